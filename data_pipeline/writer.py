"""Inputs -> per-subset ArrayRecord shards, as an Apache Beam pipeline; restartable, deterministic,
every input line accounted for.

Runs on any Beam runner: the DirectRunner in this process and its worker processes (the default,
one worker per core), or Dataflow / Flink / Spark with the standard Beam pipeline options. Every
path (inputs, output directory, tokenizer, codec directory) may be local or gs://.

Output layout under `out_dir` (the same as the earlier multiprocessing writer):

  <source>/shard-00000-of-00003.array_record        one records.encode(...) per record, in input
                                                    order (ArrayRecord group_size:1: random access)
  <source>/shard-00000-of-00003.done                completion marker (JSON: fingerprint, counts,
                                                    this shard's errors/warnings/token totals)
  <source>/shard-00000-of-00003.partial-<pid>       being written (renamed when complete; local only)
  index.json      per-source record counts and shard lists, per-category token totals, error and
                  warning counts by kind, records dropped by the curation filters by reason,
                  tokenizer vocab size, throughput of the last run, and `provenance`
                  (build.provenance: the tokenizer and codec that made the data)
  errors.jsonl    one line per skipped record or input line: manifest (the input file), line (line,
                  parquet row or tar sample, 1-based), id, source, audio, kind, reason
  warnings.jsonl  records that were written but deserve a look (e.g. resampled from 44.1 kHz)

The pipeline:

  input files --Reshuffle--> ReadInput: per file, items + line errors + per-source item counts
  counts --> plan (a side input): per source, the first-seen order of sources, each file's offset
             in the source's item sequence, the shard count
  items --> AssignShard(plan): (source, global index // shard_size) --GroupByKey--> WriteShard
  WriteShard: a finished shard (marker with the same fingerprint) is skipped; else the shard's
             embedded / remote audio is fetched, records are built (Builder, loaded once per
             worker in DoFn.setup; codec on batches of equal-length clips), written to a local
             ArrayRecord file, published (rename / upload), then the marker is written
  markers + line errors + plan --> Summarise: index.json, errors.jsonl, warnings.jsonl, stale files

Sharding: items are numbered per source in input order (input files in the order given, then line
order), and shard k of a source holds items [k * shard_size, (k + 1) * shard_size), so the plan
depends only on the inputs and the flags, not on the runner or the number of workers. A shard
whose marker exists, whose fingerprint (item list + build settings + tokenizer file hash) matches,
and whose .array_record exists (or that had no valid record) is skipped on re-run; the summary
files are rebuilt from all markers each run. Shards with zero valid records leave only a marker,
no .array_record, so readers never open an empty file. Nothing but finished shards matches
`*.array_record*`, so a reader may take a source directory as is. A re-run with another shard_size
DELETES this writer's old `shard-NNNNN-of-MMMMM.{array_record,done}` files in the source directories
it writes, listing them in index.json `removed_stale_files`; one out_dir holds one set of inputs.

Errors are per record: an "und,gen" line whose audio is missing counts once in <category>_und and
once in <category>_gen. Input-level problems (bad JSON, unknown direction, a tar member without its
pair, ...) count once. A shard that cannot be written (disk full, ...) is listed in index.json
`incomplete_shards` with its items as `shard_failed` errors; a re-run retries it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import Callable, Iterable, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from array_record.python import array_record_module

from bagpiper_jax import tokenizer as tokenizer_lib
from bagpiper_jax.data import records
from data_pipeline import build as build_lib
from data_pipeline import codes as codes_lib
from data_pipeline import fs
from data_pipeline import hub
from data_pipeline import manifest as manifest_lib

FORMAT_VERSION = "bagpiper-records-v1"
INDEX_FILE, ERRORS_FILE, WARNINGS_FILE = "index.json", "errors.jsonl", "warnings.jsonl"
RUN_DIR = ".write_run"  # per-run scratch in out_dir (plan for progress, fatal message); removed at the end
# Uncompressed: mel-bearing records read ~2.5x faster that way and compress by only ~8%
# (measured with `python -m data_pipeline.bench --writer_options=...`).
WRITER_OPTIONS = "group_size:1,uncompressed"
PROGRESS_EVERY_S = 10.0  # the launcher's progress line
FETCH_WINDOW = 256  # items whose embedded / remote audio is fetched together (one pass per input file)
_SHARD_RE = re.compile(r"^shard-\d{5}-of-\d{5}\.(array_record|done)$")


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def marker_path(path: str) -> str:
  return path[: -len(".array_record")] + ".done"


def needs_codec(item: manifest_lib.Item) -> bool:
  if item.task == "text_to_audio":
    return True
  if item.task == "dialogue":
    return any(m["role"] == "assistant" and m["modality"] == "audio" for m in item.row["messages"])
  return False


def base_fingerprint(settings: build_lib.BuildSettings, tokenizer_sha256: str) -> dict:
  return {"format": FORMAT_VERSION, "settings": dataclasses.asdict(settings),
          "tokenizer_sha256": tokenizer_sha256}


def shard_fingerprint(base: dict, items: Iterable[manifest_lib.Item]) -> str:
  h = hashlib.sha256(json.dumps(base, sort_keys=True).encode())
  for it in items:
    h.update(json.dumps([it.id, it.manifest, it.line, it.task, it.row], sort_keys=True).encode())
  return h.hexdigest()


def tokenizer_file(path: str) -> str:
  return fs.join(path, "tokenizer.json") if not path.endswith((".json", ".model")) and (
      fs.is_remote(path) or os.path.isdir(path)) else path


@dataclasses.dataclass(frozen=True)
class Job:
  """One output directory and the input files (in order) written into it."""

  inputs: tuple
  out_dir: str


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What the workers need; picklable."""

  jobs: tuple  # of Job
  settings: build_lib.BuildSettings
  base: dict  # base_fingerprint
  shard_size: int
  sft_source: str = "sft"
  cut_segments: bool = False
  codec_device: str = "cpu"
  codec_batch_size: int = 8
  vocab_size: int = 0
  started: float = 0.0
  num_workers: Optional[int] = None
  runner: str = "DirectRunner"
  progress: bool = True  # workers print a line per shard written


# -- reading --------------------------------------------------------------------------------------------

class ReadInput(beam.DoFn):
  """One input file -> items keyed for planning; line errors and per-source counts as side outputs.

  Main output: (job, source, file, local index, item), local index counting the source's items in
  this file. "errors": (job, file, line, error). "counts": (job, file, source, n, first, n_codec),
  `first` the position of the source's first item in the file (for the sources' first-seen order).
  """

  def __init__(self, cfg: RunConfig):
    self.cfg = cfg

  def process(self, element):
    job, file_idx, path = element
    per_source: dict[str, list] = {}  # source -> [count, first position, needing codes]
    pos = 0
    last_line = 0
    try:
      for items, errors in hub.read_input(path, sft_source=self.cfg.sft_source,
                                          cut_segments=self.cfg.cut_segments):
        for e in errors:
          last_line = e["line"]
          yield beam.pvalue.TaggedOutput("errors", (job, file_idx, e["line"], e))
        for it in items:
          last_line = it.line
          c = per_source.setdefault(it.source, [0, pos, 0])
          yield (job, it.source, file_idx, c[0], it)
          c[0] += 1
          c[2] += needs_codec(it)
          pos += 1
    except Exception as e:  # pylint: disable=broad-except  (a truncated / corrupt input file: say where)
      err = manifest_lib.error(path, last_line + 1, "unreadable_input",
                               f"{path}: cannot read past line/row {last_line} ({type(e).__name__}: {e}); "
                               "the rest of this file is not in the shards")
      yield beam.pvalue.TaggedOutput("errors", (job, file_idx, last_line + 1, err))
    for source, (n, first, n_codec) in per_source.items():
      yield beam.pvalue.TaggedOutput("counts", (job, file_idx, source, n, first, n_codec))


def make_plan(counts: list, cfg: RunConfig) -> dict:
  """The shard plan of every job from the per-file counts (small: sources x files)."""
  plans = []
  for job_idx, job in enumerate(cfg.jobs):
    mine = sorted((c for c in counts if c[0] == job_idx), key=lambda c: (c[1], c[4]))
    order, offsets, totals, n_codec = [], {}, collections.Counter(), 0
    for _, file_idx, source, n, _, nc in mine:
      if source not in totals:
        order.append(source)
      offsets[(source, file_idx)] = totals[source]
      totals[source] += n
      n_codec += nc
    shards = {s: -(-totals[s] // cfg.shard_size) for s in order}
    fatal = None
    if cfg.settings.codec == "" and n_codec:
      fatal = (f"{n_codec} records need assistant audio codes (direction 'gen' or SFT assistant audio) "
               "but --codec is empty; pass --codec=xcodec:<dir> or --codec=npy[:<dir>]")
    plans.append({"order": order, "offsets": offsets, "totals": dict(totals), "shards": shards,
                  "fatal": fatal})
  return {"jobs": plans, "fatal": next((p["fatal"] for p in plans if p["fatal"]), None)}


def _write_plan_note(plan: dict, cfg: RunConfig) -> dict:
  """Writes the run's plan summary (for the launcher's progress line, or its fatal message)."""
  for job, p in zip(cfg.jobs, plan["jobs"]):
    fs.write_json(fs.join(job.out_dir, RUN_DIR, "plan.json"),
                  {"items": sum(p["totals"].values()), "shards": sum(p["shards"].values()),
                   "fatal": plan["fatal"]})
  return plan


def assign_shard(element, plan: dict, shard_size: int):
  job, source, file_idx, local, item = element
  g = plan["jobs"][job]["offsets"][(source, file_idx)] + local
  return (job, source, g // shard_size), (g, item)


# -- writing --------------------------------------------------------------------------------------------

class ShardWriter:
  """Builds and writes shards; holds the Builder (tokenizer, codec), loaded once."""

  def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print):
    self.cfg = cfg
    self.log = log
    settings = cfg.settings
    if fs.is_remote(settings.tokenizer) or fs.is_remote(settings.codec.partition(":")[2]):
      local = tempfile.mkdtemp(prefix="bagpiper_models_")
      kind, _, arg = settings.codec.partition(":")
      settings = dataclasses.replace(
          settings, tokenizer=fs.localize(settings.tokenizer, local),
          codec=f"{kind}:{fs.localize(arg, local)}" if arg and fs.is_remote(arg) else settings.codec)
    self.builder = build_lib.Builder(settings, codec_device=cfg.codec_device,
                                     codec_batch_size=cfg.codec_batch_size)

  def write(self, path: str, source: str, items: list, fingerprint: str) -> dict:
    """Builds and writes one shard (local tmp file, then rename / upload), then its marker."""
    t0 = time.time()
    if not fs.is_remote(path):
      d, prefix = os.path.dirname(path), os.path.basename(path)[: -len(".array_record")] + ".partial-"
      os.makedirs(d, exist_ok=True)
      for name in os.listdir(d):  # left by a killed run
        if name.startswith(prefix):
          os.remove(os.path.join(d, name))
    tmp = fs.local_tmp_for(path, str(os.getpid()))
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    errors, warnings, n = [], [], 0
    stats: dict[str, dict[str, int]] = collections.defaultdict(
        lambda: {"records": 0, "text_tokens": 0, "audio_rows": 0})
    step = self.cfg.codec_batch_size
    try:
      for w in range(0, len(items), FETCH_WINDOW):
        window = items[w:w + FETCH_WINDOW]
        blobs = hub.fetch_audio(window)
        for c in range(0, len(window), step):
          chunk = window[c:c + step]
          for item, res in zip(chunk, self.builder.build_many(chunk, blobs)):
            warnings += res.warnings
            if res.error is not None:
              errors.append(res.error)
              continue
            writer.write(records.encode(res.record))
            n += 1
            s = stats[item.category]
            s["records"] += 1
            s["text_tokens"] += res.text_tokens
            s["audio_rows"] += res.audio_rows
    finally:
      writer.close()
    if n:
      fs.publish(tmp, path)
    else:  # nothing valid: no empty file for readers to trip on; the marker records why
      os.remove(tmp)
      if fs.exists(path):
        fs.delete([path])
    marker = {"fingerprint": fingerprint, "source": source, "shard": fs.basename(path),
              "num_items": len(items), "num_records": n, "errors": errors, "warnings": warnings,
              "by_category": dict(stats), "seconds": round(time.time() - t0, 3)}
    fs.write_json(marker_path(path), marker)
    return marker


def read_marker(path: str, fingerprint: str) -> Optional[dict]:
  """The marker of a finished shard with the same fingerprint, else None."""
  marker = fs.read_json(marker_path(path))
  if not isinstance(marker, dict) or marker.get("fingerprint") != fingerprint:
    return None
  if marker.get("num_records", 0) > 0 and not fs.exists(path):
    return None
  return marker


class WriteShard(beam.DoFn):
  """((job, source, shard), [(index, item)]) -> (job, source, shard, status, marker or failure)."""

  def __init__(self, cfg: RunConfig):
    self.cfg = cfg
    self.writer: Optional[ShardWriter] = None

  def setup(self):
    self.writer = ShardWriter(self.cfg)  # tokenizer, codec: once per worker

  def process(self, element, plan):
    (job, source, idx), values = element
    if plan["fatal"]:
      return
    items = [it for _, it in sorted(values, key=lambda v: v[0])]
    count = plan["jobs"][job]["shards"][source]
    out_dir = self.cfg.jobs[job].out_dir
    path = fs.join(out_dir, source, shard_name(idx, count))
    fp = shard_fingerprint(self.cfg.base, items)
    marker = read_marker(path, fp)
    if marker is not None:
      yield job, source, idx, "skipped", marker
      return
    try:
      marker = self.writer.write(path, source, items, fp)
    except Exception as e:  # pylint: disable=broad-except  (disk full...: reported; a re-run retries)
      failure = {"path": path, "reason": f"{type(e).__name__}: {e}",
                 "items": [(it.manifest, it.line, it.id, it.audio_path()) for it in items]}
      yield job, source, idx, "failed", failure
      return
    if self.cfg.progress:
      print(f"[data_pipeline.write] {fs.relative(path, out_dir)}: {marker['num_records']}/{len(items)} "
            f"records in {marker['seconds']:.1f}s", flush=True)
    yield job, source, idx, "built", marker


# -- summary --------------------------------------------------------------------------------------------

def _remove_stale(planned: set, source_dirs: list, out_dir: str) -> list[str]:
  """Deletes this writer's shard files/markers not in the plan, in the source dirs of the plan."""
  removed = []
  for d in sorted(source_dirs):
    for p in fs.match(fs.join(d, "shard-*")):
      if _SHARD_RE.match(fs.basename(p)) and p not in planned:
        fs.delete([p])
        removed.append(fs.relative(p, out_dir))
  return removed


def summarise(job: Job, plan: dict, outcomes: list, line_errors: list, cfg: RunConfig) -> dict:
  """Writes index.json, errors.jsonl, warnings.jsonl of one job; returns the index."""
  out_dir = job.out_dir
  order = {s: i for i, s in enumerate(plan["order"])}
  outcomes = sorted(outcomes, key=lambda o: (order[o[0]], o[1]))
  errors = [e for _, _, e in sorted(line_errors, key=lambda x: (x[0], x[1]))]
  warnings, failures = [], []
  sources: dict[str, dict] = {s: {"records": 0, "shards": [], "text_tokens": 0, "audio_rows": 0,
                                  "errors": 0} for s in plan["order"]}
  categories: dict[str, dict] = collections.defaultdict(
      lambda: {"records": 0, "text_tokens": 0, "audio_rows": 0})
  planned, built, skipped, items_built, build_seconds = set(), 0, 0, 0, 0.0
  for source, idx in ((s, i) for s in plan["order"] for i in range(plan["shards"][s])):
    path = fs.join(out_dir, source, shard_name(idx, plan["shards"][source]))
    planned |= {path, marker_path(path)}
  for source, idx, status, m in outcomes:
    if status == "failed":
      failures.append((source, m))
      continue
    if status == "built":
      built += 1
      items_built += m["num_items"]
      build_seconds += m["seconds"]
    else:
      skipped += 1
    s = sources[source]
    errors += m["errors"]
    warnings += m["warnings"]
    s["records"] += m["num_records"]
    s["errors"] += len(m["errors"])
    if m["num_records"]:
      s["shards"].append(fs.relative(fs.join(out_dir, source, m["shard"]), out_dir))
    for cat, st in m["by_category"].items():
      for k, v in st.items():
        categories[cat][k] += v
        if k != "records":
          s[k] += v
  for source, f in failures:
    rel = fs.relative(f["path"], out_dir)
    for manifest, line, item_id, audio in f["items"]:
      errors.append(manifest_lib.error(manifest, line, "shard_failed", f"shard {rel} failed: {f['reason']}",
                                       item_id=item_id, source=source, audio=audio))
  for c in categories.values():
    c["total_rows"] = c["text_tokens"] + c["audio_rows"]
  removed_stale = _remove_stale(planned, [fs.join(out_dir, s) for s in plan["order"]], out_dir)
  for name, rows in ((ERRORS_FILE, errors), (WARNINGS_FILE, warnings)):
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    fs.write_bytes(fs.join(out_dir, name), text.encode())
  seconds = time.time() - cfg.started
  filtered = collections.Counter(e["kind"][len("filter_"):] for e in errors
                                 if e["kind"].startswith("filter_"))
  index = {
      "format": FORMAT_VERSION,
      "manifests": list(job.inputs),
      "settings": dataclasses.asdict(cfg.settings),
      "tokenizer_vocab_size": cfg.vocab_size,
      "provenance": build_lib.provenance(cfg.settings),  # tokenizer + codec that made the data (release export)
      "num_records": sum(s["records"] for s in sources.values()),
      "sources": sources,
      "categories": dict(sorted(categories.items())),
      "errors": {"total": len(errors), "by_kind": dict(collections.Counter(e["kind"] for e in errors)),
                 "file": ERRORS_FILE},
      "warnings": {"total": len(warnings),
                   "by_kind": dict(collections.Counter(w["kind"] for w in warnings)),
                   "file": WARNINGS_FILE},
      "filtered": {"total": sum(filtered.values()), "by_reason": dict(filtered)},
      "incomplete_shards": [fs.relative(f["path"], out_dir) for _, f in failures],
      "removed_stale_files": removed_stale,
      "last_run": {
          "runner": cfg.runner, "num_workers": cfg.num_workers,
          "shards_built": built, "shards_skipped": skipped, "items_built": items_built,
          "seconds": round(seconds, 3),
          "items_per_s": round(items_built / seconds, 2) if seconds > 0 and items_built else None,
          "worker_build_seconds": round(build_seconds, 3),
          "items_per_s_per_worker_excl_startup":
              round(items_built / build_seconds, 2) if build_seconds > 0 and items_built else None},
  }
  fs.write_json(fs.join(out_dir, INDEX_FILE), index)
  return index


def _clear_scratch(out_dir: str) -> None:
  fs.delete(fs.match(fs.join(out_dir, RUN_DIR, "*")))
  if not fs.is_remote(out_dir):
    try:
      os.rmdir(os.path.join(out_dir, RUN_DIR))
    except OSError:
      pass


class Summarise(beam.DoFn):
  """Runs once, after every shard: the summary files of every job; the run's scratch removed."""

  def __init__(self, cfg: RunConfig):
    self.cfg = cfg

  def process(self, _, plan, outcomes, line_errors):
    for j, job in enumerate(self.cfg.jobs):
      if not plan["fatal"]:
        summarise(job, plan["jobs"][j], [o[1:] for o in outcomes if o[0] == j],
                  [e[1:] for e in line_errors if e[0] == j], self.cfg)
        _clear_scratch(job.out_dir)
    yield None


def build_pipeline(p: beam.Pipeline, cfg: RunConfig) -> None:
  """Adds the writer's transforms to `p` (see the module docstring)."""
  files = [(j, f, path) for j, job in enumerate(cfg.jobs) for f, path in enumerate(job.inputs)]
  read = (p | "InputFiles" >> beam.Create(files) | "SpreadFiles" >> beam.Reshuffle()
          | "ReadInput" >> beam.ParDo(ReadInput(cfg)).with_outputs("errors", "counts", main="items"))
  plan = (read.counts | "AllCounts" >> beam.combiners.ToList()
          | "Plan" >> beam.Map(lambda counts: _write_plan_note(make_plan(counts, cfg), cfg)))
  plan_si = beam.pvalue.AsSingleton(plan)
  outcomes = (read.items
              | "AssignShard" >> beam.Map(assign_shard, plan=plan_si, shard_size=cfg.shard_size)
              | "GroupShards" >> beam.GroupByKey()
              | "WriteShard" >> beam.ParDo(WriteShard(cfg), plan=plan_si))
  _ = (p | "Once" >> beam.Create([None])
       | "Summarise" >> beam.ParDo(Summarise(cfg), plan=plan_si, outcomes=beam.pvalue.AsList(outcomes),
                                   line_errors=beam.pvalue.AsList(read.errors)))


# -- launcher -------------------------------------------------------------------------------------------

def pipeline_options(args: Optional[list] = None, *, num_workers: Optional[int] = None) -> PipelineOptions:
  """Beam options from command-line style `args`; DirectRunner defaults: one worker per core.

  `num_workers` (or Beam's --num_workers, a Dataflow flag) sets --direct_num_workers on the
  DirectRunner when that is not given; 1 (or 0) worker runs in this process.
  """
  opts = PipelineOptions(flags=list(args or []))
  std = opts.view_as(StandardOptions)
  if std.runner in (None, "DirectRunner", "direct"):
    all_opts = opts.get_all_options(drop_default=True)
    given = max(num_workers, 1) if num_workers is not None else None
    workers = all_opts.get("direct_num_workers") or given or all_opts.get("num_workers") or os.cpu_count()
    mode = all_opts.get("direct_running_mode") or ("multi_processing" if workers > 1 else "in_memory")
    opts = PipelineOptions(flags=list(args or []), direct_num_workers=workers, direct_running_mode=mode,
                           default_sdk_harness_log_level="ERROR")
  return opts


def _workers(opts: PipelineOptions) -> tuple[str, Optional[int]]:
  all_opts = opts.get_all_options()
  runner = all_opts.get("runner") or "DirectRunner"
  if runner in ("DirectRunner", "direct"):
    return "DirectRunner", all_opts.get("direct_num_workers")
  return runner, all_opts.get("num_workers")


class _ProgressThread(threading.Thread):
  """Launcher-side progress line: shard markers in the output directories vs the run's plan."""

  def __init__(self, cfg: RunConfig, every: float = 10.0):
    super().__init__(daemon=True)
    self.cfg, self.stream, self.every = cfg, sys.stderr, every
    self.stop = threading.Event()

  def run(self):
    t0, first = time.time(), None
    while not self.stop.wait(self.every):
      notes = [fs.read_json(fs.join(j.out_dir, RUN_DIR, "plan.json")) for j in self.cfg.jobs]
      if not all(notes):
        self.stream.write(f"[data_pipeline.write] reading inputs ({time.time() - t0:.0f}s)\n")
        continue
      total = sum(n["shards"] for n in notes)
      done = sum(len(fs.match(fs.join(j.out_dir, "*", "shard-*.done"))) for j in self.cfg.jobs)
      done = min(done, total)
      first = (time.time(), done) if first is None else first
      rate = (done - first[1]) / max(time.time() - first[0], 1e-9)
      eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
      self.stream.write(f"[data_pipeline.write] {done}/{total} shards ({sum(n['items'] for n in notes)} "
                        f"items), {rate * 60:.1f} shards/min, elapsed {time.time() - t0:.0f}s, ETA {eta}\n")
      self.stream.flush()


def write_many(jobs: list[tuple[Iterable[str], str]], settings: build_lib.BuildSettings, *,
               shard_size: int = 1000, num_workers: Optional[int] = None, sft_source: str = "sft",
               progress: bool = True, log: Callable[[str], None] = print, codec_device: str = "cpu",
               codec_batch_size: int = 8, cut_segments: bool = False,
               pipeline_args: Optional[list] = None) -> list[dict]:
  """Writes the shards of several (input files, out_dir) jobs in ONE pipeline; returns their indexes.

  Raises before any work for unusable settings (no input, an input missing or of unknown kind, an
  unwritable out_dir, tokenizer not loadable, a bad --codec); everything wrong with individual
  lines, rows or files is reported and skipped. Raises after reading (before building) when
  records need codes and --codec is empty.
  """
  t0 = time.time()
  if shard_size <= 0:
    raise ValueError(f"--shard_size must be positive, got {shard_size}")
  codes_lib.check_codec_spec(settings.codec)
  if codec_device not in codes_lib.CODEC_DEVICES:
    raise ValueError(f"--codec_device {codec_device!r}: expected one of {codes_lib.CODEC_DEVICES}")
  tok_file = tokenizer_file(settings.tokenizer)
  if not fs.exists(tok_file):
    raise ValueError(f"--tokenizer {settings.tokenizer}: no such file")
  with fs.local_copy(tok_file) as local_tok:
    vocab_size = tokenizer_lib.load_tokenizer(local_tok).vocab_size  # fail fast, launcher side
  base = base_fingerprint(settings, hashlib.sha256(fs.read_bytes(tok_file)).hexdigest())
  checked = []
  for inputs, out_dir in jobs:
    inputs = [fs.absolute(p) for p in inputs]
    if not inputs:
      raise ValueError(f"no --manifest given for {out_dir}")
    for path in inputs:
      if hub.input_kind(path) is None:
        raise ValueError(f"--manifest {path}: unknown kind of input (expected .jsonl[.gz|.zst], .parquet, "
                         ".tar[.gz|.zst] or .tgz)")
      if not fs.exists(path):
        raise ValueError(f"--manifest {path}: no such file")
      if hub.input_kind(path) != "jsonl" and settings.codec.startswith("npy"):
        raise ValueError(f"--manifest {path}: audio embedded in a {hub.input_kind(path)} file has no file "
                         "name to find precomputed .npy codes by; use --codec=xcodec:<dir>")
    out_dir = fs.absolute(out_dir)
    try:
      fs.makedirs(out_dir)
      probe = fs.join(out_dir, RUN_DIR, f"probe-{os.getpid()}")
      fs.write_bytes(probe, b"")
      fs.delete([probe])
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"--out_dir {out_dir}: not writable ({type(e).__name__}: {e})") from e
    checked.append(Job(tuple(inputs), out_dir))

  opts = pipeline_options(pipeline_args, num_workers=num_workers)
  runner, workers = _workers(opts)
  cfg = RunConfig(jobs=tuple(checked), settings=settings, base=base, shard_size=shard_size,
                  sft_source=sft_source, cut_segments=cut_segments, codec_device=codec_device,
                  codec_batch_size=codec_batch_size, vocab_size=vocab_size, started=t0,
                  num_workers=workers, runner=runner, progress=progress)
  for job in checked:
    log(f"[data_pipeline.write] {job.out_dir}: {len(job.inputs)} input file(s); runner {runner}"
        + (f", {workers} worker(s)" if workers else ""))
  bar = _ProgressThread(cfg, PROGRESS_EVERY_S) if progress else None
  if bar:
    bar.start()
  beam_log = logging.getLogger("apache_beam")
  level = beam_log.level
  beam_log.setLevel(max(level, logging.WARNING))  # runner start-up chatter; our own lines say what matters
  try:
    p = beam.Pipeline(options=opts)
    build_pipeline(p, cfg)
    p.run().wait_until_finish()
  finally:
    beam_log.setLevel(level)
    if bar:
      bar.stop.set()
  indexes = []
  for job in checked:
    note = fs.read_json(fs.join(job.out_dir, RUN_DIR, "plan.json"))
    if note and note.get("fatal"):
      _clear_scratch(job.out_dir)
      raise ValueError(note["fatal"])
    index = fs.read_json(fs.join(job.out_dir, INDEX_FILE))
    errs, run = index["errors"], index["last_run"]
    log(f"[data_pipeline.write] {job.out_dir}: {index['num_records']} records in {len(index['sources'])} "
        f"sources; {errs['total']} errors {dict(errs['by_kind'])}; {index['warnings']['total']} warnings; "
        f"{run['shards_built']} shards written, {run['shards_skipped']} already done -> "
        f"{fs.join(job.out_dir, INDEX_FILE)}")
    indexes.append(index)
  built = sum(i["last_run"]["items_built"] for i in indexes)
  secs = time.time() - t0
  if built:
    wsecs = sum(i["last_run"]["worker_build_seconds"] for i in indexes)
    log(f"[data_pipeline.write] built {built} items in {secs:.1f}s ({built / secs:.1f} items/s incl. "
        f"start-up; {built / max(wsecs, 1e-9):.1f} items/s per worker once started)")
  return indexes


def write_shards(inputs: Iterable[str], out_dir: str, settings: build_lib.BuildSettings, **kw) -> dict:
  """write_many for one job."""
  return write_many([(inputs, out_dir)], settings, **kw)[0]
