"""Orbax checkpoints of the whole training state; resume is automatic, never silently fresh.

One checkpoint step directory `<workdir>/checkpoints/<step>/` holds the items

  params     the full parameter tree (frozen ones too), sharded arrays (OCDBT/tensorstore)
  train      {'step', 'opt_state', 'nonfinite': {...}}: everything else the jitted step carries
  data       the input iterator state per process (`process_<i>-of-<n>.json`), captured when the
             batches of the last finished step were taken, so prefetching never skews it
  config     the run's config as JSON (model section compared on resume)

Saves are async (`config.checkpoint.async_save`): the step returns as soon as arrays are copied off
device. `max_to_keep = config.checkpoint.keep`. Orbax writes into a temporary directory and renames
it when complete, so a process killed mid-save leaves no half step behind (`latest_step` ignores it).

Restore errors: if a checkpoint step exists but cannot be read or does not match the model, we raise
`CheckpointError` naming the directory and the reason. Starting fresh is never the fallback.
`load_params` (config.init_from) reads only the `params` item, e.g. SFT from a pretraining run.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from bagpiper_jax.convert import params_io


class CheckpointError(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------
# Per-process data-iterator state (Grain's handler saves a live iterator; we save a captured value).


def encode_data_state(state: Any) -> dict:
  if state is None:
    return {"format": "none"}
  if isinstance(state, bytes):
    return {"format": "bytes", "state": base64.b64encode(state).decode("ascii")}
  return {"format": "json", "state": state}


def decode_data_state(d: dict) -> Any:
  fmt = d.get("format")
  if fmt == "none":
    return None
  if fmt == "bytes":
    return base64.b64decode(d["state"])
  if fmt == "json":
    return d["state"]
  raise CheckpointError(f"unknown data-iterator state format {fmt!r}")


class DataStateHandler(ocp.CheckpointHandler):
  """Writes this process's iterator state to `process_<i>-of-<n>.json`."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(json.dumps(encode_data_state(args.state)))

  def restore(self, directory: epath.Path, args: Optional["DataStateRestore"] = None) -> Any:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = directory / name
    if not path.exists():
      have = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
      raise CheckpointError(f"data-iterator state {path} not found (have {have}); the checkpoint was "
                            "written with a different number of processes or is incomplete")
    return decode_data_state(json.loads(path.read_text()))

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ---------------------------------------------------------------------------------------------


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


class Checkpointer:
  """CheckpointManager over the items above. Use one per run; call close() at the end."""

  def __init__(self, directory: str, config, *, async_save: bool | None = None):
    self.directory = epath.Path(directory)
    self.config = config
    c = config.checkpoint
    opts = ocp.CheckpointManagerOptions(
        save_interval_steps=int(c.every_steps),
        max_to_keep=int(c.keep),
        enable_async_checkpointing=bool(c.async_save if async_save is None else async_save),
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("params", "train", "data", "config"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: Any, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or force). Returns whether a save started."""
    if not force and not self.manager.should_save(step):
      return False
    if step in self.manager.all_steps():
      return False
    train = {"step": state.step, "opt_state": state.opt_state, "nonfinite": state.nonfinite}
    return self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave(train),
        data=DataStateSave(data_state),
        config=ocp.args.JsonSave(json.loads(self.config.to_json_best_effort())),
    ), force=True)

  def _check_config(self, step: int) -> None:
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {self.directory / str(step)}: cannot read its config item "
                            f"({type(e).__name__}: {e}). Refusing to start fresh over it.") from e
    diff = config_diff(saved, self.config)
    if diff:
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} is incompatible with the config:\n  " + "\n  ".join(diff)
          + "\nUse a new --workdir (or config.init_from=<dir> to start from its params).")

  def restore(self, step: int, abstract_state, *, data: bool = True) -> tuple[Any, Any]:
    """(state, data_state) of `step`, arrays placed with abstract_state's shardings.

    data=False skips the per-process data-iterator states (data_state is then None): the arrays
    restore onto any mesh and process count, the iterator states only onto the same process count.
    """
    self._check_config(step)
    train_abs = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                 "nonfinite": abstract_state.nonfinite}
    items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                 train=ocp.args.StandardRestore(train_abs))
    if data:
      items["data"] = DataStateRestore()
    try:
      r = self.manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} could not be restored ({type(e).__name__}: {e}). "
          "It is corrupt or does not match this model/optimizer. Refusing to start fresh: delete that "
          "step directory to fall back to an older one, or use a new --workdir.") from e
    t = r["train"]
    state = abstract_state.replace(params=r["params"], step=t["step"], opt_state=t["opt_state"],
                                   nonfinite=t["nonfinite"])
    return state, (r["data"] if data else None)

  def leftover_tmp_dirs(self) -> list[str]:
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
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