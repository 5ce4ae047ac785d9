"""The batch contract between the input pipeline and the model.

One packed batch (numpy on the host, jax.Array on device) is a dict:

  input_ids        int32   [B, L, S]   S = 8 streams. Text/special rows: id in stream 0, 0 elsewhere.
                                       Codec rows: one codec id per stream (delay-interleaved);
                                       stream n >= 1 holds 0 or an id of its own codec block.
                                       Continuous-audio rows: all 0 (overwritten by the adapter).
  loss_weights     float32 [B, L, S]   weight of predicting cell (t, s) from row t-1 (docs/model.md#loss: 1.0 for
                                       stream-0 text/special targets, 0.125 per codec cell).
  segment_ids      int32   [B, L]      document id within the row, 1..; 0 = padding.
  positions        int32   [B, L]      RoPE position, restarting at 0 for every document.
  audio_mel        float   [B, W, C, M, F]  log-mel of the user-audio spans of the row, cut into
                                       encoder windows of C = 8 chunks of F = 100 frames, M = 128 bins.
  audio_chunk_lens int32   [B, W, C]   valid mel frames per chunk (0 = unused chunk).
  audio_rows       int32   [B, L]      for continuous-audio rows: index into the row's flattened
                                       encoder output [W * C * 13]; -1 elsewhere.

Chunk c of window w produces encoder frames [w*C*13 + c*13, w*C*13 + c*13 + n) with
n = conv_out_length(chunk_len). A batch without audio may omit the three audio keys.

This module is the one owner of that contract: the key table (`FIELDS`: dtype, padding value,
logical axes), the shapes of a batch for a config (`shapes`, `abstract`), all-padding and
one-document batches (`empty`, `example`), how many rows each host feeds (`host_rows`, the one
formula), stacking micro-batches for the step (`stack_micro_batches`) and validation
(`validate_batch`). The packer, the synthetic iterator, the model's init and the train step all
call it.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np

from bagpiper_jax.model.config import ModelConfig, conv_out_length


@dataclasses.dataclass(frozen=True)
class Field:
  dtype: type
  pad: int | float  # value of a padding cell
  logical: tuple  # logical axis names of [B, L, ...] (bagpiper_jax/sharding.py maps them)


FIELDS: dict[str, Field] = {
    "input_ids": Field(np.int32, 0, ("batch", "length", None)),
    "loss_weights": Field(np.float32, 0.0, ("batch", "length", None)),
    "segment_ids": Field(np.int32, 0, ("batch", "length")),
    "positions": Field(np.int32, 0, ("batch", "length")),
    "audio_mel": Field(np.float32, 0.0, ("batch", None, None, None, None)),
    "audio_chunk_lens": Field(np.int32, 0, ("batch", None, None)),
    "audio_rows": Field(np.int32, -1, ("batch", "length")),
}
TEXT_KEYS = ("input_ids", "loss_weights", "segment_ids", "positions")
AUDIO_KEYS = ("audio_mel", "audio_chunk_lens", "audio_rows")


def shapes(cfg: ModelConfig, rows: int, seq_len: int, audio_windows: int) -> dict[str, tuple[int, ...]]:
  """Per-key shapes of one batch; no audio keys when audio_windows == 0."""
  s, enc = cfg.num_streams, cfg.audio_encoder
  out = {"input_ids": (rows, seq_len, s), "loss_weights": (rows, seq_len, s), "segment_ids": (rows, seq_len),
         "positions": (rows, seq_len)}
  if audio_windows:
    out["audio_mel"] = (rows, audio_windows, enc.chunks_per_window, enc.num_mel_bins, enc.chunk_frames)
    out["audio_chunk_lens"] = (rows, audio_windows, enc.chunks_per_window)
    out["audio_rows"] = (rows, seq_len)
  return out


def empty(cfg: ModelConfig, rows: int, seq_len: int, audio_windows: int) -> dict[str, np.ndarray]:
  """An all-padding batch (segment_ids 0, weights 0, audio_rows -1)."""
  return {k: np.full(shape, FIELDS[k].pad, FIELDS[k].dtype)
          for k, shape in shapes(cfg, rows, seq_len, audio_windows).items()}


def example(cfg: ModelConfig, rows: int, seq_len: int, audio_windows: int = 0) -> dict[str, np.ndarray]:
  """One document per row, all ids 0 (for init, eval_shape and AOT compilation: shapes matter)."""
  b = empty(cfg, rows, seq_len, audio_windows)
  b["segment_ids"][:] = 1
  b["positions"][:] = np.arange(seq_len, dtype=np.int32)
  return b


def global_rows(config, num_devices: int) -> int:
  """Rows of one micro-batch over the whole mesh: config.data.per_device_batch x devices."""
  return int(config.data.per_device_batch) * int(num_devices)


def host_rows(config, num_devices: int, process_count: int) -> int:
  """Rows each process feeds per micro-batch (the one formula; the input pipeline is given it)."""
  n = global_rows(config, num_devices)
  if n % process_count:
    raise ValueError(f"global batch of {n} rows (config.data.per_device_batch x {num_devices} devices) "
                     f"does not split over {process_count} processes")
  return n // process_count


def abstract(config, cfg: ModelConfig, num_devices: int, *, micro_steps: int | None = None
             ) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of one step's global batch [A, B, ...] (A = config.optim.grad_accum_steps)."""
  a = int(config.optim.grad_accum_steps) if micro_steps is None else int(micro_steps)
  per = shapes(cfg, global_rows(config, num_devices), int(config.data.seq_len),
               int(config.data.max_audio_windows))
  return {k: jax.ShapeDtypeStruct((a,) + v, FIELDS[k].dtype) for k, v in per.items()}


def stack_micro_batches(batches: Sequence[Mapping[str, np.ndarray]], abstract_batch: Mapping,
                        rows: int) -> dict[str, np.ndarray]:
  """Stacks A host batches to [A, rows, ...]; adds empty audio keys when a batch has none;
  zero-pads audio windows a batch has fewer of than the step takes; checks every shape."""
  a = abstract_batch["input_ids"].shape[0]
  if len(batches) != a:
    raise ValueError(f"need {a} micro-batches per step (config.optim.grad_accum_steps), got {len(batches)}")
  out = {}
  for k, spec in abstract_batch.items():
    want = (rows,) + tuple(spec.shape[2:])
    parts = []
    for i, b in enumerate(batches):
      if k not in b:
        if k not in AUDIO_KEYS:
          raise ValueError(f"micro-batch {i} lacks key {k!r} (has {sorted(b)})")
        x = np.full(want, FIELDS[k].pad, spec.dtype)
      else:
        x = np.asarray(b[k])
        if k in ("audio_mel", "audio_chunk_lens") and x.ndim >= 2 and x.shape[1] < want[1]:
          pad = [(0, 0)] * x.ndim
          pad[1] = (0, want[1] - x.shape[1])
          x = np.pad(x, pad)  # fewer encoder windows than the max: zero windows are unused
      if tuple(x.shape) != want:
        raise ValueError(f"batch key {k!r} has per-process shape {tuple(x.shape)}, expected {want} "
                         f"(rows per host, data.seq_len, data.max_audio_windows)")
      parts.append(x.astype(spec.dtype, copy=False))
    out[k] = np.stack(parts)
  extra = set().union(*[set(b) for b in batches]) - set(abstract_batch)
  if extra:
    raise ValueError(f"batch has keys {sorted(extra)} the train step does not take "
                     f"(is data.max_audio_windows 0 while the data has audio?)")
  return out


def validate_batch(batch: Mapping[str, np.ndarray], cfg: ModelConfig, *, check_values: bool = True) -> None:
  """Raises ValueError naming the key and the problem. Shapes always; values if concrete and asked."""
  missing = [k for k in TEXT_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing keys {missing}; got {sorted(batch)}")
  ids = batch["input_ids"]
  if ids.ndim != 3 or ids.shape[-1] != cfg.num_streams:
    raise ValueError(f"input_ids must be [B, L, {cfg.num_streams}], got shape {tuple(ids.shape)}")
  b, l, s = ids.shape
  for k, shape in (("loss_weights", (b, l, s)), ("segment_ids", (b, l)), ("positions", (b, l))):
    if tuple(batch[k].shape) != shape:
      raise ValueError(f"{k} must have shape {shape} to match input_ids, got {tuple(batch[k].shape)}")
  present = [k for k in AUDIO_KEYS if k in batch]
  if present and len(present) != len(AUDIO_KEYS):
    raise ValueError(f"audio keys must come together: have {present}, missing "
                     f"{[k for k in AUDIO_KEYS if k not in batch]}")
  enc = cfg.audio_encoder
  if present:
    mel, lens, rows = batch["audio_mel"], batch["audio_chunk_lens"], batch["audio_rows"]
    want = (enc.chunks_per_window, enc.num_mel_bins, enc.chunk_frames)
    if mel.ndim != 5 or mel.shape[0] != b or tuple(mel.shape[2:]) != want:
      raise ValueError(f"audio_mel must be [B={b}, W, {want[0]}, {want[1]}, {want[2]}], got {tuple(mel.shape)}")
    if tuple(lens.shape) != tuple(mel.shape[:3]):
      raise ValueError(f"audio_chunk_lens must be {tuple(mel.shape[:3])}, got {tuple(lens.shape)}")
    if tuple(rows.shape) != (b, l):
      raise ValueError(f"audio_rows must be {(b, l)}, got {tuple(rows.shape)}")
  if not check_values or not all(isinstance(batch[k], np.ndarray) for k in batch):
    return
  if ids.min() < 0 or ids.max() >= cfg.vocab_size:
    bad = np.argwhere((ids < 0) | (ids >= cfg.vocab_size))[0]
    raise ValueError(f"input_ids out of the vocabulary [0, {cfg.vocab_size}): "
                     f"id {int(ids[tuple(bad)])} at [batch {bad[0]}, row {bad[1]}, stream {bad[2]}]")
  # Streams 1..S-1 hold 0 (no codec in the row) or an id of their own codec block: the model embeds
  # them as one multi-hot contraction over those blocks (model/bagpiper.py, embed_rows).
  codec = ids[..., 1:]
  lo = np.asarray([cfg.codec_pad_id(n) for n in range(1, s)], ids.dtype)
  stray = (codec != 0) & ((codec < lo) | (codec >= lo + cfg.codec_block))
  if stray.any():
    bad = np.argwhere(stray)[0]
    n = int(bad[2]) + 1
    raise ValueError(f"input_ids: stream {n} holds id {int(codec[tuple(bad)])} at [batch {bad[0]}, row {bad[1]}]; "
                     f"stream {n} takes 0 or its codec block [{int(lo[n - 1])}, {int(lo[n - 1]) + cfg.codec_block})")
  if present:
    rows, lens = batch["audio_rows"], batch["audio_chunk_lens"]
    n_out = batch["audio_mel"].shape[1] * enc.frames_per_window_out
    if rows.max() >= n_out:
      raise ValueError(f"audio_rows points past the encoder output ({rows.max()} >= {n_out} frames)")
    if lens.min() < 0 or lens.max() > enc.chunk_frames:
      raise ValueError(f"audio_chunk_lens must lie in [0, {enc.chunk_frames}]")
    # Every audio row must land on a valid encoder frame, and every valid frame on exactly one row.
    per_chunk = conv_out_length(lens)
    valid = (np.arange(enc.frames_per_chunk_out) < per_chunk[..., None]).reshape(b, -1)
    for i in range(b):
      used = rows[i][rows[i] >= 0]
      if not valid[i][used].all() or len(np.unique(used)) != len(used) or len(used) != valid[i].sum():
        raise ValueError(
            f"audio span mismatch in batch row {i}: {len(used)} continuous-audio rows in input_ids but "
            f"{int(valid[i].sum())} encoder frames from audio_chunk_lens (or rows point at padding frames)")
    if np.any((rows >= 0) & (batch["input_ids"][..., 0] != 0)):
      raise ValueError("audio_rows marks rows whose stream-0 id is not the placeholder 0")
