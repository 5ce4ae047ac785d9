"""Periodic work of the training loop (train_loop.make_actions registers them): the base class.

Its own module so that actions living elsewhere (evaluation, samples, releases, profiling) can
subclass it without importing the loop.
"""

from __future__ import annotations


class PeriodicAction:
  """Runs every `every` steps and at the last step (every <= 0: never). Subclasses implement
  `run(step, state) -> dict` (metrics to report, may be empty)."""

  def __init__(self, every: int):
    self.every = int(every)

  def due(self, step: int, last: bool) -> bool:
    return self.every > 0 and (step % self.every == 0 or last)

  def run(self, step: int, state) -> dict:
    raise NotImplementedError
