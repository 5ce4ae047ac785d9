"""Flash attention for packed rows that skips the blocks between documents (Pallas GPU / Triton;
and, for TPU, jax's splash kernel told which blocks to skip: `splash_document_kernel`).

A packed row holds several documents; a position attends causally within its own document only
(`layers.attend` is the contract and the reference). A flash kernel that takes segment ids but walks
every causal block (jax's `pallas.ops.gpu.attention.mha`, `attention_impl="pallas_gpu"`) computes
and then masks away every block that lies between two documents. Here each query block's loop over
key blocks starts at the first key its documents can see, and each key block's loop over query
blocks (dk, dv) stops after the last query that can see it. With documents of mean length n in rows
of length L the pairs needed fall from ~L^2/2 to ~L*n/2 per row, and the blocks run to that plus
the blocks a boundary cuts (`causal_blocks_run`): 41% of the causal 128-blocks for the GPU bench's
documents of 32..2,048 positions in rows of 4,096; for rows of 8,192 packed with documents of
500-999 positions, 14% of the 128-blocks and 26% of splash's 512-blocks (launch/README.md).

The bounds are exact for any layout of ids, not only contiguous documents: a position's range is
[first, last] occurrence of its id in the row (`occurrence_bounds`), so a document split into two
runs still sees both (only more blocks are walked). Grouped-query attention is native in the
forward and dq kernels (each query head reads its K/V head, nothing is repeated); dk, dv are
computed per query head and summed over the group by XLA.

Three kernels, each a `pl.pallas_call` over (blocks, batch, query heads): the forward (output and
logsumexp), dq (over key blocks), dk+dv (over query blocks); delta = rowsum(dO * O) in XLA. Scores
and softmax in float32; the matmuls take the inputs' dtype (bf16 on GPU) with float32 accumulation.
`interpret=True` runs the same kernels in the Pallas interpreter (the CPU tests:
tests/test_doc_attention.py against `layers.attend`, values and gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

# A finite "minus infinity": a fully masked block then rescales to nothing instead of making NaNs.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def occurrence_bounds(segment_ids):
  """(first, last) [B, L] int32: the first and last position in its row of each position's id.

  Every position a query at t may attend lies in [first[t], t] (same id, causal); every query that
  may attend a key at t lies in [t, last[t]]. Ids outside [-1, L] (never produced by the packer) get
  the whole row, so nothing is ever skipped wrongly."""
  b, l = segment_ids.shape
  pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  key = segment_ids.astype(jnp.int32) + 1  # -1 (the kernel's own length padding) -> 0
  known = (key >= 0) & (key <= l + 1)
  key = jnp.where(known, key, l + 2)  # unknown ids share a bucket that is never read
  first = jax.vmap(lambda k, p: jax.ops.segment_min(p, k, num_segments=l + 3))(key, pos)
  last = jax.vmap(lambda k, p: jax.ops.segment_max(p, k, num_segments=l + 3))(key, pos)
  first = jnp.where(known, jnp.take_along_axis(first, key, axis=1), 0)
  last = jnp.where(known, jnp.take_along_axis(last, key, axis=1), l - 1)
  return first, last


def block_bounds(segment_ids, block_q: int, block_k: int):
  """(kv_start [B, L/block_q], q_stop [B, L/block_k]) int32, in blocks.

  kv_start[b, i]: the first key block query block i can see; its loop ends at the causal diagonal.
  q_stop[b, j]: one past the last query block that can see key block j; its loop starts at the
  diagonal."""
  return blocks_from_bounds(*occurrence_bounds(segment_ids), block_q, block_k)


def blocks_from_bounds(first, last, block_q: int, block_k: int):
  """`block_bounds` from `occurrence_bounds`' (first, last): the kernels compute those once per
  call and derive each kernel's blocks from them."""
  b, l = first.shape
  kv_start = first.reshape(b, l // block_q, block_q).min(axis=2) // block_k
  q_stop = last.reshape(b, l // block_k, block_k).max(axis=2) // block_q + 1
  return kv_start.astype(jnp.int32), q_stop.astype(jnp.int32)


def causal_blocks_run(segment_ids, block: int) -> float:
  """Of the causal grid's (query, key) blocks of `block` x `block` (the diagonal included), the
  fraction the document-skipping kernels run for these rows [B, L] (L a multiple of `block`)."""
  b, l = segment_ids.shape
  n = l // block
  kv_start, _ = block_bounds(jnp.asarray(segment_ids), block, block)
  run = jnp.sum(jnp.arange(1, n + 1)[None, :] - kv_start)
  return float(run) / (b * n * (n + 1) / 2)


def _mask(seg_q, seg_k, q_pos, k_pos):
  return (seg_q[:, None] == seg_k[None, :]) & (q_pos[:, None] >= k_pos[None, :])


def _diagonal_stop(i, block_q, block_k):
  """One past the key block that holds query block i's last position: the causal end of its loop."""
  return lax.div((i + 1) * block_q + block_k - 1, block_k)


def _fwd_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, start_ref, o_ref, lse_ref, *, scale, block_q,
                block_k):
  i = pl.program_id(0)
  q = q_ref[...]
  seg_q = segq_ref[...]
  q_pos = i * block_q + jnp.arange(block_q)

  def body(j, carry):
    acc, m, s_sum = carry
    ks = pl.ds(j * block_k, block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = plgpu.dot(q, k.T).astype(jnp.float32) * scale
    s = jnp.where(_mask(seg_q, segk_ref[ks], q_pos, j * block_k + jnp.arange(block_k)), s, _MASKED)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return acc, m_new, s_sum * alpha + p.sum(axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), _MASKED, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, s_sum = lax.fori_loop(start_ref[0], _diagonal_stop(i, block_q, block_k), body, init)
  o_ref[...] = (acc / s_sum[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(s_sum)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref, start_ref, dq_ref, *,
               scale, block_q, block_k):
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, delta, seg_q = lse_ref[...], delta_ref[...], segq_ref[...]
  q_pos = i * block_q + jnp.arange(block_q)

  def body(j, dq):
    ks = pl.ds(j * block_k, block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = plgpu.dot(q, k.T).astype(jnp.float32) * scale
    keep = _mask(seg_q, segk_ref[ks], q_pos, j * block_k + jnp.arange(block_k))
    p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (plgpu.dot(do, v.T).astype(jnp.float32) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k).astype(jnp.float32)

  dq = lax.fori_loop(start_ref[0], _diagonal_stop(i, block_q, block_k), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref, stop_ref, dk_ref,
                dv_ref, *, scale, block_q, block_k):
  j = pl.program_id(0)
  k, v, seg_k = k_ref[...], v_ref[...], segk_ref[...]
  k_pos = j * block_k + jnp.arange(block_k)

  def body(i, carry):
    dk, dv = carry
    qs = pl.ds(i * block_q, block_q)
    q, do = q_ref[qs, :], do_ref[qs, :]
    s = plgpu.dot(q, k.T).astype(jnp.float32) * scale  # [block_q, block_k]
    keep = _mask(segq_ref[qs], seg_k, i * block_q + jnp.arange(block_q), k_pos)
    p = jnp.where(keep, jnp.exp(s - lse_ref[qs][:, None]), 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype).T, do).astype(jnp.float32)
    ds = p * (plgpu.dot(do, v.T).astype(jnp.float32) - delta_ref[qs][:, None])
    return dk + plgpu.dot(ds.astype(q.dtype).T, q).astype(jnp.float32), dv

  start = lax.div(j * block_k, block_q)  # the causal diagonal
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(start, stop_ref[0], body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(head_dim: int):
  # 4 warps for small heads, 8 from head dim 128, 2 pipeline stages: the usual Triton flash settings.
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _forward(q, k, v, seg, occ, blocks, interpret):
  b, l, h, d = q.shape
  g = h // k.shape[2]
  bq, bk = blocks.block_q, blocks.block_k
  kv_start, _ = blocks_from_bounds(*occ, bq, bk)
  kernel = functools.partial(_fwd_kernel, scale=d ** -0.5, block_q=bq, block_k=bk)
  o, lse = pl.pallas_call(
      kernel, grid=(l // bq, b, h),
      in_specs=[pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
                pl.BlockSpec((None, l, None, d), lambda i, b_, h_: (b_, 0, h_ // g, 0)),
                pl.BlockSpec((None, l, None, d), lambda i, b_, h_: (b_, 0, h_ // g, 0)),
                pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
                pl.BlockSpec((None, l), lambda i, b_, h_: (b_, 0)),
                pl.BlockSpec((None, 1), lambda i, b_, h_: (b_, i))],
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, l), jnp.float32)],
      compiler_params=_params(d), interpret=interpret, name="doc_flash_forward",
  )(q, k, v, seg, seg, kv_start)
  return o, lse


def _backward(q, k, v, seg, occ, o, lse, do, blocks, interpret):
  b, l, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  full_qd = pl.BlockSpec((None, l, None, d), lambda n, b_, h_: (b_, 0, h_, 0))
  full_kv = pl.BlockSpec((None, l, None, d), lambda n, b_, h_: (b_, 0, h_ // g, 0))
  full_stat = pl.BlockSpec((None, None, l), lambda n, b_, h_: (b_, h_, 0))
  full_seg = pl.BlockSpec((None, l), lambda n, b_, h_: (b_, 0))

  bq, bk = blocks.block_q_dq, blocks.block_kv_dq
  kv_start, _ = blocks_from_bounds(*occ, bq, bk)
  q_blk = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=d ** -0.5, block_q=bq, block_k=bk), grid=(l // bq, b, h),
      in_specs=[q_blk, full_kv, full_kv, q_blk,
                pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
                pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
                pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)), full_seg,
                pl.BlockSpec((None, 1), lambda i, b_, h_: (b_, i))],
      out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(d), interpret=interpret, name="doc_flash_dq",
  )(q, k, v, do, lse, delta, seg, seg, kv_start)

  bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
  _, q_stop = blocks_from_bounds(*occ, bq, bk)
  kv_blk = pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_ // g, 0))
  out_blk = pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_, 0))
  per_head = jax.ShapeDtypeStruct((b, l, h, d), jnp.float32 if g > 1 else k.dtype)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=d ** -0.5, block_q=bq, block_k=bk), grid=(l // bk, b, h),
      in_specs=[full_qd, kv_blk, kv_blk, full_qd, full_stat, full_stat, full_seg,
                pl.BlockSpec((None, bk), lambda j, b_, h_: (b_, j)),
                pl.BlockSpec((None, 1), lambda j, b_, h_: (b_, j))],
      out_specs=[out_blk, out_blk], out_shape=[per_head, per_head],
      compiler_params=_params(d), interpret=interpret, name="doc_flash_dkv",
  )(q, k, v, do, lse, delta, seg, seg, q_stop)
  if g > 1:  # per query head -> per K/V head: the sum over each group
    dk = dk.reshape(b, l, kh, g, d).sum(axis=3)
    dv = dv.reshape(b, l, kh, g, d).sum(axis=3)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, seg, occ, blocks, interpret):
  return _forward(q, k, v, seg, occ, blocks, interpret)[0]


def _flash_fwd(q, k, v, seg, occ, blocks, interpret):
  o, lse = _forward(q, k, v, seg, occ, blocks, interpret)
  return o, (q, k, v, seg, occ, o, lse)


def _flash_bwd(blocks, interpret, res, do):
  q, k, v, seg, occ, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg, occ, o, lse, do, blocks, interpret)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def doc_flash_attend(q, k, v, segment_ids, *, blocks, interpret: bool = False):
  """Packed-row causal attention within documents. q [B, L, H, D], k/v [B, L, K, D] (H % K == 0),
  segment_ids [B, L] -> [B, L, H, D]; the contract of `layers.attend`. `blocks`: the six block
  sizes of `layers.pallas_gpu_blocks` (forward q, k; dk/dv q, kv; dq q, kv). Lengths are padded to
  the largest block with segment id -1 (padding attends only to padding and is dropped)."""
  l = q.shape[1]
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} are not a multiple of K/V heads {k.shape[2]}")
  q, k, v, segment_ids = pad_to_blocks(q, k, v, segment_ids, blocks)
  seg = segment_ids.astype(jnp.int32)
  # The ids' occurrence bounds, once for all three kernels (each derives its own blocks).
  return _flash(q, k, v, seg, occurrence_bounds(seg), blocks, interpret)[:, :l]


def pad_to_blocks(q, k, v, segment_ids, blocks):
  """q, k, v, segment_ids with the length padded to a multiple of the largest of the six `blocks`
  (both GPU kernels); the padding rows get segment id -1: they attend only to each other."""
  blk = max(blocks.block_q, blocks.block_k, blocks.block_q_dkv, blocks.block_kv_dkv, blocks.block_q_dq,
            blocks.block_kv_dq)
  pad = (-q.shape[1]) % blk
  if not pad:
    return q, k, v, segment_ids
  widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  return widen(q), widen(k), widen(v), jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)


# ---------------------------------------------------------------------------------------------
# TPU: the splash kernel with per-row block masks.


def splash_document_kernel(kernel: sk.SplashAttentionKernel, segment_ids, block: int) -> sk.SplashAttentionKernel:
  """`kernel`, a splash kernel made for the causal mask with blocks of `block` everywhere, for one
  row whose documents are `segment_ids` [L]: the blocks no document of theirs spans are skipped.

  Splash walks a static grid of (query block, key block) and reads, per grid step, from its mask
  info whether the block runs (`block_mask` > 0) and which block to fetch (`data_next`). The causal
  mask info skips the blocks above the diagonal; here, per row, the blocks below it that hold no
  same-document pair are set to 0 too (bounds of `block_bounds`), and their `data_next` points at
  the next block that does run, so the pipeline fetches nothing new for them. The kernel still
  applies the segment ids elementwise inside each block it runs."""
  l = segment_ids.shape[-1]
  n = l // block
  kv_start, q_stop = (x[0] for x in block_bounds(segment_ids.reshape(1, l), block, block))
  i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]

  def skipping(info, name, skip, data_next):
    """`info` with the `skip` blocks off and `data_next` [n, n] as the blocks to fetch."""
    if info.block_mask.shape != (1, n, n) or info.data_next.shape != (1, n, n):
      raise ValueError(f"splash {name} mask info of shape {info.block_mask.shape}; the document skip needs "
                       f"the full causal grid (1, {n}, {n}) of blocks of {block}")
    return info._replace(block_mask=jnp.where(skip, 0, info.block_mask[0])[None].astype(info.block_mask.dtype),
                         data_next=data_next[None].astype(info.data_next.dtype))

  def rows_of_queries(info):  # forward and dq: query block i outer, key block j inner; data_next = key block
    skip = j < kv_start[:, None]
    next_row = kv_start[jnp.minimum(jnp.arange(n) + 1, n - 1)][:, None]  # the next row's first key block
    return skipping(info, "forward/dq", skip,
                    jnp.where(skip, kv_start[:, None], jnp.where(j > i, next_row, info.data_next[0])))

  def columns_of_keys(info):  # dk/dv: key block j outer, heads, query block i inner; data_next = query block
    skip = i >= q_stop[None, :]
    # next: the same column's diagonal, for the next head
    return skipping(info, "dkv", skip, jnp.where(skip, j, info.data_next[0]))

  dq = kernel.dq_mask_info
  return sk.SplashAttentionKernel(rows_of_queries(kernel.fwd_mask_info),
                                  None if dq is None else rows_of_queries(dq),
                                  columns_of_keys(kernel.dkv_mask_info), **kernel.kwargs)
