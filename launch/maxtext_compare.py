r"""MaxText's AOT compile of its Qwen3-8B train step, measured the way launch/aot_compile.py measures ours.

Run with a Python that has MaxText (PyPI `maxtext[tpu]`, Python >= 3.12), from the repo root:

  python3.12 -m venv /tmp/mt && /tmp/mt/bin/pip install 'maxtext[tpu]==0.2.5' libtpu==0.0.52
  JAX_PLATFORMS=cpu PYTHONPATH=. /tmp/mt/bin/python launch/maxtext_compare.py --topology=v5p-128 \
      remat_policy=minimal_with_context per_device_batch_size=2

Everything after the flags is passed to MaxText's `train_compile` on top of: base.yml, model_name=qwen3-8b,
max_target_length=8192, attention=flash, synthetic data, no checkpointing, remat_policy=full,
per_device_batch_size=1. Prints one line per phase (trace, lower, XLA compile, wall seconds), the
per-chip memory (compiled.memory_analysis: arguments + outputs - aliased + temps + code) and
executed FLOPs counted by launch/flop_count.py on MaxText's own traced step (dead code removed), over
model FLOPs from bagpiper_jax.metrics' formula for a Qwen3-8B (vocabulary 151,936, no audio): the
same yardstick as ours. MaxText's main() is used as is; only its `jit_and_compile` is wrapped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import jax
from absl import app

from maxtext.trainers.pre_train import train_compile as tc  # pylint: disable=import-error  (MaxText's Python only)
from maxtext.utils import max_utils  # pylint: disable=import-error

from bagpiper_jax import metrics
from bagpiper_jax.model.config import ModelConfig
from launch import flop_count

GIB = 1024 ** 3
# Qwen3-8B as MaxText's qwen3-8b.yml has it: our ModelConfig with no specials and no codec streams.
QWEN3_8B = ModelConfig(text_vocab_size=151936, num_specials=0, num_streams=0, hidden_size=4096,
                       intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128)
DEFAULTS = ["model_name=qwen3-8b", "max_target_length=8192", "attention=flash", "dataset_type=synthetic",
            "enable_checkpointing=false", "skip_jax_distributed_system=true", "remat_policy=full",
            "per_device_batch_size=1", "run_name=maxtext_compare", "base_output_directory=/tmp/maxtext_compare"]


def timed_jit_and_compile(func, func_input_args, func_input_kwargs, mesh, in_shardings, out_shardings,
                          static_argnums, donate_argnums, config, logical_axis_rules):
  """MaxText's jit_and_compile (train_compile.py, maxtext 0.2.5) with phases timed and FLOPs counted."""
  mesh_ctx = mesh if config.enable_diloco else contextlib.nullcontext()
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), mesh_ctx, logical_axis_rules:
    jitted = jax.jit(func, in_shardings=in_shardings, out_shardings=out_shardings, static_argnums=static_argnums,
                     donate_argnums=donate_argnums)
    traced = jitted.trace(*func_input_args, **func_input_kwargs)
    t1 = time.perf_counter()
    counted = flop_count.count_traced(traced)
    t2 = time.perf_counter()
    lowered = traced.lower()
  t3, c3 = time.perf_counter(), time.process_time()
  compiled = lowered.compile(compiler_options=max_utils.parse_libtpu_flags_to_dict(config.compile_xla_flags))
  t4, c4 = time.perf_counter(), time.process_time()
  rows = int(config.global_batch_size_to_train_on)
  seq = int(config.max_target_length)
  model = metrics.train_flops_per_step(QWEN3_8B, rows=rows, seq_len=seq, audio_windows=0)
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
           + m.generated_code_size_in_bytes)
  host = m.host_argument_size_in_bytes + m.host_output_size_in_bytes - m.host_alias_size_in_bytes \
      + m.host_temp_size_in_bytes
  print(f"MAXTEXT time: trace {t1 - t0:.1f} s, FLOP count {t2 - t1:.1f} s, lower {t3 - t2:.1f} s, "
        f"XLA compile {t4 - t3:.1f} s ({c4 - c3:.1f} s CPU)", flush=True)
  print(f"MAXTEXT memory per chip: {total / GIB:.2f} GiB (temps {m.temp_size_in_bytes / GIB:.2f}, arguments "
        f"{m.argument_size_in_bytes / GIB:.2f}); host {host / GIB:.2f} GiB", flush=True)
  print(f"MAXTEXT FLOPs: {rows} rows x {seq}; executed {counted.flops:.4g}, model {model:.4g} -> executed/model "
        f"{counted.flops / model:.3f}, {counted.flops / (rows * seq) / 1e9:.2f} GFLOP per token", flush=True)
  return compiled


def main(argv):
  topo = [a for a in argv[1:] if a.startswith("--topology=")]
  if len(topo) != 1:
    raise app.UsageError("--topology=v5p-128 (a MaxText compile_topology name) is required")
  rest = [a for a in argv[1:] if not a.startswith("--topology=")]
  base = os.path.join(os.path.dirname(tc.__file__), "..", "..", "configs", "base.yml")
  args = [argv[0], os.path.normpath(base), *DEFAULTS, f"compile_topology={topo[0].split('=', 1)[1]}",
          "compile_topology_num_slices=1", *rest]
  tc.jit_and_compile = timed_jit_and_compile
  t0 = time.perf_counter()
  tc.main(args)
  print(f"MAXTEXT wall {time.perf_counter() - t0:.1f} s (train_compile main: config, shapes, trace, compile)", flush=True)


if __name__ == "__main__":
  main(sys.argv)
