"""Stream-0 target <|pad|> (0) is never trained, but its position counts, as the reference's loss.

The reference (ESPnet `fused_cross_entropy_loss`): stream 0 CE with `ignore_index=0` and
`ce_weight=vocab_weight`; streams 1..7 CE over the codec range; the sum is divided by the number of
stream-0 positions whose loss mask is nonzero, a `'!'` mapped to <|pad|> included. The numpy
reference below is that definition, computed from the model's full logits.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bagpiper_jax import tokenizer
from bagpiper_jax.model import Bagpiper
from bagpiper_jax.model import config as mc
from conftest import init_params, tiny_model_config


def _reference_loss(logits, ids, mask, cfg, *, ignore_pad=True):
  """float64 numpy: sum over targets of vocab_weight-weighted CE / count of nonzero stream-0 mask."""
  logits = np.asarray(logits, np.float64)[0]
  vocab_weight = np.where(np.arange(cfg.vocab_size) >= cfg.codec_start, 1.0 / cfg.num_streams, 1.0)
  total, count = 0.0, 0
  for t in range(ids.shape[0] - 1):
    m = mask[t + 1]
    count += int(m[0] != 0)
    for n in range(cfg.num_streams):
      y = ids[t + 1, n]
      if m[n] == 0 or (n == 0 and ignore_pad and y == 0) or (n > 0 and y < cfg.codec_start):
        continue
      lo = 0 if n == 0 else cfg.codec_start
      z = logits[t, n, lo:]
      lse = np.log(np.exp(z - z.max()).sum()) + z.max()
      total += vocab_weight[y] * (lse - logits[t, n, y])
  return total / count


def test_pad_targets_are_ignored_but_counted():
  cfg = tiny_model_config()
  rng = np.random.default_rng(0)
  # A caption whose raw ids contain 0 (`!` in Qwen3), mapped as the reference maps it.
  raw = rng.integers(1, cfg.text_vocab_size, size=14)
  raw[[2, 5, 6, 11]] = 0
  text = tokenizer.to_unified(raw)
  assert (text == 0).sum() == 4
  rows = [[mc.BOS], [mc.ASSISTANT], [mc.TEXT]] + [[int(i)] for i in text] + [[mc.EOS]]
  ids = np.zeros((len(rows) + 10, 8), np.int32)
  ids[:len(rows), 0] = [r[0] for r in rows]
  mask = np.zeros(ids.shape, np.float32)
  mask[1:len(rows), 0] = 1.0
  # Then an assistant audio segment of 3 frames (delay-interleaved), weight 1/8 on every stream.
  r0 = len(rows)
  codes = rng.integers(0, cfg.codebook_size, size=(3, 8))
  for r in range(10):
    for n in range(8):
      f = r - n
      ids[r0 + r, n] = cfg.codec_id(n, codes[f, n]) if 0 <= f < 3 else cfg.codec_pad_id(n)
  mask[r0:r0 + 10] = 0.125
  batch = {"input_ids": ids[None], "loss_weights": mask[None], "segment_ids": np.ones((1, ids.shape[0]), np.int32),
           "positions": np.arange(ids.shape[0], dtype=np.int32)[None]}
  model = Bagpiper(cfg)
  params = init_params(cfg, batch)
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
  loss, aux = model.apply({"params": params}, batch)
  logits = model.apply({"params": params}, batch, method=Bagpiper.logits)
  want = _reference_loss(logits, ids, mask, cfg)
  assert abs(float(loss) - want) < 1e-5 * max(1.0, abs(want)), (float(loss), want)
  # The count keeps the 4 pad targets: 1 (<|text|>) + 14 text + 1 (<|eos|>) + 1 (<|assistant|>) ... all
  # stream-0 cells with a nonzero mask, i.e. everything but <|bos|>.
  assert float(aux["num_target_tokens"]) == int((mask[1:, 0] != 0).sum()) == len(rows) - 1 + 10
  # Training the pad targets (the old behaviour) would give another loss: the test can tell.
  trained = _reference_loss(logits, ids, mask, cfg, ignore_pad=False)
  assert abs(trained - want) > 1e-3


def test_to_unified_and_back():
  raw = np.array([0, 5, 0, 151935])
  np.testing.assert_array_equal(tokenizer.to_unified(raw), [0, 261, 0, 152191])
  np.testing.assert_array_equal(tokenizer.to_unified(raw, id0_as_pad=False), [256, 261, 256, 152191])
  assert tokenizer.to_unified(raw).dtype == np.int32
  # from_unified: specials (pad included) are not text and drop out; codec ids are an error.
  np.testing.assert_array_equal(tokenizer.from_unified([1, 256, 261, 0, 3, 152191], text_vocab_size=151936),
                                [0, 5, 151935])
  with pytest.raises(ValueError, match="past the text range"):
    tokenizer.from_unified([300, 152192], text_vocab_size=151936)
  with pytest.raises(ValueError, match=">= 0"):
    tokenizer.to_unified([-1])
