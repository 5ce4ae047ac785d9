"""The KV-cache decode path against a full forward (issue 11 test a).

A left-padded batch of two prompts of different lengths (one with a continuous-audio span, one
text only) is prefilled, then fed text rows and 8-stream delay-interleaved codec rows one at a
time; at every step the cached logits of all 8 streams must equal `Bagpiper.logits` over the
whole unpadded prefix of each prompt (fp32, 1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bagpiper_jax import batch as batch_lib
from bagpiper_jax.data import template
from bagpiper_jax.model import Bagpiper
from bagpiper_jax.model import config as mc
from bagpiper_jax.model.decode import BagpiperDecoder, full_logits
from conftest import tiny_model_config


def random_params(cfg, seed=0, std=0.2):
  """Random weights for every leaf (norm scales around 1), from the init's shapes: nothing compiled."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      Bagpiper(cfg).init(jax.random.key(seed), batch_lib.example(cfg, 1, 16, 1))["params"]))
  rng = np.random.default_rng(seed)
  leaf = lambda path, x: ((1.0 if path[-1].key == "scale" else 0.0)
                          + std * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def prompts(cfg):
  rng = np.random.default_rng(0)
  mel = rng.normal(size=(cfg.audio_encoder.num_mel_bins, 140)).astype(np.float32)  # 13 + 5 encoder rows
  a, _ = template.template_prompt({"messages": template.task_messages(
      "audio_to_text", [{"mel": mel}, {"text_ids": np.array([300])}])}, cfg)
  b, _ = template.template_prompt({"messages": template.task_messages(
      "text_to_audio", [{"text_ids": rng.integers(cfg.num_specials, cfg.codec_start, 5)},
                        {"codes": np.zeros((1, 8), np.int16)}])}, cfg)
  return [a, b]


def decode_rows(cfg, seed):
  """<assistant> <text> 3 text rows <eos> <assistant> <audio> 4 frames delay-interleaved (11 rows) <eos>."""
  rng = np.random.default_rng(seed)
  special = lambda i: [i] + [0] * 7
  rows = [special(mc.ASSISTANT), special(mc.TEXT)]
  rows += [[int(t)] + [0] * 7 for t in rng.integers(cfg.num_specials, cfg.codec_start, 3)]
  rows += [special(mc.EOS), special(mc.ASSISTANT), special(mc.AUDIO)]
  codes = rng.integers(0, cfg.codebook_size, (4, cfg.num_streams))
  rows += template.interleave_codes(codes, cfg).tolist()
  rows += [special(mc.EOS)]
  return np.asarray(rows, np.int32)


def full_forward(cfg, params, arrays, rows):
  """Bagpiper.logits of the prompt + rows as one unpadded document: [L, S, V] (causal, so position
  t holds the logits of the prefix ending at t)."""
  ids = np.concatenate([arrays["input_ids"], rows])
  n = len(ids)
  batch = {"input_ids": ids[None], "loss_weights": np.zeros((1, n, 8), np.float32),
           "segment_ids": np.ones((1, n), np.int32), "positions": np.arange(n, dtype=np.int32)[None]}
  if len(arrays["audio_mel"]):
    batch.update(audio_mel=arrays["audio_mel"][None].astype(np.float32),
                 audio_chunk_lens=arrays["audio_chunk_lens"][None],
                 audio_rows=np.concatenate([arrays["audio_rows"], np.full(len(rows), -1, np.int32)])[None])
  fn = jax.jit(lambda p, b: Bagpiper(cfg).apply({"params": p}, b, method=Bagpiper.logits))
  return np.asarray(fn(params, batch))[0]


def test_cached_logits_equal_full_forward_at_every_step():
  cfg = tiny_model_config()
  params = random_params(cfg)
  ps = prompts(cfg)
  lens = [len(p["input_ids"]) for p in ps]
  assert lens[0] != lens[1] and len(ps[0]["audio_mel"]) and not len(ps[1]["audio_mel"])
  b, pl = 2, max(lens) + 3  # left padding, more than the longer prompt needs
  enc = cfg.audio_encoder
  ids = np.zeros((b, pl, 8), np.int32)
  seg = np.zeros((b, pl), np.int32)
  pos = np.zeros((b, pl), np.int32)
  arows = np.full((b, pl), -1, np.int32)
  mel = np.zeros((b, 1, enc.chunks_per_window, enc.num_mel_bins, enc.chunk_frames), np.float32)
  lens_c = np.zeros((b, 1, enc.chunks_per_window), np.int32)
  for i, p in enumerate(ps):
    n = lens[i]
    ids[i, pl - n:], seg[i, pl - n:], pos[i, pl - n:] = p["input_ids"], 1, np.arange(n)
    arows[i, pl - n:] = p["audio_rows"]
    if len(p["audio_mel"]):
      mel[i] = p["audio_mel"]
      lens_c[i] = p["audio_chunk_lens"]
  batch = {"input_ids": ids, "loss_weights": np.zeros(ids.shape, np.float32), "segment_ids": seg,
           "positions": pos, "audio_mel": mel, "audio_chunk_lens": lens_c, "audio_rows": arows}
  dec = BagpiperDecoder(cfg)
  apply = lambda method, *a: dec.apply({"params": params}, *a, method=method)
  _, (k, v) = jax.jit(lambda b: apply(BagpiperDecoder.prefill, b))(batch)
  offsets = apply(BagpiperDecoder.stream_offsets)
  rows = [decode_rows(cfg, 1), decode_rows(cfg, 2)]
  steps = len(rows[0])
  s = pl + steps
  kc = jnp.zeros((cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)).at[:, :, :pl].set(k)
  vc = jnp.zeros_like(kc).at[:, :, :pl].set(v)
  start = np.array([pl - n for n in lens])
  step_fn = jax.jit(lambda kc, vc, x, p, m: apply(BagpiperDecoder.step, x, p, (kc, vc), m))
  want_all = [full_forward(cfg, params, ps[i], rows[i]) for i in range(b)]
  worst = 0.0
  for t in range(steps):
    slot = pl + t
    x = np.stack([r[t] for r in rows])[:, None]
    p = np.array([[lens[i] + t] for i in range(b)], np.int32)
    mask = (np.arange(s)[None] >= start[:, None]) & (np.arange(s)[None] < slot)
    base, (k1, v1) = step_fn(kc, vc, x, p, mask)
    kc, vc = kc.at[:, :, slot:slot + 1].set(k1), vc.at[:, :, slot:slot + 1].set(v1)
    got = np.asarray(full_logits(base, offsets))[:, 0]  # [B, S, V]
    for i in range(b):
      want = want_all[i][lens[i] + t]
      diff = float(np.abs(got[i] - want).max())
      worst = max(worst, diff)
      assert diff < 1e-4, (t, i, diff)
  print(f"max |cached - full| over {steps} steps x 2 prompts x 8 streams: {worst:.2e}")
  # The codec rows are real 8-stream rows: streams 1..7 change the logits (not only stream 0).
  assert (rows[0][10:20, 1:] != 0).any()
