"""The model's decode path: prefill a prompt into a KV cache, then one row at a time.

`BagpiperDecoder` is `Bagpiper` with the decoder layers in their KV-cache form
(layers.scanned_decoder_layers(decode=True)); the parameters are the same tree, so a training
checkpoint applies as it is:

    dec = BagpiperDecoder(cfg)
    h, (k, v) = dec.apply({"params": p}, prompt_batch, method=BagpiperDecoder.prefill)
    base, (k1, v1) = dec.apply({"params": p}, ids, positions, (k_cache, v_cache), kv_mask,
                               method=BagpiperDecoder.step)
    logits = base[:, :, None, :] + dec.apply({"params": p}, method=BagpiperDecoder.stream_offsets)

Rows are embedded exactly as in training (`embed_rows`: the 8 stream ids summed, id 0 zeroed in
streams 1..7; continuous-audio rows replaced by adapter(encoder(mel)) in the prefill), and the
prefill runs the training attention (per-document causal, `segment_ids` 0 = padding), so a left-
padded batch of prompts of different lengths is one call. Logits of stream n are
`lm_head(h) + stream_emb[n] @ lm_head` (docs/model.md#output): `step` returns the [B, T, V] base
and `stream_offsets` the [S, V] table, so callers build only the logits they sample from.

Cache layout (the caller owns it, bagpiper_jax/generate/engine.py): k, v [layers, B, S, K, D] with
logical axes CACHE_AXES, sharded by the training rules (bagpiper_jax/sharding.py). `step` does
not write the cache: it returns the new rows' (k, v) [layers, B, T, K, D]; the caller places them
(one dynamic_update_slice, in place under donation). `kv_mask` [B, S] says which cache slots each
row sees (its own earlier rows, never padding or the slot being written).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from bagpiper_jax.model import layers
from bagpiper_jax.model.bagpiper import Bagpiper

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class BagpiperDecoder(Bagpiper):
  """Bagpiper with a KV-cache decode path (same parameters)."""

  def decoder_stack(self):
    return layers.scanned_decoder_layers(self.cfg, decode=True)(self.cfg, decode=True)

  def _constrain_kv(self, kv):
    return tuple(nn.with_logical_constraint(a, CACHE_AXES) for a in kv)

  def prefill(self, batch):
    """Prompt rows (batch.py contract; loss_weights unused) -> (h [B, P, E], (k, v) [layers, B, P, K, D])."""
    x, kv = self.layers(self.input_rows(batch), self.rotary(batch["positions"]), batch["segment_ids"],
                        None, None)
    return self.norm(x), self._constrain_kv(kv)

  def step(self, input_ids, positions, cache, kv_mask, segment_ids=None):
    """T new rows [B, T, S] at `positions` [B, T] attending to `cache` -> (base logits [B, T, V] f32,
    (k, v) [layers, B, T, K, D] of the new rows). segment_ids [B, T]: 1 (default) = real row."""
    if segment_ids is None:
      segment_ids = jnp.ones(positions.shape, jnp.int32)
    x = nn.with_logical_constraint(self.embed_rows(input_ids), ("batch", "length", "embed"))
    cache = self._constrain_kv(cache)
    x, kv = self.layers(x, self.rotary(positions), segment_ids, cache, kv_mask)
    return self.base_logits(self.norm(x)), self._constrain_kv(kv)

  def base_logits(self, h):
    """lm_head(h) in float32 accumulation: [..., V]."""
    kernel = self.lm_head.kernel
    out = jnp.einsum("...e,ev->...v", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(out, ("batch", "length", "vocab")) if out.ndim == 3 else out


def full_logits(base, offsets):
  """All streams' logits [..., S, V] from base [..., V] and offsets [S, V] (tests, small inputs)."""
  return base[..., None, :] + offsets


def empty_cache(cfg, batch: int, length: int, dtype) -> tuple[jax.Array, jax.Array]:
  """Zero (k, v) [layers, B, S, K, D]."""
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
