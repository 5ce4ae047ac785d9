"""Start-up and performance tooling: persistent compilation cache, saved executables, profiling,
the AOT sweep's choice, remat policies and the GPU attention kernels (against the XLA path, on CPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.extend import core as jax_core

from bagpiper_jax import bench, profiling, sharding, trainer
from bagpiper_jax.model import Bagpiper, ModelConfig, layers
from bagpiper_jax.synthetic import SyntheticIterator
from conftest import init_params, tiny_model_config, with_default_xla_optimisation
from configs import bagpiper_8b
from configs.tiny import for_tests as tiny_train_config
from launch import aot_compile, gpu_sweep, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(wd: str, steps: int, *extra: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  args = [sys.executable, "-m", "bagpiper_jax.train", "--config=configs/tiny.py", f"--workdir={wd}",
          "--config.data.demo=False", "--config.data.synthetic=True", "--config.data.seq_len=128",
          "--config.data.max_audio_windows=1", "--config.data.per_device_batch=2",
          "--config.checkpoint.async_save=False", "--config.eval_every_steps=0", "--config.log_every_steps=1",
          "--config.checkpoint.every_steps=2", f"--config.train_steps={steps}", *extra]
  p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, p.stderr[-4000:]
  return p.stdout


def _compile_line(out: str) -> tuple[int, int, int]:
  m = re.search(r"compilation: (\d+) programs, (\d+) loaded from the persistent cache .*, (\d+) compiled", out)
  assert m, out[-2000:]
  return tuple(int(x) for x in m.groups())


def test_second_start_compiles_nothing_new_and_profile_is_written(tmp_path):
  """Start 1 trains steps 1-2 (tracing step 2), start 2 resumes and trains 3-4: every program it
  needs comes from <workdir>/compilation_cache."""
  wd = str(tmp_path / "run")
  first = _train(wd, 2, "--config.profile_steps=2,2")
  requests, hits, compiled = _compile_line(first)
  assert hits == 0 and compiled == requests > 0
  assert glob.glob(os.path.join(wd, "profile", "plugins", "profile", "*", "*.xplane.pb")), first
  assert "profile of steps 2..2 written" in first
  second = _train(wd, 4)
  assert "resumed from step 2" in second
  requests, hits, compiled = _compile_line(second)
  assert requests > 0 and compiled == 0, second[-2000:]


def test_profile_steps_flag():
  assert profiling.parse_steps("") is None
  assert profiling.parse_steps("10,12") == (10, 12)
  for bad in ("10", "3,2", "0,1", "a,b"):
    with pytest.raises(ValueError, match="profile_steps"):
      profiling.parse_steps(bad)


def _gpu_like_trace() -> list:
  """Chrome-trace events shaped like a GPU profile: kernels on two streams, plus derived lines that
  repeat the same time (XLA Ops, XLA Modules) and a host process."""
  meta = lambda kind, pid, name, tid=0: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}
  x = lambda tid, name, ts, dur, **args: {"ph": "X", "pid": 2, "tid": tid, "name": name, "ts": ts, "dur": dur,
                                          "args": args}
  return [
      meta("process_name", 1, "/host:CPU"), meta("process_name", 2, "/device:GPU:0"),
      meta("thread_name", 2, "Stream #13(Compute)", 10), meta("thread_name", 2, "Stream #14(Compute)", 11),
      meta("thread_name", 2, "XLA Ops", 12), meta("thread_name", 2, "XLA Modules", 13),
      {"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(train_step)", "ts": 0, "dur": 500},
      x(10, "sm90_xmma_gemm_bf16bf16_bf16f32", 0, 50), x(10, "loop_add_fusion", 60, 20),
      x(10, "mha_forward", 80, 30), x(11, "ncclDevKernel_AllReduce_Sum_f32", 100, 20),
      x(12, "dot.1", 0, 50), x(13, "jit_train_step", 0, 120),
  ]


def test_profile_summary_counts_device_kernels_once():
  """bench --profile_dir's summary: only the stream lines of the device count (the derived XLA Ops /
  Modules lines repeat their time), overlapping streams count once in the busy fraction, kernels are
  grouped by kind."""
  out = profiling.summarize_events(_gpu_like_trace(), steps=2)
  print(out)
  assert "/device:GPU:0, lines Stream #13(Compute), Stream #14(Compute)" in out
  # Busy: [0, 50] + [60, 80] + [80, 110] + [110, 120] = 110 of a 120 us span; 4 kernels over 2 steps.
  assert "span 0.1 ms (0.1 ms/step); a kernel running 91.7% of it (idle 8.3%" in out
  assert "2 kernels/step, mean 30.0 us" in out
  kinds = dict(re.findall(r"^    (\S.*?)\s+[\d.]+ ms\s+([\d.]+)%$", out, re.MULTILINE))
  assert kinds == {"matmul": "41.7", "attention": "25.0", "collective": "16.7",
                   "other (elementwise, reductions)": "16.7"}, kinds
  assert profiling.kernel_kind("cudnn_generated_fort_native_sdpa_sm90") == "attention"
  assert profiling.kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "matmul"
  assert profiling.kernel_kind("input_reduce_fusion_3") == "other (elementwise, reductions)"
  # A TPU-like trace has no streams: its 'XLA Ops' line is the one that counts.
  tpu = [e for e in _gpu_like_trace() if e.get("tid") not in (10, 11)]
  assert "lines XLA Ops" in profiling.summarize_events(tpu, steps=1)
  assert "no device in the trace" in profiling.summarize_events(tpu[:1] + tpu[6:7], steps=1)


def test_bench_profile_dir_writes_and_summarizes_a_trace(tmp_path):
  """On this CPU host the trace has no device lines; the point is that the trace is written and read."""
  env = with_default_xla_optimisation(dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  p = subprocess.run([sys.executable, "-m", "bagpiper_jax.bench", "--preset=tiny", "--steps=1", "--skip_torch",
                      f"--profile_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "profile: no device in the trace" in p.stdout, p.stdout
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))


def test_saved_executable_runs_like_the_jitted_step(tmp_path):
  """aot_compile --save_compiled for this host's CPU devices, loaded by trainer.Setup through
  config.compiled_train_step: same state and loss as the jitted step, and a wrong shape is refused."""
  c = tiny_train_config(seq_len=64, rows_per_device=1)
  path = str(tmp_path / "step.pkl")
  rep = aot_compile.run(c, "cpu", config_name="tiny", save_compiled_to=path)
  assert rep["saved_compiled"]["bytes"] > 0 and rep["fits"]
  mesh = sharding.make_mesh(c)
  plain = trainer.Setup(c, mesh)
  c2 = tiny_train_config(seq_len=64, rows_per_device=1)
  c2.compiled_train_step = path
  loaded = trainer.Setup(c2, mesh)
  assert isinstance(loaded.train_step, jax.stages.Compiled)
  batch = plain.host_to_device([_synthetic(plain, c)])
  s1, m1 = plain.train_step(plain.layout.fresh_state(), batch)
  s2, m2 = loaded.train_step(loaded.layout.fresh_state(), batch)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  c3 = tiny_train_config(seq_len=128, rows_per_device=1)
  c3.compiled_train_step = path
  with pytest.raises(trainer.CompiledStepError, match="other shapes"):
    _ = trainer.Setup(c3, mesh).train_step


def _synthetic(setup, c):
  return next(SyntheticIterator(setup.cfg, rows=setup.host_rows, seq_len=int(c.data.seq_len),
                                audio_windows=int(c.data.max_audio_windows)))


# ---------------------------------------------------------------------------------------------
# The sweep's grid and choice (no compilation).


def test_sweep_remat_specs_and_grid():
  assert sweep.parse_remat("minimal_with_context+offload=decoder_layer_input,query_proj") == {
      "model.remat_policy": "minimal_with_context", "model.remat_save": "",
      "model.remat_offload": "decoder_layer_input,query_proj"}
  with pytest.raises(ValueError, match="POLICY"):
    sweep.parse_remat("minimal+keep=x")
  pts = sweep.grid(["full", "minimal"], ["1", "2"], [], [], ["false", "true"], ["default", "overlap"])
  assert len(pts) == 2 * 2 * 2 * 2
  assert len({sweep.point_key("c", "t", p) for p in pts}) == len(pts)
  with pytest.raises(ValueError, match="--xla"):
    sweep.grid([], [], [], [], [], ["nope"])
  pts = sweep.grid(["full"], [], [], [], [], [], ["false", "true"])  # --offload_opt
  assert [p["overrides"]["optim.offload_state"] for p in pts] == ["false", "true"]
  rows = [sweep.summarize({"point": p, "memory": None}, 0.85) for p in pts]
  assert [r["offload_opt"] for r in rows] == [False, True]


def test_sweep_choice_is_least_flops_within_budget_then_more_rows():
  row = lambda rows, gib, ept: {"remat": "r", "save": "", "offload": "", "rows": rows, "loss_chunk": 1024,
                                "fused_bwd": False, "xla": "default", "status": "ok", "device_gib": gib,
                                "hbm_gib": 95.0, "host_gib": 0.0, "used": gib / 95, "fits": gib <= 0.85 * 95,
                                "exec_over_model": ept / 10, "exec_per_token": ept}
  rows = [row(1, 9.0, 16.0), row(2, 60.0, 13.0), row(4, 110.0, 12.0), row(1, 40.0, 13.02)]
  best = sweep.choose(rows)
  assert best["rows"] == 2 and best["device_gib"] == 60.0  # 4 rows do not fit; 13.02 ties 13.0, fewer rows
  assert "choice: remat r" in sweep.format_table(rows, 0.85)
  assert sweep.choose([row(4, 110.0, 12.0)]) is None


# ---------------------------------------------------------------------------------------------
# Remat policies and attention kernels against the plain paths.


def _grads(cfg, batch, params):
  return jax.grad(lambda p: Bagpiper(cfg).apply({"params": p}, batch)[0])(params)


def _batch(cfg, l=24):
  rng = np.random.default_rng(0)
  ids = np.zeros((1, l, 8), np.int32)
  ids[..., 0] = rng.integers(cfg.num_specials, cfg.codec_start, size=(1, l))
  w = np.zeros((1, l, 8), np.float32)
  w[..., 0] = 1.0
  seg = np.array([[1] * 10 + [2] * (l - 12) + [0] * 2], np.int32)
  pos = np.array([list(range(10)) + list(range(l - 12)) + [0, 0]], np.int32)
  return {"input_ids": ids, "loss_weights": w, "segment_ids": seg, "positions": pos}


def test_named_remat_policies_and_offload_give_the_same_gradients():
  cfg = tiny_model_config(remat_policy="none")
  batch = _batch(cfg)
  params = init_params(cfg, batch)
  ref = _grads(cfg, batch, params)
  for policy, offload in [("minimal", ""), ("minimal_with_context", ""), ("save_qkv_proj", ""),
                          ("custom", "decoder_layer_input,query_proj,key_proj,value_proj,out_proj")]:
    got = _grads(dataclasses.replace(cfg, remat_policy=policy, remat_offload=offload), batch, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=f"{policy} {offload}")


def test_remat_policy_errors_name_the_key():
  with pytest.raises(ValueError, match="remat_policy"):
    layers.remat_policy("minimum")
  with pytest.raises(ValueError, match="remat_offload: unknown checkpoint names"):
    layers.remat_policy("minimal", offload="mlp_out")
  with pytest.raises(ValueError, match="named remat_policy"):
    layers.remat_policy("full", offload="query_proj")


def test_minimal_policy_saves_the_named_projections():
  """What the policy keeps for the backward pass: the named matmul outputs, not the norms/activations
  (jax.ad_checkpoint.print_saved_residuals on one layer)."""
  cfg = tiny_model_config(remat_policy="minimal_with_context")
  layer = layers.DecoderLayer(cfg)
  x = jnp.ones((1, 8, cfg.hidden_size))
  rot, seg = layers.rope_table(jnp.arange(8)[None], cfg.head_dim, cfg.rope_theta), jnp.ones((1, 8), jnp.int32)
  p = layer.init(jax.random.PRNGKey(0), x, rot, seg)
  f = jax.checkpoint(lambda p, x: layer.apply(p, x, rot, seg)[0].sum(),
                     policy=layers.remat_policy("minimal_with_context"))
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(f, p, x)
  saved = buf.getvalue()
  for name in ("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlpwi_0", "mlpwi_1"):
    assert f"named '{name}'" in saved, saved


def _pallas_calls(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "pallas_call"
    n += sum(_pallas_calls(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
  return n


@pytest.mark.parametrize("impl", ["pallas_gpu_interpret", "pallas_gpu_docs_interpret"])
def test_saving_context_keeps_the_gpu_kernels_residuals(impl):
  """With a GPU attention kernel, a policy that saves "context" keeps the kernel's residuals: the
  backward pass runs 2 kernels (jax's: dq/dk/dv and its preprocessing; ours: dq, dk/dv), not the
  forward kernel again; the gradients are the same as with "minimal" (which reruns it) and without remat."""
  cfg = tiny_model_config(attention_impl=impl)
  layer = layers.DecoderLayer(cfg)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, cfg.hidden_size))
  rot, seg = layers.rope_table(jnp.arange(8)[None], cfg.head_dim, cfg.rope_theta), jnp.ones((1, 8), jnp.int32)
  p = layer.init(jax.random.PRNGKey(0), x, rot, seg)
  f = lambda p, x: jnp.sum(layer.apply(p, x, rot, seg)[0] ** 2)
  kernels, grads = {}, {}
  for name in ("none", "minimal", "minimal_with_context"):
    g = f if name == "none" else jax.checkpoint(f, policy=layers.remat_policy(name, attention_impl=cfg.attention_impl))
    kernels[name] = _pallas_calls(jax.make_jaxpr(jax.grad(g, argnums=(0, 1)))(p, x).jaxpr)
    grads[name] = jax.grad(g, argnums=(0, 1))(p, x)
  assert kernels == {"none": 3, "minimal": 4, "minimal_with_context": 3}, kernels
  for name in ("minimal", "minimal_with_context"):
    for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(grads["none"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=name)


def _qkv(l=200, h=4, k=2, d=16, seed=5):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(1, l, n, d)), jnp.float32) for n in (h, k, k))


def test_pallas_gpu_kernel_equals_xla_attention():
  """The Pallas GPU (Triton) flash kernel in the interpreter, values and gradients, with two documents,
  padding rows and a length that is not a block multiple (GQA: 4 query heads on 2 KV heads)."""
  q, k, v = _qkv()
  seg = jnp.asarray([[1] * 90 + [2] * 100 + [0] * 10], jnp.int32)
  blocks = layers.pallas_gpu_blocks("64,64,32,32,32,32")  # model.attention_blocks
  assert blocks == layers.gpu_attention.BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_kv_dkv=32,
                                                   block_q_dq=32, block_kv_dq=32)
  assert layers.pallas_gpu_blocks("") == layers.PALLAS_GPU_BLOCKS
  for bad in ("64,64", "64,64,32,32,32,48", "a,b,c,d,e,f"):
    with pytest.raises(ValueError, match="model.attention_blocks"):
      layers.pallas_gpu_blocks(bad)
  cfg = tiny_model_config(attention_blocks="64,64,32,32,32,32")  # with the XLA path: not ignored silently
  x, rot = jnp.ones((1, 8, cfg.hidden_size)), layers.rope_table(jnp.arange(8)[None], cfg.head_dim, cfg.rope_theta)
  with pytest.raises(ValueError, match="model.attention_blocks.*attention_impl is 'xla'"):
    layers.Attention(cfg).init(jax.random.PRNGKey(0), x, rot, jnp.ones((1, 8), jnp.int32))
  f_ref = lambda q, k, v: layers.attend(q, k, v, seg)
  f_gpu = lambda q, k, v: layers.pallas_gpu_attend(q, k, v, seg, interpret=True, blocks=blocks)
  np.testing.assert_allclose(f_gpu(q, k, v), f_ref(q, k, v), atol=2e-5)
  loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  for a, b in zip(jax.grad(loss(f_gpu), (0, 1, 2))(q, k, v), jax.grad(loss(f_ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_dot_product_attention_path_equals_xla_attention():
  """The cuDNN path's call (segment mask + is_causal through jax.nn.dot_product_attention), run with
  implementation='xla' on CPU: the same masking semantics as `attend`, values and gradients."""
  q, k, v = _qkv(l=50)
  seg = jnp.asarray([[1] * 20 + [2] * 25 + [0] * 5], jnp.int32)
  f_ref = lambda q, k, v: layers.attend(q, k, v, seg)
  f_dpa = lambda q, k, v: layers.dot_product_attend(q, k, v, seg, implementation="xla")
  np.testing.assert_allclose(f_dpa(q, k, v), f_ref(q, k, v), atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  for a, b in zip(jax.grad(loss(f_dpa), (0, 1, 2))(q, k, v), jax.grad(loss(f_ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=5e-5)


@pytest.mark.parametrize("impl", ["pallas_gpu_interpret", "pallas_gpu_docs_interpret", "splash_docs_interpret"])
def test_model_runs_with_the_kernel_interpret_paths(impl):
  cfg = tiny_model_config()
  batch = _batch(cfg, l=32)
  params = init_params(cfg, batch)
  ref, _ = Bagpiper(cfg).apply({"params": params}, batch)
  got, _ = Bagpiper(dataclasses.replace(cfg, attention_impl=impl)).apply({"params": params}, batch)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)


@pytest.mark.heavy  # 32 s: a check of the benchmark's peer (the benchmark is not a test)
def test_bench_torch_peer_does_the_same_work():
  """bagpiper_jax.bench's torch peer (transformers Qwen3Model + lm_head + stream_emb, 8-stream input
  sum, per-stream softmax ranges, packed-document mask), given our initial weights and the same
  packed micro-batches (2, accumulated), computes our first-step loss."""
  config = bench.bench_config("tiny", rows=2, seq_len=96, accum=2)
  cfg = ModelConfig.from_dict(config.model)
  micro = [bench.packed_batch(cfg, 2, 96, seed=i) for i in range(2)]
  b = micro[0]
  assert (b["segment_ids"] > 0).all() and b["segment_ids"].max() >= 2  # full rows, several documents
  assert (b["loss_weights"][..., 1:] > 0).any() and (b["input_ids"][..., 1:] >= cfg.codec_start).any()
  j = bench.bench_jax(config, micro, steps=1)
  t = bench.bench_torch(config, micro, j["params"], steps=1)
  assert abs(j["first_loss"] - t["first_loss"]) < 1e-4 * j["first_loss"], (j["first_loss"], t["first_loss"])


@pytest.mark.heavy  # 42 s: the benchmark's reporting
def test_bench_separate_processes_reports_both_sides_against_one_peak():
  """--separate_processes (the GPU mode: each framework alone on the device) runs each side in its own
  process and reports both against the parent's peak: the torch side's process keeps JAX on the CPU,
  so it must not measure a peak of its own."""
  env = with_default_xla_optimisation(dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  p = subprocess.run([sys.executable, "-m", "bagpiper_jax.bench", "--preset=tiny", "--steps=2", "--rows=1",
                      "--seq_len=64", "--separate_processes"], env=env, capture_output=True, text=True,
                     timeout=600, cwd=REPO)
  assert p.returncode == 0, p.stderr[-3000:]
  out = p.stdout
  assert out.count("preset tiny:") == 1 and out.count("matmul peak (jax") == 1, out
  side_lines = [l for l in out.splitlines() if re.match(r"(bagpiper_jax train step|torch Qwen3Model)", l)]
  assert len(side_lines) == 4, out  # each side's own line, then the parent's table
  assert all(re.search(r"% of (matmul )?peak$", l) for l in side_lines), side_lines
  assert re.search(r"RATIO jax / torch\s+: \d+\.\d+", out), out


def test_8b_slice_presets():
  plain = bagpiper_8b.get_config("pretrain")
  assert plain.model.remat_policy == "nothing_saveable" and plain.data.per_device_batch == 1
  assert sorted(bagpiper_8b.SFT_PRESETS) == sorted(bagpiper_8b.TOPOLOGY_PRESETS)
  for stage, presets in (("pretrain", bagpiper_8b.TOPOLOGY_PRESETS), ("sft", bagpiper_8b.SFT_PRESETS)):
    for name, p in presets.items():
      c = bagpiper_8b.get_config(f"{stage},{name}")
      assert c.stage == stage and c.model.remat_policy == p["remat_policy"]
      assert c.data.per_device_batch == p["per_device_batch"] and c.model.remat_offload == p["remat_offload"]
      assert c.model.attention_fused_bwd == p["attention_fused_bwd"]
      layers.remat_policy(c.model.remat_policy, c.model.remat_save, c.model.remat_offload)  # a valid policy
  assert bagpiper_8b.get_config("warmup,v5p-128").stage == "warmup"
  with pytest.raises(ValueError, match="no tuned settings"):
    bagpiper_8b.get_config("pretrain,v4-8")
  sft = bagpiper_8b.get_config("sft,v5p-128")
  assert sft.stage == "sft" and sft.data.seq_len == 20_000 and sft.model.remat_policy == "minimal_with_context"
  assert sft.model.attention_fused_bwd and sft.data.per_device_batch == 1
  with pytest.raises(ValueError, match="no tuned settings"):
    bagpiper_8b.get_config("sft,v4-8")


def test_gpu_sweep_points_are_bench_configs():
  """launch/gpu_sweep.py's --point strings become the bench preset's config with those overrides."""
  point = gpu_sweep.parse_point("remat=minimal_with_context,rows=4,attention=pallas_gpu,blocks=128/64/64/128/128/64,"
                                "save=decoder_layer_input+mlpwo,accum=2,loss_chunk=512")
  c = gpu_sweep.point_config("h100", point)
  assert (c.model.remat_policy, c.data.per_device_batch, c.model.attention_impl, c.optim.grad_accum_steps,
          c.model.loss_chunk_size) == ("minimal_with_context", 4, "pallas_gpu", 2, 512)
  assert c.model.attention_blocks == "128,64,64,128,128,64"
  assert c.model.remat_save == "decoder_layer_input,mlpwo"
  ModelConfig.from_dict(c.model)  # a valid model config
  with pytest.raises(ValueError, match="'rowz=2' is not key=value"):
    gpu_sweep.parse_point("rowz=2")
