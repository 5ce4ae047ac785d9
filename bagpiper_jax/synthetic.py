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

from bagpiper_jax.model.config import (ASSISTANT, AUDIO, BOS, EOS, TEXT, USER, ModelConfig,
                                       conv_out_length)


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
    cfg, L, S = self.cfg, self.seq_len, self.cfg.num_streams
    enc = cfg.audio_encoder
    ids = np.zeros((L, S), np.int32)
    w = np.zeros((L, S), np.float32)
    seg = np.zeros((L,), np.int32)
    pos = np.zeros((L,), np.int32)
    out = {}
    t = 0
    doc = 0

    def put(row_ids, weight, doc_id, start):
      nonlocal t
      ids[t] = row_ids
      w[t] = weight
      seg[t] = doc_id
      pos[t] = t - start
      t += 1

    text = lambda i: np.array([cfg.num_specials + i % cfg.text_vocab_size] + [0] * (S - 1), np.int32)
    tok = lambda i: np.array([i] + [0] * (S - 1), np.int32)
    one = np.array([1.0] + [0.0] * (S - 1), np.float32)
    zero = np.zeros((S,), np.float32)
    # Document 1: audio -> text (needs an encoder window).
    if self.windows:
      mel = rng.standard_normal((self.windows, enc.chunks_per_window, enc.num_mel_bins,
                                 enc.chunk_frames)).astype(np.float32) * 0.5
      lens = np.zeros((self.windows, enc.chunks_per_window), np.int32)
      nchunks = int(rng.integers(1, 3))
      lens[0, :nchunks] = enc.chunk_frames
      lens[0, nchunks - 1] = int(rng.integers(20, enc.chunk_frames + 1))
      n_frames = sum(conv_out_length(int(x)) for x in lens[0] if x)
      audio_rows = np.full((L,), -1, np.int32)
      ntxt = int(rng.integers(8, 24))
      if 6 + n_frames + 4 + ntxt <= L // 2:
        doc += 1
        start = t
        for i in (BOS, USER, AUDIO):
          put(tok(i), zero, doc, start)
        frame = 0
        for c, n in enumerate(lens[0]):
          for j in range(conv_out_length(int(n)) if n else 0):
            audio_rows[t] = c * enc.frames_per_chunk_out + j
            put(np.zeros(S, np.int32), zero, doc, start)
            frame += 1
        put(tok(EOS), zero, doc, start)
        a, step = int(rng.integers(0, 50)), int(rng.integers(1, 4))
        for i in (ASSISTANT, TEXT):
          put(tok(i), one, doc, start)
        for k in range(ntxt):
          put(text(a + step * k), one, doc, start)
        put(tok(EOS), one, doc, start)
      out.update(audio_mel=mel, audio_chunk_lens=lens, audio_rows=audio_rows)
    # Document 2: text -> audio (delay-interleaved codec frames).
    frames = int(rng.integers(4, 16))
    if t + 10 + frames + S + 2 <= L:
      doc += 1
      start = t
      for i in (BOS, USER, TEXT):
        put(tok(i), zero, doc, start)
      a = int(rng.integers(0, 50))
      for k in range(4):
        put(text(a + k), zero, doc, start)
      put(tok(EOS), zero, doc, start)
      for i in (ASSISTANT, AUDIO):
        put(tok(i), one, doc, start)
      for r in range(frames + S - 1):
        row = np.zeros(S, np.int32)
        for s in range(S):
          f = r - s
          row[s] = (cfg.codec_id(s, (a + 3 * f + s) % cfg.codebook_size) if 0 <= f < frames
                    else cfg.codec_pad_id(s))
        put(row, np.full((S,), 1.0 / S, np.float32), doc, start)
      put(tok(EOS), one, doc, start)
    out.update(input_ids=ids, loss_weights=w, segment_ids=seg, positions=pos)
    return out


def write_tiny_sources(root: str, cfg: ModelConfig, *, records: int = 64, seed: int = 0,
                       max_mel_frames: int = 300, max_text: int = 40, max_codec_frames: int = 40) -> dict:
  """Small ArrayRecord shards (und / gen / text sources) sized for tiny configs and short rows.

  Uses the data pipeline's own synthetic record generators (bagpiper_jax/data/bench.py), so tests
  of the train loop run the real Grain pipeline (and its checkpointable state) in milliseconds of
  writing. Returns config.data.train_sources-style {name: {'path', 'weight'}}.
  """
  import os  # pylint: disable=g-import-not-at-top
  from bagpiper_jax.data import bench  # pylint: disable=g-import-not-at-top
  kinds = {
      "sound_und": lambda rng, i, s: bench.und_example(rng, i, s, frames=(50, max_mel_frames),
                                                       caption=(4, max_text), text_vocab=cfg.text_vocab_size),
      "sound_gen": lambda rng, i, s: bench.gen_example(rng, i, s, frames=(8, max_codec_frames),
                                                       caption=(4, max_text), text_vocab=cfg.text_vocab_size),
      "text_only": lambda rng, i, s: bench.text_example(rng, i, s, length=(8, 2 * max_text),
                                                        text_vocab=cfg.text_vocab_size),
  }
  out = {}
  for k, (name, fn) in enumerate(sorted(kinds.items())):
    rng = np.random.default_rng([seed, k])
    d = os.path.join(root, name)
    bench.write_shards(d, (fn(rng, i, name) for i in range(records)), 2)
    out[name] = {"path": d, "weight": 1.0}
  return out


def tiny_train_config(stage: str = "pretrain", *, seq_len: int = 128, rows_per_device: int = 2,
                      audio_windows: int = 1, steps: int = 8):
  """configs/tiny.py shrunk for tests: short rows, synthetic data, log every step, sync saves."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
  spec = importlib.util.spec_from_file_location("_tiny_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(stage)
  c.data.demo = False
  c.data.synthetic = True
  c.data.seq_len = seq_len
  c.data.max_audio_windows = audio_windows
  c.data.per_device_batch = rows_per_device
  c.train_steps = steps
  c.optim.warmup_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.checkpoint.every_steps = steps
  c.checkpoint.async_save = False
  c.mesh.ici = dict(data=1, fsdp=-1, tensor=1, sequence=1)
  return c
