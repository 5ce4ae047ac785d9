"""The document-skipping flash kernel (model/doc_attention.py) in the Pallas interpreter against
`layers.attend`, values and gradients, and its block bounds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagpiper_jax import metrics
from bagpiper_jax.model import doc_attention, layers
from conftest import xla_flags

BLOCKS = layers.pallas_gpu_blocks("32,16,16,32,32,16")  # unequal q/k blocks in every kernel


def _qkv(b, l, h=4, k=2, d=16, seed=5):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, l, n, d)), jnp.float32) for n in (h, k, k))


def _rows(*docs):
  """Segment ids from per-row lists of (id, length) runs."""
  return jnp.asarray([sum(([i] * n for i, n in row), []) for row in docs], jnp.int32)


def _check(seg, atol=2e-5, gtol=1e-4, **kw):
  q, k, v = _qkv(*seg.shape, **kw)
  ref = lambda q, k, v: layers.attend(q, k, v, seg)
  got = lambda q, k, v: doc_attention.doc_flash_attend(q, k, v, seg, blocks=BLOCKS, interpret=True)
  np.testing.assert_allclose(got(q, k, v), ref(q, k, v), atol=atol)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)  # a cotangent with no symmetry
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
  for name, a, b in zip("qkv", jax.grad(loss(got), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=gtol, err_msg=f"d{name}")


def test_equals_xla_attention_on_packed_rows():
  """Two rows: several documents (lengths off the block grid), trailing padding (id 0), a length
  that is not a block multiple (the kernel pads with id -1); GQA 4 query heads on 2 K/V heads."""
  _check(_rows([(1, 7), (2, 40), (3, 33), (4, 50), (0, 14)],
               [(1, 100), (2, 3), (3, 41)]))


def test_equals_xla_attention_when_a_document_is_split():
  """Ids need not be contiguous: a document in two runs (id 1 again after id 2) still sees both runs,
  padding in the middle sees the other padding; bounds come from first/last occurrences."""
  _check(_rows([(1, 20), (2, 30), (1, 25), (0, 9), (3, 30), (0, 14)]), h=2, k=2)


def test_block_bounds_skip_the_blocks_between_documents():
  seg = _rows([(1, 64), (2, 16), (3, 48)])  # documents at [0, 64), [64, 80), [80, 128)
  kv_start, q_stop = doc_attention.block_bounds(seg, 32, 16)
  # query blocks [0,32) [32,64) [64,96) [96,128): first keys 0, 0, 64, 80 -> key blocks of 16
  np.testing.assert_array_equal(kv_start, [[0, 0, 4, 5]])
  # key blocks of 16: the last query that sees them is 63 (blocks 0-3), 79 (4), 127 (5-7) -> q blocks of 32
  np.testing.assert_array_equal(q_stop, [[2, 2, 2, 2, 3, 4, 4, 4]])
  # query blocks of 32 run 1, 2, 1 (of 3), 2 (of 4) key blocks of 32: 6 of the causal 10
  assert doc_attention.causal_blocks_run(seg, 32) == pytest.approx(6 / 10)
  assert doc_attention.causal_blocks_run(jnp.ones((2, 128), jnp.int32), 32) == 1.0
  first, last = doc_attention.occurrence_bounds(_rows([(1, 3), (2, 2), (1, 2)]))
  np.testing.assert_array_equal(first, [[0, 0, 0, 3, 3, 0, 0]])
  np.testing.assert_array_equal(last, [[6, 6, 6, 4, 4, 6, 6]])


def test_rejects_heads_that_do_not_group():
  q, k, v = _qkv(1, 32, h=3, k=2)
  with pytest.raises(ValueError, match="not a multiple"):
    doc_attention.doc_flash_attend(q, k, v, jnp.ones((1, 32), jnp.int32), blocks=BLOCKS, interpret=True)


def test_attention_pairs_within_documents_is_the_kernels_share_of_the_full_row_count():
  """metrics.attention_pairs_within_documents: causal same-id pairs over the full-row causal pairs."""
  assert metrics.attention_pairs_within_documents(np.ones((2, 6), np.int32)) == 1.0
  # [1,1,2,2,2,0]: 3 + 6 + 1 pairs of 21
  assert metrics.attention_pairs_within_documents([[1, 1, 2, 2, 2, 0]]) == pytest.approx(10 / 21)
  # a split document counts as one id: [1,2,1] -> ids 1 (2 positions: 3 pairs) and 2 (1) of 6
  assert metrics.attention_pairs_within_documents([[1, 2, 1]]) == pytest.approx(4 / 6)


@pytest.mark.parametrize("spec", ("",) + layers.PALLAS_GPU_OTHER_BLOCKS)  # all that gpu_check times
def test_kernels_lower_to_triton_for_cuda(spec):
  """On this CPU host the three kernels go through Pallas' Triton lowering for CUDA (jax.export with
  platforms=["cuda"]): what only a GPU could catch before, short of Triton's own compile, is caught
  here (an op Pallas cannot lower to Triton, a block shape it rejects). bf16, GQA 16/8 heads of 128."""
  l, d = 512, 128
  q = jax.ShapeDtypeStruct((1, l, 16, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, l, 8, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, l), jnp.int32)
  f = lambda a, b, c, s: doc_attention.doc_flash_attend(a, b, c, s, blocks=layers.pallas_gpu_blocks(spec))
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), (0, 1, 2)))
  triton = "__gpu$xla.gpu.triton"
  exported = jax.export.export(grad, platforms=["cuda"],
                               disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(q, kv, kv, seg)
  text = exported.mlir_module()
  kernels = re.findall(r'name = "(doc_flash_\w+)"', text)
  assert sorted(kernels) == ["doc_flash_dkv", "doc_flash_dq", "doc_flash_forward"], kernels
  assert text.count(f"custom_call @{triton}") == 3


@pytest.mark.parametrize("fused_bwd", [False, True])
def test_splash_with_document_block_masks_equals_xla_attention(fused_bwd):
  """TPU splash (interpreter), blocks of 128, each row's kernel told to skip the blocks between its
  documents: two rows with different documents (several whole blocks skipped in each), a split
  document, padding; values and gradients against `layers.attend`."""
  seg = _rows([(1, 40), (2, 300), (3, 150), (4, 22)],
               [(1, 130), (2, 20), (1, 30), (3, 250), (0, 82)])
  q, k, v = _qkv(*seg.shape)
  ref = lambda q, k, v: layers.attend(q, k, v, seg)
  got = lambda q, k, v: layers.splash_attend(q, k, v, seg, interpret=True, block=128, fused_bwd=fused_bwd,
                                             skip_documents=True)
  np.testing.assert_allclose(got(q, k, v), ref(q, k, v), atol=2e-5)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
  for name, a, b in zip("qkv", jax.grad(loss(got), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"d{name}")


def test_splash_document_kernel_skips_whole_blocks():
  """The per-row mask info: a row of documents [0, 128), [128, 384), [384, 512) in blocks of 128."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  sizes = sk.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128, block_q_dkv=128, block_kv_dkv=128,
                        block_kv_dkv_compute=128, block_q_dq=128, block_kv_dq=128)
  causal = sk.make_splash_mqa_single_device(sm.MultiHeadMask([sm.CausalMask((512, 512))]), block_sizes=sizes)
  seg = _rows([(1, 128), (2, 256), (3, 128)])[0]
  kern = doc_attention.splash_document_kernel(causal, seg, 128)
  # forward (query block rows, key block columns): 1 = the diagonal, 2 = a whole block to compute, 0 = skip
  np.testing.assert_array_equal(kern.fwd_mask_info.block_mask[0], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 2, 1, 0],
                                                                  [0, 0, 0, 1]])
  np.testing.assert_array_equal(kern.fwd_mask_info.data_next[0], [[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 3],
                                                                 [3, 3, 3, 3]])
  np.testing.assert_array_equal(kern.dq_mask_info.block_mask, kern.fwd_mask_info.block_mask)
  np.testing.assert_array_equal(kern.dkv_mask_info.block_mask, kern.fwd_mask_info.block_mask)
  # dk/dv (grid: key block j, head, query block i): a skipped block fetches the query block the next
  # step that runs needs, the diagonal of the same column for the next head; the rest stays causal's
  np.testing.assert_array_equal(causal.dkv_mask_info.data_next[0], [[0, 0, 0, 0], [1, 1, 0, 0], [2, 2, 2, 0],
                                                                   [3, 3, 3, 3]])
  np.testing.assert_array_equal(kern.dkv_mask_info.data_next[0], [[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 2, 0],
                                                                 [0, 1, 2, 3]])


_SHARDED = r"""
import json, numpy as np, jax, jax.numpy as jnp
from bagpiper_jax import sharding
from bagpiper_jax.model import layers
from bagpiper_jax.train_step import mesh_rules
from configs.tiny import for_tests as tiny_train_config
c = tiny_train_config()
c.mesh.ici = dict(data=1, fsdp=4, tensor=2, sequence=1)
mesh = sharding.make_mesh(c)
rng = np.random.default_rng(0)
seg = np.zeros((8, 384), np.int32)
for r, row in enumerate(seg):  # each device's two rows need different blocks: one per block, or long ones
  t, doc = 0, 1
  while t < 384:
    n = 128 if r % 2 == 0 else min(int(rng.integers(150, 300)), 384 - t)
    row[t:t + n], t, doc = doc, t + n, doc + 1
q, k, v = (jnp.asarray(rng.normal(size=(8, 384, h, 16)), jnp.float32) for h in (4, 2, 2))
w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
def loss(f):
  return lambda q, k, v: jnp.sum(f(q, k, v) * w)
ref = lambda q, k, v: layers.attend(q, k, v, seg)
got = lambda q, k, v: layers.splash_attend(q, k, v, seg, interpret=True, block=128, skip_documents=True)
def traced(q, k, v):
  with mesh_rules(mesh):  # the training step's abstract mesh: splash runs per shard under shard_map
    return jax.value_and_grad(loss(got), (0, 1, 2))(q, k, v)
on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
(l_got, g_got) = jax.jit(traced, in_shardings=(on_mesh,) * 3)(q, k, v)
(l_ref, g_ref) = jax.value_and_grad(loss(ref), (0, 1, 2))(q, k, v)
print("RESULT " + json.dumps({"devices": len(jax.devices()), "loss": [float(l_got), float(l_ref)],
                              "grad_diff": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(g_got, g_ref)]}))
"""


def test_splash_document_kernels_per_shard_on_eight_devices(tmp_path):
  """splash_docs under the training mesh (8 fake CPU devices, fsdp 4 x tensor 2): shard_map gives each
  device two rows and one K/V head, each row gets its own block masks; loss and gradients equal
  `layers.attend`'s."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  p = subprocess.run([sys.executable, "-c", _SHARDED], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  res = json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][0][7:])
  assert res["devices"] == 8
  assert res["loss"][0] == pytest.approx(res["loss"][1], rel=1e-5)
  assert max(res["grad_diff"]) < 1e-4, res
