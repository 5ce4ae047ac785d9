"""The training run (warmup / pretrain / SFT: one loop, the stage is in the config).

The command line is train.py; this module is what it runs, also callable from notebooks and tests:

    train_and_evaluate(config, workdir)        # workdir resolved (paths.resolve)

What happens, in order:
  1. mesh from config.mesh (sharding.py); state layout, jitted steps and host transfer (trainer.Setup);
  2. state (`restore_or_init`): resume from the latest checkpoint in <workdir>/checkpoints if there
     is one (params, opt state, step, the data slots' positions, onto any number of processes; a
     broken one or another data stream is an error, never a fresh start), else params from
     config.init_from (params only) or a fresh sharded init;
  3. loop: take grad_accum_steps host batches (this process's data slots), remember the iterator
     state, place them on the mesh, run the jitted step (train_step.py); every log_every_steps:
     console line (with the fraction of time spent waiting for data), TensorBoard, metrics.jsonl,
     goodput (goodput.py), non-finite check; the periodic actions (`make_actions`: held-out eval
     every eval_every_steps, samples every sample_every_steps, a release directory
     every release_every_steps, ...); async checkpoints when Orbax's `should_save` says so (every
     checkpoint.every_steps, the last step, JAX's preemption sync point);
  4. preemption (SIGTERM; under jax.distributed JAX's preemption service, on which all processes
     agree): save at that step, wait for the write, exit 0;
  5. at train_steps: final checkpoint, wait, goodput summary line, exit.
"""

from __future__ import annotations

import contextlib
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
from bagpiper_jax import goodput as goodput_lib
from bagpiper_jax import metrics as metrics_lib
from bagpiper_jax import paths, profiling, sharding, trainer
from bagpiper_jax.convert.release_action import ReleaseAction
from bagpiper_jax.data import input_pipeline
from bagpiper_jax.data import slots as slots_lib
from bagpiper_jax.generate import sample_action
from bagpiper_jax.periodic import PeriodicAction
from bagpiper_jax.synthetic import SyntheticIterator


class RunError(RuntimeError):
  """Bad input found before any work: one line naming the path or key and what to do."""


class _Preemption:
  """When to stop for a preemption, at a step boundary every process agrees on.

  Under jax.distributed, JAX's preemption service catches SIGTERM (its coordination agent installs
  the handler) and all processes agree on the step to save at: Orbax's `reached_preemption`. A Python
  SIGTERM handler would replace JAX's, so one is installed only without that service: a single
  process stops at the next step; several (service disabled) agree on their flags every
  `check_every` steps.
  """

  def __init__(self, ckpt: ckpt_lib.Checkpointer, check_every: int):
    self.ckpt, self.check_every = ckpt, max(1, int(check_every))
    self.jax_service = jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)
    self.event = threading.Event()
    self._prev = None if self.jax_service else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: will checkpoint and exit after the current step", signum)
    self.event.set()

  def reached(self, step: int) -> bool:
    if self.jax_service:
      return self.ckpt.reached_preemption(step)
    if jax.process_count() == 1:
      return self.event.is_set()
    if step % self.check_every:
      return False
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.event.is_set()))))

  def restore(self):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


# ---------------------------------------------------------------------------------------------
# Data.


def make_data(config, setup: trainer.Setup):
  """(train iterator, {eval source: iterator factory}) for this process. Reads the config only.

  The train iterator feeds this process's data slots (setup.data_slots; data/slots.py)."""
  cfg, rows, slots = setup.cfg, setup.host_rows, setup.data_slots
  if config.data.synthetic:
    mk = lambda seed, rows, index: SyntheticIterator(  # noqa: E731
        cfg, rows=rows, seq_len=int(config.data.seq_len), audio_windows=int(config.data.max_audio_windows),
        seed=seed, process_index=index)
    seed = int(config.data.shuffle_seed)
    train_it = slots_lib.SlotIterator(slots, {s: mk(seed, slots.rows_per_slot, s) for s in slots.local},
                                      input_pipeline.stream_signature(config))
    return train_it, {"synthetic": lambda: mk(10_000 + seed, rows, jax.process_index())}
  if not config.data.train_sources:
    raise RunError("config.data.train_sources is empty: give --config.data.train_sources or set "
                   "config.data.demo=True / config.data.synthetic=True")
  train_it = input_pipeline.make_train_iterator(config, cfg, slots=slots)
  where = dict(rows=rows, process_index=jax.process_index(), process_count=jax.process_count())
  make_eval = {}  # one factory per eval source: the loss is reported per source
  for name in sorted(config.data.eval_sources or {}):
    one = {name: config.data.eval_sources[name]}
    make_eval[name] = lambda one=one: input_pipeline.make_eval_iterator(
        config, cfg, num_batches=int(config.eval_steps), sources=one, **where)
  return train_it, make_eval


def _data_stats(it) -> dict:
  s = input_pipeline.pipeline_stats(it)
  if not s.get("batches"):  # synthetic rows: no pipeline counters
    return {}
  return {k: s[k] for k in ("docs_read", "docs_dropped", "fill", "rows", "rows_padding") if k in s}


# ---------------------------------------------------------------------------------------------
# State.


def restore_or_init(config, setup: trainer.Setup, ckpt: ckpt_lib.Checkpointer, train_it, *,
                    resume_from_step: int | None = None, accept_data_change: bool = False,
                    goodput: goodput_lib.Goodput | None = None):
  """The state to start from: the latest checkpoint (with the data position), else init_from, else fresh.

  resume_from_step: resume from that older finished step instead (the newer ones are moved aside,
  once: checkpoint.Checkpointer.fall_back_to). accept_data_change: a checkpoint of another data
  stream (mixture, seeds, budgets, global batch) restores params and optimizer state and the data
  stream restarts from its beginning; without it that is an error naming the differing keys.
  """
  layout = setup.layout
  if resume_from_step is not None:
    moved = ckpt.fall_back_to(int(resume_from_step))
    if moved:
      print(f"resume_from_step={resume_from_step}: newer steps {moved} moved to "
            f"{ckpt.directory.parent / ckpt_lib.ABANDONED}", flush=True)
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info("resuming from %s/%d", ckpt.directory, latest)
    with goodput.measure("restore") if goodput else contextlib.nullcontext():
      pi, pc = jax.process_index(), jax.process_count()
      diff = slots_lib.stream_diff(ckpt.read_stream(latest), slots_lib.stream_description(train_it, pc))
      keys = slots_lib.restore_keys(train_it, pi, pc)
      if diff and not accept_data_change:
        raise RunError(f"checkpoint {ckpt.step_dir(latest)} was written for another data stream:\n  "
                       + "\n  ".join(diff) + "\nResume with that data config, or pass --accept_data_change to "
                       "keep the model and optimizer state and restart the data stream from its beginning.")
      if diff:
        print(f"data stream changed ({'; '.join(diff)}); --accept_data_change: the data stream restarts "
              "from its beginning", flush=True)
        keys = None
      state, data = ckpt.restore(latest, layout.abstract_state, data_keys=keys)
      if data is not None:
        train_it.set_state(slots_lib.state_from_parts(train_it, data.parts))
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
    self.pending, self.untimed, self.data_wait = [], 0, 0.0
    self.t_start = self.t_window = time.perf_counter()

  def add(self, step: int, m, data_wait_s: float) -> None:
    self.pending.append(m)
    self.data_wait += data_wait_s
    if step == self.start_step + 1:
      jax.block_until_ready(m)  # do not bill compilation to the first window
      logging.info("first step (incl. compilation) %.1f s", time.perf_counter() - self.t_window)
      self.t_start = self.t_window = time.perf_counter()
      self.untimed, self.data_wait = 1, 0.0

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
           "data_wait_frac": self.data_wait / dt if timed and dt > 0 else float("nan"),
           "skipped_steps": int(last["nonfinite_count"])}
    out["mfu"] = (self.flops_per_step / out["step_time_s"] / self.peak_total
                  if self.peak_total > 0 and timed else float("nan"))
    done = step - self.start_step - 1
    eta = (time.perf_counter() - self.t_start) / done * (self.total - step) if done > 0 else None
    losses = [float(m["loss"]) for m in host]
    self.pending, self.untimed, self.data_wait, self.t_window = [], 0, 0.0, time.perf_counter()
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


class EvalAction(PeriodicAction):
  """Held-out loss over config.eval_steps batches of each of config.data.eval_sources (evaluate.py),
  reported per source and overall."""

  goodput_cause = "eval"

  def __init__(self, config, setup: trainer.Setup, make_eval, writer: metrics_lib.MetricsWriter):
    super().__init__(int(config.eval_every_steps) if make_eval else 0)
    self.setup, self.make_eval, self.writer, self.steps = setup, make_eval, writer, int(config.eval_steps)

  def run(self, step: int, state) -> dict:
    ev = eval_lib.evaluate_sources(self.setup, state.params, self.make_eval, self.steps)
    per = ev.pop("sources")
    self.writer.write(step, ev, prefix="eval")
    for name, r in per.items():
      self.writer.write(step, r, prefix=f"eval/{name}")
    if jax.process_index() == 0:
      sources = ", ".join(f"{k} {float(r['loss']):.3f}" for k, r in per.items())
      print(f"eval step {step}: loss {float(ev['loss']):.4f} text {float(ev['text_loss']):.3f} "
            f"audio {float(ev['audio_loss']):.3f} ({ev['eval_steps']} batches, "
            f"{ev['eval_time_s']:.1f} s); {sources}", flush=True)
    return {f"eval_{k}": v for k, v in ev.items()}


def make_actions(config, setup: trainer.Setup, make_eval, writer: metrics_lib.MetricsWriter,
                 workdir: str) -> list[PeriodicAction]:
  """The run's periodic actions, in the order they run after a step."""
  return [EvalAction(config, setup, make_eval, writer),
          sample_action.SampleAction(config, setup, writer, workdir),
          ReleaseAction(config, setup, workdir),
          profiling.ProfileAction(config, workdir)]


# ---------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(config, workdir: str, *, setup: trainer.Setup | None = None, data=None,
                       resume_from_step: int | None = None, accept_data_change: bool = False) -> dict:
  """The whole run. Returns the last logged metrics (for tests and callers).

  `workdir` must be resolved (paths.resolve). `setup` (a trainer.Setup built for this config) and
  `data` ((train iterator, eval factory)) may be passed in to reuse compiled steps or feed custom
  batches (notebooks, tests). resume_from_step / accept_data_change: see `restore_or_init`.
  """
  p0 = jax.process_index() == 0
  goodput = goodput_lib.Goodput(workdir if p0 else None)
  if setup is None:
    setup = trainer.Setup(config, sharding.make_mesh(config))
  mesh = setup.mesh
  logging.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())
  train_it, make_eval = data if data is not None else make_data(config, setup)
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  if p0:
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2))

  ckpt = ckpt_lib.Checkpointer(str(wd / paths.CHECKPOINTS), config)
  state = restore_or_init(config, setup, ckpt, train_it, resume_from_step=resume_from_step,
                          accept_data_change=accept_data_change, goodput=goodput)
  step = start_step = int(jax.device_get(state.step))
  goodput.started_at(step)
  window = _Window(config, setup, step)
  writer = metrics_lib.MetricsWriter(workdir)
  actions = make_actions(config, setup, make_eval, writer, workdir)
  total, a = int(config.train_steps), int(config.optim.grad_accum_steps)
  log_every = int(config.log_every_steps)
  preempt = _Preemption(ckpt, log_every)
  pi, pc = jax.process_index(), jax.process_count()
  stream = slots_lib.stream_description(train_it, pc)
  last_metrics = {}
  goodput.loop_started()
  try:
    while step < total:
      t_data = time.perf_counter()
      with goodput.measure("data_wait"):
        micro = [next(train_it) for _ in range(a)]
        data_state = train_it.get_state()  # exactly the data consumed through this step
        batch = setup.host_to_device(micro)
      t_data = time.perf_counter() - t_data
      with goodput.measure("compile") if step == start_step else contextlib.nullcontext():
        state, m = setup.train_step(state, batch)
        step += 1
        window.add(step, m, t_data)  # blocks on the first step

      if step % log_every == 0 or step == total:
        out, eta, losses, first_bad = window.close(step)
        gp, gp_extra = goodput.record()
        writer.write(step, gp, prefix="goodput", extra=gp_extra)
        writer.write(step, out, extra={"step_losses": losses, "data": _data_stats(train_it)})
        if p0:
          print(metrics_lib.console_line(step, total, out, eta), flush=True)
        last_metrics = out
        _check_finite(config, first_bad, out)

      for action in actions:
        if action.due(step, step == total):
          with goodput.measure(action.goodput_cause):
            last_metrics = {**last_metrics, **action.run(step, state)}

      stop = preempt.reached(step)
      if ckpt.should_save(step) or stop:
        _check_finite(config, int(jax.device_get(state.nonfinite["first_step"])), None)
        with goodput.measure("checkpoint"):
          if ckpt.save(step, state, slots_lib.checkpoint_parts(train_it, data_state, pi, pc), stream):
            logging.info("checkpoint %d %s", step, "started (async)" if config.checkpoint.async_save else "saved")
      if stop:
        with goodput.measure("checkpoint"):
          ckpt.wait()
        print(f"preempted: checkpoint at step {step} written; exiting", flush=True)
        break
  finally:
    preempt.restore()
    with goodput.measure("checkpoint"):
      ckpt.close()
    gp, gp_extra = goodput.record()
    writer.write(step, gp, prefix="goodput", extra=gp_extra)
    writer.close()
    if p0:
      print(goodput.summary(), flush=True)
  return last_metrics
