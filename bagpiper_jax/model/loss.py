"""Multi-stream loss, computed in chunks of positions so the [B, L, 8, V] logits never exist.

For stream n, logits_n = lm_head(h + stream_emb[n]) = h @ W + stream_emb[n] @ W. The lm_head is
linear without bias, so one [chunk, V] matmul serves all 8 streams: the per-stream part is an
[8, V] offset computed once. Stream 0 takes the full softmax; streams 1..7 a softmax over the
codec range [codec_start, vocab). Each chunk is rematerialised in the backward pass.

A stream-0 target equal to <|pad|> (0) is never trained, as the reference's `ignore_index=0`
(docs/model.md#loss): such a cell adds nothing to the CE, z-loss or per-stream sums, but its position
still counts in the denominator (stream-0 positions with a nonzero weight). Raw text id 0 becomes such a
target under the reference's text mapping (bagpiper_jax.tokenizer.to_unified).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bagpiper_jax.model.config import PAD, ModelConfig


def shift_targets(input_ids, loss_weights, segment_ids):
  """Targets/weights aligned to the predicting position t: cell (t+1) of the same document."""
  tgt = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  w = jnp.concatenate([loss_weights[:, 1:], jnp.zeros_like(loss_weights[:, :1])], axis=1)
  same_doc = jnp.concatenate(
      [(segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0),
       jnp.zeros_like(segment_ids[:, :1], dtype=bool)], axis=1)
  return tgt, w * same_doc[..., None].astype(w.dtype)


def multistream_loss_sums(h, lm_kernel, stream_offsets, targets, weights, cfg: ModelConfig):
  """Per-stream weighted CE sums.

  h: [B, L, E] final-norm output; lm_kernel: [E, V]; stream_offsets: [S, V] (= stream_emb @ W);
  targets/weights: [B, L, S] (already shifted). Returns dict of [S]-shaped float32 sums.
  """
  b, l, e = h.shape
  s = cfg.num_streams
  chunk = min(cfg.loss_chunk_size, l)
  pad = (-l) % chunk
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, 0), (0, pad), (0, 0)))
  n = (l + pad) // chunk
  cs = cfg.codec_start
  codec_off = stream_offsets[1:, cs:].astype(jnp.float32)  # [S-1, Vc]
  text_off = stream_offsets[0].astype(jnp.float32)

  def one_chunk(h_c, t_c, w_c):
    base = jnp.einsum("ble,ev->blv", h_c, lm_kernel.astype(h_c.dtype), preferred_element_type=jnp.float32)
    # Stream 0: full vocabulary.
    logits0 = base + text_off
    lse0 = jax.nn.logsumexp(logits0, axis=-1)
    tgt0 = jnp.take_along_axis(logits0, t_c[..., 0:1], axis=-1)[..., 0]
    ce0 = lse0 - tgt0
    # Streams 1..S-1: the codec range only.
    logits_c = base[:, :, None, cs:] + codec_off  # [B, C, S-1, Vc]
    lse_c = jax.nn.logsumexp(logits_c, axis=-1)
    idx = jnp.clip(t_c[..., 1:] - cs, 0, logits_c.shape[-1] - 1)
    tgt_c = jnp.take_along_axis(logits_c, idx[..., None], axis=-1)[..., 0]
    ce_c = lse_c - tgt_c
    ce = jnp.concatenate([ce0[..., None], ce_c], axis=-1)  # [B, C, S]
    lse = jnp.concatenate([lse0[..., None], lse_c], axis=-1)
    w_in = w_c.astype(jnp.float32)
    # ignore_index=0 on stream 0: no CE / z term for a pad target; the count below keeps it.
    w = jnp.concatenate([jnp.where(t_c[..., 0:1] == PAD, 0.0, w_in[..., 0:1]), w_in[..., 1:]], axis=-1)
    is_codec0 = (t_c[..., 0] >= cs)
    audio_w = jnp.concatenate([jnp.where(is_codec0, w[..., 0], 0.0)[..., None], w[..., 1:]], axis=-1)
    return {
        "ce": jnp.sum(w * ce, axis=(0, 1)),
        "z": jnp.sum(w * lse * lse, axis=(0, 1)),
        "weight": jnp.sum(w, axis=(0, 1)),
        "text_ce": jnp.sum(jnp.where(is_codec0, 0.0, w[..., 0] * ce0)),
        "text_weight": jnp.sum(jnp.where(is_codec0, 0.0, w[..., 0])),
        "audio_ce": jnp.sum(audio_w * ce),
        "audio_weight": jnp.sum(audio_w),
        "count0": jnp.sum((w_in[..., 0] > 0).astype(jnp.float32)),
    }

  one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)

  def body(acc, xs):
    out = one_chunk(*xs)
    return jax.tree.map(jnp.add, acc, out), None

  to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  zeros = {"ce": jnp.zeros((s,)), "z": jnp.zeros((s,)), "weight": jnp.zeros((s,)),
           "text_ce": jnp.zeros(()), "text_weight": jnp.zeros(()), "audio_ce": jnp.zeros(()),
           "audio_weight": jnp.zeros(()), "count0": jnp.zeros(())}
  sums, _ = jax.lax.scan(body, zeros, (to_chunks(h), to_chunks(targets), to_chunks(weights)))
  return sums


def finalize_loss(sums, cfg: ModelConfig):
  """Loss = weighted CE sum over all streams / number of stream-0 positions with nonzero weight."""
  denom = jnp.maximum(sums["count0"], 1.0)
  loss = (jnp.sum(sums["ce"]) + cfg.z_loss_weight * jnp.sum(sums["z"])) / denom
  safe = lambda a, b: jnp.where(b > 0, a / jnp.maximum(b, 1e-9), 0.0)
  aux = {
      "loss": loss,
      "text_loss": safe(sums["text_ce"], sums["text_weight"]),
      "audio_loss": safe(sums["audio_ce"], sums["audio_weight"]),  # 0 when the batch has no audio targets
      "stream_loss": safe(sums["ce"], sums["weight"]),  # mean CE per stream
      "num_target_tokens": sums["count0"],
  }
  return loss, aux
