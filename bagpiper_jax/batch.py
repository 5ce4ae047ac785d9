"""The batch contract between the input pipeline and the model.

One packed batch (numpy on the host, jax.Array on device) is a dict:

  input_ids        int32   [B, L, S]   S = 8 streams. Text/special rows: id in stream 0, 0 elsewhere.
                                       Codec rows: one codec id per stream (delay-interleaved).
                                       Continuous-audio rows: all 0 (overwritten by the adapter).
  loss_weights     float32 [B, L, S]   weight of predicting cell (t, s) from row t-1 (SPEC.md: 1.0 for
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
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bagpiper_jax.model.config import ModelConfig

AUDIO_KEYS = ("audio_mel", "audio_chunk_lens", "audio_rows")
TEXT_KEYS = ("input_ids", "loss_weights", "segment_ids", "positions")


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
  if present:
    rows, lens = batch["audio_rows"], batch["audio_chunk_lens"]
    n_out = batch["audio_mel"].shape[1] * enc.frames_per_window_out
    if rows.max() >= n_out:
      raise ValueError(f"audio_rows points past the encoder output ({rows.max()} >= {n_out} frames)")
    if lens.min() < 0 or lens.max() > enc.chunk_frames:
      raise ValueError(f"audio_chunk_lens must lie in [0, {enc.chunk_frames}]")
    # Every audio row must land on a valid encoder frame, and every valid frame on exactly one row.
    from bagpiper_jax.model.config import conv_out_length
    per_chunk = np.vectorize(conv_out_length)(lens) * (lens > 0)
    valid = (np.arange(enc.frames_per_chunk_out) < per_chunk[..., None]).reshape(b, -1)
    for i in range(b):
      used = rows[i][rows[i] >= 0]
      if not valid[i][used].all() or len(np.unique(used)) != len(used) or len(used) != valid[i].sum():
        raise ValueError(
            f"audio span mismatch in batch row {i}: {len(used)} continuous-audio rows in input_ids but "
            f"{int(valid[i].sum())} encoder frames from audio_chunk_lens (or rows point at padding frames)")
    if np.any((rows >= 0) & (batch["input_ids"][..., 0] != 0)):
      raise ValueError("audio_rows marks rows whose stream-0 id is not the placeholder 0")
