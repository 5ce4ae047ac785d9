"""Synthetic records: random but well-formed pretraining examples, written to ArrayRecord shards.

For the input-pipeline benchmark (data_pipeline/bench.py) and the tests, which run the real Grain
pipeline on them. Sizes default to the 8B layout; tests shrink them.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from bagpiper_jax import config_lib
from bagpiper_jax.data import records
from bagpiper_jax.model.config import ModelConfig

# What data_pipeline/writer.py uses (default compression). "group_size:1,uncompressed" reads und
# records (~0.4 MB of float16 mel each, which barely compresses) about 2.5x faster.
WRITER_OPTIONS = "group_size:1"


def text_ids(rng: np.random.Generator, n: int, text_vocab: int = 151936, num_specials: int = 256):
  return (rng.integers(0, text_vocab, n) + num_specials).astype(np.int32)


def und_example(rng, idx: int, source: str, *, frames=(500, 3000), caption=(50, 300), text_vocab=151936):
  t = int(rng.integers(frames[0], frames[1] + 1))
  return {
      "id": f"{source}/{idx}", "source": source, "task": "audio_to_text",
      "messages": [
          {"role": "user", "modality": "audio",
           "mel": rng.standard_normal((128, t), dtype=np.float32).astype(np.float16)},
          {"role": "assistant", "modality": "text",
           "text_ids": text_ids(rng, int(rng.integers(caption[0], caption[1] + 1)), text_vocab)},
      ]}


def gen_example(rng, idx: int, source: str, *, frames=(250, 1500), caption=(50, 300), text_vocab=151936):
  t = int(rng.integers(frames[0], frames[1] + 1))
  return {
      "id": f"{source}/{idx}", "source": source, "task": "text_to_audio",
      "messages": [
          {"role": "user", "modality": "text",
           "text_ids": text_ids(rng, int(rng.integers(caption[0], caption[1] + 1)), text_vocab)},
          {"role": "assistant", "modality": "audio",
           "codes": rng.integers(0, 1024, (t, 8)).astype(np.int16)},
      ]}


def text_example(rng, idx: int, source: str, *, length=(200, 4000), text_vocab=151936):
  return {
      "id": f"{source}/{idx}", "source": source, "task": "text_only",
      "messages": [{"role": "assistant", "modality": "text",
                    "text_ids": text_ids(rng, int(rng.integers(length[0], length[1] + 1)), text_vocab)}]}


def pretrain_example_fn(source: str) -> Callable[..., dict[str, Any]]:
  if source.endswith("_und"):
    return und_example
  if source.endswith("_gen"):
    return gen_example
  return text_example


def write_shards(directory: str, examples: Iterable[dict[str, Any] | bytes], num_shards: int,
                 prefix: str = "part", options: str = WRITER_OPTIONS) -> list[str]:
  """Writes examples, in order and in contiguous blocks, into `num_shards` ArrayRecord files.

  Accepts already-encoded bytes too (to plant bad records). Returns the shard paths in order.
  """
  os.makedirs(directory, exist_ok=True)
  items = list(examples)
  per = -(-len(items) // num_shards)
  paths = []
  for s in range(num_shards):
    path = os.path.join(directory, f"{prefix}-{s:05d}-of-{num_shards:05d}.array_record")
    w = ArrayRecordWriter(path, options)
    for ex in items[s * per:(s + 1) * per]:
      w.write(ex if isinstance(ex, bytes) else records.encode(ex))
    w.close()
    paths.append(path)
  return paths


def write_pretrain_sources(root: str, records_per_source: int, shards_per_source: int, seed: int = 0,
                           mixture: dict[str, float] | None = None,
                           options: str = WRITER_OPTIONS) -> dict[str, dict[str, Any]]:
  """One shard directory per pretraining subset; returns config.data.train_sources for them."""
  if mixture is None:
    mixture = config_lib.PRETRAIN_MIXTURE
  sources = {}
  for k, (name, weight) in enumerate(sorted(mixture.items())):
    rng = np.random.default_rng([seed, k])
    fn = pretrain_example_fn(name)
    d = os.path.join(root, name)
    write_shards(d, (fn(rng, i, name) for i in range(records_per_source)), shards_per_source,
                 options=options)
    sources[name] = {"path": d, "weight": weight}
  return sources


def write_tiny_sources(root: str, cfg: ModelConfig, *, records: int = 64, seed: int = 0,
                       max_mel_frames: int = 300, max_text: int = 40, max_codec_frames: int = 40) -> dict:
  """Small ArrayRecord shards (und / gen / text sources) sized for tiny configs and short rows.

  Uses the data pipeline's own synthetic record generators (bagpiper_jax/data/py), so tests
  of the train loop run the real Grain pipeline (and its checkpointable state) in milliseconds of
  writing. Returns config.data.train_sources-style {name: {'path', 'weight'}}.
  """
  kinds = {
      "sound_und": lambda rng, i, s: und_example(rng, i, s, frames=(50, max_mel_frames),
                                                       caption=(4, max_text), text_vocab=cfg.text_vocab_size),
      "sound_gen": lambda rng, i, s: gen_example(rng, i, s, frames=(8, max_codec_frames),
                                                       caption=(4, max_text), text_vocab=cfg.text_vocab_size),
      "text_only": lambda rng, i, s: text_example(rng, i, s, length=(8, 2 * max_text),
                                                        text_vocab=cfg.text_vocab_size),
  }
  out = {}
  for k, (name, fn) in enumerate(sorted(kinds.items())):
    rng = np.random.default_rng([seed, k])
    d = os.path.join(root, name)
    write_shards(d, (fn(rng, i, name) for i in range(records)), 2)
    out[name] = {"path": d, "weight": 1.0}
  return out
