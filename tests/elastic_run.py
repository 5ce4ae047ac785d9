"""Test helper program: the real `bagpiper_jax.train` command line with test-side hooks.

  python -m tests.elastic_run <bagpiper_jax.train flags...>
  python -m launch.local_multiprocess --num_processes=2 -- tests.elastic_run <flags...>

Hooks (environment variables; no test flag in the production loop):
  BAGPIPER_TEST_DUMP=<dir>        every step's GLOBAL batch, gathered from all processes exactly as
                                  the devices hold it, goes to <dir>/step_<n>.npz (process 0 writes)
  BAGPIPER_TEST_SIGNAL=<p>:<n>:<TERM|KILL>
                                  process p sends itself that signal after taking the batches of
                                  step n, before the step runs (mid-step)
  BAGPIPER_TEST_SLOW=<seconds>    from step n on, every process sleeps that long per step (leaves
                                  JAX's preemption sync time to agree before the run ends)
"""

from __future__ import annotations

import os
import signal
import time

import jax
import numpy as np
from absl import app
from jax.experimental import multihost_utils

from bagpiper_jax import train, train_loop, trainer

_DUMP = os.environ.get("BAGPIPER_TEST_DUMP")
_SIGNAL = os.environ.get("BAGPIPER_TEST_SIGNAL")
_SLOW = float(os.environ.get("BAGPIPER_TEST_SLOW", "0"))
_step = {"next": None}
_restore_or_init, _host_to_device = train_loop.restore_or_init, trainer.Setup.host_to_device


def _restore_or_init_hook(*args, **kwargs):
  state = _restore_or_init(*args, **kwargs)
  _step["next"] = int(jax.device_get(state.step)) + 1
  return state


def _host_to_device_hook(self, micro_batches):
  n = _step["next"]
  _step["next"] += 1
  if _SIGNAL:
    p, at, sig = _SIGNAL.split(":")
    if n >= int(at) and _SLOW:
      time.sleep(_SLOW)
    if n == int(at) and jax.process_index() == int(p):
      os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
  out = _host_to_device(self, micro_batches)
  if _DUMP:
    full = multihost_utils.process_allgather(out, tiled=True)  # the global arrays, all processes
    if jax.process_index() == 0:
      os.makedirs(_DUMP, exist_ok=True)
      np.savez(os.path.join(_DUMP, f"step_{n}.npz"), **{k: np.asarray(v) for k, v in full.items()})
  return out


train_loop.restore_or_init = _restore_or_init_hook
trainer.Setup.host_to_device = _host_to_device_hook

if __name__ == "__main__":
  app.run(train.main)
