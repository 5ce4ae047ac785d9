"""Qwen3 decoder building blocks in Flax Linen: RMSNorm, RoPE, GQA attention with QK-norm, SwiGLU.

Parameters carry logical axis names; activations are annotated with `nn.with_logical_constraint`.
The mapping of names onto a mesh lives in `bagpiper_jax/sharding.py`, never here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from bagpiper_jax.model.config import ModelConfig

Dtype = jnp.dtype


def dtype_of(name: str):
  return jnp.dtype(name)


class RMSNorm(nn.Module):
  """y = scale * x / sqrt(mean(x^2) + eps), computed in float32 (as Qwen3RMSNorm)."""

  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


class Proj(nn.Module):
  """y = x . kernel over the trailing `in_axes` dims of x; kernel [*in_dims, *features] (+ bias [*features]).

  Like nn.DenseGeneral, but the kernel is created with its full multi-axis shape, so its logical
  axis names (from `kernel_init`) always match its rank, also under a mesh.
  """

  features: tuple[int, ...]
  kernel_init: nn.initializers.Initializer
  in_axes: int = 1
  bias_init: nn.initializers.Initializer | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = tuple(x.shape[x.ndim - self.in_axes:]) + tuple(self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_axes)
    if self.bias_init is not None:
      y = y + self.param("bias", self.bias_init, tuple(self.features), self.param_dtype).astype(self.dtype)
    return y


def rope(x, positions, theta: float):
  """Rotary embedding, half-split layout (as HF `rotate_half`). x: [B, L, H, D]; positions: [B, L]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  cos = jnp.cos(freqs)[:, :, None, :]
  sin = jnp.sin(freqs)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def packed_causal_mask(q_segment_ids, kv_segment_ids, q_offset=0):
  """[B, Lq, Lk] bool: causal within a document (same segment id); padding (0) sees padding.

  Query i of this block sits at absolute row q_offset + i; keys start at row 0.
  """
  lq, lk = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
  causal = (q_offset + jnp.arange(lq))[:, None] >= jnp.arange(lk)[None, :]
  same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return causal[None] & same


def _attend_block(q, k, v, mask):
  """q [B, Lq, K, G, D], k/v [B, Lk, K, D], mask [B, Lq, Lk] -> [B, Lq, K, G, D] (float32 softmax)."""
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  scores = scores * (q.shape[-1] ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskd->bqkgd", probs, v)


def attend(q, k, v, segment_ids, q_chunk: int = 0):
  """Grouped-query attention over packed documents. q [B, L, H, D]; k, v [B, L, K, D].

  With q_chunk > 0 (and L > q_chunk) queries are processed in blocks of q_chunk rows, each block
  rematerialised in the backward pass: attention memory is O(q_chunk * L) instead of O(L^2).
  """
  b, l, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, l, kv, h // kv, d)
  if not q_chunk or l <= q_chunk:
    out = _attend_block(qg, k, v, packed_causal_mask(segment_ids, segment_ids))
    return out.reshape(b, l, h, d)
  pad = (-l) % q_chunk  # padded query rows get segment -1: they see nothing and are dropped
  if pad:
    qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  q_seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  n = (l + pad) // q_chunk

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block(i, q_blk, seg_blk):
    return _attend_block(q_blk, k, v, packed_causal_mask(seg_blk, segment_ids, i * q_chunk))

  q_blocks = jnp.moveaxis(qg.reshape(b, n, q_chunk, kv, h // kv, d), 1, 0)
  seg_blocks = jnp.moveaxis(q_seg.reshape(b, n, q_chunk), 1, 0)
  out = jax.lax.map(lambda xs: block(*xs), (jnp.arange(n), q_blocks, seg_blocks))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * q_chunk, h, d)[:, :l]


def attend_cached(q, k, v, segment_ids, k_cache, v_cache, kv_mask):
  """Decode-time attention: new rows attend to earlier rows in a KV cache and to each other.

  q [B, T, H, D]; k, v [B, T, K, D] of the T new rows; segment_ids [B, T] of the new rows (causal
  among them, per document, as `attend`); k_cache, v_cache [B, S, K, D]; kv_mask [B, S] says which
  cache slots each row may see. One softmax over both key sets (float32), as `attend` computes it.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  low = jnp.finfo(jnp.float32).min
  scale = d ** -0.5
  s_cache = jnp.einsum("bqkgd,bskd->bkgqs", qg, k_cache, preferred_element_type=jnp.float32) * scale
  s_cache = jnp.where(kv_mask[:, None, None, None, :], s_cache, low)
  s_new = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
  s_new = jnp.where(packed_causal_mask(segment_ids, segment_ids)[:, None, None], s_new, low)
  m = jnp.maximum(s_cache.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
  p_cache, p_new = jnp.exp(s_cache - m), jnp.exp(s_new - m)
  denom = p_cache.sum(-1) + p_new.sum(-1)  # [B, K, G, T]
  out = (jnp.einsum("bkgqs,bskd->bqkgd", p_cache.astype(v.dtype), v_cache, preferred_element_type=jnp.float32)
         + jnp.einsum("bkgqs,bskd->bqkgd", p_new.astype(v.dtype), v, preferred_element_type=jnp.float32))
  out = out / jnp.moveaxis(denom, 3, 1)[..., None]
  return out.reshape(b, t, h, d)


def _dense_init(cfg: ModelConfig, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def splash_attend(q, k, v, segment_ids, *, interpret: bool = False, block: int = 512):
  """TPU flash attention (Pallas splash kernel) with per-document causal masking. Same contract as `attend`.

  GQA runs the kernel's MQA form once per KV head. Under a mesh (the training step's abstract mesh)
  the kernel runs per shard through shard_map, with batch and heads split as the logical rules say;
  the length axis is kept whole per shard. `interpret=True` runs the kernel in the Pallas interpreter
  (CPU tests).
  """
  b, l, h, d = q.shape
  blk = min(block, -(-l // 128) * 128)
  pad = (-l) % blk  # padded rows form their own segment (-1): they attend only to each other
  if pad:
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v = widen(q), widen(k), widen(v)
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  lp = l + pad
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)

  def local(q, k, v, seg):
    bl, _, hl, _ = q.shape
    kvl = k.shape[2]
    g = hl // kvl
    mask = sm.MultiHeadMask([sm.CausalMask((lp, lp))] * g)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    qq = (q * (d ** -0.5)).transpose(0, 2, 1, 3).reshape(bl, kvl, g, lp, d)
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    per_head = lambda a, b_, c, s: kernel(a, b_, c, segment_ids=sk.SegmentIds(s, s))
    out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(qq, kk, vv, seg)
    return out.reshape(bl, hl, lp, d).transpose(0, 2, 1, 3)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    out = local(q, k, v, segment_ids)
  else:
    spec = lambda *names: jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(names))
    q_spec = spec("batch", None, "heads", None)
    kv_spec = spec("batch", None, "kv_heads", None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, spec("batch", None)),
                        out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)
  return out[:, :l]


class Attention(nn.Module):
  """GQA self-attention. With `decode` (generation, bagpiper_jax/model/decode.py) it also returns the
  new rows' (k, v) for the KV cache, and attends to `cache` = (k_cache, v_cache, kv_mask) when given."""

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    proj = functools.partial(Proj, dtype=dt, param_dtype=pdt)
    q = proj((cfg.num_heads, cfg.head_dim), _dense_init(cfg, ("embed", "heads", "head_dim")), name="q_proj")(x)
    k = proj((cfg.num_kv_heads, cfg.head_dim), _dense_init(cfg, ("embed", "kv_heads", "head_dim")),
             name="k_proj")(x)
    v = proj((cfg.num_kv_heads, cfg.head_dim), _dense_init(cfg, ("embed", "kv_heads", "head_dim")),
             name="v_proj")(x)
    q = RMSNorm(cfg.rms_norm_eps, dt, pdt, axis_name="head_dim", name="q_norm")(q)
    k = RMSNorm(cfg.rms_norm_eps, dt, pdt, axis_name="head_dim", name="k_norm")(k)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
    if cache is not None:
      out = attend_cached(q, k, v, segment_ids, *cache).astype(dt)
    elif cfg.attention_impl == "xla":
      out = attend(q, k, v, segment_ids, cfg.attention_q_chunk).astype(dt)
    elif cfg.attention_impl in ("splash", "splash_interpret"):
      out = splash_attend(q, k, v, segment_ids, interpret=cfg.attention_impl == "splash_interpret").astype(dt)
    else:
      raise ValueError(f"unknown model.attention_impl {cfg.attention_impl!r}; "
                       "expected 'xla', 'splash' or 'splash_interpret'")
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    out = proj((cfg.hidden_size,), _dense_init(cfg, ("heads", "head_dim", "embed")), in_axes=2,
               name="o_proj")(out)
    return (out, (k, v)) if self.decode else out


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=dt, param_dtype=pdt)
    gate = dense(cfg.intermediate_size, kernel_init=_dense_init(cfg, ("embed", "mlp")), name="gate_proj")(x)
    up = dense(cfg.intermediate_size, kernel_init=_dense_init(cfg, ("embed", "mlp")), name="up_proj")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(cfg.hidden_size, kernel_init=_dense_init(cfg, ("mlp", "embed")), name="down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm Qwen3 block. Signature (carry, broadcast...) -> (carry, None) for nn.scan.

  With `decode`: (x, positions, segment_ids, cache, kv_mask) -> (x, (k, v) of the new rows), where
  `cache` = this layer's (k_cache, v_cache) or None (prefill: attention as in training).
  """

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None, kv_mask=None):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
    attn = Attention(cfg, self.decode, name="self_attn")
    kv = None
    if self.decode:
      a, kv = attn(h, positions, segment_ids, None if cache is None else (*cache, kv_mask))
    else:
      a = attn(h, positions, segment_ids)
    x = x + a
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
    x = x + MLP(cfg, name="mlp")(h)
    return x, kv


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown model.remat_policy {name!r}; expected one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def scanned_decoder_layers(cfg: ModelConfig, decode: bool = False):
  """DecoderLayer stacked on a leading 'layers' axis and run with nn.scan (compile time flat in depth).

  Instantiate as `scanned_decoder_layers(cfg)(cfg, name="layers")`; call `(x, positions, segment_ids)`.
  Decode (generation): `scanned_decoder_layers(cfg, decode=True)(cfg, decode=True)`, called
  `(x, positions, segment_ids, cache, kv_mask)` with cache = (k, v) [layers, B, S, K, D] or None;
  returns (x, (k, v) [layers, B, T, K, D] of the new rows). Same parameters, no remat.
  """
  if decode:
    return nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})
  layer = DecoderLayer
  if cfg.remat_policy != "none":
    layer = nn.remat(layer, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
  return nn.scan(
      layer,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast),
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
