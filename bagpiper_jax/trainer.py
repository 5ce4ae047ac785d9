"""Train state, sharded init, and the jitted train/eval steps. No I/O here (see train.py).

For the AOT / launch code, the one entry point is

    step_fn, abstract_state, state_shardings, abstract_batch, batch_sharding = build_train_step(config, mesh)
    compiled = step_fn.lower(abstract_state, abstract_batch).compile()

It needs no concrete arrays and no devices beyond the mesh's, so `mesh` may be built from a TPU
topology description on a CPU host (`sharding.make_mesh(config, devices=topology.devices)`).
`abstract_state` / `abstract_batch` are trees of `jax.ShapeDtypeStruct` that carry their shardings.
`step_fn(state, batch) -> (state, metrics)`; the state argument is donated.

The batch always has a leading micro-batch axis: [A, B, ...] with A = config.optim.grad_accum_steps
and B = config.data.per_device_batch * mesh.size (global rows per micro-batch; each process supplies
B / process_count of them, see `host_batch_rows`). Gradient accumulation is a `lax.scan` over A inside
the step, so one optimizer step is one compiled program whatever A is.

The step in one place (`_train_step`):
  1. split params into trainable / frozen (optim.split; frozen = config.trainable.freeze + encoder);
  2. for each micro-batch: loss and grads of the TRAINABLE part only, weighted by its number of
     target positions (so accumulation equals one big batch);
  3. AdamW update of the trainable part (optim.make_optimizer; frozen params have no opt state);
  4. if loss or grad norm is not finite, the update is dropped (state kept, `nonfinite` counted,
     the first such step remembered); the host stops or goes on per config.nan_policy.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from bagpiper_jax import optim, sharding
from bagpiper_jax.model import Bagpiper, ModelConfig, dummy_batch


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer steps taken (skipped non-finite steps included)
  params: Any  # the full tree, frozen params included
  opt_state: Any  # optimizer state of the trainable params only
  nonfinite: Any  # {'count': int32 [], 'first_step': int32 [] (-1 = never)}


def model_config(config) -> ModelConfig:
  return ModelConfig.from_dict(config.model)


# ---------------------------------------------------------------------------------------------
# Shapes.


def global_rows(config, mesh: Mesh) -> int:
  return int(config.data.per_device_batch) * mesh.size


def host_batch_rows(config, mesh: Mesh) -> int:
  """Rows each process feeds per micro-batch."""
  n = global_rows(config, mesh)
  pc = jax.process_count()
  if n % pc:
    raise ValueError(f"global batch {n} rows does not split over {pc} processes")
  return n // pc


def make_abstract_batch(config, mesh: Mesh, *, micro_steps: int | None = None) -> dict:
  """ShapeDtypeStructs (with shardings) of one step's batch [A, B, ...]."""
  cfg = model_config(config)
  a = int(config.optim.grad_accum_steps) if micro_steps is None else micro_steps
  b = dummy_batch(cfg, 1, int(config.data.seq_len), int(config.data.max_audio_windows))
  shapes = {k: jax.ShapeDtypeStruct((a, global_rows(config, mesh)) + v.shape[1:], v.dtype) for k, v in b.items()}
  shard = sharding.batch_sharding(shapes, mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard[k]) for k, v in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Params and state.


def _init_batch(cfg: ModelConfig, config) -> dict:
  return dummy_batch(cfg, 1, min(16, int(config.data.seq_len)), 1)


def param_specs(config) -> tuple[Any, Any]:
  """(abstract unboxed params, logical PartitionSpec tree) without allocating anything."""
  cfg = model_config(config)
  model = Bagpiper(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _init_batch(cfg, config)))["params"]
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def check_freeze_patterns(config, params) -> None:
  """Every configured freeze regex must match at least one parameter (typos are errors)."""
  import re  # pylint: disable=g-import-not-at-top
  paths = [optim.path_str(k) for k in traverse_util.flatten_dict(params)]
  for p in config.trainable.freeze:
    if not any(re.fullmatch(p, s) for s in paths):
      raise ValueError(f"config.trainable.freeze pattern {p!r} matches no parameter; paths look like "
                       f"{paths[:4]}")


class Setup:
  """Everything derived from (config, mesh) once: model, masks, optimizer, shardings."""

  def __init__(self, config, mesh: Mesh):
    self.config, self.mesh = config, mesh
    self.cfg = model_config(config)
    self.model = Bagpiper(self.cfg)
    self.abstract_params, logical = param_specs(config)
    check_freeze_patterns(config, self.abstract_params)
    self.param_shardings = sharding.logical_to_sharding(logical, self.abstract_params, mesh)
    self.mask = optim.trainable_mask(config, self.abstract_params)
    self.optimizer = optim.make_optimizer(config, self.cfg)
    self.schedule = optim.make_schedule(config)
    abs_t, _ = optim.split(self.abstract_params, self.mask)
    sh_t, _ = optim.split(self.param_shardings, self.mask)
    abs_opt = jax.eval_shape(self.optimizer.init, abs_t)
    rep = sharding.replicated(mesh)
    self.opt_shardings = optax.tree_map_params(
        self.optimizer, lambda _, s: s, abs_opt, sh_t,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    nonfinite = {"count": jax.ShapeDtypeStruct((), jnp.int32), "first_step": jax.ShapeDtypeStruct((), jnp.int32)}
    self.state_shardings = TrainState(step=rep, params=self.param_shardings, opt_state=self.opt_shardings,
                                      nonfinite={"count": rep, "first_step": rep})
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                          opt_state=abs_opt, nonfinite=nonfinite)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings)
    self.abstract_batch = make_abstract_batch(config, mesh)
    self.batch_sharding = {k: v.sharding for k, v in self.abstract_batch.items()}

  # ---- init ----

  def init_params(self, seed: int | None = None):
    """Random params created directly sharded (never whole on one device)."""
    seed = int(self.config.seed if seed is None else seed)
    batch = _init_batch(self.cfg, self.config)

    def init():
      # No mesh context here: activation constraints do not matter for init, and flax's
      # DenseGeneral (encoder conv_out) reshapes a boxed kernel, which a mesh context rejects.
      return nn.unbox(self.model.init(jax.random.key(seed), batch)["params"])
    return jax.jit(init, out_shardings=self.param_shardings)()

  def _make_state(self, params) -> TrainState:
    t, _ = optim.split(params, self.mask)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(t),
                      nonfinite={"count": jnp.zeros((), jnp.int32), "first_step": jnp.full((), -1, jnp.int32)})

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
    batch = _init_batch(self.cfg, self.config)

    def make(seed):
      return self._make_state(nn.unbox(self.model.init(jax.random.key(seed), batch)["params"]))
    return jax.jit(make, out_shardings=self.state_shardings)

  # ---- steps ----

  def _ctx(self):
    """The abstract mesh + logical rules, so the model's activation constraints resolve (the model's
    params are created at full rank, so this always traces: tests/test_decoder.py checks it)."""
    return _MeshRules(self.mesh)

  def _micro(self, trainable, frozen, micro):
    """Per micro-batch: (weighted loss sum, aux sums, grads of the weighted sum)."""

    def loss_fn(tp):
      loss, aux = self.model.apply({"params": optim.merge(tp, frozen)}, micro)
      n = aux["num_target_tokens"]
      return loss * n, aux

    (lsum, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    n = aux["num_target_tokens"]
    sums = {"loss": lsum, "text_loss": aux["text_loss"] * n, "audio_loss": aux["audio_loss"] * n,
            "stream_loss": aux["stream_loss"] * n, "num_target_tokens": n,
            "tokens": jnp.sum(micro["segment_ids"] > 0).astype(jnp.float32)}
    return sums, grads

  def _train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    with self._ctx():
      trainable, frozen = optim.split(state.params, self.mask)
      a = batch["input_ids"].shape[0]
      if a == 1:
        sums, grads = self._micro(trainable, frozen, jax.tree.map(lambda x: x[0], batch))
      else:
        def body(carry, micro):
          s, g = self._micro(trainable, frozen, micro)
          return jax.tree.map(jnp.add, carry, (s, g)), None
        zeros = jax.eval_shape(self._micro, trainable, frozen, jax.tree.map(lambda x: x[0], batch))
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
        (sums, grads), _ = jax.lax.scan(body, zeros, batch)
      denom = jnp.maximum(sums["num_target_tokens"], 1.0)
      grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
      updates, new_opt = self.optimizer.update(grads, state.opt_state, trainable)
      new_trainable = optax.apply_updates(trainable, updates)
      grad_norm = optax.global_norm(grads)
      loss = sums["loss"] / denom
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      step = state.step + 1
      nf = state.nonfinite
      new_state = TrainState(
          step=step,
          params=keep(optim.merge(new_trainable, frozen), state.params),
          opt_state=keep(new_opt, state.opt_state),
          nonfinite={"count": nf["count"] + (~ok).astype(jnp.int32),
                     "first_step": jnp.where((nf["first_step"] < 0) & ~ok, step, nf["first_step"])})
      metrics = {k: v / denom for k, v in sums.items() if k not in ("num_target_tokens", "tokens")}
      metrics.update(grad_norm=grad_norm, lr=self.schedule(state.step - nf["count"]),
                     num_target_tokens=sums["num_target_tokens"], tokens=sums["tokens"],
                     finite=ok, nonfinite_count=new_state.nonfinite["count"],
                     nonfinite_first_step=new_state.nonfinite["first_step"])
      return new_state, metrics

  def _eval_step(self, params, batch):
    """Weighted loss sums of one eval batch [A, B, ...] (A micro-batches summed)."""
    with self._ctx():
      def one(micro):
        loss, aux = self.model.apply({"params": params}, micro)
        n = aux["num_target_tokens"]
        return {"loss": loss * n, "text_loss": aux["text_loss"] * n, "audio_loss": aux["audio_loss"] * n,
                "stream_loss": aux["stream_loss"] * n, "num_target_tokens": n}
      out = jax.lax.map(one, batch)
      return jax.tree.map(lambda x: jnp.sum(x, axis=0), out)

  @functools.cached_property
  def train_step(self):
    rep = sharding.replicated(self.mesh)
    return jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

  @functools.cached_property
  def eval_step(self):
    rep = sharding.replicated(self.mesh)
    return jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_sharding),
                   out_shardings=rep)

  # ---- host batches ----

  def host_to_device(self, micro_batches: list[Mapping[str, np.ndarray]]) -> dict:
    """A list of A process-local numpy batches -> the global [A, B, ...] device batch."""
    stacked = stack_micro_batches(micro_batches, self.abstract_batch, host_batch_rows(self.config, self.mesh))
    return sharding.place_batch(stacked, self.batch_sharding, self.abstract_batch)

  @functools.cached_property
  def abstract_eval_batch(self) -> dict:
    return make_abstract_batch(self.config, self.mesh, micro_steps=1)

  def host_to_device_eval(self, batch: Mapping[str, np.ndarray]) -> dict:
    """One process-local eval batch -> the global [1, B, ...] device batch."""
    stacked = stack_micro_batches([batch], self.abstract_eval_batch, host_batch_rows(self.config, self.mesh))
    return sharding.place_batch(stacked, self.batch_sharding, self.abstract_eval_batch)


class _MeshRules:
  """Inside a traced step: the abstract mesh + logical rules, so the model's
  `nn.with_logical_constraint` annotations resolve against the training mesh."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh

  def __enter__(self):
    self._stack = contextlib.ExitStack()
    self._stack.enter_context(jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh))
    self._stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
    return self

  def __exit__(self, *exc):
    return self._stack.__exit__(*exc)


def stack_micro_batches(batches: list[Mapping[str, np.ndarray]], abstract_batch: Mapping, rows: int) -> dict:
  """Stacks A host batches to [A, rows, ...]; adds empty audio keys when a batch has none; checks shapes."""
  a = abstract_batch["input_ids"].shape[0]
  if len(batches) != a:
    raise ValueError(f"need {a} micro-batches per step (config.optim.grad_accum_steps), got {len(batches)}")
  out = {}
  for k, spec in abstract_batch.items():
    want = (rows,) + tuple(spec.shape[2:])
    parts = []
    for i, b in enumerate(batches):
      if k not in b:
        if k == "audio_rows":
          x = np.full(want, -1, spec.dtype)
        elif k in ("audio_mel", "audio_chunk_lens"):
          x = np.zeros(want, spec.dtype)
        else:
          raise ValueError(f"micro-batch {i} lacks key {k!r} (has {sorted(b)})")
      else:
        x = np.asarray(b[k])
        if k in ("audio_mel", "audio_chunk_lens") and x.ndim >= 2 and x.shape[1] < want[1]:
          pad = [(0, 0)] * x.ndim
          pad[1] = (0, want[1] - x.shape[1])
          x = np.pad(x, pad)  # fewer encoder windows than the max: zero windows are unused
      if tuple(x.shape) != want:
        raise ValueError(f"batch key {k!r} has per-process shape {tuple(x.shape)}, expected {want} "
                         f"(per_device_batch x local devices, data.seq_len, data.max_audio_windows)")
      parts.append(x.astype(spec.dtype, copy=False))
    out[k] = np.stack(parts)
  extra = set().union(*[set(b) for b in batches]) - set(abstract_batch)
  if extra:
    raise ValueError(f"batch has keys {sorted(extra)} the train step does not take "
                     f"(is data.max_audio_windows 0 while the data has audio?)")
  return out


def build_train_step(config, mesh: Mesh):
  """(train_step_jitted, abstract_state, state_shardings, abstract_batch, batch_sharding). See module doc."""
  s = Setup(config, mesh)
  return s.train_step, s.abstract_state, s.state_shardings, s.abstract_batch, s.batch_sharding
