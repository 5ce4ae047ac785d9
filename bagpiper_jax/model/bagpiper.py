"""The Bagpiper model: Qwen3 decoder with 8-stream codec I/O, frozen Qwen3-Omni audio tower, adapter.

    rows = sum_n embed_tokens(input_ids[..., n])        (id 0 contributes nothing in streams 1..7)
    rows[audio_rows >= 0] = adapter(audio_encoder(mel))  (continuous user audio)
    h = norm(decoder(rows))                              (packed: per-document causal attention)
    logits_n = lm_head(h + stream_emb[n])                (stream_emb[0] held at zero)

`__call__` returns the loss (chunked, see loss.py); `logits` returns all logits (tests only).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from bagpiper_jax import batch as batch_lib
from bagpiper_jax.model import layers, loss as loss_lib
from bagpiper_jax.model.audio_encoder import AudioEncoder
from bagpiper_jax.model.config import ModelConfig


class LMHead(nn.Module):
  """Untied output projection [E, V] (no bias). The loss reads `kernel` directly (see loss.py)."""

  features_in: int
  features_out: int
  kernel_init: nn.initializers.Initializer
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  def setup(self):
    self.kernel = self.param("kernel", self.kernel_init, (self.features_in, self.features_out),
                             self.param_dtype)

  def __call__(self, x):
    return jnp.einsum("...e,ev->...v", x, self.kernel.astype(self.dtype))


class Bagpiper(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dt, pdt = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                                 embedding_init=init(("vocab", "embed")))
    self.layers = self.decoder_stack()
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dt, pdt)
    self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, init(("embed", "vocab")), dt, pdt)
    self.stream_emb = nn.Embed(
        cfg.num_streams, cfg.hidden_size, dtype=dt, param_dtype=pdt,
        embedding_init=nn.with_logical_partitioning(nn.initializers.zeros, ("streams", "embed")))
    self.adapter = nn.Dense(cfg.hidden_size, dtype=dt, param_dtype=pdt,
                            kernel_init=init(("audio_embed", "embed")),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    self.audio_encoder = AudioEncoder(cfg.audio_encoder, dtype=dt, param_dtype=pdt,
                                      remat_policy=cfg.remat_policy)

  def decoder_stack(self):
    """The scanned decoder layers (model/decode.py overrides this with their KV-cache form)."""
    return layers.scanned_decoder_layers(self.cfg)(self.cfg)

  # ---- pieces ----

  def embed_rows(self, input_ids):
    """Sum of the per-stream embeddings; pad id 0 is zeroed in streams 1..7.

    Stream 0 is a lookup. Streams 1..7 (model.codec_embedding):
      "lookup": seven lookups. Their gradients are seven scatter-adds; on TPU each sorts all the ids
        of the global batch (the table is sharded along its embedding axis).
      "matmul": a stream n >= 1 id is 0 or lies in stream n's codec block (batch.py checks), and those
        blocks are disjoint and adjacent, so the seven streams are one multi-hot row over the 7 x 1025
        ids of the blocks, contracted with that slice of the table. Exact (one product by 1.0 per
        stream; the sum is taken in float32 and rounded once); its gradient is a matmul. The 8B
        pretrain row: 2 x 0.48 TFLOP (forward, backward), 0.2% of the row's 439 TFLOP, and 1.1 GiB
        less per chip on v5p-128 (launch/README.md, compile time).
    """
    cfg = self.cfg
    x = self.embed_tokens(input_ids[..., 0])
    if cfg.codec_embedding == "lookup":
      for n in range(1, cfg.num_streams):
        ids = input_ids[..., n]
        x = x + jnp.where((ids != 0)[..., None], self.embed_tokens(ids), 0).astype(x.dtype)
      return x
    if cfg.codec_embedding != "matmul":
      raise ValueError(f"unknown model.codec_embedding {cfg.codec_embedding!r}; expected 'lookup' or 'matmul'")
    first, width = cfg.codec_pad_id(1), (cfg.num_streams - 1) * cfg.codec_block
    cols = jnp.arange(first, first + width)
    multi_hot = (input_ids[..., 1:, None] == cols).any(axis=-2).astype(x.dtype)  # [B, L, 7 x 1025]
    table = self.embed_tokens.embedding[first:first + width].astype(x.dtype)
    codec = jnp.einsum("blc,ce->ble", multi_hot, table, preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)
    return (x.astype(jnp.float32) + codec).astype(x.dtype)

  def audio_rows(self, batch, x):
    """Overwrites continuous-audio rows with adapter(encoder(mel)). The encoder is frozen."""
    mel, lens, rows = batch["audio_mel"], batch["audio_chunk_lens"], batch["audio_rows"]
    b, w = mel.shape[:2]
    frames, _ = self.audio_encoder(mel.reshape(b * w, *mel.shape[2:]), lens.reshape(b * w, -1))
    frames = jax.lax.stop_gradient(frames).reshape(b, -1, frames.shape[-1])  # [B, A = W*C*13, D]
    # Row l takes frame rows[b, l] as a one-hot contraction, not a gather: exact (one product by 1.0
    # per output, HIGHEST precision) and it compiles faster for TPU slices (launch/README.md, compile
    # time). The frames are picked before the adapter (a per-frame map), so no gradient flows through
    # the pick and the adapter's input gets none. The 8B pretrain row: pick [8,192 x 3,328] x [3,328 x
    # 2,048], 0.11 TFLOP; adapter on 8,192 rows, 2 x 0.14 TFLOP (forward, weight gradient); 0.1% of the
    # row's 439 TFLOP (picking after the adapter took 0.56).
    select = (rows[..., None] == jnp.arange(frames.shape[1])).astype(frames.dtype)
    picked = jnp.einsum("bla,bad->bld", select, frames, precision=jax.lax.Precision.HIGHEST)
    # Without the barrier XLA's buffer assignment overlaps the encoder's temporaries with the decoder's
    # saved activations: +0.58 GiB per chip on the v5p-128 pretrain step.
    picked, x = jax.lax.optimization_barrier((picked, x))
    emb = self.adapter(picked)  # [B, L, E]
    return jnp.where((rows >= 0)[..., None], emb.astype(x.dtype), x)

  def input_rows(self, batch):
    """A checked batch -> the decoder's input [B, L, E]: the 8-stream row embeddings, continuous-audio
    rows overwritten by the adapter (training, evaluation and the decode path's prefill)."""
    batch_lib.validate_batch(batch, self.cfg)
    x = self.embed_rows(batch["input_ids"])
    if "audio_mel" in batch:
      x = self.audio_rows(batch, x)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def hidden(self, batch):
    """Final-norm hidden states [B, L, E]."""
    x, _ = self.layers(self.input_rows(batch), self.rotary(batch["positions"]), batch["segment_ids"])
    return self.norm(x)

  def rotary(self, positions):
    """The decoder's RoPE (cos, sin) for positions [B, L], computed once for all layers."""
    return layers.rope_table(positions, self.cfg.head_dim, self.cfg.rope_theta)

  def stream_table(self):
    """stream_emb with row 0 held at zero: [S, E]."""
    e = self.stream_emb.embedding
    return e * (jnp.arange(self.cfg.num_streams) > 0)[:, None].astype(e.dtype)

  def stream_offsets(self):
    """[S, V] float32: stream_emb[n] @ lm_head, added to the base logits of stream n. Row 0 is zero by
    definition (stream_table), so only rows 1..S-1 are multiplied: a one-stream model (a plain LM)
    computes no offsets at all."""
    kernel = self.lm_head.kernel.astype(jnp.float32)
    rest = jnp.einsum("se,ev->sv", self.stream_emb.embedding[1:].astype(jnp.float32), kernel)
    return jnp.concatenate([jnp.zeros((1, kernel.shape[1]), jnp.float32), rest], axis=0)

  # ---- entry points ----

  def __call__(self, batch: Mapping[str, jax.Array]):
    """Returns (loss, aux). aux: text_loss, audio_loss, stream_loss [S], num_target_tokens."""
    cfg = self.cfg
    h = self.hidden(batch)
    targets, weights = loss_lib.shift_targets(batch["input_ids"], batch["loss_weights"], batch["segment_ids"])
    sums = loss_lib.multistream_loss_sums(h, self.lm_head.kernel, self.stream_offsets(), targets, weights, cfg)
    return loss_lib.finalize_loss(sums, cfg)

  def logits(self, batch):
    """All logits [B, L, S, V] straight from the definition (small inputs only)."""
    h = self.hidden(batch)
    rows = h[:, :, None, :] + self.stream_table().astype(h.dtype)
    return self.lm_head(rows).astype(jnp.float32)
