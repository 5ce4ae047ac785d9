"""Paths as the command line gives them -> what the library sees: resolved once, at the entry point.

Every command-line entry point (train, convert, generate, evaluate, launch) passes each path it
takes or derives through `resolve`: a local path becomes absolute (relative to the current
directory at start-up, so later `os.chdir`s and library code that needs absolute paths, such as
Orbax's TensorStore backend, are safe); a URL (`gs://`, `s3://`, ... anything with `://`) is kept
as it is and read through etils.epath. No library function below the entry points gets a relative
path.

Checkpoints are named the way a user thinks of them, through one resolver, `find_checkpoint`:

  <workdir>                      the run directory train.py was given (holds checkpoints/)
  <workdir>/checkpoints          its Orbax CheckpointManager directory
  <workdir>/checkpoints/<step>   one finished step
  <dir>                          a params directory written by convert (params/ + model_config.json)

It returns the step directory it picked (the latest finished one unless a step is named) and says
which; unfinished saves (`*.orbax-checkpoint-tmp*`) are never taken.
"""

from __future__ import annotations

import dataclasses
import os
import re

from etils import epath

CHECKPOINTS = "checkpoints"
PARAMS_ITEM = "params"
_TMP = re.compile(r"tmp", re.IGNORECASE)


def is_url(path: str) -> bool:
  return "://" in str(path)


def resolve(path: str | os.PathLike | None) -> str | None:
  """Absolute local path (user `~` expanded) or the URL unchanged; None and "" stay as they are."""
  if path is None or str(path) == "":
    return path
  path = str(path)
  if is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def epath_of(path: str) -> epath.Path:
  return epath.Path(resolve(path))


class CheckpointNotFound(FileNotFoundError):
  pass


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """A resolved checkpoint: the step directory, its step (None for a convert params dir), and the
  Checkpointer directory it belongs to (None for a convert params dir)."""
  step_dir: str
  step: int | None
  checkpoints_dir: str | None

  @property
  def params_dir(self) -> str:
    return os.path.join(self.step_dir, PARAMS_ITEM) if not is_url(self.step_dir) else f"{self.step_dir}/{PARAMS_ITEM}"

  def describe(self) -> str:
    return f"{self.step_dir}" + (f" (step {self.step})" if self.step is not None else "")


def _finished(d: epath.Path) -> bool:
  """A finished step or params dir: not an Orbax temporary, and its params item has metadata."""
  return not _TMP.search(d.name) and (d / PARAMS_ITEM / "_METADATA").exists()


def finished_steps(checkpoints_dir: str) -> list[int]:
  d = epath_of(checkpoints_dir)
  if not d.is_dir():
    return []
  return sorted(int(c.name) for c in d.iterdir() if c.name.isdigit() and _finished(c))


def find_checkpoint(path: str, step: int | None = None) -> CheckpointRef:
  """Resolves a workdir, its checkpoints/ folder, one step folder, or a convert params dir.

  Raises CheckpointNotFound with one line naming the path and what was looked for.
  """
  p = epath_of(path)
  if not p.exists():
    raise CheckpointNotFound(f"{resolve(path)}: no such file or directory")
  if not p.is_dir():
    raise CheckpointNotFound(f"{resolve(path)}: not a directory (give a workdir, its checkpoints/ "
                             "folder, one step folder, or a params directory)")
  if p.name.isdigit() and _finished(p):  # one step of a Checkpointer directory
    if step is not None and step != int(p.name):
      raise CheckpointNotFound(f"{p}: is step {p.name}, but step {step} was asked for")
    return CheckpointRef(str(p), int(p.name), str(p.parent))
  if (p / PARAMS_ITEM / "_METADATA").exists():  # a convert params directory
    return CheckpointRef(str(p), None, None)
  for ckpt_dir in (p / CHECKPOINTS, p):
    steps = finished_steps(str(ckpt_dir))
    if steps:
      if step is None:
        step = steps[-1]
      elif step not in steps:
        raise CheckpointNotFound(f"{ckpt_dir}: no finished step {step} (finished: {steps})")
      return CheckpointRef(str(ckpt_dir / str(step)), step, str(ckpt_dir))
  leftovers = sorted(c.name for d in (p, p / CHECKPOINTS) if d.is_dir() for c in d.iterdir()
                     if _TMP.search(c.name))
  hint = f"; only unfinished saves {leftovers}" if leftovers else ""
  raise CheckpointNotFound(f"{p}: no finished checkpoint here or in {CHECKPOINTS}/{hint} (expected a "
                           f"workdir, its {CHECKPOINTS}/ folder, a numbered step folder, or a params "
                           "directory with params/_METADATA)")
