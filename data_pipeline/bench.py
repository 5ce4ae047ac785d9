r"""Input-pipeline throughput: synthetic ArrayRecord shards -> template -> pack -> batch.

  python -m data_pipeline.bench                       # 8B vocab, seq_len 8192, 32 windows
  python -m data_pipeline.bench --num_workers=2 --seconds=30

Writes one source per pretraining subset (docs/data.md#pretraining-data) (config_lib.PRETRAIN_MIXTURE weights, equal
record counts, so the document mix follows the sampling factors) into a temporary directory:
  *_und: user audio (log-mel [128, T], T ~ U[500, 3000] frames = 5..30 s) -> assistant caption
  *_gen: user caption -> assistant X-Codec codes [T, 8], T ~ U[250, 1500] frames (5..30 s)
  text_only: one assistant text of 200..4000 tokens
then times make_train_iterator on it and prints packed tokens/s for this host, against the 20k
tokens/s an 8B v5p host (4 chips) consumes at 50% MFU and the 200k target.

The synthetic generators (data_pipeline/synthetic_records.py) are also what the tests write shards with.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import tempfile
import time

import numpy as np
from absl import app, flags

from bagpiper_jax import config_lib
from bagpiper_jax.data import input_pipeline as pipeline
from bagpiper_jax.data import records
from bagpiper_jax.data import template
from bagpiper_jax.model.config import ModelConfig
from data_pipeline.synthetic_records import WRITER_OPTIONS, write_pretrain_sources

# An 8B v5p host: 4 chips x 459 TFLOP/s x 50% MFU / (6 x 8.27e9 FLOP per token) ~= 18.5k tokens/s.
HOST_NEED_TOKENS_PER_S = 20_000
_DATA_DEFAULTS = config_lib.base_config("pretrain").data
TARGET_TOKENS_PER_S = 200_000
# --------------------------------------------------------------------------------------------
# Benchmark.


def bench_config(sources, *, seq_len: int, max_audio_windows: int, num_workers: int, read_threads: int,
                 packing_bins: int):
  c = config_lib.base_config("pretrain")
  c.data.train_sources = sources
  c.data.seq_len = seq_len
  c.data.max_audio_windows = max_audio_windows
  c.data.num_workers = num_workers
  c.data.read_threads = read_threads
  c.data.packing_bins = packing_bins
  return c


def measure(it, *, seconds: float, warmup_batches: int) -> dict[str, float]:
  for _ in range(warmup_batches):
    next(it)
  tokens = cells = batches = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    seg = b["segment_ids"]
    tokens += int(np.count_nonzero(seg))
    cells += seg.size
    batches += 1
  dt = time.perf_counter() - t0
  return {"tokens_per_s": tokens / dt, "batches_per_s": batches / dt, "fill": tokens / max(cells, 1),
          "batches": batches, "seconds": dt}


def stage_costs(sources, cfg, n: int = 50) -> None:
  """Single-threaded microseconds per document of read / decode / template, per source kind."""
  for kind in ("und", "gen", "text_only"):
    name = next(k for k in sorted(sources) if k.endswith(kind))
    src = pipeline.ShardSource(name, pipeline.shard_paths(name, sources[name]["path"]))
    m = min(n, len(src))
    src[0]  # open the reader
    t0 = time.perf_counter()
    raw = [src[i][0] for i in range(m)]
    t1 = time.perf_counter()
    exs = [records.decode(r) for r in raw]
    t2 = time.perf_counter()
    out = [template.template_example(e, cfg) for e in exs]
    t3 = time.perf_counter()
    rows = sum(len(o["input_ids"]) for o in out) / m
    print(f"  {name:10s} read {(t1 - t0) / m * 1e6:6.0f} us  decode {(t2 - t1) / m * 1e6:6.0f} us  "
          f"template {(t3 - t2) / m * 1e6:6.0f} us  per doc; {rows:.0f} rows/doc, "
          f"{sum(map(len, raw)) / m / 1e3:.0f} kB/record")


def main(argv):
  del argv
  f = flags.FLAGS
  root = os.path.join(f.data_dir or tempfile.mkdtemp(prefix="bagpiper_bench_"),
                      f"{f.records_per_source}x{f.shards_per_source}_"
                      f"{f.writer_options.replace(':', '-').replace(',', '_')}")
  marker = os.path.join(root, "DONE")
  t0 = time.perf_counter()
  if os.path.exists(marker):
    sources = {n: {"path": os.path.join(root, n), "weight": w} for n, w in config_lib.PRETRAIN_MIXTURE.items()}
    print(f"reusing synthetic shards in {root}")
  else:
    sources = write_pretrain_sources(root, f.records_per_source, f.shards_per_source,
                                     options=f.writer_options)
    open(marker, "w").close()
    size = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(root) for fn in fns)
    print(f"wrote {len(sources)} sources x {f.records_per_source} records ({size / 2**20:.0f} MiB) "
          f"to {root} in {time.perf_counter() - t0:.1f}s")
  config = bench_config(sources, seq_len=f.seq_len, max_audio_windows=f.max_audio_windows,
                        num_workers=f.num_workers, read_threads=f.read_threads,
                        packing_bins=f.packing_bins)
  cfg = ModelConfig()  # 8B vocabulary layout; no parameters are built.
  if f.stages:
    print("stage costs (single thread):")
    stage_costs(sources, cfg)
  it = pipeline.make_train_iterator(config, cfg, rows=f.host_batch, process_index=0, process_count=1)
  if f.profile:
    prof = cProfile.Profile()
    prof.enable()
  r = measure(it, seconds=f.seconds, warmup_batches=f.warmup_batches)
  if f.profile:
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
  stats = pipeline.pipeline_stats(it)
  if hasattr(it, "close"):
    it.close()
  print(f"settings: seq_len={f.seq_len} max_audio_windows={f.max_audio_windows} host_batch={f.host_batch} "
        f"num_workers={f.num_workers} read_threads={f.read_threads} packing_bins={f.packing_bins} "
        f"writer_options={f.writer_options} "
        f"cpus={os.cpu_count()}")
  print(f"packed tokens/s per host: {r['tokens_per_s']:,.0f}  ({r['batches']} batches in {r['seconds']:.1f}s, "
        f"fill {r['fill']:.3f})")
  print(f"  x{r['tokens_per_s'] / HOST_NEED_TOKENS_PER_S:.1f} of the {HOST_NEED_TOKENS_PER_S:,} tokens/s an 8B "
        f"v5p host needs at 50% MFU; x{r['tokens_per_s'] / TARGET_TOKENS_PER_S:.2f} of the "
        f"{TARGET_TOKENS_PER_S:,} target")
  print(f"  docs dropped: {stats['docs_dropped']} (too long {stats.get('docs_dropped_too_long', 0)}, "
        f"audio windows {stats.get('docs_dropped_audio_windows', 0)}); docs by source {stats['docs_by_source']}")


def _define_flags():
  flags.DEFINE_string("data_dir", "", "where to write (or reuse) the synthetic shards; default a new tmp dir")
  flags.DEFINE_integer("records_per_source", 200, "synthetic records per source (repeated as epochs)")
  flags.DEFINE_integer("shards_per_source", 4, "ArrayRecord shards per source")
  flags.DEFINE_string("writer_options", WRITER_OPTIONS, "ArrayRecordWriter options of the synthetic shards")
  flags.DEFINE_integer("seq_len", 8192, "packed row length")
  flags.DEFINE_integer("max_audio_windows", 32, "encoder windows per row")
  flags.DEFINE_integer("host_batch", 4, "rows per host batch (v5p host: 4 chips x 1)")
  flags.DEFINE_integer("num_workers", 0, "grain mp_prefetch worker processes (0 = in process)")
  flags.DEFINE_integer("read_threads", _DATA_DEFAULTS.read_threads, "threads reading + templating records")
  flags.DEFINE_integer("packing_bins", _DATA_DEFAULTS.packing_bins, "best-fit bins per packing round")
  flags.DEFINE_float("seconds", 20.0, "measurement time")
  flags.DEFINE_integer("warmup_batches", 4, "batches before timing starts")
  flags.DEFINE_bool("stages", True, "print single-threaded read/decode/template costs per document kind")
  flags.DEFINE_bool("profile", False, "cProfile the measured loop (in-process part only)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
