"""The train state and everything about its layout: model, trainable mask, optimizer, shardings.

`StateLayout(config, mesh, cfg)` derives, without allocating anything:

  model                the Flax module (bagpiper_jax.model.Bagpiper)
  abstract_params      unboxed jax.ShapeDtypeStruct tree of the parameters
  param_shardings      NamedShardings from the params' logical axes (sharding.LOGICAL_RULES)
  mask                 trainable (True) / frozen (False) per parameter (optim.trainable_mask)
  optimizer            the optax transformation of the TRAINABLE part (optim.make_optimizer)
  state_shardings      TrainState of NamedShardings; abstract_state the matching ShapeDtypeStructs

and creates states on the mesh: `fresh_state()` (random params + zero optimizer state in one
sharded program, never whole on one device) and `init_state(params)` (loaded params).
The jitted step that advances a TrainState is in train_step.py.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from bagpiper_jax import batch as batch_lib
from bagpiper_jax import optim, sharding
from bagpiper_jax.model import Bagpiper, ModelConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer steps taken (skipped non-finite steps included)
  params: Any  # the full tree, frozen params included
  opt_state: Any  # optimizer state of the trainable params only
  nonfinite: Any  # {'count': int32 [], 'first_step': int32 [] (-1 = never)}


def _init_batch(cfg: ModelConfig) -> dict:
  """Shapes are all init needs: one short row with one audio window."""
  return batch_lib.example(cfg, 1, 16, 1)


def param_specs(cfg: ModelConfig) -> tuple[Any, Any]:
  """(abstract unboxed params, logical PartitionSpec tree) without allocating anything."""
  boxed = jax.eval_shape(lambda: Bagpiper(cfg).init(jax.random.key(0), _init_batch(cfg)))["params"]
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def check_freeze_patterns(config, params) -> None:
  """Every configured freeze regex must match at least one parameter (typos are errors)."""
  paths = [optim.path_str(k) for k in traverse_util.flatten_dict(params)]
  for p in config.trainable.freeze:
    if not any(re.fullmatch(p, s) for s in paths):
      raise ValueError(f"config.trainable.freeze pattern {p!r} matches no parameter; paths look like "
                       f"{paths[:4]}")


class StateLayout:
  """Model, mask, optimizer and shardings of the train state for (config, mesh)."""

  def __init__(self, config, mesh: Mesh, cfg: ModelConfig):
    self.config, self.mesh, self.cfg = config, mesh, cfg
    self.model = Bagpiper(cfg)
    self.abstract_params, logical = param_specs(cfg)
    check_freeze_patterns(config, self.abstract_params)
    self.param_shardings = sharding.logical_to_sharding(logical, self.abstract_params, mesh)
    self.mask = optim.trainable_mask(config, self.abstract_params)
    self.optimizer = optim.make_optimizer(config, cfg)
    self.schedule = optim.make_schedule(config)
    abs_t, _ = optim.split(self.abstract_params, self.mask)
    sh_t, _ = optim.split(self.param_shardings, self.mask)
    abs_opt = jax.eval_shape(self.optimizer.init, abs_t)
    rep = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        self.optimizer, lambda _, s: s, abs_opt, sh_t,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    # Where the update runs (HBM); with optim.offload_state the state lives in host memory between steps.
    self.opt_device_shardings = opt_shardings
    self.offload_opt_state = bool(config.optim.offload_state)
    if self.offload_opt_state:
      opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    self.state_shardings = TrainState(step=rep, params=self.param_shardings, opt_state=opt_shardings,
                                      nonfinite={"count": rep, "first_step": rep})
    abstract = TrainState(step=scalar, params=self.abstract_params, opt_state=abs_opt,
                          nonfinite={"count": scalar, "first_step": scalar})
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings)

  @property
  def layers_trainable(self) -> bool:
    return any(jax.tree.leaves(self.mask.get("layers", {})))

  def _make_state(self, params) -> TrainState:
    t, _ = optim.split(params, self.mask)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(t),
                      nonfinite={"count": jnp.zeros((), jnp.int32), "first_step": jnp.full((), -1, jnp.int32)})

  def _init_params(self, seed):
    # No mesh context here: activation constraints do not matter for init, and flax's
    # DenseGeneral (encoder conv_out) reshapes a boxed kernel, which a mesh context rejects.
    return nn.unbox(self.model.init(jax.random.key(seed), _init_batch(self.cfg))["params"])

  def init_params(self, seed: int | None = None):
    """Random params created directly sharded (never whole on one device)."""
    seed = int(self.config.seed if seed is None else seed)
    return jax.jit(self._init_params, out_shardings=self.param_shardings)(jnp.asarray(seed, jnp.uint32))

  def init_state(self, params) -> TrainState:
    """State at step 0 around `params` (fresh or loaded)."""
    return jax.jit(self._make_state, in_shardings=(self.param_shardings,), out_shardings=self.state_shardings,
                   donate_argnums=(0,))(params)

  def fresh_state(self, seed: int | None = None) -> TrainState:
    """Random params + zero optimizer state in one sharded program (= init_state(init_params()))."""
    seed = int(self.config.seed if seed is None else seed)
    return self._fresh_fn(jnp.asarray(seed, jnp.uint32))

  @functools.cached_property
  def _fresh_fn(self):
    return jax.jit(lambda seed: self._make_state(self._init_params(seed)), out_shardings=self.state_shardings)
