r"""Compile the real train step for a TPU pod on a CPU-only host, and say whether it fits in HBM.

  python -m launch.aot_compile --config=configs/bagpiper_8b.py:pretrain --topology=v5p-128
  python -m launch.aot_compile --config=configs/bagpiper_8b.py:sft --topology=v5p-128 --num_slices=2
  python -m launch.aot_compile --config=configs/bagpiper_8b.py --topology=v6e-256 \
      --config.data.per_device_batch=1 --config.model.remat_policy=full --report_json=/tmp/r.json

Why: finding out that a config runs out of HBM, or that an axis does not divide, after a pod has
been booked wastes the booking. With the `libtpu` package installed, `jax.experimental.topologies`
hands out compile-only devices of any slice shape; we build the training mesh from them
(`sharding.make_mesh(config, devices=...)`), take the train step from `train_step.build_train_step`
(the same function the training run jits, so the compiled program is the one that would run) and
compile it with abstract inputs only. XLA's TPU compiler does the real memory assignment, so the
numbers below are the ones the chip would see; a program that cannot fit fails to compile with
RESOURCE_EXHAUSTED, which we report as "does not fit" too.

Report (per chip = per JAX device; v4/v5p megacore chips are one device):
  memory     arguments (params + optimizer state + batch shard), outputs, aliased (donated state
             reused in place, counted once), temporaries (activations, gradients, collectives
             buffers), generated code; total = arguments + outputs - aliased + temps + code,
             against the chip's HBM (launch/topology.py).
  FLOPs      model FLOPs of the step (`metrics.train_flops_per_step`: matmul FLOPs, what MFU
             counts); executed FLOPs (matmuls/convs of the traced step, backward and remat
             recompute included, every scan times its length: launch/flop_count.py); and XLA's
             `cost_analysis()` of the compiled per-device program, which counts each while-loop
             body once and so is only a lower bound for our scanned layers / chunked loss.
  estimate   at an assumed MFU (--assumed_mfu): step time = model FLOPs per chip / (peak * MFU),
             tokens/s, and the hardware utilisation that step time would need for the executed
             FLOPs (must be < 100% for the assumption to be possible). With --step_time (measured
             seconds per step on the pod) it prints the MFU that step time means instead.

Saving the executable (`--save_compiled=PATH`, local or gs://): the compiled program is serialized
(`jax.experimental.serialize_executable`) with its argument/result tree structure, so a run on the
pod with the same config and slice loads it (`--config.compiled_train_step=PATH`, see
bagpiper_jax/trainer.py) instead of compiling (MaxText's `compiled_trainstep_file`).

Compile time: the report splits the time into building the state layout, tracing, counting FLOPs,
lowering and XLA's compile, and gives the size of the lowered program (StableHLO ops) and of the
compiled one (HLO instructions, when the backend can print it).

Exit status: 0 fits; 3 does not fit (or XLA ran out of memory while compiling); anything else is
an error (bad flag, bad config, mesh that does not divide ...).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never grab local accelerators: we compile only

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402
from flax import traverse_util  # noqa: E402
from jax.experimental import serialize_executable  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bagpiper_jax import backends, metrics, optim, sharding, train_state, train_step, trainer  # noqa: E402
from bagpiper_jax.generate import engine  # noqa: E402
from bagpiper_jax.model import ModelConfig  # noqa: E402
from launch import flop_count  # noqa: E402
from launch import topology as topology_lib  # noqa: E402

NOT_FIT_EXIT = 3


def define_flags() -> None:
  """Flags are defined only when this file runs as the program, so importing it (tests, notebooks)
  next to bagpiper_jax.train, which also defines --config, does not clash."""
  config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/bagpiper_8b.py:pretrain.")
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v6e-256, v5e-16, v4-32, v5p:4x4x12.")
  flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice over DCN).")
  flags.DEFINE_float("assumed_mfu", 0.4, "MFU assumed for the step-time estimate.")
  flags.DEFINE_float("step_time", 0.0, "Measured seconds per step on the pod (optional): print the MFU it implies.")
  flags.DEFINE_string("report_json", "", "Also write the report as JSON to this path.")
  flags.DEFINE_string("dump_hlo", "", "Write the lowered StableHLO to PATH and the optimized per-device HLO "
                      "to PATH.opt (when the backend can print it).")
  flags.DEFINE_bool("flops_only", False, "Trace and count FLOPs only (seconds): no XLA compile, no memory report.")
  flags.DEFINE_string("save_compiled", "", "Serialize the compiled train step to this file (local or gs://) for "
                      "a run to load with --config.compiled_train_step.")
  flags.DEFINE_bool("decode", False, "Compile the generation decode step (compile_decode_step) instead.")
  flags.DEFINE_integer("decode_batch", 32, "--decode: requests decoded together.")
  flags.DEFINE_integer("decode_cache_len", 4096, "--decode: KV-cache rows per request.")


# ---------------------------------------------------------------------------------------------
# Compilation.


def prepare_config(config, topo: topology_lib.Topology) -> list[str]:
  """Adjusts config.mesh.dcn for multi-slice when the config leaves it all 1. Returns notes."""
  notes = []
  dcn = dict(config.mesh.dcn)
  if topo.num_slices > 1 and math.prod(int(v) for v in dcn.values() if int(v) != -1) == 1 \
      and -1 not in dcn.values():
    with config.unlocked():
      config.mesh.dcn.data = topo.num_slices
    notes.append(f"config.mesh.dcn was all 1; set mesh.dcn.data={topo.num_slices} (pure data parallelism "
                 "across slices). Pass --config.mesh.dcn.<axis>=N to choose otherwise.")
  return notes


def compile_train_step(config, topo: topology_lib.Topology):
  """(compiled, mesh, abstract_state, abstract_batch, jaxpr FLOP count, timings, sizes) for `config` on `topo`."""
  devices = topology_lib.devices(topo)
  mesh = sharding.make_mesh(config, devices=devices)
  t = [time.perf_counter()]
  step_fn, abstract_state, _, abstract_batch, _ = train_step.build_train_step(config, mesh)
  t.append(time.perf_counter())
  traced = step_fn.trace(abstract_state, abstract_batch)
  t.append(time.perf_counter())
  counted = flop_count.count_traced(traced)
  t.append(time.perf_counter())
  lowered = traced.lower()
  t.append(time.perf_counter())
  cpu0 = time.process_time()
  compiled = lowered.compile()
  t.append(time.perf_counter())
  names = ("build_s", "trace_s", "flop_count_s", "lower_s", "compile_s")
  timing = {k: b - a for k, a, b in zip(names, t, t[1:])}
  timing["compile_cpu_s"] = time.process_time() - cpu0  # all threads; less sensitive to other jobs than wall
  sizes = {"jaxpr_eqns": flop_count.count_eqns(traced.jaxpr), "stablehlo_ops": stablehlo_op_count(lowered)}
  optimized = optimized_hlo_text(compiled)
  if optimized is not None:
    sizes["hlo_instructions"] = hlo_instruction_count(optimized)
    sizes["collectives"] = collective_counts(optimized)
  return compiled, lowered, mesh, abstract_state, abstract_batch, counted, timing, sizes


def stablehlo_op_count(lowered) -> int:
  """Operations in the lowered module (lines holding an op, regions' ops included)."""
  return sum(1 for line in lowered.as_text().splitlines() if re.match(r"\s*(%\S+ = )?\"?[a-z_]+\.[a-z_]", line))


def optimized_hlo_text(compiled) -> str | None:
  """The optimized per-device HLO, or None where the backend cannot print it (libtpu 0.0.52 fails a
  RET_CHECK on async-update instructions of some programs)."""
  try:
    return compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return None


def hlo_instruction_count(text: str) -> int:
  return sum(1 for line in text.splitlines() if re.match(r"\s*(ROOT )?%?[\w.\-]+ = ", line))


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
COLLECTIVE_OP = re.compile(r" (" + "|".join(COLLECTIVES) + r")(-start)?\(")  # group 1: the kind


def collective_counts(text: str) -> dict[str, int]:
  """Collectives of the optimized program by kind (an async start/done pair counts once). FSDP weight
  gathers should be all-gathers: libtpu turns them into all-reduces of zero-padded buffers when it
  compiles for the wrong torus (launch/topology.py, Topology.wrap)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for m in COLLECTIVE_OP.finditer(text):
    counts[m.group(1)] += 1
  return counts


def save_compiled(compiled, path: str, meta: dict) -> int:
  """Writes the serialized executable + its pytree structures + `meta` (what it was compiled for)."""
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  blob = pickle.dumps({"format": trainer.COMPILED_FORMAT, "executable": payload, "in_tree": in_tree,
                       "out_tree": out_tree, "meta": meta})
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(blob)
  return len(blob)


def is_out_of_memory(e: BaseException) -> bool:
  s = f"{type(e).__name__}: {e}"
  return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or "exceeds the memory" in s


def oom_summary(e: BaseException) -> str:
  """The lines of XLA's out-of-memory message that say how much (the full text can be pages)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  keep = [l for l in lines if re.search(r"(Ran out of memory|Used .* of .*hbm|Exceeded .*capacity|"
                                         r"Total hbm usage|RESOURCE_EXHAUSTED|program hbm requirement)", l, re.I)]
  return "\n".join((keep or lines)[:8])


# ---------------------------------------------------------------------------------------------
# Reports.


def _per_device_bytes(tree, host: bool | None = None) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, to be safe);
  host=True / False: only the leaves in pinned host memory / the others (optim.offload_state)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    kind = getattr(leaf.sharding, "memory_kind", None)
    if host is not None and (kind == "pinned_host") != host:
      continue
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def memory_report(compiled, chip: topology_lib.Chip, abstract_state=None, abstract_batch=None) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("compiled.memory_analysis() returned None (this backend gives no memory analysis)")
  r = {
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
      "aliased": int(m.alias_size_in_bytes),
      "temps": int(m.temp_size_in_bytes),
      "code": int(m.generated_code_size_in_bytes),
  }
  r["total"] = metrics.memory_stats_device_bytes(m)
  # Host memory (pinned_host): offloaded activations / optimizer state; per device, like the rest.
  host = {k: int(getattr(m, f"host_{k}_size_in_bytes", 0) or 0)
          for k in ("argument", "output", "alias", "temp")}
  r["host_total"] = host["argument"] + host["output"] - host["alias"] + host["temp"]
  r["host_temps"] = host["temp"]
  r["peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  r["hbm"] = int(chip.hbm_bytes)
  r["fits"] = r["total"] <= r["hbm"]
  r["headroom"] = r["hbm"] - r["total"]
  if abstract_state is not None:
    r["state_expected"] = _per_device_bytes(abstract_state, host=False)  # from the shardings, a cross-check
    r["state_host_expected"] = _per_device_bytes(abstract_state, host=True)
  if abstract_batch is not None:
    r["batch_expected"] = _per_device_bytes(abstract_batch)
  return r


def _cost_dict(compiled) -> dict:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0] if ca else {}
  return dict(ca or {})


def layers_trainable(config) -> bool:
  """Whether the decoder layers get gradients in this stage (warmup freezes them)."""
  params, _ = train_state.param_specs(ModelConfig.from_dict(config.model))
  mask = traverse_util.flatten_dict(optim.trainable_mask(config, params))
  return any(v for k, v in mask.items() if k[0] == "layers")


def flops_report(compiled, counted: flop_count.FlopCount, config, abstract_batch, num_chips: int, peak: float,
                 assumed_mfu: float, step_time: float = 0.0) -> dict:
  ids = abstract_batch["input_ids"]
  micro, rows, seq_len = int(ids.shape[0]), int(ids.shape[1]), int(ids.shape[2])
  windows = int(abstract_batch["audio_mel"].shape[2]) if "audio_mel" in abstract_batch else 0
  cfg = ModelConfig.from_dict(config.model)
  model_flops = metrics.train_flops_per_step(cfg, rows=micro * rows, seq_len=seq_len, audio_windows=windows,
                                             layers_trainable=layers_trainable(config))
  cost = _cost_dict(compiled) if compiled is not None else {}
  compiled_flops = float(cost.get("flops", float("nan")))
  tokens = micro * rows * seq_len
  r = {
      "global_rows": micro * rows, "seq_len": seq_len, "tokens_per_step": tokens, "audio_windows": windows,
      "xla_cost_flops_per_chip": compiled_flops,  # while-loop bodies counted once (see flop_count.py)
      "executed_flops_per_step": counted.flops,  # jaxpr matmul/conv FLOPs, loops x trip count
      "executed_flops_per_chip": counted.flops / num_chips,
      "kernel_flops_per_chip": counted.kernel_flops / num_chips,  # Pallas kernels, counted dense
      "unknown_trip_loops": counted.unknown_trip_loops,
      "model_flops_per_step": model_flops,
      "model_flops_per_chip": model_flops / num_chips,
      "executed_over_model": counted.flops / model_flops,
      "executed_flops_per_token": counted.flops / tokens,
      "bytes_accessed_per_chip": float(cost.get("bytes accessed", float("nan"))),
      "peak_flops_per_chip": peak,
      "assumed_mfu": assumed_mfu,
  }
  t = r["model_flops_per_chip"] / (peak * assumed_mfu)
  r["est_step_time_s"] = t
  r["est_tokens_per_s"] = tokens / t
  r["est_tokens_per_s_per_chip"] = tokens / t / num_chips
  r["est_hardware_utilisation"] = r["executed_flops_per_chip"] / (peak * t)  # > 1: assumed MFU impossible
  if step_time > 0:
    r["measured_step_time_s"] = step_time
    r["measured_mfu"] = r["model_flops_per_chip"] / (peak * step_time)
  return r


def _gib(x: float) -> str:
  if abs(x) < topology_lib.GIB:
    return f"{x / 2**20:8.2f} MiB"
  return f"{x / topology_lib.GIB:8.2f} GiB"


def format_report(rep: dict) -> str:
  out = [f"AOT compile: {rep['config']} on {rep['topology']}",
         f"  mesh {rep['mesh']}  ({rep['num_chips']} chips, {rep['chip']}, device kind {rep['device_kind']!r})"]
  out += [f"  note: {n}" for n in rep.get("notes", [])]
  if "timing" in rep:
    t, z = rep["timing"], rep.get("sizes", {})
    out.append(f"  time: build {t['build_s']:.1f} s, trace {t['trace_s']:.1f} s, FLOP count {t['flop_count_s']:.1f} s, "
               f"lower {t['lower_s']:.1f} s, XLA compile {t['compile_s']:.1f} s ({t.get('compile_cpu_s', 0):.1f} s CPU); program: "
               f"{z.get('jaxpr_eqns', 0):,} jaxpr equations, {z.get('stablehlo_ops', 0):,} StableHLO ops"
               + (f", {z['hlo_instructions']:,} optimized HLO instructions" if "hlo_instructions" in z else ""))
    if z.get("collectives"):
      out.append("  collectives: " + ", ".join(f"{n} {k}" for k, n in z["collectives"].items() if n))
  m = rep.get("memory")
  if m is None:
    out.append("  DOES NOT FIT: XLA ran out of memory while compiling:\n    "
               + rep["oom"].replace("\n", "\n    "))
    return "\n".join(out)
  out.append("  per-chip memory (compiled.memory_analysis):")
  out.append(f"    arguments {_gib(m['arguments'])}" + (
      f"   (state shards {_gib(m['state_expected']).strip()}"
      + (f" + {_gib(m['state_host_expected']).strip()} in host memory" if m.get("state_host_expected") else "")
      + f", batch shard {_gib(m['batch_expected']).strip()})" if "state_expected" in m else ""))
  out.append(f"    outputs   {_gib(m['outputs'])}")
  out.append(f"    aliased   {_gib(m['aliased'])}   (donated state reused in place)")
  out.append(f"    temps     {_gib(m['temps'])}")
  out.append(f"    code      {_gib(m['code'])}")
  if m.get("host_total"):
    out.append(f"    host      {_gib(m['host_total'])}   (pinned host memory: offloaded activations / state)")
  out.append(f"    total     {_gib(m['total'])}   of {_gib(m['hbm']).strip()} HBM -> "
             + (f"FITS ({100 * m['total'] / m['hbm']:.1f}% used, {_gib(m['headroom']).strip()} free)"
                if m["fits"] else f"DOES NOT FIT (over by {_gib(-m['headroom']).strip()})"))
  f = rep["flops"]
  out.append(f"  step: {f['global_rows']} rows x {f['seq_len']} tokens = {f['tokens_per_step']:,} tokens, "
             f"{f['audio_windows']} audio windows per row")
  out.append(f"  FLOPs per chip per step: model {f['model_flops_per_chip']:.4g} (metrics.train_flops_per_step); "
             f"executed {f['executed_flops_per_chip']:.4g} (jaxpr matmuls incl. remat recompute, "
             f"{f['executed_over_model']:.2f}x model); XLA cost analysis {f['xla_cost_flops_per_chip']:.4g} "
             "(counts each loop body once: a lower bound)")
  if f.get("kernel_flops_per_chip"):
    out.append(f"  note: {f['kernel_flops_per_chip']:.4g} of the executed FLOPs are inside Pallas kernels (splash "
               "attention), counted as if no masked block were skipped")
  if f["unknown_trip_loops"]:
    out.append(f"  note: {f['unknown_trip_loops']} while loops with data-dependent trip counts counted once")
  out.append(f"  at an assumed MFU of {100 * f['assumed_mfu']:.0f}% (peak {f['peak_flops_per_chip'] / 1e12:.0f} "
             f"TFLOP/s/chip): step {f['est_step_time_s']:.4g} s, {f['est_tokens_per_s']:,.0f} tokens/s "
             f"({f['est_tokens_per_s_per_chip']:,.0f} per chip); the executed FLOPs would then run at "
             f"{100 * f['est_hardware_utilisation']:.0f}% of peak"
             + (" (impossible: lower --assumed_mfu)" if f["est_hardware_utilisation"] > 1 else ""))
  if "measured_mfu" in f:
    out.append(f"  measured step time {f['measured_step_time_s']:.3f} s -> MFU {100 * f['measured_mfu']:.1f}%")
  return "\n".join(out)


def count_flops(config, topology: str, num_slices: int = 1, *, assumed_mfu: float = 0.4) -> dict:
  """The FLOPs part of the report from tracing alone (no XLA compile): seconds instead of minutes."""
  topo = topology_lib.parse(topology, num_slices)
  prepare_config(config, topo)
  mesh = sharding.make_mesh(config, devices=topology_lib.devices(topo))
  step_fn, abstract_state, _, abstract_batch, _ = train_step.build_train_step(config, mesh)
  counted = flop_count.count_traced(step_fn.trace(abstract_state, abstract_batch))
  return flops_report(None, counted, config, abstract_batch, topo.num_chips, topo.chip.peak_bf16_flops, assumed_mfu)


def run(config, topology: str, num_slices: int = 1, *, assumed_mfu: float = 0.4, step_time: float = 0.0,
        config_name: str = "", dump_hlo: str = "", save_compiled_to: str = "") -> dict:
  """Compiles and returns the report dict (rep['fits'] says whether it fits)."""
  topo = topology_lib.parse(topology, num_slices)
  notes = prepare_config(config, topo)
  rep: dict[str, Any] = {"config": config_name or "<config>", "topology": topo.describe(), "num_chips": topo.num_chips,
                         "chip": topo.chip.name, "notes": notes, "stage": str(config.get("stage", ""))}
  try:
    compiled, lowered, mesh, abstract_state, abstract_batch, counted, timing, sizes = compile_train_step(config, topo)
  except Exception as e:  # pylint: disable=broad-except
    if not is_out_of_memory(e):
      raise
    mesh = sharding.make_mesh(config, devices=topology_lib.devices(topo))
    rep.update(mesh=dict(mesh.shape), device_kind=mesh.devices.flat[0].device_kind, fits=False,
               oom=oom_summary(e), memory=None)
    return rep
  rep["mesh"] = dict(mesh.shape)
  rep["device_kind"] = mesh.devices.flat[0].device_kind
  rep["timing"] = timing
  rep["sizes"] = sizes
  rep["memory"] = memory_report(compiled, topo.chip, abstract_state, abstract_batch)
  rep["flops"] = flops_report(compiled, counted, config, abstract_batch, topo.num_chips, topo.chip.peak_bf16_flops,
                              assumed_mfu, step_time)
  rep["fits"] = rep["memory"]["fits"]
  if dump_hlo:
    epath.Path(dump_hlo).write_text(lowered.as_text())
    optimized = optimized_hlo_text(compiled)
    if optimized is not None:
      epath.Path(dump_hlo + ".opt").write_text(optimized)
  if save_compiled_to:
    meta = {"topology": topo.describe(), "num_chips": topo.num_chips, "device_kind": rep["device_kind"],
            "mesh": rep["mesh"], "config": config.to_json_best_effort(sort_keys=True)}
    rep["saved_compiled"] = {"path": save_compiled_to, "bytes": save_compiled(compiled, save_compiled_to, meta)}
  return rep


# ---------------------------------------------------------------------------------------------
# The generation decode step (bagpiper_jax/generate/engine.py): one loop iteration, all chips on the
# `tensor` axis (weights and KV cache split by heads/vocab, no weight all-gathers per token).

HBM_BYTES_PER_S = {"v4": 1.2e12, "v5p": 2.765e12, "v5e": 0.819e12, "v6e": 1.64e12}  # per chip, vendor figures


def compile_decode_step(config, topo: topology_lib.Topology, *, batch: int, cache_len: int,
                        use_cfg: bool) -> dict:
  """Compiles one decode iteration for `topo`; reports per-chip memory and the HBM-bandwidth-bound step
  time: (decoder weights the step multiplies + KV cache) bytes per chip / HBM bandwidth. Embedding rows
  are gathered (8 per token) and the audio tower is unused, so neither counts."""
  devices = topology_lib.devices(topo)
  mesh = Mesh(np.asarray(devices).reshape(1, 1, len(devices), 1), sharding.MESH_AXES)
  gen = engine.Generator(ModelConfig.from_dict(config.model), None, mesh=mesh, max_cache_len=cache_len)
  fn, params, state = gen.abstract_step(gen.step_shape(batch=batch, cache=cache_len, use_cfg=use_cfg))
  t0 = time.time()
  compiled = fn.lower(params, state).compile()
  weights = _per_device_bytes({k: params[k] for k in ("layers", "lm_head", "norm", "stream_emb")})
  cache = _per_device_bytes({k: state[k] for k in ("k", "v")})
  step_s = (weights + cache) / HBM_BYTES_PER_S[topo.chip.name]
  return {"topology": topo.describe(), "chips": topo.num_chips, "mesh": dict(mesh.shape), "batch": batch,
          "cache_len": cache_len, "cfg_branch": use_cfg, "cache_rows": int(state["k"].shape[1]),
          "compile_s": time.time() - t0, "memory": memory_report(compiled, topo.chip, params),
          "weight_bytes_per_chip": weights, "cache_bytes_per_chip": cache, "hbm_step_time_s": step_s,
          "hbm_tokens_per_s": batch / step_s}


def format_decode_report(r: dict) -> str:
  m, g = r["memory"], lambda x: _gib(x).strip()
  cfg = f" + CFG branch ({r['cache_rows']} cache rows)" if r["cfg_branch"] else ""
  return (f"decode step on {r['topology']}, mesh {r['mesh']}: batch {r['batch']} x cache "
          f"{r['cache_len']}{cfg}; compile {r['compile_s']:.0f} s\n"
          f"  per chip: arguments {g(m['arguments'])}, temps {g(m['temps'])}, total {g(m['total'])} of "
          f"{g(m['hbm'])} HBM ({'fits' if m['fits'] else 'DOES NOT FIT'})\n"
          f"  per step and chip: weights {g(r['weight_bytes_per_chip'])} + KV cache "
          f"{g(r['cache_bytes_per_chip'])} -> >= {1e3 * r['hbm_step_time_s']:.2f} ms at HBM bandwidth = "
          f"<= {r['hbm_tokens_per_s']:,.0f} tokens/s")


def main(argv):
  F = flags.FLAGS
  backends.skip_tpu_probe_without_tpu()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if F.config is None or not F.topology:
    raise app.UsageError("--config and --topology are required, e.g. "
                         "--config=configs/bagpiper_8b.py:pretrain --topology=v5p-128")
  if F.decode:
    topo = topology_lib.parse(F.topology, F.num_slices)
    reps = [compile_decode_step(F.config, topo, batch=F.decode_batch, cache_len=F.decode_cache_len, use_cfg=c)
            for c in (False, True)]
    print("\n".join(format_decode_report(r) for r in reps), flush=True)
    if F.report_json:
      with open(F.report_json, "w") as f:
        json.dump(reps, f, indent=1, default=str)
    sys.exit(0 if all(r["memory"]["fits"] for r in reps) else NOT_FIT_EXIT)
  if F.flops_only:
    f = count_flops(F.config, F.topology, F.num_slices, assumed_mfu=F.assumed_mfu)
    print(f"FLOPs per chip per step: model {f['model_flops_per_chip']:.4g}, executed {f['executed_flops_per_chip']:.4g} "
          f"({f['executed_over_model']:.3f}x model, {f['executed_flops_per_token'] / 1e9:.2f} GFLOP per token)", flush=True)
    if F.report_json:
      with open(F.report_json, "w") as fh:
        json.dump({"flops": f}, fh, indent=1, default=str)
    return
  rep = run(F.config, F.topology, F.num_slices, assumed_mfu=F.assumed_mfu,
            step_time=F.step_time, config_name=config_flags.get_config_filename(flags.FLAGS["config"]),
            dump_hlo=F.dump_hlo, save_compiled_to=F.save_compiled)
  print(format_report(rep), flush=True)
  if "saved_compiled" in rep:
    print(f"  compiled train step written to {rep['saved_compiled']['path']} "
          f"({rep['saved_compiled']['bytes'] / 2**20:.1f} MiB): run with "
          f"--config.compiled_train_step={rep['saved_compiled']['path']}", flush=True)
  if F.report_json:
    with open(F.report_json, "w") as f:
      json.dump(rep, f, indent=1, default=str)
  if not rep["fits"]:
    sys.exit(NOT_FIT_EXIT)


if __name__ == "__main__":
  define_flags()
  app.run(main)
