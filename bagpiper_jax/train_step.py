"""The train step and the eval step: pure functions of (layout, state, batch), jitted with shardings.

The batch always has a leading micro-batch axis: [A, B, ...] with A = config.optim.grad_accum_steps
and B = global rows per micro-batch (batch.global_rows; each process feeds batch.host_rows of them).
Gradient accumulation is a `lax.scan` over A inside the step, so one optimizer step is one compiled
program whatever A is.

The train step, in order (`train_step`):
  1. split params into trainable / frozen (optim.split; frozen = config.trainable.freeze + encoder);
  2. for each micro-batch: loss and grads of the TRAINABLE part only, weighted by its number of
     target positions (so accumulation equals one big batch);
  3. AdamW update of the trainable part (optim.make_optimizer; frozen params have no opt state;
     with optim.offload_state the state comes from host memory for it and goes back after);
  4. if loss or grad norm is not finite, the update is dropped (state kept, `nonfinite` counted,
     the first such step remembered); the host stops or goes on per config.nan_policy.

For AOT compilation (launch/aot_compile.py) the one entry point is `build_train_step(config, mesh)`:
it needs no concrete arrays and no devices beyond the mesh's, so `mesh` may be built from a TPU
topology description on a CPU host.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from bagpiper_jax import batch as batch_lib
from bagpiper_jax import optim, sharding
from bagpiper_jax.model import ModelConfig
from bagpiper_jax.train_state import StateLayout, TrainState


@contextlib.contextmanager
def mesh_rules(mesh: Mesh):
  """Inside a traced step: the abstract mesh + logical rules, so the model's
  `nn.with_logical_constraint` annotations resolve against the training mesh."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    yield


def _micro(layout: StateLayout, trainable, frozen, micro):
  """Per micro-batch: (weighted loss sum, aux sums, grads of the weighted sum)."""

  def loss_fn(tp):
    loss, aux = layout.model.apply({"params": optim.merge(tp, frozen)}, micro)
    return loss * aux["num_target_tokens"], aux

  (lsum, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  n = aux["num_target_tokens"]
  sums = {"loss": lsum, "text_loss": aux["text_loss"] * n, "audio_loss": aux["audio_loss"] * n,
          "stream_loss": aux["stream_loss"] * n, "num_target_tokens": n,
          "tokens": jnp.sum(micro["segment_ids"] > 0).astype(jnp.float32)}
  return sums, grads


def train_step(layout: StateLayout, state: TrainState, batch: Mapping[str, jax.Array]):
  """(state, batch [A, B, ...]) -> (new state, metrics). See the module docstring."""
  with mesh_rules(layout.mesh):
    trainable, frozen = optim.split(state.params, layout.mask)
    if batch["input_ids"].shape[0] == 1:
      sums, grads = _micro(layout, trainable, frozen, jax.tree.map(lambda x: x[0], batch))
    else:
      def body(carry, micro):
        s, g = _micro(layout, trainable, frozen, micro)
        return jax.tree.map(jnp.add, carry, (s, g)), None
      zeros = jax.eval_shape(functools.partial(_micro, layout), trainable, frozen,
                             jax.tree.map(lambda x: x[0], batch))
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
      (sums, grads), _ = jax.lax.scan(body, zeros, batch)
    denom = jnp.maximum(sums["num_target_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    opt_state = state.opt_state
    if layout.offload_opt_state:  # host memory -> HBM for the update (optim.offload_state)
      opt_state = jax.device_put(opt_state, layout.opt_device_shardings)
    with jax.named_scope("optimizer"):  # names these ops in profiles and compile logs
      updates, new_opt = layout.optimizer.update(grads, opt_state, trainable)
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
        opt_state=_to_host(layout, keep(new_opt, opt_state)),
        nonfinite={"count": nf["count"] + (~ok).astype(jnp.int32),
                   "first_step": jnp.where((nf["first_step"] < 0) & ~ok, step, nf["first_step"])})
    metrics = {k: v / denom for k, v in sums.items() if k not in ("num_target_tokens", "tokens")}
    metrics.update(grad_norm=grad_norm, lr=layout.schedule(state.step - nf["count"]),
                   num_target_tokens=sums["num_target_tokens"], tokens=sums["tokens"],
                   finite=ok, nonfinite_count=new_state.nonfinite["count"],
                   nonfinite_first_step=new_state.nonfinite["first_step"])
    return new_state, metrics


def _to_host(layout: StateLayout, opt_state):
  """The updated optimizer state back to host memory when optim.offload_state (else unchanged)."""
  if not layout.offload_opt_state:
    return opt_state
  return jax.device_put(opt_state, layout.state_shardings.opt_state)


def eval_step(layout: StateLayout, params, batch):
  """Weighted loss sums of one eval batch [A, B, ...] (A micro-batches summed)."""
  with mesh_rules(layout.mesh):
    def one(micro):
      loss, aux = layout.model.apply({"params": params}, micro)
      n = aux["num_target_tokens"]
      return {"loss": loss * n, "text_loss": aux["text_loss"] * n, "audio_loss": aux["audio_loss"] * n,
              "stream_loss": aux["stream_loss"] * n, "num_target_tokens": n}
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.lax.map(one, batch))


def jit_train_step(layout: StateLayout, batch_shardings):
  rep = sharding.replicated(layout.mesh)
  return jax.jit(lambda state, batch: train_step(layout, state, batch),
                 in_shardings=(layout.state_shardings, batch_shardings), out_shardings=(layout.state_shardings, rep),
                 donate_argnums=(0,))


def jit_eval_step(layout: StateLayout, batch_shardings):
  return jax.jit(lambda params, batch: eval_step(layout, params, batch),
                 in_shardings=(layout.param_shardings, batch_shardings), out_shardings=sharding.replicated(layout.mesh))


def abstract_batch(config, cfg: ModelConfig, mesh: Mesh, *, micro_steps: int | None = None) -> dict:
  """The step's global batch as ShapeDtypeStructs carrying their shardings."""
  shapes = batch_lib.abstract(config, cfg, mesh.size, micro_steps=micro_steps)
  shard = sharding.batch_sharding(shapes, mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard[k]) for k, v in shapes.items()}


def build_train_step(config, mesh: Mesh, cfg: ModelConfig | None = None):
  """(jitted step, abstract_state, state_shardings, abstract_batch, batch_shardings), nothing allocated:

      compiled = step.lower(abstract_state, abstract_batch).compile()
  """
  cfg = ModelConfig.from_dict(config.model) if cfg is None else cfg
  layout = StateLayout(config, mesh, cfg)
  batch = abstract_batch(config, cfg, mesh)
  shardings = {k: v.sharding for k, v in batch.items()}
  return jit_train_step(layout, shardings), layout.abstract_state, layout.state_shardings, batch, shardings
