r"""Where a TPU compile spends its time: per-kernel backend cost of the AOT-compiled train step, by part.

  python -m launch.compile_profile --config=configs/bagpiper_8b.py:pretrain --topology=v5p-128
  python -m launch.compile_profile --config=configs/bagpiper_8b.py:pretrain --topology=v5p-128 \
      -- --config.data.max_audio_windows=0       # config overrides for aot_compile go after `--`
  python -m launch.compile_profile --log=mt/libtpu.log --dump=mt/dump     # a run made elsewhere (MaxText)

For a train step, libtpu's HLO passes take seconds; the backend (lowering every fusion to LLO, then
scheduling and register allocation) takes the rest. This runs `launch.aot_compile` in a subprocess
with libtpu's backend log on (TPU_VMODULE=deepsea_compiler_backend=2) and the optimized HLO dumped
(XLA_FLAGS=--xla_dump_to), then reads, per kernel: its LLO instruction count (deterministic: the
figure to compare between programs) and the seconds between its log lines on its compile thread
(noisy: the host's speed varies, threads overlap). The kernels' op names (jax's name stack, e.g.
`Bagpiper.hidden/while/body/...`, `multistream_loss`, `optimizer`) put each in a part of the step.

Also printed: libtpu's stage durations (HLO_PASSES, BACKEND_PASSES, END_TO_END) and the collectives.
Findings made with it are in launch/README.md ("Compile time").
"""

from __future__ import annotations

import collections
import glob
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags

from launch import aot_compile

# (part, pattern over a kernel's op names), first match wins. `transpose(` marks the backward pass.
PARTS = (
    ("audio encoder + adapter", r"audio_encoder|/adapter/|audio_rows"),
    ("embedding", r"embed_rows|embed_tokens"),
    ("loss", r"multistream_loss"),
    ("optimizer", r"/optimizer/|optax|apply_updates"),
    ("decoder layers, backward", r"transpose\(.*/while/body/"),
    ("decoder layers, forward", r"/while/body/"),
)
_LOG_LINE = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s+(\d+) \S+\] (.*)")
_KERNEL = re.compile(r"\[([\w.\-]+)\] LLO optimizing ([\d,]+) instructions")
_STAGE = re.compile(r"(\w+) stage duration: (.*)$")


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Training config, e.g. configs/bagpiper_8b.py:pretrain (passed to aot_compile).")
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128.")
  flags.DEFINE_string("log", "", "Analyse this libtpu log (stderr of a run with the env above) instead of compiling.")
  flags.DEFINE_string("dump", "", "With --log: the --xla_dump_to directory of that run.")
  flags.DEFINE_string("out_dir", "", "Where to keep the log and dump (default: a temporary directory).")
  flags.DEFINE_integer("top", 15, "Kernels to list, largest LLO count first.")


def kernel_costs(log_lines) -> dict[str, tuple[int, float]]:
  """kernel name -> (LLO instructions, seconds). A kernel's seconds run from the previous log line of
  its thread that ended the kernel before it (or the first line of the thread) to its last line."""
  cost: dict[str, list] = {}
  current: dict[str, tuple[str, float]] = {}
  last: dict[str, float] = {}
  for line in log_lines:
    m = _LOG_LINE.match(line)
    if not m:
      continue
    t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    thread, msg = m.group(4), m.group(5)
    k = _KERNEL.match(msg)
    if k:
      start = last.get(thread, t)
      if thread in current:
        name, began = current.pop(thread)
        cost[name][1] += start - began
      current[thread] = (k.group(1), start)
      cost.setdefault(k.group(1), [0, 0.0])[0] = int(k.group(2).replace(",", ""))
    last[thread] = t
  for thread, (name, began) in current.items():
    cost[name][1] += last[thread] - began
  return {k: (v[0], v[1]) for k, v in cost.items()}


def stage_durations(log_lines) -> dict[str, str]:
  return {m.group(1): m.group(2).strip() for m in map(_STAGE.search, log_lines) if m}


def op_names(hlo_text: str) -> dict[str, list[str]]:
  """instruction name -> the op names of it and of the computation it calls (fusions)."""
  comps = {m.group(1): re.findall(r'op_name="([^"]*)"', m.group(2))
           for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S)}
  names = {}
  for m in re.finditer(r"^\s+(?:ROOT )?%?([\w.\-]+) = [^\n]*", hlo_text, re.M):
    line = m.group(0)
    called = re.search(r"calls=%?([\w.\-]+)", line)
    names[m.group(1)] = re.findall(r'op_name="([^"]*)"', line) + (comps.get(called.group(1), []) if called else [])
  return names


def part_of(ops: list[str]) -> str:
  joined = " ".join(o for o in ops if o)
  for part, pattern in PARTS:
    if re.search(pattern, joined):
      return part
  return "rest (entry: gathers, norms, casts, ...)" if joined else "unnamed (copies, collectives)"


def report(log_lines, hlo_text: str, top: int) -> str:
  costs, names = kernel_costs(log_lines), op_names(hlo_text)
  by_part = collections.defaultdict(lambda: [0, 0, 0.0])
  for k, (llo, sec) in costs.items():
    p = by_part[part_of(names.get(k, []))]
    p[0] += 1
    p[1] += llo
    p[2] += sec
  total_llo = sum(v[1] for v in by_part.values()) or 1
  out = ["libtpu stages: " + ", ".join(f"{k} {v}" for k, v in stage_durations(log_lines).items()),
         f"{len(costs)} kernels, {total_llo:,} LLO instructions, {sum(c[1] for c in costs.values()):.1f} "
         "kernel-seconds (summed over compile threads)",
         f"  {'part':42s} {'kernels':>7s} {'LLO instr':>11s} {'share':>6s} {'seconds':>8s}"]
  for part, (n, llo, sec) in sorted(by_part.items(), key=lambda kv: -kv[1][1]):
    out.append(f"  {part:42s} {n:7d} {llo:11,d} {llo / total_llo:6.1%} {sec:8.1f}")
  collectives = aot_compile.collective_counts(hlo_text)
  out.append("collectives: " + (", ".join(f"{n} {k}" for k, n in collectives.items() if n) or "none"))
  out.append(f"largest {top} kernels:")
  for k, (llo, sec) in sorted(costs.items(), key=lambda kv: -kv[1][0])[:top]:
    ops = [o for o in names.get(k, []) if o]
    where = collections.Counter(ops).most_common(1)[0][0][-90:] if ops else ""
    out.append(f"  {llo:9,d} {sec:6.2f} s  {k:32s} {where}")
  return "\n".join(out)


def _main_module(dump: str) -> str:
  files = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
  if not files:
    raise FileNotFoundError(f"no *after_optimizations.txt in {dump} (was XLA_FLAGS=--xla_dump_to={dump} set?)")
  with open(max(files, key=os.path.getsize)) as f:
    return f.read()


def main(argv):
  F = flags.FLAGS
  if F.log:
    if not F.dump:
      raise app.UsageError("--log needs --dump (the run's --xla_dump_to directory)")
    log, dump = F.log, F.dump
  else:
    if not F.config or not F.topology:
      raise app.UsageError("--config and --topology are required (or --log and --dump)")
    work = F.out_dir or tempfile.mkdtemp(prefix="compile_profile_")
    os.makedirs(work, exist_ok=True)
    log, dump = os.path.join(work, "libtpu.log"), os.path.join(work, "dump")
    env = dict(os.environ, TPU_VMODULE="deepsea_compiler_backend=2", TPU_STDERR_LOG_LEVEL="0",
               TPU_MIN_LOG_LEVEL="0", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip())
    cmd = [sys.executable, "-m", "launch.aot_compile", f"--config={F.config}", f"--topology={F.topology}", *argv[1:]]
    with open(log, "w") as err:
      rc = subprocess.run(cmd, env=env, stderr=err, check=False).returncode
    if rc not in (0, 3):
      raise SystemExit(f"aot_compile exited {rc}; its log: {log}")
    print(f"log {log}, dump {dump}")
  with open(log, errors="replace") as f:
    lines = f.read().splitlines()
  print(report(lines, _main_module(dump), F.top))


if __name__ == "__main__":
  define_flags()
  app.run(main)
