"""Orbax checkpoints of the whole training state; resume is automatic, never silently fresh.

One checkpoint step directory `<workdir>/checkpoints/<step>/` holds the items

  params     the full parameter tree (frozen ones too), sharded arrays (OCDBT/tensorstore)
  train      {'step', 'opt_state', 'nonfinite': {...}}: everything else the jitted step carries
  data       the input stream's position: one JSON file per data slot (`slot_<s>-of-<S>.json`,
             bagpiper_jax/data/slots.py), or per process for iterators without slots
             (`process_<i>-of-<n>.json`), captured when the batches of the last finished step were
             taken (prefetching never skews it), and `stream.json` (what the stream is)
  config     the run's config as JSON (model section compared on resume)

plus `integrity.json`, the size of every file of the step, written once the step is final.

When to save is Orbax's decision (`should_save`: every config.checkpoint.every_steps, the last step,
and JAX's preemption sync point, `reached_preemption`, on which all processes agree). Saves are async
(`config.checkpoint.async_save`): the step returns as soon as arrays are copied off device.
`max_to_keep = config.checkpoint.keep`. Orbax writes into a temporary directory and renames it when
complete, so a process killed mid-save leaves no half step behind (`latest_step` ignores it).

Restore checks before it reads any array (`verify`): every file `integrity.json` lists is there with
its size (a shard cut short is named with both sizes), Orbax's metadata files are there and parse,
and the data item's files parse; all processes agree before any collective. A step that fails is an
error naming the file (`CheckpointError`); starting fresh is never the fallback. `fall_back_to(K)`
(train.py --resume_from_step) deliberately resumes from an older finished step and moves the newer
ones to `<workdir>/abandoned_checkpoints/`. `load_params` (config.init_from) reads only `params`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bagpiper_jax.convert import params_io

SEAL = "integrity.json"
STREAM = "stream.json"
ABANDONED = "abandoned_checkpoints"
# Files Orbax (checked with 0.12.8) always writes per step / per item; tests/test_checkpoint_integrity.py
# checks this table against a fresh save, so an Orbax upgrade that changes the layout fails there.
REQUIRED_FILES = {
    "": ("_CHECKPOINT_METADATA",),
    "params": ("_METADATA", "_sharding", "manifest.ocdbt"),
    "train": ("_METADATA", "_sharding", "manifest.ocdbt"),
    "config": ("metadata",),
    "data": (STREAM,),
}
JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata", STREAM)


class CheckpointError(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------
# The data item (Grain's handler saves a live iterator; we save captured values, per slot).


def encode_data_state(state: Any) -> dict:
  if state is None:
    return {"format": "none"}
  if isinstance(state, bytes):
    return {"format": "bytes", "state": base64.b64encode(state).decode("ascii")}
  return {"format": "json", "state": state}


def decode_data_state(d: dict) -> Any:
  fmt = d.get("format") if isinstance(d, dict) else None
  if fmt == "none":
    return None
  if fmt == "bytes":
    return base64.b64decode(d["state"])
  if fmt == "json":
    return d["state"]
  raise CheckpointError(f"unknown data-iterator state format {fmt!r}")


def _read_json(path: epath.Path, what: str) -> Any:
  """A JSON file of a checkpoint; CheckpointError naming the file if it is missing or does not parse."""
  if not path.exists():
    have = sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []
    raise CheckpointError(f"{what} {path} is missing (the directory has {have})")
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{what} {path} does not parse ({type(e).__name__}: {e}); the file is damaged") from e


@dataclasses.dataclass
class DataState:
  """The data item as read back: stream.json and the requested parts ({file stem: state})."""
  stream: Optional[dict]
  parts: dict[str, Any]


class DataStateHandler(ocp.CheckpointHandler):
  """Writes this process's parts as `<stem>.json`; process 0 also writes stream.json."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    for stem, state in args.parts.items():
      (directory / f"{stem}.json").write_text(json.dumps(encode_data_state(state)))
    if jax.process_index() == 0:
      (directory / STREAM).write_text(json.dumps(args.stream))

  def restore(self, directory: epath.Path, args: Optional["DataStateRestore"] = None) -> DataState:
    keys = args.keys if args is not None else ()
    stream = _read_json(directory / STREAM, "data stream description")
    parts = {}
    for stem in keys:
      path = directory / f"{stem}.json"
      if not path.exists():
        have = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        raise CheckpointError(f"data-iterator state {path} not found (have {have}); the checkpoint was "
                              "written with another data layout or is incomplete")
      try:
        parts[stem] = decode_data_state(_read_json(path, "data-iterator state"))
      except CheckpointError as e:
        raise CheckpointError(f"data-iterator state {path}: {e}") if str(path) not in str(e) else e
    return DataState(stream=stream, parts=parts)

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  parts: dict  # {file stem: iterator state} this process writes
  stream: dict  # stream.json (written by process 0)


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  keys: tuple = ()  # file stems this process reads


# ---------------------------------------------------------------------------------------------
# Config comparison.


def _dict_diff(saved: dict, current: dict, prefix: str, what: str) -> list[str]:
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _dict_diff(a, b, f"{prefix}.{k}", what)
    elif a != b:
      out.append(f"{prefix}.{k}: {what} {a!r} vs config {b!r}")
  return out


def config_diff(saved: dict | str, config, what: str = "checkpoint") -> list[str]:
  """What makes a saved run config (dict or its JSON) another model than `config`: the model
  section, the stage, and what is frozen (the optimizer state's structure). One line per key."""
  if isinstance(saved, str):
    saved = json.loads(saved)
  diff = _dict_diff(saved.get("model", {}), config.model.to_dict(), "model", what)
  if saved.get("stage", config.stage) != config.stage:
    diff.append(f"stage: {what} {saved.get('stage')!r} vs config {config.stage!r}")
  frz = (list(saved.get("trainable", {}).get("freeze", [])), list(config.trainable.freeze))
  if frz[0] != frz[1]:
    diff.append(f"trainable.freeze: {what} {frz[0]} vs config {frz[1]}")
  return diff


# ---------------------------------------------------------------------------------------------
# Integrity.


def file_sizes(step_dir: epath.Path) -> dict[str, int]:
  """{path relative to the step directory: bytes} of every file in it (the seal leaves itself out)."""
  out = {}
  for root, _, files in step_dir.walk():
    for f in files:
      rel = str((root / f).relative_to(step_dir))
      if rel != SEAL and not rel.startswith(SEAL + "."):
        out[rel] = (root / f).stat().length
  return dict(sorted(out.items()))


def seal(step_dir: epath.Path) -> None:
  """Writes integrity.json (every file's size) into a finished step; a rename makes it all-or-nothing."""
  tmp = step_dir / f"{SEAL}.tmp"
  tmp.write_text(json.dumps({"files": file_sizes(step_dir)}, indent=0))
  tmp.rename(step_dir / SEAL)


def verify_step(step_dir: epath.Path, *, data: bool = True) -> bool:
  """Raises CheckpointError naming the first damaged file of a step; returns whether it was sealed.

  data=False leaves the data item out (a restore of the arrays alone does not read it)."""
  sealed = (step_dir / SEAL).exists()
  if sealed:
    sizes = _read_json(step_dir / SEAL, "checkpoint integrity record")
    for rel, n in sizes.get("files", {}).items():
      if not data and rel.startswith("data/"):
        continue
      p = step_dir / rel
      if not p.exists():
        raise CheckpointError(f"checkpoint file {p} is missing (it was written with {n} bytes)")
      got = p.stat().length
      if got != n:
        raise CheckpointError(f"checkpoint file {p} has {got} bytes, {n} when it was written: it was cut "
                              "short or overwritten")
  for item, names in REQUIRED_FILES.items():
    if not data and item == "data":
      continue
    for name in names:
      p = step_dir / item / name if item else step_dir / name
      if not p.exists():
        raise CheckpointError(f"checkpoint metadata file {p} is missing: the step is incomplete")
      if name in JSON_FILES:
        _read_json(p, "checkpoint metadata file")
  return sealed


_PATH_IN_ERROR = re.compile(r'(?:local file|file) "([^"]+)"')


def _name_files(e: Exception, step_dir: epath.Path) -> str:
  """The files of `step_dir` an (e.g. TensorStore) error message mentions, to say which one is bad."""
  found = sorted({m for m in _PATH_IN_ERROR.findall(str(e)) if str(step_dir) in m})
  return f" (file{'s' if len(found) > 1 else ''}: {', '.join(found)})" if found else ""


def _agree(fn: Callable[[], Any], what: str) -> Any:
  """Runs a per-process check; if it fails on any process, every process raises (none hangs in a
  collective waiting for one that gave up)."""
  err = None
  try:
    out = fn()
  except CheckpointError as e:
    err, out = e, None
  if jax.process_count() > 1:
    bad = np.asarray(multihost_utils.process_allgather(np.int32(err is not None))).reshape(-1)
    if bad.any() and err is None:
      err = CheckpointError(f"{what}: process(es) {np.nonzero(bad)[0].tolist()} found it damaged (their "
                            "output names the file)")
  if err is not None:
    raise err
  return out


# ---------------------------------------------------------------------------------------------


class Checkpointer:
  """CheckpointManager over the items above. Use one per run; call close() at the end."""

  def __init__(self, directory: str, config, *, async_save: bool | None = None):
    self.directory = epath.Path(directory)
    self.config = config
    c = config.checkpoint
    policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ocp.checkpoint_managers.SpecificStepsPolicy([int(config.train_steps)])]
    if int(c.every_steps) > 0:
      policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(int(c.every_steps)))
    opts = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
        max_to_keep=int(c.keep),
        enable_async_checkpointing=bool(c.async_save if async_save is None else async_save),
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("params", "train", "data", "config"))
    self._unsealed: list[int] = []

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def should_save(self, step: int) -> bool:
    """Orbax's decision: on the interval, the last step, or JAX's preemption sync point."""
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (the same step on every process); False without jax.distributed."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state, data_parts: dict[str, Any], data_stream: dict) -> bool:
    """Starts saving `step` (unless it exists). data_parts: {file stem: state} of this process."""
    if step in self.manager.all_steps():
      return False
    train = {"step": state.step, "opt_state": state.opt_state, "nonfinite": state.nonfinite}
    started = self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave(train),
        data=DataStateSave(parts=dict(data_parts), stream=data_stream),
        config=ocp.args.JsonSave(json.loads(self.config.to_json_best_effort())),
    ), force=True)
    self._seal_finished()  # Orbax starts a save only after the previous ones finished
    if started:
      self._unsealed.append(step)
    return started

  def _seal_finished(self) -> None:
    """Seals the steps this run saved that are final now (process 0; kept-last-K may have deleted some)."""
    todo, self._unsealed = self._unsealed, []
    if jax.process_index() != 0:
      return
    for step in todo:
      d = self.step_dir(step)
      if d.exists() and not (d / SEAL).exists():
        seal(d)

  def _check_config(self, step: int) -> None:
    path = self.step_dir(step) / "config" / "metadata"
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {self.step_dir(step)}: cannot read its config item {path} "
                            f"({type(e).__name__}: {e}). Refusing to start fresh over it.") from e
    diff = config_diff(saved, self.config)
    if diff:
      raise CheckpointError(
          f"checkpoint {self.step_dir(step)} is incompatible with the config:\n  " + "\n  ".join(diff)
          + "\nUse a new --workdir (or config.init_from=<dir> to start from its params).")

  def read_stream(self, step: int) -> Optional[dict]:
    """The data item's stream.json of `step` (None if the step has none); errors name the file."""
    path = self.step_dir(step) / "data" / STREAM
    return _agree(lambda: _read_json(path, "data stream description") if path.exists() else None,
                  f"checkpoint {self.step_dir(step)}")

  def restore(self, step: int, abstract_state, *, data_keys=()) -> tuple[Any, Optional[DataState]]:
    """(state, data) of `step`, arrays placed with abstract_state's shardings.

    data_keys: the data item's file stems this process needs (data/slots.restore_keys); None skips
    the data item (the arrays restore onto any mesh and process count). Every file is checked
    first (`verify_step`, the data files parsed) on all processes, which agree before any array is read.
    """
    step_dir = self.step_dir(step)
    self._check_config(step)

    def check():
      try:
        sealed = verify_step(step_dir, data=data_keys is not None)
      except CheckpointError as e:
        raise CheckpointError(f"{e}. Refusing to start fresh: resume from an older finished step with "
                              f"--resume_from_step (finished: {self.all_steps()}), or use a new --workdir.") from e
      if not sealed:
        logging.warning("checkpoint %s has no %s (the run stopped right after writing it): checked its "
                        "metadata only", step_dir, SEAL)
      if data_keys is None:
        return None
      return DataStateHandler().restore(step_dir / "data", DataStateRestore(keys=tuple(data_keys)))

    data = _agree(check, f"checkpoint {step_dir}")
    train_abs = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                 "nonfinite": abstract_state.nonfinite}
    items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                 train=ocp.args.StandardRestore(train_abs))
    try:
      r = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {step_dir} could not be restored{_name_files(e, step_dir)} ({type(e).__name__}: {e}). "
          "It is corrupt or does not match this model/optimizer. Refusing to start fresh: resume from an "
          f"older finished step with --resume_from_step (finished: {self.all_steps()}), or use a new "
          "--workdir.") from e
    t = r["train"]
    state = abstract_state.replace(params=r["params"], step=t["step"], opt_state=t["opt_state"],
                                   nonfinite=t["nonfinite"])
    return state, data

  def fall_back_to(self, step: int) -> list[int]:
    """Makes finished step `step` the latest: newer steps move to <workdir>/abandoned_checkpoints/.

    Once per workdir and step (recorded in abandoned_checkpoints/fallbacks.json), so a job restarted
    with the same command line resumes from its newest checkpoint instead of falling back again.
    Returns the steps moved away ([] when there were none or the fallback was done before).
    """
    finished = self.all_steps()
    if step not in finished:
      raise CheckpointError(f"--resume_from_step={step}: {self.directory} has no finished step {step} "
                            f"(finished: {finished})")
    record = self.directory.parent / ABANDONED / "fallbacks.json"
    done = json.loads(record.read_text()) if record.exists() else []
    newer = [s for s in finished if s > step]
    if not newer or any(d["to_step"] == step for d in done):
      multihost_utils.sync_global_devices("fall_back_to read")
      return []
    multihost_utils.sync_global_devices("fall_back_to read")
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      record.parent.mkdir(parents=True, exist_ok=True)
      for s in newer:
        self.step_dir(s).rename(record.parent / f"{s}-{stamp}")
      done.append({"to_step": step, "moved": newer, "time": stamp})
      record.write_text(json.dumps(done, indent=1))
    multihost_utils.sync_global_devices("fall_back_to moved")
    self.manager.reload()
    return newer

  def leftover_tmp_dirs(self) -> list[str]:
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name)

  def wait(self):
    self.manager.wait_until_finished()
    self._seal_finished()

  def close(self):
    self.manager.wait_until_finished()
    self._seal_finished()
    self.manager.close()


def load_params(path: str, abstract_params) -> Any:
  """Params only, from a Checkpointer directory (latest step) or one step directory (init_from).

  The directory rules are params_io's (the same that conversion uses), errors are init_from's."""
  try:
    item = params_io.resolve_params_dir(path)
  except params_io.ParamsIOError as e:
    raise CheckpointError(f"config.init_from={path!r}: neither a checkpoint step nor a checkpoint "
                          f"directory with finished steps ({e})") from e
  logging.info("init_from: loading params from %s", item)
  try:
    return params_io.load_params(item, abstract_params)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"config.init_from: params in {item} could not be loaded into this model "
                          f"({type(e).__name__}: {e})") from e