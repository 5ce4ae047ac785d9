"""Goodput: where a run's wall time goes, and what restarts cost (after MaxText's goodput recording).

MaxText records job events (start, TPU init, training preparation, data loading, step starts,
checkpoint loads/saves) with the ml-goodput-measurement library and reports goodput = productive
step time / job time, with the badput split by cause, "wasted progress from disruption" (steps
redone after a restart) among them. This is the same bookkeeping for one process, in metrics.jsonl
and TensorBoard (`goodput/*`), with no service behind it. Seconds per cause:

  init_s             from train_and_evaluate's start to the loop (mesh, jitted steps, data, state),
                     the checkpoint restore excepted
  restore_s          reading the checkpoint (verification included)
  compile_s          the first step of the run (tracing, compilation, its execution)
  step_s             training steps: the loop's time not counted below
  data_wait_s        taking the batches from the input pipeline and placing them on the devices
  checkpoint_s       the blocking part of checkpoint saves and the final wait for the writes
  eval_s             held-out evaluation (EvalAction); actions_s: the other periodic actions
  lost_to_restart_s  the previous run's time on the steps this run redoes because it ended after
                     its last checkpoint (lost_to_restart_steps: how many, exact as far as that
                     run logged; their time at its mean step time)

goodput = (step_s - lost_to_restart_s) / wall_s. Each record (kind "goodput", written at every log
step) holds the run's cumulative seconds and its `run_start`; the job's figures add the last record
of every earlier run of the workdir, so a job preempted three times reports its goodput over all
four runs. Times are process 0's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

CAUSES = ("init", "restore", "compile", "step", "data_wait", "checkpoint", "eval", "actions")
_TIMED = ("compile", "data_wait", "checkpoint", "eval", "actions")  # measured inside the loop


def _runs(metrics_path: str) -> dict[float, list[dict]]:
  """{run_start: that run's goodput records} from a workdir's metrics.jsonl."""
  runs: dict[float, list[dict]] = {}
  if not os.path.exists(metrics_path):
    return runs
  with open(metrics_path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill: nothing to count
      if rec.get("kind") == "goodput" and "run_start" in rec:
        runs.setdefault(rec["run_start"], []).append(rec)
  return runs


class Goodput:
  """Wall-time accounting of one run: `measure(cause)` times a block; `record()`, `summary()`."""

  def __init__(self, workdir: str | None = None):
    self.t0 = time.perf_counter()
    self.run_start = time.time()
    self.seconds = {k: 0.0 for k in CAUSES}
    self.loop_t0: float | None = None
    self.first_step = 0
    self.lost_steps, self.lost_s = 0, 0.0
    self.previous: list[dict] = []  # the last record of each earlier run
    self._metrics = os.path.join(workdir, "metrics.jsonl") if workdir else None

  @contextlib.contextmanager
  def measure(self, cause: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[cause] += time.perf_counter() - t

  def started_at(self, step: int) -> None:
    """The run trains from `step`: the steps the previous run did past it are redone now."""
    self.first_step = int(step)
    if self._metrics is None:
      return
    runs = _runs(self._metrics)
    self.previous = [max(recs, key=lambda r: r["step"]) for _, recs in sorted(runs.items())]
    if not self.previous:
      return
    last = self.previous[-1]
    self.lost_steps = max(0, int(last["step"]) - self.first_step)
    done = int(last["step"]) - int(last.get("first_step", 0))
    self.lost_s = self.lost_steps * float(last.get("step_s", 0.0)) / done if done > 0 else 0.0

  def loop_started(self) -> None:
    """The loop begins: the time before it is init (the restore excepted)."""
    self.loop_t0 = time.perf_counter()
    self.seconds["init"] = self.loop_t0 - self.t0 - self.seconds["restore"]

  def totals(self) -> dict[str, float]:
    """This run's cumulative seconds per cause (`<cause>_s`), wall_s, lost_to_restart and goodput."""
    now = time.perf_counter()
    s = dict(self.seconds)
    if self.loop_t0 is not None:
      s["step"] = max(0.0, now - self.loop_t0 - sum(s[k] for k in _TIMED))
    out = {f"{k}_s": v for k, v in s.items()}
    out["wall_s"] = now - self.t0
    out["lost_to_restart_s"] = self.lost_s
    out["lost_to_restart_steps"] = float(self.lost_steps)
    out["goodput"] = _goodput(out)
    return out

  def job_totals(self) -> dict[str, float]:
    """totals() plus the last record of every earlier run of the workdir."""
    out = self.totals()
    for rec in self.previous:
      for k in [f"{c}_s" for c in CAUSES] + ["wall_s", "lost_to_restart_s", "lost_to_restart_steps"]:
        out[k] += float(rec.get(k, 0.0))
    out["goodput"] = _goodput(out)
    out["runs"] = float(len(self.previous) + 1)
    return out

  def record(self) -> tuple[dict[str, float], dict]:
    """(scalars, extra) for MetricsWriter.write(step, scalars, prefix='goodput', extra=extra)."""
    return self.totals(), {"run_start": self.run_start, "first_step": self.first_step}

  def summary(self) -> str:
    """One line: this run's goodput and where the rest went (and the job's, after restarts)."""
    t = self.totals()
    wall = max(t["wall_s"], 1e-9)
    parts = [f"goodput {100 * t['goodput']:.1f}% of {t['wall_s']:.1f} s wall"]
    for k in ("step", "compile", "data_wait", "checkpoint", "eval", "actions", "init", "restore"):
      v = t[f"{k}_s"]
      if v > 0 or k in ("step", "data_wait"):
        parts.append(f"{k.replace('_', ' ')} {v:.1f} s ({100 * v / wall:.1f}%)")
    if self.lost_steps:
      parts.append(f"lost to restart: {self.lost_steps} steps redone (~{self.lost_s:.1f} s)")
    if self.previous:
      j = self.job_totals()
      parts.append(f"job over {int(j['runs'])} runs: goodput {100 * j['goodput']:.1f}% of {j['wall_s']:.1f} s")
    return " | ".join(parts)


def _goodput(t: dict[str, float]) -> float:
  return (t["step_s"] - t["lost_to_restart_s"]) / t["wall_s"] if t["wall_s"] > 0 else 0.0
