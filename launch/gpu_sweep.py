r"""Time a list of train-step settings on one GPU, in one process: s/step, tokens/s, MFU, memory.

  python -m launch.gpu_sweep --preset=h100 --point=remat=minimal,rows=2 \
      --point=remat=minimal_with_context,rows=2 --point=remat=minimal_with_context,rows=4 \
      --out=/tmp/gpu_sweep.jsonl --profile_dir=/tmp/profile

Each --point is `key=value,...` over the bench preset (bagpiper_jax.bench: the same model, packed batch
and step as `python -m bagpiper_jax.bench --preset=...`'s jax side):
  remat        model.remat_policy (layers.py)          save        model.remat_save (names joined by '+')
  rows         packed rows per micro-batch             accum       micro-batches per optimizer step
  attention    model.attention_impl                    blocks      model.attention_blocks (pallas_gpu(_docs))
  loss_chunk   model.loss_chunk_size                   seq_len     tokens per row
  unroll       model.scan_unroll (layers per iteration of the layer scan)
Per point: the step compiled ahead of time (its device memory from the compiled program), one step,
then --steps timed steps (median). MFU = metrics.train_flops_per_step / time / the chip's dense bf16
peak (metrics.PEAK_FLOPS), the same count as the bench and the training loop. A point that fails
(out of memory, a kernel that does not compile) is reported and the sweep goes on. With
--profile_dir, the fastest point is traced for 2 more steps and profiling.summarize_trace printed.
Lines go to stdout as each point finishes and, as JSON, to --out.
"""

from __future__ import annotations

import gc
import json
import statistics
import traceback

import jax
from absl import app, flags

from bagpiper_jax import backends, bench, metrics
from bagpiper_jax.model import ModelConfig

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags exist only when this file runs as the program (importing it next to other tools is safe).
  --preset, --steps and --profile_dir are bagpiper_jax.bench's (same meaning; the profile is of the
  fastest point)."""
  flags.DEFINE_multi_string("point", [], "key=value,... (module docstring); repeated.")
  flags.DEFINE_string("out", "", "Append one JSON line per point here.")

KEYS = ("remat", "save", "rows", "accum", "attention", "blocks", "loss_chunk", "seq_len", "unroll")


def parse_point(text: str) -> dict[str, str]:
  point = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in KEYS:
      raise ValueError(f"--point={text!r}: {item!r} is not key=value with key in {KEYS}")
    point[key] = value
  return point


def point_config(preset: str, point: dict[str, str]):
  config = bench.bench_config(preset, remat=point.get("remat", "none"), rows=int(point.get("rows", 0)),
                              seq_len=int(point.get("seq_len", 0)), attention=point.get("attention", ""),
                              loss_chunk=int(point.get("loss_chunk", 0)), accum=int(point.get("accum", 0)))
  with config.unlocked():
    config.model.remat_save = point.get("save", "").replace("+", ",")
    # The blocks are joined by '/' on the command line (',' separates the point's keys).
    config.model.attention_blocks = point.get("blocks", "").replace("/", ",")
    config.model.scan_unroll = int(point.get("unroll", 1))
  return config


def run_point(preset: str, text: str, steps: int, peak: float, profile_dir: str = "") -> dict:
  config = point_config(preset, parse_point(text))
  cfg = ModelConfig.from_dict(config.model)
  rows, seq, accum, tokens, flops = bench.step_shape(config)
  micro = [bench.packed_batch(cfg, rows, seq, seed=i) for i in range(accum)]
  r = {"point": text, "tokens": tokens, "model_flops": flops,
       "attention_within_docs": metrics.attention_pairs_within_documents([m["segment_ids"] for m in micro])}
  j = bench.bench_jax(config, micro, steps, keep_params=False, profile_dir=profile_dir, profile_top=40)
  med = statistics.median(j["times"]) if j["times"] else float("nan")
  r.update(s_per_step=med, best=min(j["times"]) if j["times"] else med, compile_s=j["compile_s"],
           device_gib=j["device_bytes"] / 2**30, first_loss=j["first_loss"], tokens_per_s=r["tokens"] / med,
           mfu=r["model_flops"] / med / peak)
  return r


def line(r: dict) -> str:
  if "error" in r:
    return f"point {r['point']:55s} FAILED {r['error']}"
  return (f"point {r['point']:55s} {r['s_per_step']:7.4f} s/step | {r['tokens_per_s']:9.1f} tok/s | "
          f"{100 * r['mfu']:5.1f}% MFU | {r['device_gib']:6.2f} GiB | compile {r['compile_s']:5.1f} s | "
          f"loss {r['first_loss']:.4f} | attention within documents {100 * r['attention_within_docs']:.0f}%")


def main(argv):
  del argv
  backends.skip_tpu_probe_without_tpu()
  dev = jax.devices()[0]
  peak, src = metrics.device_peak_flops(bench.bench_config(FLAGS.preset), dev)
  print(f"gpu_sweep: preset {FLAGS.preset} on {dev.device_kind}; peak {peak / 1e12:.0f} TFLOP/s ({src})",
        flush=True)
  results = []
  for text in FLAGS.point:
    try:
      r = run_point(FLAGS.preset, text, FLAGS.steps, peak)
    except Exception as e:  # pylint: disable=broad-except  (one failing point must not end the sweep)
      r = {"point": text, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
           "trace": traceback.format_exc()[-1500:]}
    results.append(r)
    print(line(r), flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "a") as f:
        f.write(json.dumps(r) + "\n")
    gc.collect()  # the point's state and batch go before the next point allocates
  done = [r for r in results if "error" not in r]
  if not done:
    return
  best = max(done, key=lambda r: r["tokens_per_s"])
  print(f"best point: {best['point']} ({100 * best['mfu']:.1f}% MFU, {best['tokens_per_s']:.0f} tok/s)", flush=True)
  if FLAGS.profile_dir:
    run_point(FLAGS.preset, best["point"], 0, peak, profile_dir=FLAGS.profile_dir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
