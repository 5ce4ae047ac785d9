"""The engine the Beam pipeline replaced: one machine, a multiprocessing pool over shards.

Kept ONLY as the peer of the throughput benchmark (data_pipeline/write_bench.py) and of the
same-output test (tests/test_data_writer_beam.py); not a user entry point (use
data_pipeline.write). It does the same work with the same pieces as data_pipeline.writer (the
shard plan arithmetic, writer.ShardWriter for every shard, writer.summarise) but plans on the
launcher from fully read JSONL manifests and runs the shards on `num_workers` processes, biggest
shards first. Its output is that of data_pipeline.writer, byte for byte.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from typing import Iterable, Optional

from bagpiper_jax import tokenizer as tokenizer_lib
from data_pipeline import build as build_lib
from data_pipeline import codes as codes_lib
from data_pipeline import fs
from data_pipeline import manifest as manifest_lib
from data_pipeline import writer

_WRITER: Optional[writer.ShardWriter] = None


def _init_worker(cfg: writer.RunConfig) -> None:
  global _WRITER
  _WRITER = writer.ShardWriter(cfg, log=lambda s: None)


def _run(task: tuple) -> tuple:
  source, idx, path, items, fp = task
  marker = writer.read_marker(path, fp)
  if marker is not None:
    return source, idx, "skipped", marker
  try:
    return source, idx, "built", _WRITER.write(path, source, items, fp)
  except Exception as e:  # pylint: disable=broad-except  (reported as the Beam writer does)
    return source, idx, "failed", {"path": path, "reason": f"{type(e).__name__}: {e}",
                                   "items": [(it.manifest, it.line, it.id, it.audio_path()) for it in items]}


def write_shards(manifests: Iterable[str], out_dir: str, settings: build_lib.BuildSettings, *,
                 shard_size: int = 1000, num_workers: int = 2, sft_source: str = "sft",
                 codec_batch_size: int = 8, progress: bool = False) -> dict:
  """Same arguments and output as writer.write_shards (JSONL inputs, local paths)."""
  del progress
  t0 = time.time()
  codes_lib.check_codec_spec(settings.codec)
  tok = writer.tokenizer_file(settings.tokenizer)
  vocab = tokenizer_lib.load_tokenizer(tok).vocab_size
  base = writer.base_fingerprint(settings, hashlib.sha256(fs.read_bytes(tok)).hexdigest())
  manifests = [os.path.abspath(m) for m in manifests]
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  items, line_errors = manifest_lib.read_manifests(manifests)
  n_codec = sum(map(writer.needs_codec, items))
  if settings.codec == "" and n_codec:
    raise ValueError(f"{n_codec} records need assistant audio codes but --codec is empty")
  by_source: dict[str, list] = {}
  for it in items:
    by_source.setdefault(it.source, []).append(it)
  plan = {"order": list(by_source), "shards": {}}
  tasks = []
  for source, its in by_source.items():
    count = -(-len(its) // shard_size)
    plan["shards"][source] = count
    for i in range(count):
      chunk = its[i * shard_size:(i + 1) * shard_size]
      tasks.append((source, i, os.path.join(out_dir, source, writer.shard_name(i, count)), chunk,
                    writer.shard_fingerprint(base, chunk)))
  workers = max(int(num_workers), 1)
  cfg = writer.RunConfig(jobs=(writer.Job(tuple(manifests), out_dir),), settings=settings, base=base,
                         shard_size=shard_size, sft_source=sft_source, codec_batch_size=codec_batch_size,
                         vocab_size=vocab, started=t0, num_workers=workers, runner="multiprocessing.Pool")
  tasks.sort(key=lambda t: -len(t[3]))  # biggest first: the pool does not end on one straggler
  if workers == 1:
    _init_worker(cfg)
    outcomes = [_run(t) for t in tasks]
  else:
    with mp.get_context("spawn").Pool(min(workers, max(len(tasks), 1)), _init_worker, (cfg,)) as pool:
      outcomes = pool.map(_run, tasks, chunksize=1)
  errors = [(manifests.index(e["manifest"]), e["line"], e) for e in line_errors]
  return writer.summarise(cfg.jobs[0], plan, outcomes, errors, cfg)
