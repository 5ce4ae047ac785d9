"""`--config.profile_steps=N,M`: a jax.profiler trace of train steps N..M in `<workdir>/profile`.

    python -m bagpiper_jax.train --config=... --workdir=W --config.profile_steps=10,12
    tensorboard --logdir=W            # Profile tab (tensorboard-plugin-profile), or: xprof --logdir=W/profile

The trace starts after step N-1 has finished and stops once step M's results are ready, so it holds
exactly steps N..M (dispatch, device execution, collectives, host input). Step 1 includes
compilation: start at 2 or later to see the steady state. Every process traces its own devices
(files per host). Traces are large: a few steps are enough.
"""

from __future__ import annotations

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
