"""AOT compilation for TPU topologies on this CPU host (needs the `libtpu` pip package).

The one real compile (tiny config, shrunk, on v5p-8) checks that the report's memory numbers are
present and consistent with the shardings; the rest are cheap checks of the pieces the report
depends on: topology names, the loop-aware FLOP count, the fit decision, multi-slice meshes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from launch import flop_count, topology  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu_aot])")


def tiny_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config("pretrain")
  # Small enough to compile in ~20 s on a shared 2-core CPU; still has audio windows and 2 layers.
  c.data.seq_len = 128
  c.data.per_device_batch = 1
  c.data.max_audio_windows = 1
  c.model.loss_chunk_size = 32  # 4 loss chunks: a scan whose trip count the FLOP count must see
  return c


@pytest.mark.parametrize("name,libtpu_name,chips", [
    ("v5p-8", "v5:2x2x1", 4), ("v5p-128", "v5:4x4x4", 64), ("v5p-256", "v5:4x4x8", 128),
    ("v4-32", "v4:2x2x4", 16), ("v5e-8", "v5e:2x4", 8), ("v5e-256", "v5e:16x16", 256),
    ("v6e-256", "v6e:16x16", 256), ("v6e-64", "v6e:8x8", 64), ("v5p:4x4x12", "v5:4x4x12", 192),
])
def test_topology_names(name, libtpu_name, chips):
  t = topology.parse(name)
  assert t.libtpu_topology == libtpu_name
  assert t.num_chips == chips
  assert topology.parse(name, num_slices=2).num_chips == 2 * chips


@pytest.mark.parametrize("name,wrap", [
    ("v5p-8", (False, False, False)), ("v5p-64", (False, False, False)), ("v5p-128", (True, True, True)),
    ("v5p:4x4x12", (True, True, True)), ("v4-128", (True, True, True)), ("v4-32", (False, False, False)),
    ("v6e-64", (False, False, False)), ("v6e-128", (False, True, False)), ("v6e-256", (True, True, False)),
    ("v5e-256", (True, True, False)), ("v5e-16", (False, False, False)),
])
def test_topology_wraparound(name, wrap):
  """Whole 4x4x4 cubes are tori; v5e/v6e close a side of 16 chips (as Cloud TPU builds the slices)."""
  assert topology.parse(name).wrap == wrap


def test_devices_ask_libtpu_for_the_slice_with_its_torus(monkeypatch):
  seen = {}

  class Desc:
    devices = [object()] * 64

  def fake(**kwargs):
    seen.update(kwargs)
    return Desc()
  monkeypatch.setattr(topology.topologies, "get_topology_desc", fake)
  assert len(topology.devices(topology.parse("v5p-128"))) == 64
  assert seen["topology_name"] == "v5:4x4x4" and seen["wrap"] == (True, True, True), seen
  assert seen["chip_config_name"] == "megacore" and seen["chips_per_host_bounds"] == (2, 2, 1)


@pytest.mark.parametrize("bad", ["v5p-384", "v5p-7", "v9-8", "tpu", "v5e:2x2x2"])
def test_topology_bad_names_are_errors(bad):
  with pytest.raises(ValueError, match="--topology"):
    topology.parse(bad)


def test_hbm_table():
  assert {k: c.hbm_bytes / topology.GIB for k, c in topology.CHIPS.items()} == {
      "v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}


def test_flop_count_counts_scan_trip_and_remat():
  n, length = 32, 7

  def f(x):
    def body(c, _):
      return jnp.tanh(c @ x), None
    return jax.lax.scan(jax.checkpoint(body), x, None, length=length)[0].sum()

  traced = jax.jit(jax.grad(f)).trace(jax.ShapeDtypeStruct((n, n), jnp.float32))
  # Per step: forward, remat recompute, two backward matmuls; each 2 n^3.
  assert flop_count.count_traced(traced).flops == length * 4 * 2 * n ** 3


def test_flop_count_skips_dead_code():
  """An unused matmul is not counted: XLA deletes it."""
  n = 16

  def f(x):
    _ = x @ x  # dead
    return jnp.sum(x @ x.T)

  traced = jax.jit(f).trace(jax.ShapeDtypeStruct((n, n), jnp.float32))
  assert flop_count.count_jaxpr(traced.jaxpr).flops == 2 * 2 * n ** 3  # the raw jaxpr holds both
  assert flop_count.count_traced(traced).flops == 2 * n ** 3


def _kernel_matmul():
  """x @ w as a Pallas kernel (traced only) with its own backward, run per shard: how splash attention is
  called. The kernel's output is its residual, named "ctx" (splash's `residual_checkpoint_name`)."""
  from jax.ad_checkpoint import checkpoint_name  # pylint: disable=g-import-not-at-top
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def body(x_ref, w_ref, o_ref):
    o_ref[...] = x_ref[...] @ w_ref[...]

  def kernel(x, w):
    return pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype),
                          interpret=True)(x, w)

  @jax.custom_vjp
  def matmul(x, w):
    return kernel(x, w)

  def fwd(x, w):
    out = checkpoint_name(kernel(x, w), "ctx")
    return out, (x, w, out)

  matmul.defvjp(fwd, lambda res, g: (g @ res[1].T * jnp.cos(res[2]), res[0].T @ g))
  mesh = Mesh(np.array(jax.devices()[:1]), ("a",))
  return jax.shard_map(matmul, mesh=mesh, in_specs=(P("a"), P()), out_specs=P("a"), check_vma=False)


@pytest.mark.parametrize("policy,recomputed_live", [("save_ctx", False), ("nothing_saveable", True)])
def test_flop_count_skips_a_dead_rematerialised_kernel(policy, recomputed_live):
  """A checkpointed layer in a scan, whose kernel output the policy saves: jax leaves the kernel's
  rematerialised forward in the backward pass (a shard_map with no outputs around a pallas_call, as
  with splash attention); XLA deletes it, so it is not counted. Without the saved name it is live."""
  m, k, length = 8, 16, 3
  unit = 2 * m * k * k  # one [m, k] @ [k, k] matmul
  matmul = _kernel_matmul()
  pol = {"save_ctx": jax.checkpoint_policies.save_only_these_names("ctx"),
         "nothing_saveable": jax.checkpoint_policies.nothing_saveable}[policy]

  def f(x, ws):
    layer = jax.checkpoint(lambda c, w: (jnp.sin(matmul(c, w)), None), policy=pol)
    return jax.lax.scan(layer, x, ws)[0].sum()

  traced = jax.jit(jax.grad(f, argnums=(0, 1))).trace(jax.ShapeDtypeStruct((m, k), jnp.float32),
                                                      jax.ShapeDtypeStruct((length, k, k), jnp.float32))
  # Per layer: forward kernel, recomputed kernel, backward g @ w.T and x.T @ g.
  raw = flop_count.count_jaxpr(traced.jaxpr)
  assert (raw.flops, raw.kernel_flops) == (length * 4 * unit, length * 2 * unit)
  live = flop_count.count_traced(traced)
  kernels = 2 if recomputed_live else 1
  assert (live.flops, live.kernel_flops) == (length * (kernels + 2) * unit, length * kernels * unit)


def test_flop_count_loop_carries_live_to_a_fixpoint():
  n, length = 16, 5
  unit = 2 * n ** 3
  x = jax.ShapeDtypeStruct((n, n), jnp.float32)

  def scan(x, b_feeds_a):
    def body(c, _):
      a, b, dead = c
      return (jnp.tanh(a @ x) + (b if b_feeds_a else 0), b @ x, dead @ x), None
    return jax.lax.scan(body, (x, x, x), None, length=length)[0][0]

  # The needed carry a reads b only through the previous trip: b is needed from the second pass on.
  assert flop_count.count_traced(jax.jit(lambda x: scan(x, True)).trace(x)).flops == length * 2 * unit
  assert flop_count.count_traced(jax.jit(lambda x: scan(x, False)).trace(x)).flops == length * unit

  def loop(x, steps):
    return jax.lax.while_loop(lambda c: c[0] < steps, lambda c: (c[0] + 1, c[1] @ x, c[2] @ x), (0, x, x))[1]

  traced = jax.jit(loop).trace(x, jax.ShapeDtypeStruct((), jnp.int32))
  assert flop_count.count_jaxpr(traced.jaxpr).flops == 2 * unit  # both chains, once (unknown trip count)
  counted = flop_count.count_traced(traced)
  assert (counted.flops, counted.unknown_trip_loops) == (unit, 1)  # XLA keeps one dot (checked on CPU)


def test_flop_count_shard_map_counts_every_shard():
  from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("a", "b"))
  n = 16
  f = jax.shard_map(lambda x, y: x @ y, mesh=mesh, in_specs=(P("a", None), P()), out_specs=P("a", None),
                    axis_names={"a"})
  traced = jax.jit(f).trace(jax.ShapeDtypeStruct((n, n), jnp.float32), jax.ShapeDtypeStruct((n, n), jnp.float32))
  assert flop_count.count_traced(traced).flops == 2 * n ** 3
  # With 4 shards the body holds a quarter of the rows and runs 4 times: same total.
  body = jax.make_jaxpr(lambda x, y: x @ y)(jnp.zeros((n // 4, n)), jnp.zeros((n, n)))
  fake = types.SimpleNamespace(axis_names=("a", "b"), axis_sizes=(4, 2))
  assert flop_count._manual_shards({"mesh": fake, "newly_manual_axes": frozenset({"a"})}) == 4
  assert 4 * flop_count.count_jaxpr(body).flops == 2 * n ** 3


def test_memory_report_fit_decision():
  from launch import aot_compile  # pylint: disable=g-import-not-at-top
  gib = topology.GIB
  chip = topology.CHIPS["v5e"]
  stats = types.SimpleNamespace(argument_size_in_bytes=10 * gib, output_size_in_bytes=9 * gib,
                                alias_size_in_bytes=9 * gib, temp_size_in_bytes=5 * gib,
                                generated_code_size_in_bytes=gib // 2)
  fake = types.SimpleNamespace(memory_analysis=lambda: stats)
  r = aot_compile.memory_report(fake, chip)
  assert r["total"] == int(15.5 * gib)
  assert r["fits"] is True and r["headroom"] == gib // 2
  stats.temp_size_in_bytes = 6 * gib
  r = aot_compile.memory_report(fake, chip)
  assert r["fits"] is False and r["headroom"] == -(gib // 2)
  assert "DOES NOT FIT" in aot_compile.format_report(_fake_rep(r))


def _fake_rep(mem):
  return {"config": "c", "topology": "t", "mesh": {}, "num_chips": 1, "chip": "v5e", "device_kind": "k",
          "memory": mem, "flops": {
              "global_rows": 1, "seq_len": 1, "tokens_per_step": 1, "audio_windows": 0,
              "model_flops_per_chip": 1.0, "executed_flops_per_chip": 1.0, "executed_over_model": 1.0,
              "xla_cost_flops_per_chip": 1.0, "unknown_trip_loops": 0, "assumed_mfu": 0.4,
              "peak_flops_per_chip": 1e12, "est_step_time_s": 1.0, "est_tokens_per_s": 1.0,
              "est_tokens_per_s_per_chip": 1.0, "est_hardware_utilisation": 0.4}}


def test_out_of_memory_is_recognised():
  from launch import aot_compile  # pylint: disable=g-import-not-at-top
  e = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                   "hbm. Used 20.5G of 15.75G hbm. Exceeded hbm capacity by 4.75G.\n\nTotal hbm usage >= 20.5G:\n"
                   + "  detail\n" * 50)
  assert aot_compile.is_out_of_memory(e)
  assert "Exceeded hbm capacity by 4.75G" in aot_compile.oom_summary(e)
  assert not aot_compile.is_out_of_memory(ValueError("fsdp does not divide 7"))


@needs_libtpu
def test_multislice_mesh_puts_slices_on_dcn_data():
  from bagpiper_jax import sharding  # pylint: disable=g-import-not-at-top
  from launch import aot_compile  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  topo = topology.parse("v5p-16", num_slices=2)
  notes = aot_compile.prepare_config(c, topo)
  assert notes and c.mesh.dcn.data == 2
  devs = topology.devices(topo)
  assert len(devs) == 16 and {d.slice_index for d in devs} == {0, 1}
  mesh = sharding.make_mesh(c, devices=devs)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1, "sequence": 1}
  # Each data row of the mesh is one slice: slices only talk over DCN for the data axis.
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}


@needs_libtpu
def test_aot_compile_tiny_on_v5p_8():
  from launch import aot_compile  # pylint: disable=g-import-not-at-top
  rep = aot_compile.run(tiny_config(), "v5p-8", assumed_mfu=0.4, config_name="configs/tiny.py")
  assert rep["device_kind"] == "TPU v5" and rep["num_chips"] == 4
  assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 1}
  m = rep["memory"]
  for k in ("arguments", "outputs", "aliased", "temps", "code", "total", "hbm", "fits"):
    assert k in m, k
  assert m["hbm"] == 95 * topology.GIB
  assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temps"] + m["code"]
  # Arguments are the state shards plus the batch shard as the shardings say. TPU tiles pad tiny
  # arrays ([64] norm scales to 8x128 tiles), hence the slack; a state replicated over fsdp=4
  # instead of sharded would be ~4x.
  expected = m["state_expected"] + m["batch_expected"]
  assert expected <= m["arguments"] <= 1.5 * expected, m
  # The whole state is donated: every output buffer of the state reuses its argument.
  assert m["aliased"] >= 0.9 * m["state_expected"] and m["outputs"] >= m["aliased"]
  assert 0 < m["temps"] < 2 * 1024 ** 3 and m["fits"] and rep["fits"]
  f = rep["flops"]
  assert f["tokens_per_step"] == 4 * 128
  # Executed FLOPs = model FLOPs + remat recompute + small extras (1.0x .. 2x); XLA's count sees each
  # loop body once, so it is below the executed count with 4 loss chunks.
  assert 1.0 <= f["executed_over_model"] <= 2.0, f
  assert 0 < f["xla_cost_flops_per_chip"] < f["executed_flops_per_chip"]
  assert f["unknown_trip_loops"] == 0
  assert f["est_step_time_s"] > 0 and 0 < f["est_hardware_utilisation"] < 1
  # FSDP gathers the weights with all-gathers (not all-reduces of zero-padded buffers).
  assert rep["sizes"]["collectives"]["all-gather"] >= 10, rep["sizes"]
  text = aot_compile.format_report(rep)
  assert "FITS" in text and "arguments" in text and "temps" in text and " all-gather" in text


@needs_libtpu
def test_offloaded_optimizer_state_is_host_memory_in_the_tpu_program():
  """optim.offload_state for v5p-8: the Adam moments are host arguments of the compiled step, not HBM."""
  from launch import aot_compile  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.optim.offload_state = True
  rep = aot_compile.run(c, "v5p-8", assumed_mfu=0.4, config_name="configs/tiny.py")
  m = rep["memory"]
  assert m["state_host_expected"] > 0.6 * (m["state_expected"] + m["state_host_expected"])  # 2 moments of 3 copies
  assert m["state_host_expected"] <= m["host_total"] <= 1.5 * m["state_host_expected"], m
  expected = m["state_expected"] + m["batch_expected"]
  assert expected <= m["arguments"] <= 1.5 * expected, m  # the device arguments: params, step, batch
  assert "in host memory" in aot_compile.format_report(rep)


@needs_libtpu
def test_decode_step_compiles_for_a_tpu_slice():
  """The generation decode step (one loop iteration) for v5p-8, tiny model: memory report present,
  the KV cache split over the tensor axis when the KV heads divide it, CFG doubling the cache rows."""
  from launch import aot_compile  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.model.num_kv_heads = 4
  c.model.num_heads = 4
  topo = topology.parse("v5p-8")
  plain = aot_compile.compile_decode_step(c, topo, batch=4, cache_len=256, use_cfg=False)
  cfg = aot_compile.compile_decode_step(c, topo, batch=4, cache_len=256, use_cfg=True)
  assert plain["mesh"]["tensor"] == 4 and plain["memory"]["fits"]
  m = c.model
  full_cache = 2 * m.num_layers * 4 * 256 * m.num_kv_heads * m.head_dim * 4  # k and v, fp32
  assert plain["cache_bytes_per_chip"] == full_cache // 4  # split by KV heads over 4 chips
  assert cfg["cache_rows"] == 8 and cfg["cache_bytes_per_chip"] == 2 * plain["cache_bytes_per_chip"]
  assert 0 < plain["hbm_step_time_s"] < cfg["hbm_step_time_s"]
  assert "per step and chip" in aot_compile.format_decode_report(plain)


def test_compile_profile_attributes_kernels_to_parts():
  """launch/compile_profile: each kernel's LLO count from libtpu's backend log, its seconds from its
  thread's log lines, its part from the op names of the fusion it lowers (here: a backward decoder
  matmul on thread 7, an encoder conv on thread 8, interleaved as the two compile threads log)."""
  from launch import compile_profile  # pylint: disable=g-import-not-at-top
  log = [
      "I1127 04:00:00.000000       7 deepsea_compiler_backend.cc:1] [fusion.3] LLO optimizing 1,000 instructions",
      "I1127 04:00:00.500000       8 deepsea_compiler_backend.cc:1] [fusion.9] LLO optimizing 40 instructions",
      "I1127 04:00:02.000000       7 deepsea_compiler_backend.cc:2] post-bundle-packing non-empty bundle count: 5",
      "I1127 04:00:02.500000       8 deepsea_compiler_backend.cc:2] post-bundle-packing non-empty bundle count: 1",
      "I1127 04:00:03.000000       7 deepsea_compiler_backend.cc:1] [all-gather.1] LLO optimizing 7 instructions",
      "I1127 04:00:03.250000       7 deepsea_compiler_base.cc:3914] BACKEND_PASSES stage duration: 3.25s",
  ]
  hlo = "\n".join([
      "%fused_computation.3 (p: bf16[8]) -> bf16[8] {",
      '  ROOT %m = bf16[8] multiply(%p, %p), metadata={op_name="jit(f)/transpose(jvp(Bagpiper))/Bagpiper.hidden/'
      'while/body/closed_call/layers/mlp/dot_general"}',
      "}",
      "%fused_computation.9 (p: bf16[8]) -> bf16[8] {",
      '  ROOT %c = bf16[8] add(%p, %p), metadata={op_name="jit(f)/jvp(Bagpiper)/Bagpiper.audio_rows/audio_encoder/'
      'conv2d1/conv_general_dilated"}',
      "}",
      "ENTRY %main (a: bf16[8]) -> bf16[8] {",
      "  %fusion.3 = bf16[8] fusion(%a), kind=kOutput, calls=%fused_computation.3",
      "  %fusion.9 = bf16[8] fusion(%fusion.3), kind=kLoop, calls=%fused_computation.9",
      "  ROOT %all-gather.1 = bf16[64] all-gather(%fusion.9), dimensions={0}",
      "}",
  ])
  costs = compile_profile.kernel_costs(log)
  assert costs == {"fusion.3": (1000, 2.0), "fusion.9": (40, 2.0), "all-gather.1": (7, 1.25)}, costs
  names = compile_profile.op_names(hlo)
  assert compile_profile.part_of(names["fusion.3"]) == "decoder layers, backward"
  assert compile_profile.part_of(names["fusion.9"]) == "audio encoder + adapter"
  assert compile_profile.stage_durations(log) == {"BACKEND_PASSES": "3.25s"}
  text = compile_profile.report(log, hlo, top=2)
  assert re.search(r"decoder layers, backward\s+1\s+1,000\s+95\.5%", text), text
  assert "1 all-gather" in text and "fusion.9" in text.split("largest 2 kernels:")[1]


@needs_libtpu
def test_collective_probe_tells_reduce_scatter_from_all_reduce():
  """launch/collective_probe on v5p-8 (4 chips): an explicit psum_scatter of a weight gradient stays
  one reduce-scatter there; the SPMD partitioner's form of the same reduction is one all-reduce."""
  from launch import collective_probe  # pylint: disable=g-import-not-at-top
  small = dict(embed=256, mlp=512, positions=64)
  assert collective_probe.probe("v5p-8", "psum_scatter", **small)["collectives"] == {"reduce-scatter": 1}
  spmd = collective_probe.probe("v5p-8", "constraint", **small)
  assert spmd["collectives"] == {"all-reduce": 1} and "bf16[256,512]" in spmd["lines"][0]
