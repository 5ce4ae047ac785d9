"""The training run (warmup / pretrain / SFT: one loop, the stage is in the config).

The command line is train.py; this module is what it runs, also callable from notebooks and tests:

    train_and_evaluate(config, workdir)        # workdir resolved (paths.resolve)

What happens, in order:
  1. mesh from config.mesh (sharding.py); state layout, jitted steps and host transfer (trainer.Setup);
  2. state (`restore_or_init`): resume from the latest checkpoint in <workdir>/checkpoints if there
     is one (params, opt state, step, data-iterator state; a broken one is an error, never a fresh
     start), else params from config.init_from (params only) or a fresh sharded init;
  3. loop: take grad_accum_steps host batches, remember the iterator state, place them on the mesh,
     run the jitted step (train_step.py); every log_every_steps: console line, TensorBoard,
     metrics.jsonl, non-finite check; the periodic actions (`make_actions`: held-out eval every
     eval_every_steps, ...); every checkpoint.every_steps: async checkpoint;
  4. SIGTERM (preemption): save at the current step, wait for the write, exit 0;
  5. at train_steps: final checkpoint, wait, exit.
"""

from __future__ import annotations

import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from bagpiper_jax import checkpoint as ckpt_lib
from bagpiper_jax import evaluate as eval_lib
from bagpiper_jax import metrics as metrics_lib
from bagpiper_jax import paths, profiling, sharding, trainer
from bagpiper_jax.data import input_pipeline
from bagpiper_jax.synthetic import SyntheticIterator


class RunError(RuntimeError):
  """Bad input found before any work: one line naming the path or key and what to do."""


class _Preemption:
  """SIGTERM -> flag; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.event = threading.Event()
    self._prev = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: will checkpoint and exit after the current step", signum)
    self.event.set()

  def reached(self, step: int, check_every: int) -> bool:
    if jax.process_count() == 1:
      return self.event.is_set()
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption sync service: agree on the local flags now and then
      if step % check_every:
        return False
      return bool(np.max(multihost_utils.process_allgather(np.int32(self.event.is_set()))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._prev)


# ---------------------------------------------------------------------------------------------
# Data.


def make_data(config, setup: trainer.Setup):
  """(train iterator, eval iterator factory or None) for this process. Reads the config only."""
  cfg, rows = setup.cfg, setup.host_rows
  if config.data.synthetic:
    mk = lambda seed: SyntheticIterator(cfg, rows=rows, seq_len=int(config.data.seq_len),
                                        audio_windows=int(config.data.max_audio_windows), seed=seed,
                                        process_index=jax.process_index())
    return mk(int(config.data.shuffle_seed)), (lambda: mk(10_000 + int(config.data.shuffle_seed)))
  if not config.data.train_sources:
    raise RunError("config.data.train_sources is empty: give --config.data.train_sources or set "
                   "config.data.demo=True / config.data.synthetic=True")
  where = dict(rows=rows, process_index=jax.process_index(), process_count=jax.process_count())
  train_it = input_pipeline.make_train_iterator(config, cfg, **where)
  make_eval = None
  if config.data.eval_sources:
    make_eval = lambda: input_pipeline.make_eval_iterator(config, cfg, num_batches=int(config.eval_steps), **where)
  return train_it, make_eval


def _data_stats(it) -> dict:
  if not isinstance(it, SyntheticIterator):
    s = input_pipeline.pipeline_stats(it)
    return {k: s[k] for k in ("docs_read", "docs_dropped", "fill", "rows", "rows_padding") if k in s}
  return {}


# ---------------------------------------------------------------------------------------------
# State.


def restore_or_init(config, setup: trainer.Setup, ckpt: ckpt_lib.Checkpointer, train_it):
  """The state to start from: the latest checkpoint (with the data position), else init_from, else fresh."""
  layout = setup.layout
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info("resuming from %s/%d", ckpt.directory, latest)
    state, data_state = ckpt.restore(latest, layout.abstract_state)
    if data_state is not None:
      train_it.set_state(data_state)
    print(f"resumed from step {latest}", flush=True)
    return state
  leftovers = ckpt.leftover_tmp_dirs()
  if leftovers:
    logging.warning("no finished checkpoint in %s, only unfinished saves %s: starting at step 0",
                    ckpt.directory, leftovers)
  if config.init_from:
    return layout.init_state(ckpt_lib.load_params(config.init_from, layout.abstract_state.params))
  return layout.fresh_state()


# ---------------------------------------------------------------------------------------------
# Logging.


class _Window:
  """Per-step device metrics of one log interval, reduced to host numbers at the interval's end.

  The compiling first step of a run counts for the losses but not for step time / tokens/s / MFU.
  """

  def __init__(self, config, setup: trainer.Setup, start_step: int):
    cfg, mesh = setup.cfg, setup.mesh
    rows = int(config.optim.grad_accum_steps) * int(config.data.per_device_batch) * mesh.size
    self.flops_per_step = metrics_lib.train_flops_per_step(
        cfg, rows=rows, seq_len=int(config.data.seq_len), audio_windows=int(config.data.max_audio_windows),
        layers_trainable=setup.layout.layers_trainable)
    peak, src = metrics_lib.device_peak_flops(config)
    self.peak_total = peak * mesh.size
    logging.info("model FLOPs/step %.3g; device peak %.3g FLOP/s (%s)", self.flops_per_step, peak, src)
    self.total, self.start_step = int(config.train_steps), start_step
    self.pending, self.untimed = [], 0
    self.t_start = self.t_window = time.perf_counter()

  def add(self, step: int, m) -> None:
    self.pending.append(m)
    if step == self.start_step + 1:
      jax.block_until_ready(m)  # do not bill compilation to the first window
      logging.info("first step (incl. compilation) %.1f s", time.perf_counter() - self.t_window)
      self.t_start = self.t_window = time.perf_counter()
      self.untimed = 1

  def close(self, step: int) -> tuple[dict, float | None, list[float], int]:
    """(metrics, ETA seconds, every step's loss, first non-finite step or -1); starts a new window."""
    host = jax.device_get(self.pending)
    last, timed = host[-1], host[self.untimed:]
    dt = time.perf_counter() - self.t_window
    tokens = float(sum(m["tokens"] for m in timed))
    mean = lambda k: float(np.mean([m[k] for m in host]))
    out = {"loss": mean("loss"), "text_loss": mean("text_loss"), "audio_loss": mean("audio_loss"),
           "stream_loss": np.mean([m["stream_loss"] for m in host], axis=0), "grad_norm": mean("grad_norm"),
           "lr": float(last["lr"]),
           "tokens_per_s": tokens / dt if timed else float("nan"),
           "step_time_s": dt / len(timed) if timed else float("nan"),
           "skipped_steps": int(last["nonfinite_count"])}
    out["mfu"] = (self.flops_per_step / out["step_time_s"] / self.peak_total
                  if self.peak_total > 0 and timed else float("nan"))
    done = step - self.start_step - 1
    eta = (time.perf_counter() - self.t_start) / done * (self.total - step) if done > 0 else None
    losses = [float(m["loss"]) for m in host]
    self.pending, self.untimed, self.t_window = [], 0, time.perf_counter()
    return out, eta, losses, int(last["nonfinite_first_step"])


class NonFiniteError(RuntimeError):
  pass


def _check_finite(config, first_bad_step: int, out) -> None:
  if first_bad_step < 0:
    return
  if config.nan_policy == "stop":
    raise NonFiniteError(
        f"non-finite loss or gradient at step {first_bad_step} (config.nan_policy='stop'); that update "
        "was not applied and no checkpoint after it was written. Set --config.nan_policy=skip to skip "
        "such steps instead.")
  if out is not None and out.get("skipped_steps"):
    logging.warning("%d steps skipped so far for non-finite loss/gradient (first at step %d)",
                    out["skipped_steps"], first_bad_step)


# ---------------------------------------------------------------------------------------------
# Periodic actions: what the loop does every N steps besides the step, logging and checkpoints.


class PeriodicAction:
  """Runs every `every` steps and at the last step (every <= 0: never). Subclasses implement
  `run(step, state) -> dict` (metrics to report, may be empty)."""

  def __init__(self, every: int):
    self.every = int(every)

  def due(self, step: int, last: bool) -> bool:
    return self.every > 0 and (step % self.every == 0 or last)

  def run(self, step: int, state) -> dict:
    raise NotImplementedError


class EvalAction(PeriodicAction):
  """Held-out loss over config.eval_steps batches of config.data.eval_sources (evaluate.py)."""

  def __init__(self, config, setup: trainer.Setup, make_eval, writer: metrics_lib.MetricsWriter):
    super().__init__(int(config.eval_every_steps) if make_eval is not None else 0)
    self.setup, self.make_eval, self.writer, self.steps = setup, make_eval, writer, int(config.eval_steps)

  def run(self, step: int, state) -> dict:
    ev = eval_lib.evaluate(self.setup, state.params, self.make_eval, self.steps)
    self.writer.write(step, ev, prefix="eval")
    if jax.process_index() == 0:
      print(f"eval step {step}: loss {float(ev['loss']):.4f} text {float(ev['text_loss']):.3f} "
            f"audio {float(ev['audio_loss']):.3f} ({ev['eval_steps']} batches, "
            f"{ev['eval_time_s']:.1f} s)", flush=True)
    return {f"eval_{k}": v for k, v in ev.items()}


def make_actions(config, setup: trainer.Setup, make_eval, writer: metrics_lib.MetricsWriter,
                 workdir: str) -> list[PeriodicAction]:
  """The run's periodic actions, in the order they run after a step."""
  return [EvalAction(config, setup, make_eval, writer), profiling.ProfileAction(config, workdir)]


# ---------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(config, workdir: str, *, setup: trainer.Setup | None = None, data=None) -> dict:
  """The whole run. Returns the last logged metrics (for tests and callers).

  `workdir` must be resolved (paths.resolve). `setup` (a trainer.Setup built for this config) and
  `data` ((train iterator, eval factory)) may be passed in to reuse compiled steps or feed custom
  batches (notebooks, tests).
  """
  if setup is None:
    setup = trainer.Setup(config, sharding.make_mesh(config))
  mesh = setup.mesh
  logging.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())
  train_it, make_eval = data if data is not None else make_data(config, setup)
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2))

  ckpt = ckpt_lib.Checkpointer(str(wd / paths.CHECKPOINTS), config)
  state = restore_or_init(config, setup, ckpt, train_it)
  step = int(jax.device_get(state.step))
  window = _Window(config, setup, step)
  writer = metrics_lib.MetricsWriter(workdir)
  actions = make_actions(config, setup, make_eval, writer, workdir)
  preempt = _Preemption()
  last_metrics = {}
  data_state = train_it.get_state()
  total, a = int(config.train_steps), int(config.optim.grad_accum_steps)
  log_every, save_every = int(config.log_every_steps), int(config.checkpoint.every_steps)
  try:
    while step < total:
      micro = [next(train_it) for _ in range(a)]
      data_state = train_it.get_state()  # exactly the data consumed through this step
      state, m = setup.train_step(state, setup.host_to_device(micro))
      step += 1
      window.add(step, m)

      if step % log_every == 0 or step == total:
        out, eta, losses, first_bad = window.close(step)
        writer.write(step, out, extra={"step_losses": losses, "data": _data_stats(train_it)})
        if jax.process_index() == 0:
          print(metrics_lib.console_line(step, total, out, eta), flush=True)
        last_metrics = out
        _check_finite(config, first_bad, out)

      for action in actions:
        if action.due(step, step == total):
          last_metrics = {**last_metrics, **action.run(step, state)}

      stop = preempt.reached(step, log_every)
      if (save_every > 0 and step % save_every == 0) or stop or step == total:
        _check_finite(config, int(jax.device_get(state.nonfinite["first_step"])), None)
        if ckpt.save(step, state, data_state, force=True):
          logging.info("checkpoint %d %s", step, "started (async)" if config.checkpoint.async_save else "saved")
      if stop:
        ckpt.wait()
        print(f"preempted: checkpoint at step {step} written; exiting", flush=True)
        break
  finally:
    preempt.restore()
    writer.close()
    ckpt.close()
  return last_metrics
