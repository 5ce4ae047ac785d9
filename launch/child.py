"""One process of a distributed run: `jax.distributed.initialize` from the environment, then a module.

  python -m launch.child MODULE [ARGS...]

Why a wrapper: `jax.distributed.initialize()` auto-detects Cloud TPU, Slurm, Open MPI and
Kubernetes, but not N plain processes on one machine. launch/local_multiprocess.py sets
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID for each child; here we pass them to
`initialize` explicitly and then run MODULE exactly as `python -m MODULE ARGS...` would, so the
program under test (e.g. bagpiper_jax.train) carries no launcher code. Without those variables
(e.g. on a TPU VM) `initialize()` is called with no arguments and auto-detects the cluster.
A process that fails exits at once with its status (see `_exit_now`), so its peers do not hang.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback

import jax


def initialize_from_env() -> None:
  impl = os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION")
  if impl:
    jax.config.update("jax_cpu_collectives_implementation", impl)
  n, pid = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  if n is None and pid is None:
    jax.distributed.initialize()  # TPU VM / Slurm / MPI / k8s: auto-detected
    return
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not addr or n is None or pid is None:
    raise SystemExit("launch.child: set all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                     f"(have address={addr!r}, num_processes={n!r}, process_id={pid!r})")
  jax.distributed.initialize(coordinator_address=addr, num_processes=int(n), process_id=int(pid),
                             initialization_timeout=120)


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SystemExit("usage: python -m launch.child MODULE [ARGS...]")
  initialize_from_env()
  module = argv[1]
  sys.argv = [module] + argv[2:]
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    if e.code in (None, 0):
      raise
    if not isinstance(e.code, int):
      print(e.code, file=sys.stderr)
    _exit_now(e.code if isinstance(e.code, int) else 1)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    _exit_now(1)


def _exit_now(code: int) -> None:
  """Exit without the atexit `jax.distributed.shutdown()`.

  That shutdown is a barrier with every other process: a process that failed would sit in it
  (for minutes) waiting for peers that are themselves waiting for it in a collective, so nobody
  would see the failure. Exiting at once lets the launcher (or the coordination service's
  heartbeat) stop the others.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


if __name__ == "__main__":
  main(sys.argv)
