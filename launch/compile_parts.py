r"""Where the compile time of the train step goes: each part compiled on its own for a TPU slice.

  python -m launch.compile_parts --config=configs/bagpiper_8b.py:pretrain --topology=v5p-128
  python -m launch.compile_parts --config=configs/tiny.py --topology=cpu --parts=encoder,loss

Parts (each jitted with the train step's shardings, on the same compile-only devices):
  step       the whole train step (train_step.build_train_step), as launch.aot_compile compiles it
  encoder    the frozen audio tower + adapter, forward only, over the step's audio windows
  decoder    embeddings + the scanned decoder layers + final norm, forward and backward (grads of the
             params), with the step's remat policy and attention kernel; the loss replaced by a sum
  loss       the chunked multi-stream loss (and its gradient w.r.t. h, lm_head and stream offsets)
  optimizer  the AdamW update of the trainable parameters (clip, schedule, weight decay)
For each: trace + lower seconds, XLA compile seconds, jaxpr equations, StableHLO ops. The parts
do not add up to the step exactly (XLA optimises across parts), but they say which one dominates.
`--log_compiles` turns on jax.log_compiles (every compilation with its time, on stderr).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never grab local accelerators: we compile only

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bagpiper_jax import backends, optim, sharding, train_step  # noqa: E402
from bagpiper_jax.model import ModelConfig  # noqa: E402
from bagpiper_jax.model import loss as loss_lib  # noqa: E402
from bagpiper_jax.train_state import StateLayout  # noqa: E402
from launch import aot_compile, flop_count  # noqa: E402
from launch import topology as topology_lib  # noqa: E402

PARTS = ("step", "encoder", "decoder", "loss", "optimizer")


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/bagpiper_8b.py:pretrain.")
  flags.DEFINE_string("topology", None, "TPU slice (v5p-128, ...) or cpu.")
  flags.DEFINE_list("parts", list(PARTS), f"Parts to compile, of {PARTS}.")
  flags.DEFINE_bool("log_compiles", False, "jax.log_compiles while compiling.")


def _abstract(shape, dtype, shard):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=shard)


def part_functions(config, mesh):
  """name -> (function, abstract args) for every part (nothing allocated)."""
  cfg = ModelConfig.from_dict(config.model)
  layout = StateLayout(config, mesh, cfg)
  model = layout.model
  batch = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*v.sharding.spec[1:])))
           for k, v in train_step.abstract_batch(config, cfg, mesh).items()}
  params = layout.abstract_state.params
  trainable, frozen = optim.split(params, layout.mask)
  out = {}

  fn, st, _, ab, _ = train_step.build_train_step(config, mesh, cfg)
  out["step"] = (fn, (st, ab))

  if "audio_mel" in batch:
    def encoder(p, b):
      with train_step.mesh_rules(mesh):
        return model.apply({"params": p}, b, jnp.zeros(b["input_ids"].shape[:2] + (cfg.hidden_size,),
                                                       layers_dtype(cfg)), method=type(model).audio_rows)
    out["encoder"] = (jax.jit(encoder), (params, batch))

  def decoder(tp, b):
    def f(tp):
      with train_step.mesh_rules(mesh):
        h = model.apply({"params": optim.merge(tp, frozen)}, {k: v for k, v in b.items()
                                                             if not k.startswith("audio")},
                        method=type(model).hidden)
      return jnp.sum(h.astype(jnp.float32))
    return jax.grad(f)(tp)
  out["decoder"] = (jax.jit(decoder), (trainable, batch))

  b, l = batch["input_ids"].shape[:2]
  h_abs = _abstract((b, l, cfg.hidden_size), layers_dtype(cfg), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*batch["positions"].sharding.spec, None)))
  kernel = params["lm_head"]["kernel"]
  offs = _abstract((cfg.num_streams, cfg.vocab_size), jnp.float32, sharding.replicated(mesh))

  def loss(h, kern, off, b):
    def f(h, kern, off):
      with train_step.mesh_rules(mesh):
        tgt, w = loss_lib.shift_targets(b["input_ids"], b["loss_weights"], b["segment_ids"])
        sums = loss_lib.multistream_loss_sums(h, kern, off, tgt, w, cfg)
        return loss_lib.finalize_loss(sums, cfg)[0]
    return jax.grad(f, argnums=(0, 1, 2))(h, kern, off)
  out["loss"] = (jax.jit(loss), (h_abs, kernel, offs, batch))

  opt_state = layout.abstract_state.opt_state

  def optimizer(g, s, p):
    with train_step.mesh_rules(mesh):
      return layout.optimizer.update(g, s, p)
  out["optimizer"] = (jax.jit(optimizer), (trainable, opt_state, trainable))
  return out


def layers_dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def compile_part(fn, args) -> dict:
  t0 = time.perf_counter()
  traced = fn.trace(*args)
  lowered = traced.lower()
  t1, c1 = time.perf_counter(), time.process_time()
  lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "compile_cpu_s": c2 - c1,
          "jaxpr_eqns": flop_count.count_eqns(traced.jaxpr),
          "stablehlo_ops": aot_compile.stablehlo_op_count(lowered)}


def main(argv):
  del argv
  backends.skip_tpu_probe_without_tpu()
  F = flags.FLAGS
  if F.config is None or not F.topology:
    raise app.UsageError("--config and --topology are required")
  unknown = set(F.parts) - set(PARTS)
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}; known {PARTS}")
  if F.log_compiles:
    jax.config.update("jax_log_compiles", True)
  topo = topology_lib.parse(F.topology)
  aot_compile.prepare_config(F.config, topo)
  mesh = sharding.make_mesh(F.config, devices=topology_lib.devices(topo))
  fns = part_functions(F.config, mesh)
  print(f"compile parts of {config_flags.get_config_filename(F['config'])} on {topo.describe()}, mesh "
        f"{dict(mesh.shape)}", flush=True)
  print("| part | trace + lower s | XLA compile s (wall) | XLA compile s (CPU) | jaxpr equations | StableHLO ops |\n"
        "|---|---:|---:|---:|---:|---:|", flush=True)
  for name in PARTS:
    if name not in F.parts or name not in fns:
      continue
    r = compile_part(*fns[name])
    print(f"| {name} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} | {r['jaxpr_eqns']:,} | "
          f"{r['stablehlo_ops']:,} |", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
