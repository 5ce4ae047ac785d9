"""A small deterministic batch iterator with the pipeline's get_state/set_state protocol.

Used by trainer tests and as `config.data.synthetic = True` (no files needed). Batch `i` is a pure
function of (seed, process_index, i), so restoring the state {'next': i} reproduces the stream
exactly. Rows follow the batch contract (batch.py): per packed row, an audio-to-text document
(user continuous audio -> assistant text) and a text-to-audio document (user text -> assistant
delay-interleaved codec frames). Content is learnable (each assistant text is an arithmetic
progression, each codec stream a shifted ramp) so the loss visibly goes down.
"""

from __future__ import annotations

import numpy as np

from bagpiper_jax import batch as batch_lib
from bagpiper_jax.data import template
from bagpiper_jax.model.config import ModelConfig


class SyntheticIterator:

  def __init__(self, model_cfg: ModelConfig, *, rows: int, seq_len: int, audio_windows: int,
               seed: int = 0, process_index: int = 0):
    self.cfg, self.rows, self.seq_len, self.windows = model_cfg, rows, seq_len, audio_windows
    self.seed, self.process_index = seed, process_index
    self._next = 0

  def __iter__(self):
    return self

  def get_state(self) -> dict:
    return {"next": self._next}

  def set_state(self, state: dict) -> None:
    self._next = int(state["next"])

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.process_index, self._next])
    self._next += 1
    rows = [self._row(rng) for _ in range(self.rows)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def _row(self, rng) -> dict:
    """Two documents written as records and templated by the pipeline's own `template_example`."""
    cfg, L = self.cfg, self.seq_len
    enc = cfg.audio_encoder
    text = lambda ids: np.asarray([cfg.num_specials + i % cfg.text_vocab_size for i in ids], np.int32)
    docs = []
    # Document 1: audio -> text (needs an encoder window).
    if self.windows:
      nchunks = int(rng.integers(1, 3))
      frames = (nchunks - 1) * enc.chunk_frames + int(rng.integers(20, enc.chunk_frames + 1))
      mel = rng.standard_normal((enc.num_mel_bins, frames)).astype(np.float32) * 0.5
      ntxt = int(rng.integers(8, 24))
      a, step = int(rng.integers(0, 50)), int(rng.integers(1, 4))
      und = template.template_example({"id": "und", "messages": [
          {"role": "user", "modality": "audio", "mel": mel},
          {"role": "assistant", "modality": "text", "text_ids": text(a + step * np.arange(ntxt))}]}, cfg)
      if len(und["input_ids"]) <= L // 2:
        docs.append(und)
    # Document 2: text -> audio (delay-interleaved codec frames).
    frames = int(rng.integers(4, 16))
    a = int(rng.integers(0, 50))
    codes = (a + 3 * np.arange(frames)[:, None] + np.arange(cfg.num_streams)[None]) % cfg.codebook_size
    gen = template.template_example({"id": "gen", "messages": [
        {"role": "user", "modality": "text", "text_ids": text(a + np.arange(4))},
        {"role": "assistant", "modality": "audio", "codes": codes}]}, cfg)
    if sum(len(d["input_ids"]) for d in docs) + len(gen["input_ids"]) <= L:
      docs.append(gen)

    out = {k: v[0] for k, v in batch_lib.empty(cfg, 1, L, self.windows).items()}
    t = 0
    for doc_id, d in enumerate(docs, start=1):
      n = len(d["input_ids"])
      out["input_ids"][t:t + n] = d["input_ids"]
      out["loss_weights"][t:t + n] = d["loss_weights"]
      out["segment_ids"][t:t + n] = doc_id
      out["positions"][t:t + n] = np.arange(n)
      w = len(d["audio_mel"])
      if w:  # only document 1 has audio, and it starts at window 0
        out["audio_mel"][:w] = d["audio_mel"]
        out["audio_chunk_lens"][:w] = d["audio_chunk_lens"]
        out["audio_rows"][t:t + n] = d["audio_rows"]
      t += n
    return out
