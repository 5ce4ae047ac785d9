"""The Grain input pipeline of training and eval: ArrayRecord shards -> packed batches.

Train (`make_train_iterator`): the global batch is cut into data slots (bagpiper_jax/data/slots.py;
slot s = global rows [s*R, (s+1)*R), R = config.data.rows_per_slot) and each slot is a pipeline
of its own. Per slot s of S, per source in config.data.train_sources:

  ArrayRecord shards (glob, or a directory of *.array_record*; opened once per host)
    -> global shuffle (seed = config.data.shuffle_seed folded with the source name; reshuffled
       every epoch by Grain's epoch-aware index shuffle) -> repeat forever
    -> the slot's share: elements s, s + S, s + 2S, ... of that stream, so slots read disjoint
       records and together cover each epoch exactly once
    -> decode + template (bagpiper_jax.data.template) at load time
  then: weighted mixture of the sources (Grain's deterministic proportional interleave)
    -> drop + count documents over the row budgets -> best-fit packing (seed folded with the slot)
    -> batches of R rows -> optional multiprocess prefetch (config.data.num_workers per slot).
A host's batch is its slots' batches in slot order (`slots.SlotIterator`). Nothing in a slot depends
on the host count, so the global batches are the same on any number of hosts, and a checkpoint
saved on P hosts resumes exactly on P' hosts (same S).

Eval (`make_eval_iterator`): the sources of config.data.eval_sources concatenated in sorted name
order, each in record order, host-sharded (elements p, p + P, ...), no shuffle, no mixing weights,
finite. Eval is never checkpointed, so it needs no slots.

Mixture weights are *sampling factors* (docs/data.md#pretraining-data) by default (config.data.mixture_weighting =
"factor"): a source's share of the documents is weight x its record count, so weight 3.15 means
"sample each music_und record 3.15 times as often as a weight-1 record". Set "proportion" to make
the weights the documents' shares directly.

Slot iterators are Grain DatasetIterators: `get_state()` returns a JSON-serialisable dict and
`set_state()` restores it, also in a fresh process (same config and num_workers).
`pipeline_stats(it)` reads the drop/pack counters out of that state.

Prefetch workers (config.data.num_workers = W) belong to a slot: W > 0 runs the slot's pipeline in
W Grain worker processes (a host runs slots x W of them). W = 1 gives the same batches as W = 0;
W >= 2 splits the slot's records over its workers, which changes (deterministically) what the slot
yields, so W is part of the stream's signature. Read threads and buffer are per host, split
evenly over its slots (they never change the batches).

config.data keys besides the sources (defaults in config_lib.base_config, the one place): seq_len,
max_audio_windows, shuffle_seed, rows_per_slot, num_workers, template, packing_bins, read_threads,
read_buffer, mixture_weighting. Grain's prefetch workers import this module; the caller says
which slots this process feeds and how many rows each has.
"""

from __future__ import annotations

import bisect
import glob as glob_lib
import os
import zlib
from typing import Any

import grain
import numpy as np
from absl import flags
from etils import epath

from bagpiper_jax.data import packing
from bagpiper_jax.data import records
from bagpiper_jax.data import slots as slots_lib
from bagpiper_jax.data import template
from bagpiper_jax.model.config import ModelConfig

MIXTURE_WEIGHTINGS = ("factor", "proportion")
TEMPLATES = ("pretrain", "sft")


# ---------------------------------------------------------------------------------------------
# Config helpers.


def _check_process(process_index: int, process_count: int) -> tuple[int, int]:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def _source_specs(sources, key: str) -> dict[str, dict[str, Any]]:
  """{name: {path, weight}} from the config, validated; names sorted for a stable order."""
  if not sources:
    raise ValueError(f"config.data.{key} is empty: give {{name: dict(path=<glob or dir>, weight=<float>)}}"
                     " (or set config.data.demo to generate the demo data)")
  out = {}
  for name in sorted(sources):
    spec = sources[name]
    path = spec if isinstance(spec, str) else spec.get("path", None)
    if not path:
      raise ValueError(f"config.data.{key}[{name!r}] has no 'path'")
    weight = 1.0 if isinstance(spec, str) else float(spec.get("weight", 1.0))
    if weight < 0:
      raise ValueError(f"config.data.{key}[{name!r}].weight must be >= 0, got {weight}")
    out[name] = {"path": str(path), "weight": weight}
  return out


# ---------------------------------------------------------------------------------------------
# Sources.


def shard_paths(name: str, pattern: str) -> list[str]:
  """Sorted shard files of one source: a glob, a directory (its *.array_record* files) or a file."""
  is_remote = "://" in pattern
  if is_remote:
    p = epath.Path(pattern)
    if p.is_dir():
      files = sorted(str(f) for f in p.glob("*.array_record*"))
    else:
      files = sorted(str(f) for f in epath.Path(p.parent).glob(p.name))
  elif os.path.isdir(pattern):
    files = sorted(glob_lib.glob(os.path.join(pattern, "*.array_record*")))
  else:
    files = sorted(glob_lib.glob(pattern))
  if not files:
    raise FileNotFoundError(f"source {name!r}: no ArrayRecord shards match {pattern!r}")
  return files


def shard_record_counts(ds: grain.sources.ArrayRecordDataSource) -> list[int]:
  """Records per shard of an open ArrayRecordDataSource, in shard order.

  The one private-API call of this package: grain (checked with 0.2.18) reads every shard's record
  count while opening the source but exposes only the total; counting again with public readers
  would open every shard twice (a remote read each on gs://). tests/test_pipeline.py checks it
  against ArrayRecordReader counts, so an upgrade that removes the attribute fails loudly there.
  """
  try:
    return [int(ri.num_records) for ri in ds._read_instructions]  # pylint: disable=protected-access
  except AttributeError as e:
    raise RuntimeError(f"grain {grain.__version__ if hasattr(grain, '__version__') else '?'}: "
                       "ArrayRecordDataSource no longer has _read_instructions; update "
                       "input_pipeline.shard_record_counts") from e


class ShardSource:
  """Random access over the shards of one source; records come back with their global key.

  The key lets `describe` name the shard file and the record index inside it in errors.
  """

  def __init__(self, name: str, paths: list[str]):
    self.name = name
    self.paths = list(paths)
    self._ds = grain.sources.ArrayRecordDataSource(self.paths)
    counts = shard_record_counts(self._ds)
    if len(counts) != len(self.paths) or sum(counts) != len(self._ds):
      raise RuntimeError(f"source {name!r}: shard record counts {counts} do not add up to {len(self._ds)}")
    self._ends = list(np.cumsum(counts))
    self._len = len(self._ds)

  def __len__(self) -> int:
    return self._len

  def describe(self, key: int) -> str:
    i = bisect.bisect_right(self._ends, key)
    start = self._ends[i - 1] if i else 0
    return f"source {self.name!r}, shard {self.paths[i]}, record {key - start}"

  def __getitem__(self, key: int) -> tuple[bytes, int]:
    key = int(key)
    try:
      return self._ds[key], key
    except Exception as e:  # array_record raises generic errors; name the shard.
      raise OSError(f"{self.describe(key)}: cannot read ({type(e).__name__}: {e})") from e

  def __repr__(self) -> str:
    return f"ShardSource({self.name!r}, {len(self.paths)} shards, {self._len} records)"


class Templater:
  """(record bytes, key) -> templated example; errors name the shard file and record index."""

  def __init__(self, source: ShardSource, cfg: ModelConfig):
    self._source = source
    self._cfg = cfg

  def __call__(self, item: tuple[bytes, int]) -> dict[str, Any]:
    data, key = item
    try:
      ex = records.decode(data, where="record")
      out = template.template_example(ex, self._cfg, where="record")
    except Exception as e:
      raise ValueError(f"{self._source.describe(key)}: {e}") from e
    out["source"] = self._source.name
    return out


def _seed(base: int, name: str) -> int:
  return (int(base) * 1_000_003 + zlib.crc32(name.encode())) % 2**32


def host_stream(source: ShardSource, cfg: ModelConfig, *, seed: int | None, process_index: int,
                process_count: int) -> grain.MapDataset:
  """Every `process_count`-th element (from `process_index`) of one source, templated: shuffled +
  repeated (seed given) or one pass in record order (seed None). A train slot is the same with
  (slot, num_slots) in place of (process_index, process_count)."""
  ds = grain.MapDataset.source(source)
  if seed is not None:
    ds = ds.shuffle(seed=seed).repeat()
  return ds[process_index::process_count].map(Templater(source, cfg))


# ---------------------------------------------------------------------------------------------
# Iterators.


def _finish(ds: grain.IterDataset, config, cfg: ModelConfig, *, batch: int, seed: int, train: bool,
            num_batches: int | None = None):
  seq_len = int(config.data.seq_len)
  max_windows = int(config.data.max_audio_windows)
  ds = packing.BudgetFilterIterDataset(ds, seq_len=seq_len, max_windows=max_windows)
  ds = packing.pack(ds, seq_len=seq_len, max_windows=max_windows,
                    num_bins=int(config.data.packing_bins),
                    seed=seed, shuffle_bins=train)
  assembler = packing.BatchAssembler(cfg, batch_size=batch, seq_len=seq_len, max_windows=max_windows)
  ds = ds.batch(batch, drop_remainder=False, batch_fn=assembler)
  ds = packing.CountingIterDataset(ds)
  workers = int(config.data.num_workers)
  if workers > 0:
    # Each worker process reads its own slice of the mixed stream and packs it; the main process
    # interleaves their batches. The output depends on num_workers: keep it fixed across restarts.
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; outside an absl app use defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  if num_batches is not None:  # after the workers: the count is per host, not per worker
    ds = packing.FixedCountIterDataset(ds, num=int(num_batches), filler=assembler.empty)
  return ds.__iter__()


def _read_options(config, share: int = 1) -> grain.ReadOptions:
  """The host's read threads and buffer, split over `share` pipelines (order never depends on them)."""
  return grain.ReadOptions(num_threads=max(1, int(config.data.read_threads) // share),
                           prefetch_buffer_size=max(1, int(config.data.read_buffer) // share))


def _check_template(config) -> None:
  t = config.data.template
  if t not in TEMPLATES:  # both use the docs/data.md format; the record decides the messages.
    raise ValueError(f"config.data.template {t!r} not in {TEMPLATES}")


def stream_signature(config, sources: dict[str, "ShardSource"] | None = None) -> dict[str, Any]:
  """What defines the training stream besides the slot layout (data/slots.py compares it on resume).

  Sources are named with their weight and record/shard counts, not their paths, so shards copied
  to another bucket resume; read threads/buffer are left out (they never change the batches).
  """
  sig = {k: config.data[k] for k in ("template", "seq_len", "max_audio_windows", "shuffle_seed",
                                     "packing_bins", "mixture_weighting", "num_workers", "synthetic")}
  if sources is not None:
    specs = _source_specs(config.data.train_sources, "train_sources")
    sig["train_sources"] = {name: {"weight": spec["weight"], "records": len(sources[name]) if name in sources else 0,
                                   "shards": len(sources[name].paths) if name in sources else 0}
                            for name, spec in specs.items()}
  return sig


def make_train_iterator(config, cfg: ModelConfig, *, rows: int | None = None, process_index: int = 0,
                        process_count: int = 1, slots: slots_lib.DataSlots | None = None):
  """Infinite iterator of host batches (dicts of numpy arrays, bagpiper_jax/batch.py contract).

  Args:
    config: the ml_collections config (uses config.data.*).
    cfg: the ModelConfig (vocabulary layout, encoder chunking).
    rows / process_index / process_count: without `slots`, this host feeds global rows
      [process_index * rows, (process_index + 1) * rows) (rows = batch.host_rows).
    slots: the data slots this process feeds (trainer.Setup.data_slots: from the mesh).

  Returns:
    a slots.SlotIterator; get_state() -> JSON-serialisable dict, set_state(state) restores.
  """
  _check_template(config)
  if slots is None:
    if rows is None:
      raise ValueError("make_train_iterator: give rows= (rows per host) or slots=")
    _check_process(process_index, process_count)
    slots = slots_lib.DataSlots.contiguous(int(config.data.rows_per_slot), int(rows), process_index,
                                           process_count)
  specs = _source_specs(config.data.train_sources, "train_sources")
  base_seed = int(config.data.shuffle_seed)
  weighting = config.data.mixture_weighting
  if weighting not in MIXTURE_WEIGHTINGS:
    raise ValueError(f"config.data.mixture_weighting {weighting!r} not in {MIXTURE_WEIGHTINGS}")
  sources = {}
  for name, spec in specs.items():
    if spec["weight"] == 0:
      continue  # an explicitly disabled source
    sources[name] = src = ShardSource(name, shard_paths(name, spec["path"]))
    if len(src) < slots.num_slots:
      raise ValueError(f"source {name!r} has {len(src)} records, fewer than the {slots.num_slots} data slots")
  if not sources:
    raise ValueError("config.data.train_sources: every source has weight 0")
  weights = [specs[n]["weight"] * (len(src) if weighting == "factor" else 1.0) for n, src in sources.items()]
  total = sum(weights)
  its = {}
  for s in slots.local:
    streams = [host_stream(src, cfg, seed=_seed(base_seed, name), process_index=s, process_count=slots.num_slots)
               for name, src in sources.items()]
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [w / total for w in weights])
    ds = ds.to_iter_dataset(_read_options(config, len(slots.local)))
    its[s] = _finish(ds, config, cfg, batch=slots.rows_per_slot, seed=_seed(base_seed, f"packing/slot{s}"),
                     train=True)
  return slots_lib.SlotIterator(slots, its, stream_signature(config, sources))


def make_eval_iterator(config, cfg: ModelConfig, *, rows: int, process_index: int, process_count: int,
                       num_batches: int | None = None, sources=None):
  """Finite, deterministic iterator over config.data.eval_sources (one pass, no shuffle).

  `sources` (a subset of eval_sources, same format) evaluates those instead: one source at a time
  gives the per-source losses (bagpiper_jax/evaluate.py).

  With num_batches set it yields exactly that many batches, all-padding ones after the data runs
  out, so every host runs the same number of eval steps (hosts' shares can pack into different
  numbers of batches). Weights in eval_sources are ignored.
  """
  _check_template(config)
  pi, pc = _check_process(process_index, process_count)
  specs = _source_specs(config.data.eval_sources if sources is None else sources, "eval_sources")
  parts = [host_stream(ShardSource(name, shard_paths(name, spec["path"])), cfg, seed=None,
                       process_index=pi, process_count=pc)
           for name, spec in specs.items()]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  ds = ds.to_iter_dataset(_read_options(config))
  return _finish(ds, config, cfg, batch=rows, seed=0, train=False,
                 num_batches=num_batches)


def pipeline_stats(iterator) -> dict[str, Any]:
  """Drop / packing counters of an iterator made here (summed over slots and prefetch workers).

  Keys: docs_read, docs_dropped_too_long, docs_dropped_audio_windows, tokens_dropped,
  docs_accepted, tokens_accepted, docs_by_source (as of the start of the current packing round);
  batches (host batches), rows, rows_padding, tokens (packed tokens emitted), cells, fill
  (= tokens / cells).
  """
  s = packing.collect_stats(iterator.get_state())
  s.setdefault("docs_by_source", {})
  if isinstance(iterator, slots_lib.SlotIterator) and "batches" in s:
    s["batches"] //= len(iterator.slots.local)  # every slot counts each host batch once
  cells = s.get("cells", 0)
  s["fill"] = s.get("tokens", 0) / cells if cells else 0.0
  s["docs_dropped"] = s.get("docs_dropped_too_long", 0) + s.get("docs_dropped_audio_windows", 0)
  return s
