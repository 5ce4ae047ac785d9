"""Multi-stream loss, computed in chunks of positions so the [B, L, 8, V] logits never exist.

For stream n, logits_n = lm_head(h + stream_emb[n]) = h @ W + stream_emb[n] @ W. The lm_head is
linear without bias, so one [chunk, V] matmul serves all 8 streams: the per-stream part is an
[8, V] offset computed once. Stream 0 takes the full softmax; streams 1..7 a softmax over the
codec range [codec_start, vocab).

A stream-0 target equal to <|pad|> (0) is never trained, as the reference's `ignore_index=0`
(docs/model.md#loss): such a cell adds nothing to the CE, z-loss, per-stream sums or gradients, but its
position still counts in the denominator (stream-0 positions with a nonzero weight). Raw text id 0
becomes such a target under the reference's text mapping (bagpiper_jax.tokenizer.to_unified).

Gradients are made in the forward pass, chunk by chunk (a custom VJP, like the reference's Liger
fused linear cross-entropy): each chunk's logits feed its CE sums and, at once, d/dlogits, from which
d/dh (a [chunk, V] x [V, E] matmul) and the lm_head / offset gradients are accumulated. The backward
pass only scales them by the incoming cotangent, so the logits matmul runs once per chunk instead of
twice (forward + rematerialisation): 3 lm_head-sized matmuls per position instead of 4. With
`model.lm_head_grad_per_row` the lm_head gradient is accumulated per row ([B, E, V] float32, sharded
like the batch: rows-per-device x E x V x 4 bytes, 2.45 GiB per row for the 8B) and summed over the
rows once, so the cross-device reduction of that [E, V] gradient happens once per loss call, not
once per chunk (launch/README.md); otherwise each chunk is summed over rows and positions at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from bagpiper_jax.model.config import PAD, ModelConfig


def shift_targets(input_ids, loss_weights, segment_ids):
  """Targets/weights aligned to the predicting position t: cell (t+1) of the same document."""
  tgt = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  w = jnp.concatenate([loss_weights[:, 1:], jnp.zeros_like(loss_weights[:, :1])], axis=1)
  same_doc = jnp.concatenate(
      [(segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0),
       jnp.zeros_like(segment_ids[:, :1], dtype=bool)], axis=1)
  return tgt, w * same_doc[..., None].astype(w.dtype)


def _chunk_terms(h_c, kernel, text_off, codec_off, t_c, w_c, cfg: ModelConfig, with_grad: bool):
  """One chunk: metric sums and, if `with_grad`, the gradient of its objective w.r.t. the logits.

  objective = sum over cells of w * (CE + z_loss_weight * lse^2) (every stream, its own softmax range)
  d objective / d logits = w * (softmax - onehot) + z_loss_weight * w * 2 * lse * softmax
  Returns (sums, d_base [B, C, V] (the gradient w.r.t. the shared h @ W), d_text_off [V], d_codec_off [S-1, Vc]).
  """
  cs = cfg.codec_start
  base = jnp.einsum("ble,ev->blv", h_c, kernel, preferred_element_type=jnp.float32)
  # Stream 0: full vocabulary.
  logits0 = base + text_off
  lse0 = jax.nn.logsumexp(logits0, axis=-1)
  tgt0 = jnp.take_along_axis(logits0, t_c[..., 0:1], axis=-1)[..., 0]
  ce0 = lse0 - tgt0
  # Streams 1..S-1: one softmax over the whole codec range [codec_start, vocab).
  logits_c = base[:, :, None, cs:] + codec_off  # [B, C, S-1, Vc]
  lse_c = jax.nn.logsumexp(logits_c, axis=-1)
  idx = jnp.clip(t_c[..., 1:] - cs, 0, logits_c.shape[-1] - 1)
  tgt_c = jnp.take_along_axis(logits_c, idx[..., None], axis=-1)[..., 0]
  ce_c = lse_c - tgt_c
  ce = jnp.concatenate([ce0[..., None], ce_c], axis=-1)  # [B, C, S]
  lse = jnp.concatenate([lse0[..., None], lse_c], axis=-1)
  w_in = w_c.astype(jnp.float32)
  # ignore_index=0 on stream 0: no CE / z term (nor gradient) for a pad target; count0 below keeps it.
  w = jnp.concatenate([jnp.where(t_c[..., 0:1] == PAD, 0.0, w_in[..., 0:1]), w_in[..., 1:]], axis=-1)
  is_codec0 = (t_c[..., 0] >= cs)
  audio_w = jnp.concatenate([jnp.where(is_codec0, w[..., 0], 0.0)[..., None], w[..., 1:]], axis=-1)
  sums = {
      "ce": jnp.sum(w * ce, axis=(0, 1)),
      "z": jnp.sum(w * lse * lse, axis=(0, 1)),
      "weight": jnp.sum(w, axis=(0, 1)),
      "text_ce": jnp.sum(jnp.where(is_codec0, 0.0, w[..., 0] * ce0)),
      "text_weight": jnp.sum(jnp.where(is_codec0, 0.0, w[..., 0])),
      "audio_ce": jnp.sum(audio_w * ce),
      "audio_weight": jnp.sum(audio_w),
      "count0": jnp.sum((w_in[..., 0] > 0).astype(jnp.float32)),
  }
  if not with_grad:
    return sums, None, None, None
  zw = cfg.z_loss_weight
  scale0 = w[..., 0] * (1.0 + 2.0 * zw * lse0)  # [B, C]
  d0 = jnp.exp(logits0 - lse0[..., None]) * scale0[..., None]
  d0 = d0 - jax.nn.one_hot(t_c[..., 0], d0.shape[-1], dtype=d0.dtype) * w[..., 0:1]
  scale_c = w[..., 1:] * (1.0 + 2.0 * zw * lse_c)  # [B, C, S-1]
  dc = jnp.exp(logits_c - lse_c[..., None]) * scale_c[..., None]
  dc = dc - jax.nn.one_hot(idx, dc.shape[-1], dtype=dc.dtype) * w[..., 1:, None]
  d_base = d0.at[..., cs:].add(jnp.sum(dc, axis=2))
  return sums, d_base, _sum_positions(d0), _sum_positions(dc)


def _sum_positions(x):
  """x summed over its leading (batch, position) axes, written as a contraction with ones.

  The same sum as jnp.sum(x, axis=(0, 1)), exact in float32 (HIGHEST precision: no bf16 or TF32
  passes on TPU/GPU). Why not a reduce: XLA:CPU (jax 0.10) runs a reduce over leading axes through
  YNNPACK at a tenth of memory speed (510 ms for these [4, 512, 7, 8200] softmax gradients, 14 ms as a
  contraction; docs/training.md, "Performance facts"); a contraction is a plain dot everywhere.
  """
  ones = jnp.ones(x.shape[:2], x.dtype)
  return jnp.einsum("bc,bc...->...", ones, x, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


def _zero_sums(s: int) -> dict:
  return {"ce": jnp.zeros((s,)), "z": jnp.zeros((s,)), "weight": jnp.zeros((s,)), "text_ce": jnp.zeros(()),
          "text_weight": jnp.zeros(()), "audio_ce": jnp.zeros(()), "audio_weight": jnp.zeros(()),
          "count0": jnp.zeros(())}


def _chunked(h, targets, weights, chunk: int):
  """[B, L, ...] -> [N, B, chunk, ...] (positions padded with weight 0)."""
  b, l = h.shape[:2]
  pad = (-l) % chunk
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, 0), (0, pad), (0, 0)))
  n = (l + pad) // chunk
  to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  return to_chunks(h), to_chunks(targets), to_chunks(weights), pad


def _loss_scan(h, lm_kernel, stream_offsets, targets, weights, cfg: ModelConfig, with_grad: bool):
  """The chunk loop. With `with_grad`, also d(objective)/d(h, kernel, offsets), built chunk by chunk
  in the forward pass (as Liger's fused linear cross-entropy does): the [chunk, V] logits are made
  once and never recomputed for the backward pass."""
  b, l, e = h.shape
  s, cs = cfg.num_streams, cfg.codec_start
  chunk = min(cfg.loss_chunk_size, l)
  hc, tc, wc, _ = _chunked(h, targets, weights, chunk)
  kernel = lm_kernel.astype(h.dtype)
  text_off = stream_offsets[0].astype(jnp.float32)
  codec_off = stream_offsets[1:, cs:].astype(jnp.float32)  # [S-1, Vc]

  if not with_grad:
    def body(acc, xs):
      sums, _, _, _ = _chunk_terms(*xs[:1], kernel, text_off, codec_off, *xs[1:], cfg, False)
      return jax.tree.map(jnp.add, acc, sums), None
    sums, _ = jax.lax.scan(body, _zero_sums(s), (hc, tc, wc))
    return sums, None

  v = lm_kernel.shape[1]
  per_row = cfg.lm_head_grad_per_row
  w_spec, w_shape = ("bev", (b, e, v)) if per_row else ("ev", (e, v))
  w_axes = ("batch", None, "vocab") if per_row else ("embed", "vocab")

  def body(acc, xs):
    sums, d_w, d_off0, d_offc = acc
    h_c, t_c, w_c = xs
    cs_sums, d_base, g0, gc = _chunk_terms(h_c, kernel, text_off, codec_off, t_c, w_c, cfg, True)
    d_base = d_base.astype(h.dtype)
    d_h = jnp.einsum("blv,ev->ble", d_base, kernel, preferred_element_type=jnp.float32).astype(h.dtype)
    # Per row (cfg.lm_head_grad_per_row): contracting the rows here adds an [E, V] reduction across
    # the devices holding the batch to every chunk (8 per 8,192-position row at chunk 1,024).
    d_w = d_w + jnp.einsum(f"ble,blv->{w_spec}", h_c, d_base, preferred_element_type=jnp.float32)
    d_w = nn.with_logical_constraint(d_w, w_axes)
    return (jax.tree.map(jnp.add, sums, cs_sums), d_w, d_off0 + g0, d_offc + gc), d_h

  init = (_zero_sums(s), nn.with_logical_constraint(jnp.zeros(w_shape, jnp.float32), w_axes),
          jnp.zeros((v,), jnp.float32), jnp.zeros(codec_off.shape, jnp.float32))
  (sums, d_w, d_off0, d_offc), d_h = jax.lax.scan(body, init, (hc, tc, wc))
  if per_row:
    d_w = nn.with_logical_constraint(jnp.sum(d_w, axis=0), ("embed", "vocab"))  # one reduction per call
  d_h = jnp.moveaxis(d_h, 0, 1).reshape(b, -1, e)[:, :l]
  d_off = jnp.zeros(stream_offsets.shape, jnp.float32).at[0].set(d_off0).at[1:, cs:].set(d_offc)
  return sums, (d_h, d_w, d_off)


def multistream_loss_sums(h, lm_kernel, stream_offsets, targets, weights, cfg: ModelConfig):
  """Per-stream weighted CE sums and the objective to differentiate.

  h: [B, L, E] final-norm output; lm_kernel: [E, V]; stream_offsets: [S, V] (= stream_emb @ W);
  targets/weights: [B, L, S] (already shifted). Returns dict of float32 sums ([S]-shaped ce, z,
  weight; scalars text_ce, text_weight, audio_ce, audio_weight, count0) plus "objective" =
  sum(ce) + z_loss_weight * sum(z), the only entry with a gradient (w.r.t. h, lm_kernel and
  stream_offsets, computed in the forward pass: `_fused_objective`); the metric sums carry none.
  """
  with jax.named_scope("multistream_loss"):  # names the loss's ops in profiles and compile logs
    objective, sums = _fused_objective(h, lm_kernel, stream_offsets, targets, weights, cfg)
  return {**jax.lax.stop_gradient(sums), "objective": objective}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_objective(h, lm_kernel, stream_offsets, targets, weights, cfg):
  sums, _ = _loss_scan(h, lm_kernel, stream_offsets, targets, weights, cfg, with_grad=False)
  return _objective(sums, cfg), sums


def _objective(sums, cfg: ModelConfig):
  return jnp.sum(sums["ce"]) + cfg.z_loss_weight * jnp.sum(sums["z"])


def _fused_objective_fwd(h, lm_kernel, stream_offsets, targets, weights, cfg):
  sums, (d_h, d_w, d_off) = _loss_scan(h, lm_kernel, stream_offsets, targets, weights, cfg, with_grad=True)
  return (_objective(sums, cfg), sums), (d_h, d_w.astype(lm_kernel.dtype), d_off.astype(stream_offsets.dtype))


def _fused_objective_bwd(cfg, res, cotangents):
  del cfg
  d_h, d_w, d_off = res
  g = cotangents[0]  # the metric sums' cotangents are dropped: they are stop_gradient'ed by the caller
  return ((d_h.astype(jnp.float32) * g).astype(d_h.dtype), (d_w * g).astype(d_w.dtype),
          (d_off * g).astype(d_off.dtype), None, None)


_fused_objective.defvjp(_fused_objective_fwd, _fused_objective_bwd)


def finalize_loss(sums, cfg: ModelConfig):
  """Loss = weighted CE sum over all streams (+ z-loss) / number of stream-0 positions with nonzero weight."""
  del cfg  # the z-loss weight is already in sums["objective"]
  denom = jnp.maximum(sums["count0"], 1.0)
  loss = sums["objective"] / denom
  safe = lambda a, b: jnp.where(b > 0, a / jnp.maximum(b, 1e-9), 0.0)
  aux = {
      "loss": loss,
      "text_loss": safe(sums["text_ce"], sums["text_weight"]),
      "audio_loss": safe(sums["audio_ce"], sums["audio_weight"]),  # 0 when the batch has no audio targets
      "stream_loss": safe(sums["ce"], sums["weight"]),  # mean CE per stream
      "num_target_tokens": sums["count0"],
  }
  return loss, aux
