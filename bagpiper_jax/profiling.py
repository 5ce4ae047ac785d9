"""`--config.profile_steps=N,M`: a jax.profiler trace of train steps N..M in `<workdir>/profile`.

    python -m bagpiper_jax.train --config=... --workdir=W --config.profile_steps=10,12
    tensorboard --logdir=W            # Profile tab (tensorboard-plugin-profile), or: xprof --logdir=W/profile

The trace starts after step N-1 has finished and stops once step M's results are ready, so it holds
exactly steps N..M (dispatch, device execution, collectives, host input). Step 1 includes
compilation: start at 2 or later to see the steady state. Every process traces its own devices
(files per host). Traces are large: a few steps are enough.

`summarize_trace` prints where the device time went, as text, from a trace written with a perfetto
file (`bagpiper_jax.bench --profile_dir`, launch/gpu_bench.sh): for machines without TensorBoard.
"""

from __future__ import annotations

import collections
import gzip
import json
import re

import jax
from absl import logging
from etils import epath

from bagpiper_jax.periodic import PeriodicAction


def parse_steps(spec: str) -> tuple[int, int] | None:
  """'N,M' -> (N, M); '' -> None. Raises ValueError naming the flag."""
  if not spec:
    return None
  parts = str(spec).split(",")
  try:
    first, last = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"config.profile_steps={spec!r}: expected 'N,M' (first and last step to trace), "
                     "e.g. --config.profile_steps=10,12") from None
  if not 1 <= first <= last:
    raise ValueError(f"config.profile_steps={spec!r}: need 1 <= N <= M")
  return first, last


class ProfileAction(PeriodicAction):
  """A periodic action of the train loop that starts a jax.profiler trace before step N and stops it
  after step M (its own `due`: not every-N-steps)."""

  def __init__(self, config, workdir: str):
    super().__init__(0)
    self.steps = parse_steps(config.profile_steps)
    self.log_dir = str(epath.Path(workdir) / "profile")
    self.active = False
    self.done = self.steps is None
    if self.steps is not None and self.steps[0] == 1:  # before the first step (it includes compilation)
      self._start()

  def _start(self) -> None:
    jax.profiler.start_trace(self.log_dir)
    self.active = True
    logging.info("profiling steps %d..%d into %s", *self.steps, self.log_dir)

  def due(self, step: int, last: bool) -> bool:
    if self.done:
      return False
    first, final = self.steps
    return (not self.active and first - 1 <= step < final) or (self.active and (step >= final or last))

  def run(self, step: int, state) -> dict:
    if not self.active:
      self._start()  # after step first-1 (or later, when a resumed run starts inside the window)
      return {}
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active, self.done = False, True
    if jax.process_index() == 0:
      print(f"profile of steps {self.steps[0]}..{step} written to {self.log_dir} "
            f"(tensorboard --logdir={self.log_dir})", flush=True)
    return {}

  def close(self) -> None:
    """Stops a trace still running (the run ended early)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active, self.done = False, True


# ---------------------------------------------------------------------------------------------
# A text summary of where device time went, from a trace written with
# jax.profiler.trace(dir, create_perfetto_trace=True) (what `bagpiper_jax.bench --profile_dir` does),
# for machines where nobody can open TensorBoard: one line per kind of kernel and the largest kernels.

# Kernel kinds by name (the kernel's own name, plus its HLO op when the trace carries one); first match wins.
KERNEL_KINDS = (
    ("attention", r"attention|flash|fmha|mha|splash|pallas|cudnn|softmax_fwd|softmax_bwd"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|wgmma|\bdot|dot_general|convolution|matmul"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective"),
    ("copy", r"memcpy|memset|copy|transpose"),
)


def kernel_kind(text: str) -> str:
  for kind, pattern in KERNEL_KINDS:
    if re.search(pattern, text, re.IGNORECASE):
      return kind
  return "other (elementwise, reductions)"


def _trace_file(log_dir: str) -> epath.Path:
  """The newest run's perfetto trace (or, failing that, its <host>.trace.json.gz) under `log_dir`."""
  runs = sorted(epath.Path(log_dir).glob("plugins/profile/*"), key=lambda p: p.name)
  for run in reversed(runs):
    found = sorted(run.glob("perfetto_trace.json.gz")) or sorted(run.glob("*.trace.json.gz"))
    if found:
      return found[0]
  raise FileNotFoundError(f"no plugins/profile/*/*trace.json.gz under {log_dir}: trace with "
                          "jax.profiler.trace(dir, create_perfetto_trace=True)")


def device_kernels(events: list) -> tuple[list, str]:
  """The kernel events of the first device in a Chrome/perfetto event list, and which lines they came from.

  GPU: the stream lines ('Stream #..'); TPU: 'XLA Ops'; else every line of the device except the
  derived module/step lines (which would count the same time twice)."""
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  devices = sorted(pid for pid, name in procs.items() if name.startswith("/device:"))
  if not devices:
    return [], "no device in the trace (on CPU, XLA runs on host threads)"
  pid = devices[0]
  line = lambda e: threads.get((pid, e["tid"]), "")
  mine = [e for e in events if e.get("ph") == "X" and e.get("pid") == pid and "dur" in e]
  lines = {line(e) for e in mine}
  for want in ("Stream", "XLA Ops"):
    keep = {name for name in lines if name.startswith(want)}
    if keep:
      break
  else:
    keep = {name for name in lines if not re.search(r"Modules|Steps|Framework|Source", name)}
  return [e for e in mine if line(e) in keep], f"{procs[pid]}, lines {', '.join(sorted(keep))}"


def summarize_events(events: list, steps: int, top: int = 12) -> str:
  """Text summary of a trace's Chrome/perfetto events covering `steps` steps: span, busy share, kernels
  per step, time by kernel kind (KERNEL_KINDS) and the `top` largest kernels (total over the steps)."""
  kernels, where = device_kernels(events)
  if not kernels:
    return f"profile: {where}"
  start = min(e["ts"] for e in kernels)
  end = max(e["ts"] + e["dur"] for e in kernels)
  busy, reach = 0.0, start  # the union of the kernels' intervals (streams may overlap)
  for e in sorted(kernels, key=lambda e: e["ts"]):
    lo, hi = max(e["ts"], reach), e["ts"] + e["dur"]
    if hi > lo:
      busy += hi - lo
    reach = max(reach, hi)
  span = max(end - start, 1e-9)
  by_kind, by_name = collections.Counter(), collections.defaultdict(lambda: [0, 0.0])
  for e in kernels:
    args = e.get("args", {})
    text = " ".join([e["name"], *(str(args[k]) for k in ("hlo_op", "long_name", "tf_op") if k in args)])
    by_kind[kernel_kind(text)] += e["dur"]
    by_name[e["name"]][0] += 1
    by_name[e["name"]][1] += e["dur"]
  total = sum(by_kind.values())
  out = [f"profile: {steps} step(s) on {where}",
         f"  span {span / 1e3:.1f} ms ({span / 1e3 / max(steps, 1):.1f} ms/step); a kernel running "
         f"{100 * busy / span:.1f}% of it (idle {100 * (1 - busy / span):.1f}%: launch gaps, host waits); "
         f"{len(kernels) / max(steps, 1):.0f} kernels/step, mean {total / len(kernels):.1f} us",
         "  kernel time by kind:"]
  for kind, t in by_kind.most_common():
    out.append(f"    {kind:34s} {t / 1e3:9.2f} ms  {100 * t / total:5.1f}%")
  out.append(f"  largest {top} kernels (total over the steps):")
  for name, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
    out.append(f"    {t / 1e3:9.2f} ms {100 * t / total:5.1f}% x{n:<5d} {name[:90]}")
  return "\n".join(out)


def summarize_trace(log_dir: str, steps: int, top: int = 12) -> str:
  """Summary of the newest perfetto trace under `log_dir` (see summarize_events)."""
  path = _trace_file(log_dir)
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return f"{summarize_events(events, steps, top)}\n  trace: {path}"
