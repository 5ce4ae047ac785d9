"""Manifests -> per-subset ArrayRecord shards, in parallel, restartable, with a full error report.

Output layout under `out_dir`:

  <source>/shard-00000-of-00003.array_record        one records.encode(...) per record, in manifest
                                                    order (ArrayRecord group_size:1: random access)
  <source>/shard-00000-of-00003.done                completion marker (JSON: fingerprint, counts,
                                                    this shard's errors/warnings/token totals)
  <source>/shard-00000-of-00003.partial-<pid>       being written (renamed when complete)
  index.json      per-source record counts and shard lists, per-category token totals, error and
                  warning counts by kind, tokenizer vocab size, throughput of the last run, and
                  `provenance` (build.provenance: the tokenizer and codec that made the data)
  errors.jsonl    one line per skipped record or manifest line: manifest, line, id, source, audio,
                  kind, reason
  warnings.jsonl  records that were written but deserve a look (e.g. resampled from 44.1 kHz)

Sharding: items are grouped by source in manifest order and cut every `shard_size` items, so the
plan depends only on the manifests and the flags. A shard whose marker exists, whose fingerprint
(item list + build settings + tokenizer file hash) matches, and whose .array_record exists (or that
had no valid record) is skipped on re-run; the summary files are rebuilt from all markers each run.
Shards with zero valid records leave only a marker, no .array_record, so readers never open an
empty file. Nothing but finished shards matches `*.array_record*`, so a reader may take a source
directory as is (bagpiper_jax.data.input_pipeline does). For the same reason a re-run with another
shard_size DELETES this writer's old `shard-NNNNN-of-MMMMM.array_record` files (and markers) in the
source directories it writes, listing them in index.json `removed_stale_files`; one out_dir holds
the output of one set of manifests.

Errors are per record: an "und,gen" line whose audio is missing counts once in <category>_und and
once in <category>_gen. Manifest-level problems (bad JSON, unknown direction, ...) count once.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Optional

from array_record.python import array_record_module

from bagpiper_jax import tokenizer as tokenizer_lib
from bagpiper_jax.data import records
from data_pipeline import build as build_lib
from data_pipeline import codes as codes_lib
from data_pipeline import manifest as manifest_lib

FORMAT_VERSION = "bagpiper-records-v1"
INDEX_FILE, ERRORS_FILE, WARNINGS_FILE = "index.json", "errors.jsonl", "warnings.jsonl"
_SHARD_RE = re.compile(r"^shard-\d{5}-of-\d{5}\.(array_record|done)$")


@dataclasses.dataclass(frozen=True)
class ShardTask:
  source: str
  index: int
  count: int
  items: tuple  # of manifest_lib.Item
  path: str  # absolute .array_record path
  fingerprint: str

  @property
  def marker(self) -> str:
    return self.path[: -len(".array_record")] + ".done"

  @property
  def partial_prefix(self) -> str:
    return self.path[: -len(".array_record")] + ".partial-"


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def _file_sha(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def plan_shards(items: list, out_dir: str, settings: build_lib.BuildSettings,
                shard_size: int) -> list[ShardTask]:
  """Deterministic shards: per source (first-seen order), consecutive runs of `shard_size` items."""
  if shard_size <= 0:
    raise ValueError(f"--shard_size must be positive, got {shard_size}")
  by_source: dict[str, list] = collections.OrderedDict()
  for it in items:
    by_source.setdefault(it.source, []).append(it)
  tok_path = settings.tokenizer
  if os.path.isdir(tok_path):
    tok_path = os.path.join(tok_path, "tokenizer.json")
  base = {"format": FORMAT_VERSION, "settings": dataclasses.asdict(settings),
          "tokenizer_sha256": _file_sha(tok_path)}
  tasks = []
  for source, its in by_source.items():
    count = (len(its) + shard_size - 1) // shard_size
    for i in range(count):
      chunk = tuple(its[i * shard_size:(i + 1) * shard_size])
      h = hashlib.sha256(json.dumps(base, sort_keys=True).encode())
      for it in chunk:
        h.update(json.dumps([it.id, it.manifest, it.line, it.task, it.row], sort_keys=True).encode())
      tasks.append(ShardTask(source, i, count, chunk,
                             os.path.join(os.path.abspath(out_dir), source, shard_name(i, count)),
                             h.hexdigest()))
  return tasks


def _read_marker(task: ShardTask) -> Optional[dict]:
  """The marker of a finished shard with the same fingerprint, else None."""
  try:
    with open(task.marker) as f:
      marker = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  if marker.get("fingerprint") != task.fingerprint:
    return None
  if marker.get("num_records", 0) > 0 and not os.path.exists(task.path):
    return None
  return marker


def _atomic_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


# -- worker side ------------------------------------------------------------------------------------

_BUILDER: Optional[build_lib.Builder] = None
_DONE = None  # mp.Value: items finished, all workers
_FAILED = None  # mp.Value: items that became errors
_INIT_ERROR: Optional[BaseException] = None


def _init_worker(settings: build_lib.BuildSettings, done, failed) -> None:
  """Loads tokenizer and codec once per process. A failure is kept and raised by run_shard: an
  exception escaping a Pool initializer makes the pool respawn workers forever."""
  global _BUILDER, _DONE, _FAILED, _INIT_ERROR
  _DONE, _FAILED = done, failed
  try:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(1)  # one process per core; torch's own threads would oversubscribe
    except ImportError:
      pass
    _BUILDER = build_lib.Builder(settings)
  except Exception as e:  # pylint: disable=broad-except
    _INIT_ERROR = e


def _bump(counter, n: int = 1) -> None:
  if counter is not None:
    with counter.get_lock():
      counter.value += n


def run_shard(task: ShardTask) -> dict:
  """Builds and writes one shard (tmp file + rename), then its marker. Returns the marker."""

  if _INIT_ERROR is not None:
    raise RuntimeError(f"worker set-up failed: {type(_INIT_ERROR).__name__}: {_INIT_ERROR}")
  t0 = time.time()
  os.makedirs(os.path.dirname(task.path), exist_ok=True)
  for stale in glob.glob(glob.escape(task.partial_prefix) + "*"):  # left by a killed run
    os.remove(stale)
  tmp = f"{task.partial_prefix}{os.getpid()}"
  # Uncompressed: mel-bearing records read ~2.5x faster that way and compress by only ~8%
  # (measured with `python -m data_pipeline.bench --writer_options=...`).
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1,uncompressed")
  errors, warnings, n = [], [], 0
  stats: dict[str, dict[str, int]] = collections.defaultdict(
      lambda: {"records": 0, "text_tokens": 0, "audio_rows": 0})
  try:
    for item in task.items:
      res = _BUILDER.build(item)
      warnings += res.warnings
      if res.error is not None:
        errors.append(res.error)
        _bump(_FAILED)
      else:
        writer.write(records.encode(res.record))
        n += 1
        s = stats[item.category]
        s["records"] += 1
        s["text_tokens"] += res.text_tokens
        s["audio_rows"] += res.audio_rows
      _bump(_DONE)
  finally:
    writer.close()
  if n:
    os.replace(tmp, task.path)
  else:  # nothing valid: no empty file for readers to trip on; the marker records why
    os.remove(tmp)
    if os.path.exists(task.path):
      os.remove(task.path)
  marker = {"fingerprint": task.fingerprint, "source": task.source, "shard": os.path.basename(task.path),
            "num_items": len(task.items), "num_records": n, "errors": errors, "warnings": warnings,
            "by_category": dict(stats), "seconds": round(time.time() - t0, 3)}
  _atomic_json(task.marker, marker)
  return marker


# -- main side --------------------------------------------------------------------------------------

def _fmt_secs(s: float) -> str:
  s = int(max(0, s))
  return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
  """One status line: items done / total, items/s, ETA, errors. '\\r'-updated on a terminal."""

  def __init__(self, total: int, stream=sys.stderr, enabled: bool = True):
    self.total, self.stream, self.enabled = total, stream, enabled
    self.tty = hasattr(stream, "isatty") and stream.isatty()
    self.t0 = time.time()
    self.last = 0.0

  def update(self, done: int, failed: int, final: bool = False) -> None:
    now = time.time()
    if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
      return
    self.last = now
    dt = max(now - self.t0, 1e-9)
    rate = done / dt
    eta = _fmt_secs((self.total - done) / rate) if rate > 0 else "?"
    msg = (f"[data_pipeline.write] {done}/{self.total} items ({100.0 * done / max(self.total, 1):.1f}%) "
           f"{rate:.1f} items/s  elapsed {_fmt_secs(dt)}  ETA {eta}  skipped {failed}")
    end = "\n" if (final or not self.tty) else ""
    self.stream.write(("\r" if self.tty else "") + msg + end)
    self.stream.flush()


def _needs_codec(item) -> bool:
  if item.task == "text_to_audio":
    return True
  if item.task == "dialogue":
    return any(m["role"] == "assistant" and m["modality"] == "audio" for m in item.row["messages"])
  return False


def write_shards(manifests: Iterable[str], out_dir: str, settings: build_lib.BuildSettings, *,
                 shard_size: int = 1000, num_workers: int = 2, sft_source: str = "sft",
                 progress: bool = True, log: Callable[[str], None] = print) -> dict:
  """Builds all shards of `manifests` into `out_dir`; returns the index (also in index.json).

  Raises only for unusable settings (no manifest, tokenizer not loadable, codes needed but no
  codec); everything wrong with individual lines or files is reported and skipped.
  """
  return write_many([(manifests, out_dir)], settings, shard_size=shard_size, num_workers=num_workers,
                    sft_source=sft_source, progress=progress, log=log)[0]


def write_many(jobs: list[tuple[Iterable[str], str]], settings: build_lib.BuildSettings, *,
               shard_size: int = 1000, num_workers: int = 2, sft_source: str = "sft",
               progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
  """write_shards for several (manifests, out_dir) jobs sharing one worker pool (one start-up)."""

  t_start = time.time()
  codes_lib.check_codec_spec(settings.codec)
  vocab_size = tokenizer_lib.load_tokenizer(settings.tokenizer).vocab_size  # fail fast, main side
  plans = []
  for manifests, out_dir in jobs:
    manifests = list(manifests)
    if not manifests:
      raise ValueError(f"no --manifest given for {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    items, line_errors = manifest_lib.read_manifests(manifests, sft_source=sft_source)
    n = sum(_needs_codec(it) for it in items)
    if settings.codec == "" and n:
      raise ValueError(f"{n} records need assistant audio codes (direction 'gen' or SFT assistant "
                       "audio) but --codec is empty; pass --codec=xcodec:<dir> or --codec=npy[:<dir>]")
    tasks = plan_shards(items, out_dir, settings, shard_size)
    plans.append((manifests, out_dir, items, line_errors, tasks))

  markers: dict[str, dict] = {}
  todo = []
  for manifests, out_dir, items, line_errors, tasks in plans:
    mine = []
    for t in tasks:
      m = _read_marker(t)
      if m is None:
        mine.append(t)
      else:
        markers[t.path] = m
    todo += mine
    log(f"[data_pipeline.write] {out_dir}: {len(items)} items from {len(manifests)} manifest(s), "
        f"{len(line_errors)} bad lines; {len(tasks)} shards, {len(tasks) - len(mine)} already done, "
        f"{len(mine)} to write ({sum(len(t.items) for t in mine)} items)")
  n_todo = sum(len(t.items) for t in todo)

  bar = _Progress(n_todo, enabled=progress)
  failures: dict[str, BaseException] = {}
  t_run = time.time()
  if todo:
    # Biggest shards first, so the pool does not end waiting on one long straggler.
    todo.sort(key=lambda t: -len(t.items))
    if num_workers <= 1:
      done, failed = mp.Value("l", 0, lock=True), mp.Value("l", 0, lock=True)
      _init_worker(settings, done, failed)
      for t in todo:
        try:
          markers[t.path] = run_shard(t)
        except Exception as e:  # e.g. disk full: report, leave no marker, so a re-run retries it
          failures[t.path] = e
        bar.update(done.value, failed.value)
    else:
      ctx = mp.get_context("spawn")  # fork is unsafe once JAX/torch threads exist in the parent
      done, failed = ctx.Value("l", 0, lock=True), ctx.Value("l", 0, lock=True)
      with ctx.Pool(min(num_workers, len(todo)), initializer=_init_worker,
                    initargs=(settings, done, failed)) as pool:
        pending = [(t, pool.apply_async(run_shard, (t,))) for t in todo]
        while not all(r.ready() for _, r in pending):
          bar.update(done.value, failed.value)
          time.sleep(0.2)
        for t, r in pending:
          try:
            markers[t.path] = r.get()
          except Exception as e:
            failures[t.path] = e
    bar.update(done.value, failed.value, final=True)
  run_seconds = time.time() - t_run
  build_seconds = sum(markers[t.path]["seconds"] for t in todo if t.path in markers)

  indexes = []
  for manifests, out_dir, items, line_errors, tasks in plans:
    removed_stale = _remove_stale(tasks, out_dir, log)
    shard_failures = [(t, failures[t.path]) for t in tasks if t.path in failures]
    run = {"items_built": n_todo, "seconds": round(run_seconds, 3),
           "items_per_s": round(n_todo / run_seconds, 2) if run_seconds > 0 and n_todo else None,
           "worker_build_seconds": round(build_seconds, 3),
           "items_per_s_per_worker_excl_startup":
               round(n_todo / build_seconds, 2) if build_seconds > 0 and n_todo else None,
           "num_workers": max(num_workers, 1), "total_seconds": round(time.time() - t_start, 3)}
    index = _summarise(tasks, markers, line_errors, shard_failures, out_dir, settings, manifests,
                       vocab_size, run, removed_stale)
    errs = index["errors"]
    log(f"[data_pipeline.write] {out_dir}: {index['num_records']} records in {len(index['sources'])} "
        f"sources; {errs['total']} errors {dict(errs['by_kind'])}; {index['warnings']['total']} "
        f"warnings -> {os.path.join(out_dir, INDEX_FILE)}")
    indexes.append(index)
  if n_todo:
    log(f"[data_pipeline.write] built {n_todo} items in {run_seconds:.1f}s ({n_todo / run_seconds:.1f} "
        f"items/s incl. worker start-up; {n_todo / max(build_seconds, 1e-9):.1f} items/s per worker "
        "once started)")
  return indexes


def _remove_stale(tasks: list[ShardTask], out_dir: str, log) -> list[str]:
  """Deletes this writer's shard files/markers not in the plan, in the source dirs of the plan."""
  keep = {os.path.abspath(p) for t in tasks for p in (t.path, t.marker)}
  removed = []
  for d in sorted({os.path.dirname(t.path) for t in tasks}):
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
      p = os.path.abspath(os.path.join(d, name))
      if _SHARD_RE.match(name) and p not in keep:
        os.remove(p)
        removed.append(os.path.relpath(p, out_dir))
  if removed:
    log(f"[data_pipeline.write] removed {len(removed)} stale shard file(s) of an earlier plan "
        f"(other --shard_size or manifests): {removed[:4]}{' ...' if len(removed) > 4 else ''}")
  return removed


def _summarise(tasks, markers, line_errors, shard_failures, out_dir, settings, manifests, vocab_size,
               run, removed_stale) -> dict:
  errors = list(line_errors)
  warnings = []
  sources: dict[str, dict] = collections.OrderedDict()
  categories: dict[str, dict] = collections.defaultdict(
      lambda: {"records": 0, "text_tokens": 0, "audio_rows": 0})
  for t in tasks:
    s = sources.setdefault(t.source, {"records": 0, "shards": [], "text_tokens": 0, "audio_rows": 0,
                                      "errors": 0})
    m = markers.get(t.path)
    if m is None:
      continue
    errors += m["errors"]
    warnings += m["warnings"]
    s["records"] += m["num_records"]
    s["errors"] += len(m["errors"])
    if m["num_records"]:
      s["shards"].append(os.path.relpath(t.path, out_dir))
    for cat, st in m["by_category"].items():
      for k, v in st.items():
        categories[cat][k] += v
        if k != "records":
          s[k] += v
  for t, e in shard_failures:
    for it in t.items:
      errors.append(manifest_lib.error(it.manifest, it.line, "shard_failed",
                                       f"shard {os.path.relpath(t.path, out_dir)} failed: "
                                       f"{type(e).__name__}: {e}", item_id=it.id, source=t.source,
                                       audio=it.audio_path()))
  for c in categories.values():
    c["total_rows"] = c["text_tokens"] + c["audio_rows"]
  with open(os.path.join(out_dir, ERRORS_FILE), "w") as f:
    for e in errors:
      f.write(json.dumps(e, sort_keys=True) + "\n")
  with open(os.path.join(out_dir, WARNINGS_FILE), "w") as f:
    for w in warnings:
      f.write(json.dumps(w, sort_keys=True) + "\n")
  index = {
      "format": FORMAT_VERSION,
      "manifests": [os.path.abspath(m) for m in manifests],
      "settings": dataclasses.asdict(settings),
      "provenance": build_lib.provenance(settings),  # tokenizer + codec that made the data (release export)
      "tokenizer_vocab_size": vocab_size,
      "num_records": sum(s["records"] for s in sources.values()),
      "sources": sources,
      "categories": dict(sorted(categories.items())),
      "errors": {"total": len(errors), "by_kind": dict(collections.Counter(e["kind"] for e in errors)),
                 "file": ERRORS_FILE},
      "warnings": {"total": len(warnings),
                   "by_kind": dict(collections.Counter(w["kind"] for w in warnings)),
                   "file": WARNINGS_FILE},
      "incomplete_shards": [os.path.relpath(t.path, out_dir) for t, _ in shard_failures],
      "removed_stale_files": removed_stale,
      "last_run": run,
  }
  _atomic_json(os.path.join(out_dir, INDEX_FILE), index)
  return index
