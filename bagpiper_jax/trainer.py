"""What a run needs from (config, mesh), built once: the state layout, the jitted steps, host -> device.

    setup = Setup(config, mesh)
    state = setup.layout.fresh_state()                  # or setup.layout.init_state(params)
    state, metrics = setup.train_step(state, setup.host_to_device(micro_batches))

The pieces live where a reader looks for them: the state, its shardings and init in
train_state.py, the step itself in train_step.py, the batch contract in batch.py. This class only
holds them together for the loop (train.py), the evaluation and the benchmark.
"""

from __future__ import annotations

import functools
import pickle
from typing import Mapping, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import serialize_executable
from jax.sharding import Mesh

from bagpiper_jax import batch as batch_lib
from bagpiper_jax import sharding, train_step
from bagpiper_jax.data.slots import DataSlots
from bagpiper_jax.model import ModelConfig
from bagpiper_jax.train_state import StateLayout


# What launch/aot_compile.py --save_compiled writes (a pickled dict: format, executable, in_tree,
# out_tree, meta) and `load_compiled` reads.
COMPILED_FORMAT = "bagpiper_jax.compiled_train_step/1"


class CompiledStepError(RuntimeError):
  """config.compiled_train_step does not fit this run (other shapes, devices or format)."""


def load_compiled(path: str, abstract_args) -> jax.stages.Compiled:
  """The train step executable saved by `launch.aot_compile --save_compiled=PATH`, loaded onto this
  process's devices, after checking that it takes exactly `abstract_args` ((state, batch) shapes)."""
  try:
    blob = pickle.loads(epath.Path(path).read_bytes())
  except (OSError, pickle.UnpicklingError, EOFError) as e:
    raise CompiledStepError(f"config.compiled_train_step={path}: cannot read it ({type(e).__name__}: {e})") from e
  if not isinstance(blob, dict) or blob.get("format") != COMPILED_FORMAT:
    raise CompiledStepError(f"config.compiled_train_step={path}: not a file written by "
                            "`python -m launch.aot_compile --save_compiled`")
  if jax.tree.structure((tuple(abstract_args), {})) != blob["in_tree"]:
    raise CompiledStepError(f"config.compiled_train_step={path}: compiled for another state/batch structure "
                            f"({blob['meta'].get('topology')}); compile it again for this config")
  compiled = serialize_executable.deserialize_and_load(blob["executable"], blob["in_tree"], blob["out_tree"])
  sig = lambda a: (tuple(a.shape), str(a.dtype))
  bad = [f"{jax.tree_util.keystr(k)}: {sig(g)} vs {sig(w)}" for (k, w), g in
         zip(jax.tree_util.tree_leaves_with_path(tuple(abstract_args)), jax.tree.leaves(compiled.args_info))
         if sig(g) != sig(w)]
  if bad:
    raise CompiledStepError(f"config.compiled_train_step={path}: compiled for other shapes "
                            f"({blob['meta'].get('topology')}): {'; '.join(bad[:3])}")
  return compiled


class Setup:

  def __init__(self, config, mesh: Mesh, cfg: ModelConfig | None = None):
    self.config, self.mesh = config, mesh
    self.cfg = ModelConfig.from_dict(config.model) if cfg is None else cfg
    self.layout = StateLayout(config, mesh, self.cfg)
    self.abstract_batch = train_step.abstract_batch(config, self.cfg, mesh)
    self.batch_sharding = {k: v.sharding for k, v in self.abstract_batch.items()}
    self.host_rows = batch_lib.host_rows(config, mesh.size, jax.process_count())

  @functools.cached_property
  def data_slots(self) -> DataSlots:
    """The data slots this process feeds, from the rows its devices hold (data/slots.py)."""
    spec = self.abstract_batch["input_ids"]
    rows = sharding.batch_rows_by_process(self.batch_sharding["input_ids"], spec.shape, axis=1)
    slots = DataSlots.from_rows(int(self.config.data.rows_per_slot), rows, jax.process_index())
    if slots.host_rows != self.host_rows:
      raise ValueError(f"this process's devices hold {slots.host_rows} batch rows, batch.host_rows says "
                       f"{self.host_rows} (is the batch replicated across processes?)")
    return slots

  @functools.cached_property
  def train_step(self):
    if self.config.compiled_train_step:
      print(f"train step: the executable in {self.config.compiled_train_step} (no compilation)", flush=True)
      return load_compiled(self.config.compiled_train_step, (self.layout.abstract_state, self.abstract_batch))
    return train_step.jit_train_step(self.layout, self.batch_sharding)

  @functools.cached_property
  def eval_step(self):
    return train_step.jit_eval_step(self.layout, self.batch_sharding)

  @functools.cached_property
  def abstract_eval_batch(self) -> dict:
    return train_step.abstract_batch(self.config, self.cfg, self.mesh, micro_steps=1)

  def host_to_device(self, micro_batches: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """A list of A process-local numpy batches -> the global [A, B, ...] device batch."""
    stacked = batch_lib.stack_micro_batches(micro_batches, self.abstract_batch, self.host_rows)
    return sharding.place_batch(stacked, self.batch_sharding, self.abstract_batch)

  def host_to_device_eval(self, batch: Mapping[str, np.ndarray]) -> dict:
    """One process-local eval batch -> the global [1, B, ...] device batch."""
    stacked = batch_lib.stack_micro_batches([batch], self.abstract_eval_batch, self.host_rows)
    return sharding.place_batch(stacked, self.batch_sharding, self.abstract_eval_batch)
