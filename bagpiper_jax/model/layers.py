"""Qwen3 decoder building blocks in Flax Linen: RMSNorm, RoPE, GQA attention with QK-norm, SwiGLU.

Parameters carry logical axis names; activations are annotated with `nn.with_logical_constraint`.
The mapping of names onto a mesh lives in `bagpiper_jax/sharding.py`, never here.

Rematerialisation. The decoder layer tags its matmul outputs with `jax.ad_checkpoint.checkpoint_name`,
spelled as MaxText does so its remat recipes carry over: `decoder_layer_input`, `query_proj`,
`key_proj`, `value_proj`, `context` (attention output; with a kernel, its residuals too),
`out_proj`, `mlpwi_0` (gate), `mlpwi_1` (up), `mlpwo` (down). `model.remat_policy` picks what the
backward pass keeps (`REMAT_POLICIES`, `NAMED_POLICIES`), `model.remat_save` adds names and
`model.remat_offload` moves named values to host memory (`pinned_host`) instead of keeping them in
HBM or recomputing them (`remat_policy`).

Attention kernels (`model.attention_impl`), all with the same packed-row contract as `attend`
(per-document causal masking from segment ids; parity-tested against it):
  xla                 plain XLA, query blocks of `attention_q_chunk` rows (any backend)
  splash              TPU Pallas splash kernel (`splash_interpret`: the same in the interpreter)
  splash_docs         the same, each row's kernel told to skip the blocks between its documents
                      (doc_attention.splash_document_kernel; `splash_docs_interpret`)
  cudnn               cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPU)
  pallas_gpu          Pallas GPU (Triton) flash attention with segment ids (`pallas_gpu_interpret`:
                      the same kernel in the Pallas interpreter, CPU tests)
  pallas_gpu_docs     ours (model/doc_attention.py): the same, but each block's loop skips the blocks
                      between documents, and GQA without repeating K/V (`pallas_gpu_docs_interpret`)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from bagpiper_jax.model.config import ModelConfig
from bagpiper_jax.model.doc_attention import doc_flash_attend, pad_to_blocks, splash_document_kernel

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


def rope_table(positions, head_dim: int, theta: float):
  """The rotary angles' (cos, sin), each [B, L, D/2] float32, for positions [B, L].

  Computed once per forward pass, outside the layer scan, and broadcast to every layer: inside the
  scanned (and rematerialised) layer, f32 sin/cos were the two largest kernels of the decoder's
  forward on TPU (launch/README.md, compile time)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  # The barrier keeps XLA from sinking the cheap-looking sin/cos back into the loop body.
  return jax.lax.optimization_barrier((jnp.cos(freqs), jnp.sin(freqs)))


def rope(x, table):
  """Rotary embedding, half-split layout (as HF `rotate_half`). x: [B, L, H, D]; table: rope_table(...)."""
  cos, sin = (t[:, :, None, :] for t in table)
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


def splash_attend(q, k, v, segment_ids, *, interpret: bool = False, block: int = 512,
                  fused_bwd: bool = False, residual_name: str | None = None, skip_documents: bool = False):
  """TPU flash attention (Pallas splash kernel) with per-document causal masking. Same contract as `attend`.

  GQA runs the kernel's MQA form once per KV head. Under a mesh (the training step's abstract mesh)
  the kernel runs per shard through shard_map, with batch and heads split as the logical rules say;
  the length axis is kept whole per shard. `interpret=True` runs the kernel in the Pallas interpreter
  (CPU tests). `fused_bwd`: one backward kernel for dq, dk and dv (5 block matmuls instead of 7).
  `residual_name`: checkpoint name of the kernel's residuals (output, logsumexp), so a remat policy
  that saves it does not rerun the forward kernel in the backward pass. `skip_documents`: each row's
  kernel also skips the blocks between its documents (doc_attention.splash_document_kernel).
  """
  b, l, h, d = q.shape
  blk = min(block, -(-l // 128) * 128)
  pad = (-l) % blk  # padded rows form their own segment (-1): they attend only to each other
  if pad:
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v = widen(q), widen(k), widen(v)
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  lp = l + pad
  dq_blocks = {} if fused_bwd else dict(block_q_dq=blk, block_kv_dq=blk)
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, use_fused_bwd_kernel=fused_bwd, **dq_blocks)

  def local(q, k, v, seg):
    bl, _, hl, _ = q.shape
    kvl = k.shape[2]
    g = hl // kvl
    mask = sm.MultiHeadMask([sm.CausalMask((lp, lp))] * g)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret,
                                              residual_checkpoint_name=residual_name)
    qq = (q * (d ** -0.5)).transpose(0, 2, 1, 3).reshape(bl, kvl, g, lp, d)
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if skip_documents:  # a kernel per row: its block masks depend on the row's documents
      out = jnp.stack([jax.vmap(functools.partial(_splash_heads, splash_document_kernel(kernel, seg[r], blk)),
                                in_axes=(0, 0, 0, None))(qq[r], kk[r], vv[r], seg[r]) for r in range(bl)])
    else:
      out = jax.vmap(jax.vmap(functools.partial(_splash_heads, kernel), in_axes=(0, 0, 0, None)))(qq, kk, vv, seg)
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


def _splash_heads(kernel, q, k, v, seg):
  return kernel(q, k, v, segment_ids=sk.SegmentIds(seg, seg))


def segment_mask(segment_ids):
  """[B, 1, L, L] bool: same document (segment id); causality is left to the kernel (is_causal)."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def dot_product_attend(q, k, v, segment_ids, *, implementation: str = "cudnn"):
  """Packed-row attention through `jax.nn.dot_product_attention` (cuDNN flash attention on NVIDIA GPUs).

  jax 0.10's public API has no segment ids (only right-padding lengths: `query_seq_lengths`,
  `key_value_seq_lengths`), so documents are separated by a boolean mask [B, 1, L, L] (same segment)
  with `is_causal=True`; cuDNN takes it as an additive bias, broadcast over heads, and still skips the
  blocks above the diagonal. GQA is native (K heads for H query heads). `implementation="xla"` runs
  the same call through XLA (CPU parity tests of the mask semantics); "cudnn" needs bf16/fp16 inputs.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), is_causal=True,
                                      implementation=implementation)


# Pallas GPU kernel blocks: forward (block_q x block_k) and the backward kernel's dk/dv and dq loops.
# The fastest of launch/gpu_check.py's set for head dim 128, bf16, 1 x 4,096 packed, 16/8 heads
# (H200, 2026-11-27: fwd+bwd 1.19 ms; block_k=64 1.36 ms; launch/README.md "On a GPU").
PALLAS_GPU_BLOCKS = gpu_attention.BlockSizes(block_q=128, block_k=128, block_q_dkv=64, block_kv_dkv=64,
                                             block_q_dq=64, block_kv_dq=64)
# The alternatives launch/gpu_check.py times beside it (model.attention_blocks values).
PALLAS_GPU_OTHER_BLOCKS = ("128,64,64,64,64,64", "128,128,32,64,64,32", "64,64,32,64,64,32")


def pallas_gpu_blocks(spec: str) -> gpu_attention.BlockSizes:
  """`model.attention_blocks` ("q,k,q_dkv,kv_dkv,q_dq,kv_dq"; '' = PALLAS_GPU_BLOCKS) as BlockSizes."""
  if not spec:
    return PALLAS_GPU_BLOCKS
  try:
    sizes = [int(x) for x in spec.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 6 or any(b <= 0 or b & (b - 1) for b in sizes):
    raise ValueError(f"model.attention_blocks={spec!r}: expected 6 powers of two "
                     "'block_q,block_k,block_q_dkv,block_kv_dkv,block_q_dq,block_kv_dq'")
  names = ("block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")
  return gpu_attention.BlockSizes(**dict(zip(names, sizes)))


def pallas_gpu_attend(q, k, v, segment_ids, *, interpret: bool = False,
                      blocks: gpu_attention.BlockSizes = PALLAS_GPU_BLOCKS):
  """Flash attention as a Pallas GPU (Triton) kernel with segment ids. Same contract as `attend`.

  The kernel is multi-head only, so K/V heads are repeated for the query groups (GQA). Lengths are
  padded to the block size with segment id -1 (padding rows see only each other and are dropped).
  `interpret=True` runs the kernel in the Pallas interpreter (CPU tests).
  """
  b, l, h, d = q.shape
  g = h // k.shape[2]
  q, k, v, segment_ids = pad_to_blocks(q, k, v, segment_ids, blocks)
  if g > 1:
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  out = gpu_attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=d ** -0.5, causal=True,
                          block_sizes=blocks, interpret=interpret)
  return out[:, :l]


class Attention(nn.Module):
  """GQA self-attention. With `decode` (generation, bagpiper_jax/model/decode.py) it also returns the
  new rows' (k, v) for the KV cache, and attends to `cache` = (k_cache, v_cache, kv_mask) when given."""

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, rotary, segment_ids, cache=None):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    proj = functools.partial(Proj, dtype=dt, param_dtype=pdt)
    q = proj((cfg.num_heads, cfg.head_dim), _dense_init(cfg, ("embed", "heads", "head_dim")), name="q_proj")(x)
    k = proj((cfg.num_kv_heads, cfg.head_dim), _dense_init(cfg, ("embed", "kv_heads", "head_dim")),
             name="k_proj")(x)
    v = proj((cfg.num_kv_heads, cfg.head_dim), _dense_init(cfg, ("embed", "kv_heads", "head_dim")),
             name="v_proj")(x)
    q, k, v = checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")
    q = RMSNorm(cfg.rms_norm_eps, dt, pdt, axis_name="head_dim", name="q_norm")(q)
    k = RMSNorm(cfg.rms_norm_eps, dt, pdt, axis_name="head_dim", name="k_norm")(k)
    q, k = rope(q, rotary), rope(k, rotary)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
    impl = cfg.attention_impl
    if cfg.attention_blocks and impl not in PALLAS_GPU_IMPLS:
      raise ValueError(f"model.attention_blocks={cfg.attention_blocks!r} sets the pallas_gpu kernel's blocks; "
                       f"model.attention_impl is {impl!r}")
    if cache is not None:
      out = attend_cached(q, k, v, segment_ids, *cache).astype(dt)
    elif impl in SPLASH_IMPLS:
      # The kernel tags its own residuals "context": saving them spares the forward kernel's rerun.
      out = splash_attend(q, k, v, segment_ids, interpret=impl.endswith("_interpret"),
                          fused_bwd=cfg.attention_fused_bwd, residual_name="context",
                          skip_documents=impl.startswith("splash_docs")).astype(dt)
    else:
      if impl == "xla":
        out = attend(q, k, v, segment_ids, cfg.attention_q_chunk)
      elif impl == "cudnn":
        out = dot_product_attend(q, k, v, segment_ids)
      elif impl in ("pallas_gpu", "pallas_gpu_interpret"):
        out = pallas_gpu_attend(q, k, v, segment_ids, interpret=impl == "pallas_gpu_interpret",
                                blocks=pallas_gpu_blocks(cfg.attention_blocks))
      elif impl in ("pallas_gpu_docs", "pallas_gpu_docs_interpret"):
        out = doc_flash_attend(q, k, v, segment_ids, interpret=impl == "pallas_gpu_docs_interpret",
                               blocks=pallas_gpu_blocks(cfg.attention_blocks))
      else:
        raise ValueError(f"unknown model.attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}")
      out = checkpoint_name(out.astype(dt), "context")
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    out = proj((cfg.hidden_size,), _dense_init(cfg, ("heads", "head_dim", "embed")), in_axes=2,
               name="o_proj")(out)
    out = checkpoint_name(out, "out_proj")
    return (out, (k, v)) if self.decode else out


PALLAS_GPU_IMPLS = ("pallas_gpu", "pallas_gpu_interpret", "pallas_gpu_docs", "pallas_gpu_docs_interpret")
SPLASH_IMPLS = ("splash", "splash_interpret", "splash_docs", "splash_docs_interpret")
ATTENTION_IMPLS = ("xla",) + SPLASH_IMPLS + ("cudnn",) + PALLAS_GPU_IMPLS
GPU_KERNELS = ("cudnn",) + PALLAS_GPU_IMPLS  # each a jax.custom_vjp (remat_policy)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=dt, param_dtype=pdt)
    gate = dense(cfg.intermediate_size, kernel_init=_dense_init(cfg, ("embed", "mlp")), name="gate_proj")(x)
    up = dense(cfg.intermediate_size, kernel_init=_dense_init(cfg, ("embed", "mlp")), name="up_proj")(x)
    gate, up = checkpoint_name(gate, "mlpwi_0"), checkpoint_name(up, "mlpwi_1")
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    out = dense(cfg.hidden_size, kernel_init=_dense_init(cfg, ("mlp", "embed")), name="down_proj")(h)
    return checkpoint_name(out, "mlpwo")


class DecoderLayer(nn.Module):
  """Pre-norm Qwen3 block. Signature (carry, broadcast...) -> (carry, None) for nn.scan.

  `rotary` = rope_table(positions, ...), computed once outside the scan.
  With `decode`: (x, rotary, segment_ids, cache, kv_mask) -> (x, (k, v) of the new rows), where
  `cache` = this layer's (k_cache, v_cache) or None (prefill: attention as in training).
  """

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, rotary, segment_ids, cache=None, kv_mask=None):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = checkpoint_name(x, "decoder_layer_input")
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
    attn = Attention(cfg, self.decode, name="self_attn")
    kv = None
    if self.decode:
      a, kv = attn(h, rotary, segment_ids, None if cache is None else (*cache, kv_mask))
    else:
      a = attn(h, rotary, segment_ids)
    x = x + a
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
    x = x + MLP(cfg, name="mlp")(h)
    return x, kv


# Policies by what they are: jax's built-in ones (on primitives) ...
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint at all: the backward pass keeps every intermediate
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# ... and MaxText's, on the names the layer tags (see the module docstring). "minimal" keeps every
# projection output and recomputes only norms, RoPE, activations and attention; "minimal_with_context"
# keeps the attention output too (for splash: its residuals, so its forward kernel never reruns).
_QKV = ("query_proj", "key_proj", "value_proj")
_MLP = ("mlpwi_0", "mlpwi_1", "mlpwo")
NAMED_POLICIES = {
    "minimal": _QKV + ("out_proj",) + _MLP,
    "minimal_with_context": _QKV + ("context", "out_proj") + _MLP,
    "save_qkv_proj": _QKV,
    "save_out_proj": ("out_proj",),
    "save_dot_except_mlp": _QKV + ("out_proj",),
    "save_dot_except_mlpwi": _QKV + ("out_proj", "mlpwo"),
    "save_dot_with_context_except_mlp": _QKV + ("context", "out_proj"),
    "custom": (),  # exactly model.remat_save (+ model.remat_offload)
}
CHECKPOINT_NAMES = ("decoder_layer_input",) + _QKV + ("context", "out_proj") + _MLP


def _names(csv: str, what: str) -> tuple[str, ...]:
  names = tuple(n.strip() for n in csv.split(",") if n.strip())
  unknown = set(names) - set(CHECKPOINT_NAMES)
  if unknown:
    raise ValueError(f"model.{what}: unknown checkpoint names {sorted(unknown)}; the layer tags "
                     f"{list(CHECKPOINT_NAMES)}")
  return names


def _saving_kernel_residuals(policy):
  """`policy`, and also the outputs of every `jax.custom_vjp` call and Pallas kernel in the layer: the
  GPU attention kernel (the policy sees jax's and cuDNN's as one `custom_vjp_call`, ours,
  model/doc_attention.py, as its forward `pallas_call`), so its residuals (output, logsumexp) are
  kept and the forward kernel does not rerun in the backward pass."""
  def saves(prim, *avals, **params):
    return prim.name in ("custom_vjp_call", "pallas_call") or policy(prim, *avals, **params)
  return saves


def remat_policy(name: str, save: str = "", offload: str = "", attention_impl: str = "xla"):
  """The jax.checkpoint policy of `name` (a REMAT_POLICIES or NAMED_POLICIES key).

  `save` (comma-separated checkpoint names) adds names to a named policy; `offload` names values to
  move to host memory (`pinned_host`) in the forward pass and back for the backward pass, instead of
  keeping them in HBM (save) or recomputing them. Saving "context" with a GPU attention kernel
  (`attention_impl` in GPU_KERNELS) keeps the kernel's residuals too, so, as with splash (whose kernel
  tags them itself), its forward kernel never reruns.
  """
  known = sorted(REMAT_POLICIES) + sorted(NAMED_POLICIES)
  if name not in REMAT_POLICIES and name not in NAMED_POLICIES:
    raise ValueError(f"unknown model.remat_policy {name!r}; expected one of {known}")
  save_names, offload_names = _names(save, "remat_save"), _names(offload, "remat_offload")
  if name in REMAT_POLICIES:
    if save_names or offload_names:
      raise ValueError(f"model.remat_save / model.remat_offload need a named remat_policy "
                       f"({sorted(NAMED_POLICIES)}), not {name!r}")
    return REMAT_POLICIES[name]
  saved = tuple(n for n in dict.fromkeys(NAMED_POLICIES[name] + save_names) if n not in offload_names)
  if not offload_names:
    policy = jax.checkpoint_policies.save_only_these_names(*saved)
  else:
    policy = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=saved, names_which_can_be_offloaded=offload_names,
        offload_src="device", offload_dst="pinned_host")
  if "context" in saved and attention_impl in GPU_KERNELS:
    policy = _saving_kernel_residuals(policy)
  return policy


def scanned_decoder_layers(cfg: ModelConfig, decode: bool = False):
  """DecoderLayer stacked on a leading 'layers' axis and run with nn.scan (compile time flat in depth).

  Instantiate as `scanned_decoder_layers(cfg)(cfg, name="layers")`; call `(x, rope_table(positions, ...), segment_ids)`.
  Decode (generation): `scanned_decoder_layers(cfg, decode=True)(cfg, decode=True)`, called
  `(x, rotary, segment_ids, cache, kv_mask)` with cache = (k, v) [layers, B, S, K, D] or None;
  returns (x, (k, v) [layers, B, T, K, D] of the new rows). Same parameters, no remat.
  """
  if decode:
    return nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})
  layer = DecoderLayer
  policy = remat_policy(cfg.remat_policy, cfg.remat_save, cfg.remat_offload, cfg.attention_impl)
  if cfg.remat_policy != "none":
    layer = nn.remat(layer, policy=policy, prevent_cse=False)
  return nn.scan(
      layer,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast),
      length=cfg.num_layers,
      unroll=cfg.scan_unroll,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
