"""Sampling one id per (row, stream) and the reference's logit masks.

`sample` is the reference's `_logits_to_token` (docs/model.md#decoding-rules-of-the-reference):
temperature 0 -> argmax; else top-k over the (masked) logits, softmax of the top-k values divided
by the temperature, one draw. Top-p (nucleus) is an addition (off at 1.0, the reference default):
it keeps the smallest prefix of the sorted top-k whose probability reaches p.

`reference_masks` builds the reference's per-stream vocabulary masks as full [S, V] tables
(`prepare_inference` in ESPnet's parallel.py, here True = allowed where the reference's True is
forbidden). The decode loop (engine.py) never materialises [B, S, V] masked logits: it samples text
from stream 0's [V] logits and audio from each stream's own 1,025-id interval (plus <|eos|>/<|eot|>
on stream 0), which the tests check against these tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bagpiper_jax.model import config as mc

NEG_INF = -jnp.inf


def sample(logits, key, *, temperature: float, top_k: int, top_p: float = 1.0):
  """logits [..., N] (forbidden entries -inf) -> int32 indices [...], one draw per leading index.

  temperature, top_k (<= 0: all N) and top_p are static. One key draws all leading indices.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  n = logits.shape[-1]
  k = n if top_k <= 0 else min(int(top_k), n)
  vals, idx = jax.lax.top_k(logits, k)
  vals = vals / temperature
  if top_p < 1.0:
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better candidates
    vals = jnp.where(before < top_p, vals, NEG_INF)  # the first candidate always stays
  choice = jax.random.categorical(key, vals, axis=-1)
  return jnp.take_along_axis(idx, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def reference_masks(cfg: mc.ModelConfig) -> dict[str, np.ndarray]:
  """The reference's masks as bool [S, V] tables, True = allowed.

  modality: stream 0 may be <|text|>, <|audio|>, <|image|>, <|video|>, <|toolcall|>; streams 1..7 only 0.
  text:     stream 0 the text ids [num_specials, codec_start); streams 1..7 only 0.
  audio:    stream n its own 1,025 ids (its pad, then its codes).
  <|eos|>/<|eot|> are in none of them: the loop opens them on stream 0 from `min_steps` on
  (`open_closers`).
  """
  s, v = cfg.num_streams, cfg.vocab_size
  modality = np.zeros((s, v), bool)
  modality[0, [mc.AUDIO, mc.TEXT, mc.IMAGE, mc.VIDEO, mc.TOOLCALL]] = True
  modality[1:, 0] = True
  text = np.zeros((s, v), bool)
  text[0, cfg.num_specials:cfg.codec_start] = True
  text[1:, 0] = True
  audio = np.zeros((s, v), bool)
  for n in range(s):
    audio[n, cfg.codec_pad_id(n):cfg.codec_pad_id(n) + cfg.codec_block] = True
  return {"modality": modality, "text": text, "audio": audio}


def open_closers(mask: np.ndarray) -> np.ndarray:
  """The mask with <|eos|> and <|eot|> allowed on stream 0 (the reference's `step >= min_step`)."""
  out = mask.copy()
  out[0, [mc.EOS, mc.EOT]] = True
  return out
