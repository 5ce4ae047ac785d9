"""Test helper program: `python tests/kill_after_step.py STEP <bagpiper_jax.train flags...>`.

Runs the real training command line, and SIGKILLs the process right after step STEP has been
logged (log_every_steps=1 in the tests) and any checkpoint save in flight has finished: a crash
at a step boundary, without a test-only flag in the production loop.
"""

import os
import signal
import sys

from absl import app

from bagpiper_jax import checkpoint as ckpt_lib
from bagpiper_jax import metrics as metrics_lib
from bagpiper_jax import train

KILL_AFTER = int(sys.argv.pop(1))
_checkpointers = []
_init, _write = ckpt_lib.Checkpointer.__init__, metrics_lib.MetricsWriter.write


def _track(self, *a, **kw):
  _init(self, *a, **kw)
  _checkpointers.append(self)


def _write_then_maybe_die(self, step, scalars, *, prefix="train", extra=None):
  _write(self, step, scalars, prefix=prefix, extra=extra)
  if prefix == "train" and step == KILL_AFTER:
    for c in _checkpointers:
      c.wait()
    self.flush()
    os.kill(os.getpid(), signal.SIGKILL)


ckpt_lib.Checkpointer.__init__ = _track
metrics_lib.MetricsWriter.write = _write_then_maybe_die

if __name__ == "__main__":
  app.run(train.main)
