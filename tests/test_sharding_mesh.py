"""Mesh construction, the logical-axis rules table, and 1-device vs 8-device equivalence.

The 8-device checks run in a subprocess: XLA_FLAGS=--xla_force_host_platform_device_count=8 must
be set before jax is imported, and this pytest process already imported it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from bagpiper_jax import sharding, train_state
from bagpiper_jax.model import ModelConfig
from configs import bagpiper_8b
from configs.tiny import for_tests as tiny_train_config
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_8b():
  return bagpiper_8b.get_config("pretrain")


def test_mesh_shapes_resolve_and_reject():
  c = tiny_train_config()
  c.mesh.ici = dict(data=1, fsdp=-1, tensor=2, sequence=1)
  assert sharding.mesh_shapes(c, 8) == ([1, 4, 2, 1], [1, 1, 1, 1])
  c.mesh.dcn = dict(data=2, fsdp=1, tensor=1, sequence=1)
  assert sharding.mesh_shapes(c, 16, num_slices=2) == ([1, 4, 2, 1], [2, 1, 1, 1])
  c.mesh.dcn = dict(data=1, fsdp=1, tensor=1, sequence=1)
  c.mesh.ici = dict(data=1, fsdp=3, tensor=2, sequence=1)
  with pytest.raises(ValueError, match="uses 6 devices but 8"):
    sharding.mesh_shapes(c, 8)
  c.mesh.ici = dict(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.mesh_shapes(c, 8)
  c.mesh.ici = dict(fsdp=-1, model=2)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shapes(c, 8)
  mesh = sharding.make_mesh(tiny_train_config())
  assert mesh.axis_names == sharding.MESH_AXES and mesh.size == len(jax.devices())


def test_unknown_logical_name_is_an_error():
  with pytest.raises(ValueError, match="no rule"):
    sharding.check_rules_cover({"w": P("embed", "experts")})


def test_8b_params_and_opt_state_fully_sharded_over_fsdp():
  """Every large 8B tensor, parameter or Adam moment, is split 256 ways on a v5p-512-like fsdp mesh
  (abstract; no devices)."""
  c = _config_8b()
  mesh = AbstractMesh((1, 256, 1, 1), sharding.MESH_AXES)
  layout = train_state.StateLayout(c, mesh, ModelConfig.from_dict(c.model))
  abstract = layout.abstract_params

  def split_of(sh):
    return math.prod(mesh.shape[a] for axes in sh.spec if axes for a in (axes if isinstance(axes, tuple) else (axes,)))

  for part, tree in (("params", layout.abstract_state.params), ("opt_state", layout.abstract_state.opt_state)):
    total = per_device = 0
    leaves = jax.tree.leaves(tree)
    assert leaves, part
    for leaf in leaves:
      n = math.prod(leaf.shape) * leaf.dtype.itemsize
      total += n
      per_device += n / split_of(leaf.sharding)
      if n > 64 << 20:
        assert split_of(leaf.sharding) == 256, (part, leaf.shape, leaf.sharding.spec)
    # What stays replicated: norm scales/biases and the encoder's 3x3 conv kernels (~20 MB in all).
    assert per_device < total / 256 + (32 << 20), (part, per_device, total)
  # Adam's two fp32 moments cover exactly the trainable params (the encoder has no optimizer state).
  trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) - sum(
      math.prod(x.shape) for x in jax.tree.leaves(abstract["audio_encoder"]))
  moments = sum(math.prod(x.shape) for x in jax.tree.leaves(layout.abstract_state.opt_state) if x.ndim)
  assert 8.2e9 < trainable < 8.35e9 and moments == 2 * trainable, (trainable, moments)


_EQUIV = r"""
import json, os, sys
import jax, numpy as np
from flax import traverse_util
from bagpiper_jax import sharding, train_step, trainer
from bagpiper_jax.synthetic import SyntheticIterator
from configs.tiny import for_tests as tiny_train_config
K = 3
out = {}
for name, ici, devs in [("one", dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1]),
                        ("fsdp4_tensor2", dict(data=1, fsdp=4, tensor=2, sequence=1), jax.devices())]:
  c = tiny_train_config(rows_per_device=8 // len(devs), audio_windows=1)
  c.mesh.ici = ici
  mesh = sharding.make_mesh(c, devices=devs)
  s = trainer.Setup(c, mesh)
  if name != "one":
    specs = {"/".join(k): list(v.spec) for k, v in traverse_util.flatten_dict(s.layout.param_shardings).items()}
    out["specs"] = {k: specs[k] for k in ("lm_head/kernel", "embed_tokens/embedding",
                                           "layers/self_attn/q_proj/kernel", "layers/mlp/down_proj/kernel")}
    # AOT: lower + compile from abstract values only; the 8-device run below uses that executable.
    step, a_state, _, a_batch, _ = train_step.build_train_step(c, mesh)
    run = step.lower(a_state, a_batch).compile()
  else:
    run = s.train_step
  state = s.layout.fresh_state()
  it = SyntheticIterator(s.cfg, rows=8, seq_len=c.data.seq_len, audio_windows=1)
  losses = []
  for _ in range(K):
    state, m = run(state, s.host_to_device([next(it)]))
    losses.append(float(m["loss"]))
  lm = state.params["lm_head"]["kernel"]
  mu = [x for x in jax.tree.leaves(state.opt_state) if x.shape == lm.shape][0]
  np.savez(os.path.join(sys.argv[1], name + ".npz"),
           **{"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(state.params)).items()})
  out[name] = {"losses": losses, "lm_shard": list(lm.addressable_shards[0].data.shape),
               "mu_shard": list(mu.addressable_shards[0].data.shape)}
print("RESULT " + json.dumps(out))
"""


def test_one_device_vs_eight_fake_devices_fsdp4_tensor2(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  p = subprocess.run([sys.executable, "-c", _EQUIV, str(tmp_path)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  res = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][0][7:])
  assert res["specs"] == {
      "lm_head/kernel": ["fsdp", "tensor"],
      "embed_tokens/embedding": ["tensor", "fsdp"],
      "layers/self_attn/q_proj/kernel": [None, "fsdp", "tensor", None],
      "layers/mlp/down_proj/kernel": [None, "tensor", "fsdp"],
  }
  assert res["fsdp4_tensor2"]["lm_shard"] == [16, 4740]  # [64, 9480] over fsdp=4 x tensor=2
  assert res["fsdp4_tensor2"]["mu_shard"] == [16, 4740]  # Adam moments sharded like the params
  one, eight = res["one"]["losses"], res["fsdp4_tensor2"]["losses"]
  assert one[-1] < one[0]  # it trained
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "fsdp4_tensor2.npz")
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)
  print("losses 1 device", one, "8 devices", eight, "max |param diff|", worst)
  assert worst < 1e-4, worst
