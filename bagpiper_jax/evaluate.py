"""Held-out evaluation: weighted mean losses over `config.eval_steps` batches of the eval split.

The eval iterator is made fresh for every evaluation (one deterministic pass from the start of
config.data.eval_sources), so eval numbers at different steps are comparable and eval never
touches the training iterator or its checkpointed state. Every process runs the same number of
steps (the pipeline pads with all-padding batches when a host's share runs out).

Losses are averaged over batches weighted by their number of target positions, i.e. as if the
whole eval set were one batch (an all-padding batch adds nothing).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import jax
import numpy as np


def evaluate(setup, params, make_iterator: Callable[[], Iterator], num_steps: int) -> dict[str, float]:
  """Runs `num_steps` eval batches; returns {'loss', 'text_loss', 'audio_loss', 'stream_loss', ...}."""
  it = make_iterator()
  total = None
  t0 = time.perf_counter()
  steps = 0
  for _ in range(int(num_steps)):
    try:
      host = next(it)
    except StopIteration:
      break
    batch = setup.host_to_device_eval(host)
    out = setup.eval_step(params, batch)
    total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)  # stays on device
    steps += 1
  if total is None:
    raise ValueError("eval iterator yielded no batch; check config.data.eval_sources")
  total = jax.device_get(total)
  n = max(float(total["num_target_tokens"]), 1.0)
  res = {k: np.asarray(v) / n for k, v in total.items() if k != "num_target_tokens"}
  res["num_target_tokens"] = float(total["num_target_tokens"])
  res["eval_steps"] = steps
  res["eval_time_s"] = time.perf_counter() - t0
  return res
