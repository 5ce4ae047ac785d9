r"""AOT-compile a grid of settings for one TPU slice; memory (device + host) and executed FLOPs per point.

  python -m launch.sweep --config=configs/bagpiper_8b.py:pretrain --topology=v5p-128 \
      --remat=full --remat=minimal --remat=minimal_with_context --rows=1,2,4 --out=sweeps/v5p-128.jsonl
  python -m launch.sweep --config=configs/bagpiper_8b.py:pretrain --topology=v6e-256 \
      --remat='custom+offload=decoder_layer_input,query_proj,key_proj,value_proj,out_proj' --rows=2,4 \
      --xla=default,overlap --out=sweeps/v6e-256.jsonl
  python -m launch.sweep --table=sweeps/v5p-128.jsonl          # print a finished sweep and its choice

Axes (the grid is their product; every value is a config override of the AOT compile):
  --remat       repeated; `POLICY[+save=NAMES][+offload=NAMES]`: model.remat_policy (layers.py: full,
                minimal, minimal_with_context, save_qkv_proj, save_dot_except_mlp, ..., custom) with
                model.remat_save / model.remat_offload (comma-separated checkpoint names; offloaded
                values live in pinned host memory between the forward and the backward pass)
  --rows        data.per_device_batch (packed rows per chip)
  --loss_chunk  model.loss_chunk_size (positions per chunk of the multi-stream loss)
  --windows     data.max_audio_windows (audio-encoder windows per row: changes the work itself)
  --fused_bwd   model.attention_fused_bwd (splash: one fused backward kernel)
  --offload_opt optim.offload_state (the Adam moments in pinned host memory between steps)
  --xla         named LIBTPU_INIT_ARGS sets (XLA_FLAG_SETS: scoped VMEM, collective overlap)
  --set         extra fixed overrides for every point, e.g. --set=optim.grad_accum_steps=2

Each point runs `python -m launch.aot_compile` in its own process (a fresh libtpu with that point's
LIBTPU_INIT_ARGS), one at a time. Results append to --out as JSON lines; points already there are
skipped, so an interrupted sweep resumes where it stopped.

The choice (printed under the table): among points whose device total is within --hbm_fraction
(0.85) of the chip's HBM, the least executed FLOPs per token (launch/flop_count.py: remat recompute
and Pallas kernels counted dense included); ties (within 0.5%) -> more rows per chip (fewer FSDP
all-gathers per token), then less device memory.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

from launch import topology as topology_lib

GIB = topology_lib.GIB
# LIBTPU_INIT_ARGS sets (flags of libtpu 0.0.52). "overlap": the collective/compute overlap of
# MaxText's TPU recipes; "overlap_ag" adds all-gather continuation fusion, which libtpu refuses on v5p
# ("not supported/recommended on platforms other than TPU v5e"; v6e recipes use it); "vmem96": the
# 96 MiB scoped-VMEM limit of the v6e recipes.
_OVERLAP = ("--xla_tpu_enable_async_collective_fusion=true "
            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
            "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")
XLA_FLAG_SETS = {
    "default": "",
    "overlap": _OVERLAP,
    "overlap_ag": _OVERLAP + " --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "vmem96": "--xla_tpu_scoped_vmem_limit_kib=98304",
    "overlap_ag_vmem96": (_OVERLAP + " --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
                          " --xla_tpu_scoped_vmem_limit_kib=98304"),
}

def define_flags() -> None:
  """Flags exist only when this file runs as the program (importing it next to other tools is safe)."""
  flags.DEFINE_string("config", None, "Config file[:stage], as for aot_compile.")
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128.")
  flags.DEFINE_multi_string("remat", [], "POLICY[+save=NAMES][+offload=NAMES]; repeat for several.")
  flags.DEFINE_list("rows", [], "data.per_device_batch values.")
  flags.DEFINE_list("loss_chunk", [], "model.loss_chunk_size values.")
  flags.DEFINE_list("windows", [], "data.max_audio_windows values.")
  flags.DEFINE_list("fused_bwd", [], "model.attention_fused_bwd values (false,true).")
  flags.DEFINE_list("offload_opt", [], "optim.offload_state values (false,true).")
  flags.DEFINE_list("xla", [], f"LIBTPU_INIT_ARGS sets: {sorted(XLA_FLAG_SETS)}.")
  flags.DEFINE_multi_string("set", [], "Fixed config override KEY=VALUE for every point.")
  flags.DEFINE_string("out", "", "JSON-lines results file (appended; finished points are skipped).")
  flags.DEFINE_string("table", "", "Only print the table + choice of this results file.")
  flags.DEFINE_bool("recount", False, "With --table: recount every point's FLOPs (aot_compile --flops_only, "
                    "seconds each) and rewrite the file; memory results are kept.")
  flags.DEFINE_float("hbm_fraction", 0.85, "A point fits when device total <= this x HBM.")
  flags.DEFINE_integer("timeout", 3600, "Seconds per compile before it counts as failed.")


def parse_remat(spec: str) -> dict[str, str]:
  """'minimal_with_context+offload=decoder_layer_input,query_proj' -> config overrides."""
  parts = spec.split("+")
  out = {"model.remat_policy": parts[0], "model.remat_save": "", "model.remat_offload": ""}
  for p in parts[1:]:
    key, _, names = p.partition("=")
    if key not in ("save", "offload") or not names:
      raise ValueError(f"--remat={spec!r}: expected POLICY[+save=NAMES][+offload=NAMES], got part {p!r}")
    out[f"model.remat_{key}"] = names
  return out


def grid(remat, rows, loss_chunk, windows, fused_bwd, xla, offload_opt=()) -> list[dict[str, Any]]:
  """Points as {'overrides': {config key: value}, 'xla': flag-set name}, in a stable order."""
  axes = [
      [parse_remat(r) for r in remat] or [{}],
      [{"data.per_device_batch": v} for v in rows] or [{}],
      [{"model.loss_chunk_size": v} for v in loss_chunk] or [{}],
      [{"data.max_audio_windows": v} for v in windows] or [{}],
      [{"model.attention_fused_bwd": v} for v in fused_bwd] or [{}],
      [{"optim.offload_state": v} for v in offload_opt] or [{}],
  ]
  for x in xla:
    if x not in XLA_FLAG_SETS:
      raise ValueError(f"--xla={x!r}: known sets are {sorted(XLA_FLAG_SETS)}")
  points = []
  for combo in itertools.product(*axes):
    for x in (xla or ["default"]):
      ov = {}
      for d in combo:
        ov.update(d)
      points.append({"overrides": ov, "xla": x})
  return points


def point_key(config: str, topology: str, point: dict) -> str:
  return json.dumps({"config": config, "topology": topology, **point}, sort_keys=True)


def compile_point(config: str, topology: str, point: dict, fixed: list[str], timeout: int,
                  flops_only: bool = False) -> dict:
  """Runs aot_compile for one point in a subprocess; returns its report (or the failure)."""
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, "r.json")
    cmd = [sys.executable, "-m", "launch.aot_compile", f"--config={config}", f"--topology={topology}",
           f"--report_json={report}"] + (["--flops_only"] if flops_only else [])
    cmd += [f"--config.{k}={v}" for k, v in point["overrides"].items()]
    cmd += [f"--config.{kv}" for kv in fixed]
    env = dict(os.environ, LIBTPU_INIT_ARGS=XLA_FLAG_SETS[point["xla"]])
    t0 = time.time()
    try:
      p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
      rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired:
      rc, tail = -1, f"timed out after {timeout} s"
    rep = {}
    if os.path.exists(report):
      with open(report) as f:
        rep = json.load(f)
  rep.update(point=point, exit_status=rc, wall_s=time.time() - t0)
  if rc not in (0, 3):
    rep["error"] = tail
  return rep


def summarize(rep: dict, hbm_fraction: float) -> dict:
  """One table row of a point's report."""
  ov = rep["point"]["overrides"]
  row = {
      "remat": ov.get("model.remat_policy", "(config)"),
      "save": ov.get("model.remat_save", ""),
      "offload": ov.get("model.remat_offload", ""),
      "offload_opt": str(ov.get("optim.offload_state", "")).lower() == "true",
      "rows": ov.get("data.per_device_batch", "(config)"),
      "loss_chunk": ov.get("model.loss_chunk_size", "(config)"),
      "windows": ov.get("data.max_audio_windows", "(config)"),
      "fused_bwd": ov.get("model.attention_fused_bwd", "(config)"),
      "xla": rep["point"]["xla"],
      "status": "error" if "error" in rep else ("oom" if rep.get("memory") is None else "ok"),
      "wall_s": rep.get("wall_s", 0.0),
  }
  m, f = rep.get("memory"), rep.get("flops")
  if m:
    row.update(device_gib=m["total"] / GIB, hbm_gib=m["hbm"] / GIB, host_gib=m.get("host_total", 0) / GIB,
               used=m["total"] / m["hbm"], fits=m["total"] <= hbm_fraction * m["hbm"])
  else:
    row.update(fits=False)
  if f:
    row.update(exec_over_model=f["executed_over_model"],
               exec_per_token=f.get("executed_flops_per_token", f["executed_flops_per_step"] / f["tokens_per_step"]))
  if "timing" in rep:
    row["compile_s"] = rep["timing"]["compile_s"]
  return row


def choose(rows: list[dict]) -> dict | None:
  """Least executed FLOPs/token among fitting points; ties (0.5%) -> more rows, then less memory."""
  ok = [r for r in rows if r.get("fits") and "exec_per_token" in r]
  if not ok:
    return None
  best = min(r["exec_per_token"] for r in ok)
  tied = [r for r in ok if r["exec_per_token"] <= best * 1.005]
  return sorted(tied, key=lambda r: (-int(r["rows"]) if str(r["rows"]).isdigit() else 0, r["device_gib"]))[0]


def format_table(rows: list[dict], hbm_fraction: float) -> str:
  head = ("| remat | offload | rows | loss chunk | fused bwd | xla | device GiB | % HBM | host GiB "
          "| executed/model | executed GFLOP/token | fits (<= {:.0f}%) | compile s |".format(100 * hbm_fraction))
  out = [head, "|" + "---|" * 13]
  for r in rows:
    remat = r["remat"] + (f" +save {r['save']}" if r["save"] else "")
    off = " + ".join(x for x in (r["offload"], "optimizer state" if r.get("offload_opt") else "") if x) or "-"
    if r["status"] != "ok" or "device_gib" not in r:
      status = {"oom": "XLA: out of memory", "error": "error"}.get(r["status"], r["status"])
      out.append(f"| {remat} | {off} | {r['rows']} | {r['loss_chunk']} | {r['fused_bwd']} | "
                 f"{r['xla']} | {status} | | | {r.get('exec_over_model', float('nan')):.3f} | "
                 f"{r.get('exec_per_token', float('nan')) / 1e9:.1f} | no | |")
      continue
    out.append(f"| {remat} | {off} | {r['rows']} | {r['loss_chunk']} | {r['fused_bwd']} | "
               f"{r['xla']} | {r['device_gib']:.2f} | {100 * r['used']:.1f} | {r['host_gib']:.2f} | "
               f"{r['exec_over_model']:.3f} | {r['exec_per_token'] / 1e9:.1f} | {'yes' if r['fits'] else 'no'} | "
               f"{r.get('compile_s', 0):.0f} |")
  best = choose(rows)
  if best is None:
    out.append("\nchoice: no point fits")
  else:
    out.append(f"\nchoice: remat {best['remat']}" + (f" +save {best['save']}" if best["save"] else "")
               + (f" +offload {best['offload']}" if best["offload"] else "")
               + (" +optimizer state offloaded" if best.get("offload_opt") else "")
               + f", {best['rows']} rows/chip, loss chunk {best['loss_chunk']}, fused bwd {best['fused_bwd']}, "
               f"xla {best['xla']}: {best['device_gib']:.2f} GiB ({100 * best['used']:.1f}% of HBM), "
               f"executed/model {best['exec_over_model']:.3f}")
  return "\n".join(out)


def read_results(path: str) -> list[dict]:
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  F = flags.FLAGS
  if F.table:
    reps = read_results(F.table)
    if F.recount:
      for r in reps:
        key = json.loads(r["key"])
        new = compile_point(key["config"], key["topology"], r["point"], r.get("fixed", F.set), F.timeout,
                            flops_only=True)
        if "flops" in new and "flops" in r:
          r["flops"].update(new["flops"])
          r["flops_recounted"] = True
        print(f"recounted {r['point']['overrides']}: executed/model "
              f"{r.get('flops', {}).get('executed_over_model', float('nan')):.3f}", flush=True)
      with open(F.table, "w") as f:
        f.writelines(json.dumps(r, default=str) + "\n" for r in reps)
    print(format_table([summarize(r, F.hbm_fraction) for r in reps], F.hbm_fraction))
    return
  if not F.config or not F.topology:
    raise app.UsageError("--config and --topology are required (or --table=FILE)")
  topology_lib.parse(F.topology)  # bad names fail here, not in the first subprocess
  points = grid(F.remat, F.rows, F.loss_chunk, F.windows, F.fused_bwd, F.xla, F.offload_opt)
  done = {r["key"]: r for r in read_results(F.out) if "key" in r}
  print(f"sweep: {len(points)} points on {F.topology} ({len(done)} already in {F.out or '-'})", flush=True)
  reps = []
  for i, point in enumerate(points):
    key = point_key(F.config, F.topology, point)
    if key in done:
      reps.append(done[key])
      continue
    rep = compile_point(F.config, F.topology, point, F.set, F.timeout)
    rep["key"], rep["fixed"] = key, list(F.set)
    reps.append(rep)
    row = summarize(rep, F.hbm_fraction)
    print(f"[{i + 1}/{len(points)}] {point['overrides']} xla={point['xla']}: {row['status']}"
          + (f", {row['device_gib']:.2f} GiB, executed/model {row['exec_over_model']:.3f}" if "device_gib" in row else "")
          + f" ({rep['wall_s']:.0f} s)", flush=True)
    if "error" in rep:
      print(rep["error"][-1500:], flush=True)
    if F.out:
      os.makedirs(os.path.dirname(os.path.abspath(F.out)), exist_ok=True)
      with open(F.out, "a") as f:
        f.write(json.dumps(rep, default=str) + "\n")
  print(format_table([summarize(r, F.hbm_fraction) for r in reps], F.hbm_fraction), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
