"""`PeriodicAction`: work the training loop does every N steps besides the step itself.

The base class lives here, apart from train_loop.py, so that actions can live in their own modules
(evaluation in train_loop, releases in convert/release_action.py, ...) and train_loop can import them
for `make_actions` without an import cycle.
"""

from __future__ import annotations


class PeriodicAction:
  """Runs every `every` steps and at the last step (every <= 0: never). Subclasses implement
  `run(step, state) -> dict` (metrics to report, may be empty)."""

  goodput_cause = "actions"  # where goodput.py books the action's time

  def __init__(self, every: int):
    self.every = int(every)

  def due(self, step: int, last: bool) -> bool:
    return self.every > 0 and (step % self.every == 0 or last)

  def run(self, step: int, state) -> dict:
    raise NotImplementedError
