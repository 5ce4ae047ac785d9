"""Command line of training: `python -m bagpiper_jax.train --config=configs/<size>.py[:stage]`.

  python -m bagpiper_jax.train --config=configs/tiny.py                       # demo data, CPU, minutes
  python -m bagpiper_jax.train --config=configs/bagpiper_8b.py:pretrain --workdir=gs://bucket/run \\
      --config.data.train_sources.speech_und.path=gs://.../speech_und/*.array_record

Before any compilation: JAX platforms chosen (backends.py), every path resolved once
(bagpiper_jax/paths.py), the workdir checked (writable, not another config's run) and init_from
found; then the demo data generated when config.data.demo asks for it (data_pipeline/demo.py: an
offline tool, which only entry points like this one may call) and the run started
(train_loop.train_and_evaluate). Bad input ends with one line on stderr and exit status 1.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from bagpiper_jax import backends
from bagpiper_jax import checkpoint as ckpt_lib
from bagpiper_jax import compile_cache, paths
from bagpiper_jax.train_loop import NonFiniteError, RunError, train_and_evaluate
from data_pipeline import demo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py[:stage].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, metrics.jsonl); "
                               "local or gs://. Default: ./workdirs/<config file name>[_<stage>].")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() first "
                                 "(multi-host TPU/GPU).")
_RESUME_FROM = flags.DEFINE_integer("resume_from_step", None, "Resume from this older finished checkpoint "
                                    "step instead of the latest (e.g. the latest is damaged); the newer "
                                    "steps move to <workdir>/abandoned_checkpoints/, once per workdir.")
_ACCEPT_DATA = flags.DEFINE_bool("accept_data_change", False, "Resume a checkpoint written for another data "
                                 "stream (sources, weights, seeds, budgets, global batch): params and "
                                 "optimizer state restore, the data stream restarts from its beginning.")


def default_workdir(config_path: str, stage: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("workdirs", name if stage == "pretrain" else f"{name}_{stage}")


def check_workdir(config, workdir: str) -> None:
  """Refuses, before any compilation, a workdir that cannot be written or holds another config's run,
  and an init_from that does not exist."""
  wd = epath.Path(workdir)
  try:
    wd.mkdir(parents=True, exist_ok=True)
    probe = wd / f".write_probe_{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise RunError(f"workdir {workdir} is not writable ({type(e).__name__}: {e}); choose another "
                   "--workdir") from e
  saved = wd / "config.json"
  if saved.exists():
    diff = ckpt_lib.config_diff(saved.read_text(), config, what="workdir")
    if diff:
      raise RunError(f"workdir {workdir} holds a run of another config ({'; '.join(diff[:3])}"
                     f"{' ...' if len(diff) > 3 else ''}); choose a new --workdir, or set "
                     "config.init_from to start from its checkpoint")
  if config.init_from:
    try:
      ref = paths.find_checkpoint(config.init_from)
    except paths.CheckpointNotFound as e:
      raise RunError(f"config.init_from: {e}") from e
    print(f"init_from: {ref.describe()}", flush=True)


def prepare_demo_data(config, workdir: str) -> None:
  """config.data.demo: generates the synthetic demo shards once and points the data sources at them.

  Shards go to config.data.demo_dir, by default `demo_data` next to the workdir (so the stages'
  workdirs under ./workdirs share one copy). An entry-point step: the library never imports the
  offline tools (data_pipeline) itself.
  """
  out_dir = paths.resolve(config.data.demo_dir) or os.path.join(os.path.dirname(workdir), "demo_data")
  print(f"demo data in {out_dir} (generated on first use, about a minute)", flush=True)
  shard_root = demo.ensure_demo_shards(out_dir)
  config.data.demo_dir = out_dir
  config.data.train_sources, config.data.eval_sources = demo.demo_sources(shard_root, config.stage)
  files = demo.demo_model_files(out_dir)  # for the sample action (and generate/evaluate on this run)
  config.sample.tokenizer = config.sample.tokenizer or files["tokenizer"]
  config.sample.codec = config.sample.codec or files["codec"]


class _QuietLibraries(pylogging.Filter):
  """Keeps Orbax/Grain/TensorStore INFO chatter (dozens of lines per save) off the console."""

  def filter(self, record):
    noisy = any(f"{os.sep}{m}{os.sep}" in record.pathname for m in ("orbax", "grain", "etils"))
    return record.levelno >= pylogging.WARNING or not noisy


def main(argv):
  del argv
  backends.skip_tpu_probe_without_tpu()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  workdir = paths.resolve(_WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]), config.stage))
  config.init_from = paths.resolve(config.init_from)
  config.release.tokenizer, config.release.codec = (paths.resolve(p) for p in (config.release.tokenizer,
                                                                               config.release.codec))
  config.compiled_train_step = paths.resolve(config.compiled_train_step) or ""
  print(f"workdir {workdir}", flush=True)
  cache = compile_cache.setup(config, workdir)
  counter = compile_cache.CompileCounter()
  try:
    check_workdir(config, workdir)
    if config.data.demo and not config.data.synthetic:
      prepare_demo_data(config, workdir)
    train_and_evaluate(config, workdir, resume_from_step=_RESUME_FROM.value,
                       accept_data_change=_ACCEPT_DATA.value)
    if jax.process_index() == 0:
      print(counter.summary(cache), flush=True)
  except (RunError, NonFiniteError, ckpt_lib.CheckpointError) as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
