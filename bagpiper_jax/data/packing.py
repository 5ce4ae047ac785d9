"""Packing templated examples into fixed-size rows, and rows into batches (bagpiper_jax/batch.py).

Three Grain stages, all checkpointable through get_state/set_state:

  BudgetFilterIterDataset   drops (and counts) documents that can never fit one row: more than
                            seq_len rows, or more than max_audio_windows encoder windows.
  pack(...)                 Grain's BestFitPackIterDataset with two budgets per row: seq_len token
                            rows (input_ids, loss_weights, audio_rows) and max_audio_windows encoder
                            windows (audio_chunk_lens). The mel windows ride along as a
                            non-sequence meta feature (a list of per-document arrays per row), so the
                            packer never allocates [bins, W, 8, 128, 100] buffers.
  BatchAssembler            turns `batch_size` packed rows into one batch dict of exactly the
                            contract keys/dtypes, shifting each document's audio_rows by the encoder
                            frames of the windows packed before it in its row.
  CountingIterDataset       counts batches / rows / real tokens after batching.

Counters live in the iterator *state* under the key `STATS_KEY`, so they are restored with the
data position and survive `mp_prefetch` (each worker's state is part of the main iterator's
state); `collect_stats` sums every such dict found in a state. Grain's packer re-reads its current
packing round on restore, so document counters reflect the start of the current round (they never
double count) while batch counters are exact at batch boundaries.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from bagpiper_jax import batch as batch_lib
from bagpiper_jax.model.config import ModelConfig

STATS_KEY = "bagpiper_stats"
SEQ_FEATURES = ("input_ids", "loss_weights", "audio_rows")
WINDOW_FEATURE = "audio_chunk_lens"
MEL_FEATURE = "audio_mel"


# ---------------------------------------------------------------------------------------------
# Budget filter.


class _BudgetFilterIterator(grain.DatasetIterator):
  """Yields documents that fit an empty row; counts everything it sees."""

  def __init__(self, parent, seq_len: int, max_windows: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._max_windows = max_windows
    self._counts = self._zero()

  @staticmethod
  def _zero() -> dict[str, Any]:
    return {
        "docs_read": 0,
        "docs_dropped_too_long": 0,
        "docs_dropped_audio_windows": 0,
        "tokens_dropped": 0,
        "docs_accepted": 0,
        "tokens_accepted": 0,
        "docs_by_source": {},
    }

  def __next__(self):
    c = self._counts
    while True:
      ex = next(self._parent)
      n, w = len(ex["input_ids"]), len(ex[WINDOW_FEATURE])
      c["docs_read"] += 1
      if n > self._seq_len:
        c["docs_dropped_too_long"] += 1
        c["tokens_dropped"] += n
        continue
      if w > self._max_windows:
        c["docs_dropped_audio_windows"] += 1
        c["tokens_dropped"] += n
        continue
      c["docs_accepted"] += 1
      c["tokens_accepted"] += n
      src = ex.get("source")
      if src is not None:
        c["docs_by_source"][src] = c["docs_by_source"].get(src, 0) + 1
      return ex

  def get_state(self):
    c = dict(self._counts)
    c["docs_by_source"] = dict(c["docs_by_source"])
    return {"parent": self._parent.get_state(), STATS_KEY: c}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    c = dict(state[STATS_KEY])
    c["docs_by_source"] = dict(c["docs_by_source"])
    self._counts = c


class BudgetFilterIterDataset(grain.IterDataset):
  """Drops documents longer than `seq_len` rows or with more than `max_windows` audio windows."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, max_windows: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._max_windows = max_windows

  def __iter__(self):
    return _BudgetFilterIterator(self._parent.__iter__(), self._seq_len, self._max_windows)

  def __str__(self):
    return f"BudgetFilterIterDataset(seq_len={self._seq_len}, max_windows={self._max_windows})"


# ---------------------------------------------------------------------------------------------
# Packing.


def pack(ds: grain.IterDataset, *, seq_len: int, max_windows: int, num_bins: int, seed: int,
         shuffle_bins: bool) -> grain.IterDataset:
  """Best-fit packing into rows of `seq_len` token rows and `max_windows` audio windows.

  Grain packs one round of `num_bins` rows at a time and emits the whole round when a document
  fits no bin; with 32 bins that leaves ~1-2% padding on the pretraining length mix. The budget
  filter upstream guarantees every document fits an empty row (Grain raises otherwise).
  """
  length_struct = {k: seq_len for k in SEQ_FEATURES}
  length_struct[WINDOW_FEATURE] = max(max_windows, 1)  # Grain wants a positive length per feature.
  padding = {"input_ids": 0, "loss_weights": 0.0, "audio_rows": -1, WINDOW_FEATURE: 0}
  return grain.experimental.BestFitPackIterDataset(
      ds,
      length_struct=length_struct,
      num_packing_bins=num_bins,
      seed=seed,
      shuffle_bins=shuffle_bins,
      meta_features=(MEL_FEATURE,),
      padding_struct=padding,
  )


# ---------------------------------------------------------------------------------------------
# Batch assembly.


class BatchAssembler:
  """Packed rows (Grain packer output) -> one batch dict of the bagpiper_jax/batch.py contract.

  A short final list (finite eval data) is padded with empty rows (segment_ids 0, weights 0,
  audio_rows -1) so every batch has the same static shape.
  """

  def __init__(self, cfg: ModelConfig, *, batch_size: int, seq_len: int, max_windows: int):
    self._cfg = cfg
    self._b = batch_size
    self._l = seq_len
    self._w = max_windows
    self._frames_per_window = cfg.audio_encoder.frames_per_window_out

  def empty(self) -> dict[str, np.ndarray]:
    """An all-padding batch (used to keep hosts in lock step after eval data runs out)."""
    return self([])

  def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    if len(rows) > self._b:
      raise ValueError(f"got {len(rows)} packed rows for a batch of {self._b}")
    out = batch_lib.empty(self._cfg, self._b, self._l, self._w)
    for i, row in enumerate(rows):
      out["input_ids"][i] = row["input_ids"]
      out["loss_weights"][i] = row["loss_weights"]
      seg = row["input_ids_segment_ids"]
      out["segment_ids"][i] = seg
      out["positions"][i] = row["input_ids_positions"]
      if not self._w:
        continue
      lens = row[WINDOW_FEATURE][:self._w]
      out["audio_chunk_lens"][i] = lens
      mels = row[MEL_FEATURE]
      if not any(len(m) for m in mels):
        continue
      # Windows of segment k sit after those of segments 1..k-1 (Grain packs in order per row).
      win_seg = row[f"{WINDOW_FEATURE}_segment_ids"][:self._w]
      per_seg = np.bincount(win_seg, minlength=len(mels) + 1)
      per_seg[0] = 0
      offset_frames = (np.cumsum(per_seg) - per_seg) * self._frames_per_window  # windows before seg k
      ar = row["audio_rows"]
      out["audio_rows"][i] = np.where(ar >= 0, ar + offset_frames[seg], -1)
      w0 = 0
      for m in mels:
        n = len(m)
        if n:
          out["audio_mel"][i, w0:w0 + n] = m
          w0 += n
    return out


# ---------------------------------------------------------------------------------------------
# Batch counters.


class _CountingIterator(grain.DatasetIterator):

  def __init__(self, parent):
    super().__init__(parent)
    self._counts = {"batches": 0, "rows": 0, "rows_padding": 0, "tokens": 0, "cells": 0}

  def __next__(self):
    batch = next(self._parent)
    seg = batch["segment_ids"]
    real_rows = int(np.count_nonzero(seg.any(axis=1)))
    c = self._counts
    c["batches"] += 1
    c["rows"] += real_rows
    c["rows_padding"] += seg.shape[0] - real_rows
    c["tokens"] += int(np.count_nonzero(seg))
    c["cells"] += seg.size
    return batch

  def get_state(self):
    return {"parent": self._parent.get_state(), STATS_KEY: dict(self._counts)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._counts = dict(state[STATS_KEY])


class CountingIterDataset(grain.IterDataset):
  """Counts batches, real rows, all-padding rows and packed tokens (segment_ids > 0)."""

  def __iter__(self):
    return _CountingIterator(self._parent.__iter__())


# ---------------------------------------------------------------------------------------------
# Fixed number of batches (eval in lock step across hosts).


class _FixedCountIterator(grain.DatasetIterator):

  def __init__(self, parent, num: int, filler):
    super().__init__(parent)
    self._num = num
    self._filler = filler
    self._emitted = 0
    self._exhausted = False

  def __next__(self):
    if self._emitted >= self._num:
      raise StopIteration
    self._emitted += 1
    if not self._exhausted:
      try:
        return next(self._parent)
      except StopIteration:
        self._exhausted = True
    return self._filler()

  def get_state(self):
    return {"parent": self._parent.get_state(), "emitted": self._emitted, "exhausted": self._exhausted}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._emitted = state["emitted"]
    self._exhausted = state["exhausted"]


class FixedCountIterDataset(grain.IterDataset):
  """Exactly `num` elements: the parent's, then `filler()` once the parent runs out."""

  def __init__(self, parent: grain.IterDataset, *, num: int, filler):
    super().__init__(parent)
    self._num = num
    self._filler = filler

  def __iter__(self):
    return _FixedCountIterator(self._parent.__iter__(), self._num, self._filler)


# ---------------------------------------------------------------------------------------------
# Reading counters back.


def _merge(into: dict, add: Mapping) -> None:
  for k, v in add.items():
    if isinstance(v, Mapping):
      _merge(into.setdefault(k, {}), v)
    else:
      into[k] = into.get(k, 0) + v


def collect_stats(state: Any) -> dict[str, Any]:
  """Sums every `STATS_KEY` dict found anywhere in a (possibly multi-worker) iterator state."""
  total: dict[str, Any] = {}
  todo = collections.deque([state])
  while todo:
    x = todo.popleft()
    if isinstance(x, Mapping):
      for k, v in x.items():
        if k == STATS_KEY and isinstance(v, Mapping):
          _merge(total, v)
        else:
          todo.append(v)
    elif isinstance(x, (list, tuple)):
      todo.extend(x)
  return total
