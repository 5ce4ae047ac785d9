r"""Run a JAX program as N cooperating processes on this machine (CPU devices, gloo collectives).

  python -m launch.local_multiprocess --num_processes=2 --devices_per_process=4 -- \
      bagpiper_jax.train --config=configs/tiny.py --config.data.synthetic=True --workdir=/tmp/mh

Why: a multi-host TPU pod is N processes that each own a slice of the devices and meet in
`jax.distributed`; every bug of that setting (a batch placed with the wrong process rows, a
checkpoint written by one host only, a host-local value used as if it were global) shows up just
as well with N processes x M fake CPU devices on one machine, in seconds and without a pod.

Each child process gets
  JAX_PLATFORMS=cpu, XLA_FLAGS=... --xla_force_host_platform_device_count=<devices_per_process>,
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo (cross-process collectives on CPU; jax 0.10's option
  `jax_cpu_collectives_implementation`), JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>,
  JAX_NUM_PROCESSES=<n>, JAX_PROCESS_ID=<i>,
and runs `python -m launch.child <module> <args>`, which calls `jax.distributed.initialize` from
those variables and then runs <module> as __main__ (so the program itself needs no launcher code;
do NOT also pass it --jax_distributed). The children's output is streamed here prefixed with
[p<i>] (and written to <log_dir>/process_<i>.log with --log_dir). If one child fails, the others get
SIGTERM, then SIGKILL after a grace period, and the exit status is the failed child's.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
              base: dict | None = None) -> dict:
  """The environment of child `process_id` (see module docstring)."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env.update({
      "XLA_FLAGS": " ".join(flags),
      "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
  })
  env.pop("JAX_NUM_CPU_DEVICES", None)  # would override the per-process device count
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _pump(proc: subprocess.Popen, prefix: str, log_path: str | None, echo: bool, sink: list[str]):
  log = open(log_path, "w") if log_path else None
  try:
    for line in iter(proc.stdout.readline, ""):
      sink.append(line)
      if log:
        log.write(line)
        log.flush()
      if echo:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()
  finally:
    if log:
      log.close()


class Result:
  def __init__(self, returncodes: list[int], outputs: list[str], first_failed: int | None = None):
    self.returncodes, self.outputs, self.first_failed = returncodes, outputs, first_failed

  @property
  def ok(self) -> bool:
    return all(rc == 0 for rc in self.returncodes)

  @property
  def returncode(self) -> int:
    """The status of the child that failed first (the others were then stopped), else 0."""
    if self.first_failed is not None:
      return self.returncodes[self.first_failed] or 1
    return next((rc for rc in self.returncodes if rc != 0), 0)


def launch(module: str, args: Sequence[str] = (), *, num_processes: int = 2, devices_per_process: int = 4,
           port: int = 0, log_dir: str | None = None, timeout: float | None = None, echo: bool = True,
           cwd: str | None = None, extra_env: dict | None = None, grace: float = 10.0) -> Result:
  """Runs `python -m <module> <args>` as `num_processes` distributed processes; returns their status."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"need num_processes >= 1 and devices_per_process >= 1, got {num_processes}, "
                     f"{devices_per_process}")
  port = port or free_port()
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  procs, pumps, outs = [], [], []
  for i in range(num_processes):
    env = child_env(i, num_processes, devices_per_process, port)
    env.update(extra_env or {})
    p = subprocess.Popen([sys.executable, "-u", "-m", "launch.child", module, *args], env=env,
                         cwd=cwd or os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    outs.append([])
    t = threading.Thread(target=_pump, args=(p, f"[p{i}]", os.path.join(log_dir, f"process_{i}.log")
                                             if log_dir else None, echo, outs[-1]), daemon=True)
    t.start()
    pumps.append(t)
  deadline = None if timeout is None else time.monotonic() + timeout
  first_failed, stop_at = None, 0.0
  try:
    while any(p.poll() is None for p in procs):
      bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if bad and first_failed is None:
        first_failed = bad[0]  # the others would wait for it in a collective until the timeout
        stop_at = time.monotonic()
        for p in procs:
          if p.poll() is None:
            p.terminate()
      if first_failed is not None and time.monotonic() - stop_at > grace:
        # JAX's distributed runtime turns SIGTERM into a preemption notice, and a process blocked in a
        # collective with a dead peer never gets to act on it: kill what is left after the grace period.
        for p in procs:
          if p.poll() is None:
            p.kill()
      if deadline is not None and time.monotonic() > deadline:
        for p in procs:
          if p.poll() is None:
            p.kill()
        sys.stderr.write(f"local_multiprocess: timed out after {timeout} s; killed the processes\n")
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    raise
  finally:
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  return Result([p.returncode for p in procs], ["".join(o) for o in outs], first_failed)


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               usage="python -m launch.local_multiprocess [options] -- MODULE [ARGS...]")
  ap.add_argument("--num_processes", type=int, default=2)
  ap.add_argument("--devices_per_process", type=int, default=4)
  ap.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: pick a free one)")
  ap.add_argument("--log_dir", default=None, help="also write each process's output to DIR/process_<i>.log")
  ap.add_argument("--timeout", type=float, default=None, help="kill all processes after this many seconds")
  ap.add_argument("module", help="Python module to run in every process, e.g. bagpiper_jax.train")
  ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the module")
  ns = ap.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
  r = launch(ns.module, args, num_processes=ns.num_processes, devices_per_process=ns.devices_per_process,
             port=ns.port, log_dir=ns.log_dir, timeout=ns.timeout)
  if not r.ok:
    sys.stderr.write(f"local_multiprocess: exit codes {r.returncodes}\n")
  return r.returncode


if __name__ == "__main__":
  sys.exit(main())
