r"""GPU checks before the GPU benchmark (run by launch/gpu_bench.sh; needs one NVIDIA GPU).

  python -m launch.gpu_check --json=/tmp/gpu_check.json

1. Attention kernels against the XLA path on the GPU, at the benchmark's shape (one packed row of
   4,096 positions holding several documents, 16 query / 8 KV heads of 128, bf16): the output and
   the gradients of q, k, v of `layers.dot_product_attend` (cuDNN), `layers.pallas_gpu_attend`
   (jax's Pallas/Triton kernel) and `doc_attention.doc_flash_attend` (ours, `pallas_gpu_docs`: skips
   the blocks between documents) against `layers.attend` computed in float32; plus each kernel's forward+backward
   time. A kernel passes when its error is within bf16 rounding (max |diff| / max |ref| < 2e-2).
2. The torch peer of bagpiper_jax.bench against the jax step on the GPU: a small model, same weights,
   same packed batch, bf16: the first-step losses must agree (to bf16 accuracy).
   pallas_gpu and pallas_gpu_docs are also checked and timed with the --blocks sizes
   (model.attention_blocks values).
Prints one line per check and writes them to --json; the fastest passing kernel is `best_attention`
(and `best_blocks`, its model.attention_blocks, '' for the default).
"""

from __future__ import annotations

import functools
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bagpiper_jax import backends, bench
from bagpiper_jax.model import ModelConfig, doc_attention, layers

_JSON = flags.DEFINE_string("json", "", "Write the results here.")
_LEN = flags.DEFINE_integer("attention_len", 4096, "Length of the attention check (one packed row).")
_BLOCKS = flags.DEFINE_string(
    "blocks", ";".join(layers.PALLAS_GPU_OTHER_BLOCKS),
    "Other pallas_gpu / pallas_gpu_docs block sizes to check and time beside layers.PALLAS_GPU_BLOCKS: "
    "model.attention_blocks values separated by ';' (default: layers.PALLAS_GPU_OTHER_BLOCKS).")


def _packed_segments(l: int, rng) -> np.ndarray:
  seg, t, doc = np.zeros((1, l), np.int32), 0, 1
  while t < l:
    n = min(int(rng.integers(64, l // 2)), l - t)
    seg[0, t:t + n] = doc
    t, doc = t + n, doc + 1
  return seg


def check_attention(l: int, h: int = 16, k: int = 8, d: int = 128, blocks: tuple[str, ...] = ()) -> dict:
  """Each kernel's errors and fwd+bwd time; `blocks`: pallas_gpu and pallas_gpu_docs again with these
  block sizes (entries "pallas_gpu:<blocks>", "pallas_gpu_docs:<blocks>")."""
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.normal(size=(1, l, n, d)), jnp.bfloat16) for n in (h, k, k))
  seg = jnp.asarray(_packed_segments(l, rng))
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, kk, v))  # the reference sees the same bf16 values
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * jnp.cos(jnp.arange(d, dtype=jnp.float32)))
  ref_fn = jax.jit(jax.value_and_grad(loss(lambda a, b, c: layers.attend(a, b, c, seg, q_chunk=1024)), (0, 1, 2)))
  ref_out = jax.jit(lambda a, b, c: layers.attend(a, b, c, seg, q_chunk=1024))(q32, k32, v32)
  _, ref_g = ref_fn(q32, k32, v32)
  impls = {"cudnn": lambda a, b, c: layers.dot_product_attend(a, b, c, seg),
           "xla": lambda a, b, c: layers.attend(a, b, c, seg, q_chunk=1024)}
  # The two Pallas kernels at their default blocks ('') and at each of `blocks`.
  kernels = (("pallas_gpu", layers.pallas_gpu_attend), ("pallas_gpu_docs", doc_attention.doc_flash_attend))
  for name, attend in kernels:
    for spec in ("",) + tuple(blocks):
      impls[f"{name}:{spec}" if spec else name] = functools.partial(
          lambda a, b, c, attend, sizes: attend(a, b, c, seg, blocks=sizes),
          attend=attend, sizes=layers.pallas_gpu_blocks(spec))
  out = {}
  for name, f in impls.items():
    try:
      o = jax.jit(f)(q, kk, v)
      vg = jax.jit(jax.value_and_grad(loss(f), (0, 1, 2)))
      _, g = vg(q, kk, v)
      jax.block_until_ready(g)
      rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
      errs = {"out": rel(o, ref_out), "dq": rel(g[0], ref_g[0]), "dk": rel(g[1], ref_g[1]), "dv": rel(g[2], ref_g[2])}
      times = []
      for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(vg(q, kk, v))
        times.append(time.perf_counter() - t)
      out[name] = {"ok": max(errs.values()) < 2e-2, "max_rel_err": errs, "fwd_bwd_ms": 1e3 * min(times)}
    except Exception as e:  # pylint: disable=broad-except
      out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}",
                   "trace": traceback.format_exc()[-1500:]}
  return out


def check_torch_peer() -> dict:
  """Same weights, same packed batch, bf16 on the GPU: jax's and torch's first-step losses."""
  config = bench.bench_config("small", attention="xla", rows=2, seq_len=512)
  with config.unlocked():
    config.model.dtype = "bfloat16"
  cfg = ModelConfig.from_dict(config.model)
  batch = bench.packed_batch(cfg, 2, 512)
  j = bench.bench_jax(config, [batch], steps=1)
  t = bench.bench_torch(config, [batch], j["params"], steps=1)
  diff = abs(j["first_loss"] - t["first_loss"])
  return {"ok": diff < 2e-2 * abs(j["first_loss"]), "jax_loss": j["first_loss"], "torch_loss": t["first_loss"],
          "torch_device": t["device"]}


def main(argv):
  del argv
  backends.skip_tpu_probe_without_tpu()
  dev = jax.devices()[0]
  res = {"device": dev.device_kind, "platform": dev.platform}
  print(f"gpu_check on {dev.device_kind} ({dev.platform})", flush=True)
  res["attention"] = check_attention(_LEN.value, blocks=tuple(b for b in _BLOCKS.value.split(";") if b))
  for name, r in res["attention"].items():
    if "error" in r:
      print(f"attention {name:10s}: FAILED {r['error'][:200]}", flush=True)
    else:
      print(f"attention {name:10s}: {'ok  ' if r['ok'] else 'BAD '} max rel err "
            + ", ".join(f"{k} {v:.2e}" for k, v in r["max_rel_err"].items())
            + f"; fwd+bwd {r['fwd_bwd_ms']:.2f} ms (1 x {_LEN.value}, 16/8 heads x 128, bf16)", flush=True)
  passing = {k: r for k, r in res["attention"].items() if r.get("ok")}
  best = min(passing, key=lambda k: passing[k]["fwd_bwd_ms"]) if passing else "xla"
  # The kernel (model.attention_impl) and, for pallas_gpu(_docs), its blocks (model.attention_blocks; '' = default).
  res["best_attention"], _, res["best_blocks"] = best.partition(":")
  print(f"best attention kernel: {res['best_attention']}"
        + (f" with blocks {res['best_blocks']}" if res["best_blocks"] else ""), flush=True)
  try:
    res["torch_peer"] = check_torch_peer()
    r = res["torch_peer"]
    print(f"torch peer ({r['torch_device']}, bf16, small model): first-step loss jax {r['jax_loss']:.4f} vs torch "
          f"{r['torch_loss']:.4f} -> {'ok' if r['ok'] else 'DIFFERENT'}", flush=True)
  except Exception as e:  # pylint: disable=broad-except
    res["torch_peer"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    print(f"torch peer check FAILED: {res['torch_peer']['error']}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
