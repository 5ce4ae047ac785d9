"""Train (warmup / pretrain / SFT: one loop, the stage is in the config).

  python -m bagpiper_jax.train --config=configs/tiny.py                       # demo data, CPU, minutes
  python -m bagpiper_jax.train --config=configs/bagpiper_8b.py:pretrain --workdir=gs://bucket/run \\
      --config.data.train_sources.speech_und.path=gs://.../speech_und/*.array_record

What happens, in order:
  1. mesh from config.mesh (sharding.py), model + optimizer + shardings (trainer.Setup);
  2. state: resume from the latest checkpoint in <workdir>/checkpoints if there is one (params, opt
     state, step, data-iterator state; a broken one is an error, never a fresh start), else params
     from config.init_from (params only) or a fresh sharded init;
  3. loop: take grad_accum_steps host batches, remember the iterator state, place them on the mesh,
     run the jitted step (trainer._train_step); every log_every_steps: console line, TensorBoard,
     metrics.jsonl, non-finite check; every eval_every_steps: held-out eval; every
     checkpoint.every_steps: async checkpoint;
  4. SIGTERM (preemption): save at the current step, wait for the write, exit 0;
  5. at train_steps: final checkpoint, wait, exit.
"""

from __future__ import annotations

import logging as pylogging
import os
import signal
import sys
import threading
import time

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags

from bagpiper_jax import checkpoint as ckpt_lib
from bagpiper_jax import evaluate as eval_lib
from bagpiper_jax import metrics as metrics_lib
from bagpiper_jax import sharding, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py[:stage].",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, metrics.jsonl). "
                               "Default: ./workdirs/<config file name>[_<stage>].")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() first "
                                 "(multi-host TPU/GPU).")
_CRASH_AT = flags.DEFINE_integer("testonly_sigkill_after_step", 0, "Test hook: after this step (and after "
                                 "any checkpoint save of it has finished) the process SIGKILLs itself.")


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
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption sync service: agree on the local flags now and then
      if step % check_every:
        return False
      return bool(np.max(multihost_utils.process_allgather(np.int32(self.event.is_set()))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._prev)


def default_workdir(config_path: str, stage: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("workdirs", name if stage == "pretrain" else f"{name}_{stage}")


# ---------------------------------------------------------------------------------------------
# Data.


def use_demo_data(config, workdir: str) -> None:
  """Generates the shipped synthetic demo shards once and points the data sources at them.

  Shards go to config.data.demo_dir, by default `demo_data` next to the workdir (so the stages'
  workdirs under ./workdirs share one copy).
  """
  from bagpiper_jax.data import demo  # pylint: disable=g-import-not-at-top
  out_dir = config.data.get("demo_dir", "") or os.path.join(
      os.path.dirname(os.path.abspath(workdir)), "demo_data")
  logging.info("demo data in %s (generated on first use, a few minutes)", out_dir)
  shard_root = demo.ensure_demo_shards(out_dir)
  train, evals = demo.demo_sources(shard_root, config.stage)
  with config.unlocked():
    config.data.train_sources = train
    config.data.eval_sources = evals


def make_data(config, setup, workdir: str):
  """(train iterator, eval iterator factory or None)."""
  cfg, rows = setup.cfg, trainer.host_batch_rows(setup.config, setup.mesh)
  synthetic = config.data.get("synthetic", False)
  if config.data.demo and not synthetic:
    try:
      use_demo_data(config, workdir)
    except ImportError as e:
      logging.warning("config.data.demo: demo data generator unavailable (%s); using synthetic batches", e)
      print("WARNING: demo data unavailable; training on synthetic batches", flush=True)
      synthetic = True
  if synthetic:
    from bagpiper_jax.synthetic import SyntheticIterator  # pylint: disable=g-import-not-at-top
    mk = lambda seed: SyntheticIterator(cfg, rows=rows, seq_len=int(config.data.seq_len),
                                        audio_windows=int(config.data.max_audio_windows), seed=seed,
                                        process_index=jax.process_index())
    return mk(int(config.data.shuffle_seed)), (lambda: mk(10_000 + int(config.data.shuffle_seed)))
  from bagpiper_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if not config.data.train_sources:
    raise ValueError("config.data.train_sources is empty: give --config.data.train_sources or set "
                     "config.data.demo=True / config.data.synthetic=True")
  train_it = pipeline.make_train_iterator(config, cfg)
  make_eval = None
  if config.data.eval_sources:
    make_eval = lambda: pipeline.make_eval_iterator(config, cfg, num_batches=int(config.eval_steps))
  return train_it, make_eval


def _data_stats(it) -> dict:
  try:
    from bagpiper_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    s = pipeline.pipeline_stats(it)
    return {k: s[k] for k in ("docs_read", "docs_dropped", "fill", "rows", "rows_padding") if k in s}
  except Exception:  # pylint: disable=broad-except  (synthetic iterator: no counters)
    return {}


# ---------------------------------------------------------------------------------------------


def _log_window(step, config, pending, untimed, t_window, setup, flops_per_step, peak, t_start, start_step):
  """Reduces the per-step device metrics of one log window to host numbers.

  The first `untimed` steps of the window (the compiling first step of a run) count for the
  losses but not for step time / tokens/s / MFU.
  """
  host = jax.device_get(pending)
  last = host[-1]
  timed = host[untimed:]
  dt = time.perf_counter() - t_window
  tokens = float(sum(m["tokens"] for m in timed))
  out = {
      "loss": float(np.mean([m["loss"] for m in host])),
      "text_loss": float(np.mean([m["text_loss"] for m in host])),
      "audio_loss": float(np.mean([m["audio_loss"] for m in host])),
      "stream_loss": np.mean([m["stream_loss"] for m in host], axis=0),
      "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
      "lr": float(last["lr"]),
      "tokens_per_s": tokens / dt if timed else float("nan"),
      "step_time_s": dt / len(timed) if timed else float("nan"),
      "skipped_steps": int(last["nonfinite_count"]),
  }
  out["mfu"] = (flops_per_step / out["step_time_s"] / (peak * setup.mesh.size)
                if peak > 0 and timed else float("nan"))
  done = step - start_step - 1
  eta = (time.perf_counter() - t_start) / done * (int(config.train_steps) - step) if done > 0 else None
  step_losses = [float(m["loss"]) for m in host]
  return out, eta, step_losses, int(last["nonfinite_first_step"])


def train_and_evaluate(config, workdir: str, *, sigkill_after_step: int = 0, setup=None,
                       data=None) -> dict:
  """The whole run. Returns the last logged metrics (for tests and callers).

  `setup` (a trainer.Setup built for this config) and `data` ((train iterator, eval factory)) may
  be passed in to reuse compiled steps or feed custom batches (notebooks, tests).
  """
  os.makedirs(workdir, exist_ok=True)
  if config.nan_policy not in ("stop", "skip"):
    raise ValueError(f"config.nan_policy must be 'stop' or 'skip', got {config.nan_policy!r}")
  if setup is None:
    mesh = sharding.make_mesh(config)
    setup = trainer.Setup(config, mesh)
  mesh = setup.mesh
  logging.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())
  train_it, make_eval = data if data is not None else make_data(config, setup, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config)
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info("resuming from %s/%d", ckpt.directory, latest)
    state, data_state = ckpt.restore(latest, setup.abstract_state)
    if data_state is not None:
      train_it.set_state(data_state)
    print(f"resumed from step {latest}", flush=True)
  else:
    leftovers = ckpt.leftover_tmp_dirs()
    if leftovers:
      logging.warning("no finished checkpoint in %s, only unfinished saves %s: starting at step 0",
                      ckpt.directory, leftovers)
    if config.init_from:
      state = setup.init_state(ckpt_lib.load_params(config.init_from, setup.abstract_state.params))
    else:
      state = setup.fresh_state()
  step = int(jax.device_get(state.step))
  start_step = step

  cfg = setup.cfg
  a, rows = int(config.optim.grad_accum_steps), trainer.global_rows(config, mesh)
  layers_trainable = any(jax.tree.leaves(setup.mask.get("layers", {})))
  flops_per_step = metrics_lib.train_flops_per_step(
      cfg, rows=a * rows, seq_len=int(config.data.seq_len), audio_windows=int(config.data.max_audio_windows),
      layers_trainable=layers_trainable)
  peak, peak_src = metrics_lib.device_peak_flops(config)
  logging.info("model FLOPs/step %.3g; device peak %.3g FLOP/s (%s)", flops_per_step, peak, peak_src)

  writer = metrics_lib.MetricsWriter(workdir)
  preempt = _Preemption()
  pending, untimed, last_metrics = [], 0, {}
  data_state = train_it.get_state()
  t_start = t_window = time.perf_counter()
  total = int(config.train_steps)
  log_every, eval_every = int(config.log_every_steps), int(config.eval_every_steps)
  try:
    while step < total:
      micro = [next(train_it) for _ in range(a)]
      data_state = train_it.get_state()  # exactly the data consumed through this step
      batch = setup.host_to_device(micro)
      state, m = setup.train_step(state, batch)
      step += 1
      pending.append(m)
      if step == start_step + 1:
        jax.block_until_ready(m)  # do not bill compilation to the first window
        logging.info("first step (incl. compilation) %.1f s", time.perf_counter() - t_window)
        t_start = t_window = time.perf_counter()
        untimed = 1

      if step % log_every == 0 or step == total:
        out, eta, step_losses, first_bad = _log_window(step, config, pending, untimed, t_window, setup,
                                                       flops_per_step, peak, t_start, start_step)
        pending, untimed, t_window = [], 0, time.perf_counter()
        writer.write(step, out, extra={"step_losses": step_losses, "data": _data_stats(train_it)})
        if jax.process_index() == 0:
          print(metrics_lib.console_line(step, total, out, eta), flush=True)
        last_metrics = out
        _check_finite(config, first_bad, out)

      if make_eval is not None and eval_every > 0 and (step % eval_every == 0 or step == total):
        ev = eval_lib.evaluate(setup, state.params, make_eval, int(config.eval_steps))
        writer.write(step, {k: v for k, v in ev.items()}, prefix="eval")
        if jax.process_index() == 0:
          print(f"eval step {step}: loss {float(ev['loss']):.4f} text {float(ev['text_loss']):.3f} "
                f"audio {float(ev['audio_loss']):.3f} ({ev['eval_steps']} batches, "
                f"{ev['eval_time_s']:.1f} s)", flush=True)
        last_metrics = {**last_metrics, **{f"eval_{k}": v for k, v in ev.items()}}

      stop = preempt.reached(step, log_every)
      final = step == total
      every = int(config.checkpoint.every_steps)
      if (every > 0 and step % every == 0) or stop or final:
        _check_finite(config, int(jax.device_get(state.nonfinite["first_step"])), None)
        if ckpt.save(step, state, data_state, force=True):
          logging.info("checkpoint %d %s", step, "started (async)" if config.checkpoint.async_save else "saved")
      if sigkill_after_step and step == sigkill_after_step:
        ckpt.wait()
        writer.flush()
        os.kill(os.getpid(), signal.SIGKILL)
      if stop:
        ckpt.wait()
        print(f"preempted: checkpoint at step {step} written; exiting", flush=True)
        break
  finally:
    preempt.restore()
    writer.close()
    ckpt.close()
  return last_metrics


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


class _QuietLibraries(pylogging.Filter):
  """Keeps Orbax/Grain/TensorStore INFO chatter (dozens of lines per save) off the console."""

  def filter(self, record):
    noisy = any(f"{os.sep}{m}{os.sep}" in record.pathname for m in ("orbax", "grain", "etils"))
    return record.levelno >= pylogging.WARNING or not noisy


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]),
                                              config.stage)
  logging.info("workdir %s", os.path.abspath(workdir))
  try:
    train_and_evaluate(config, workdir, sigkill_after_step=_CRASH_AT.value)
  except (NonFiniteError, ckpt_lib.CheckpointError) as e:
    logging.error("%s", e)
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
