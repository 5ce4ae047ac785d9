"""Optimizer, learning-rate schedule and the trainable/frozen split, all from `config`.

Stages differ only by config (config_lib.py): `config.trainable.freeze` is a list of regexes over
'/'-joined parameter paths (e.g. 'layers/self_attn/q_proj/kernel'); a parameter matching any of
them is frozen. Frozen parameters are not differentiated at all and get NO optimizer state: the
train step splits the param tree into a trainable and a frozen part (`split`) and the optimizer
only ever sees the trainable part, so frozen weights stay bit-identical by construction. The
audio encoder is always frozen, whatever the config says (`ALWAYS_FROZEN`).

AdamW (docs/training.md): b1 0.9, b2 0.95, eps 1e-8, decoupled weight decay 3e-7 on matrices only (never on
norm scales or biases), global-norm clip 1.0, fp32 moments. Schedule: linear warmup from 0, then
cosine to `min_lr_ratio * lr` at `train_steps` (or constant). `freeze_text_embedding_rows` (warmup
option) zeroes the gradient AND the update of embedding rows [num_specials, codec_start), so the
pretrained Qwen3 text rows keep their values (weight decay included) while specials and codec rows
train.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import optax
from flax import traverse_util

from bagpiper_jax.model.config import ModelConfig

ALWAYS_FROZEN = ("audio_encoder/.*",)
EMBED_PATH = ("embed_tokens", "embedding")


def path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _patterns(config) -> list[re.Pattern]:
  pats = list(config.trainable.freeze) + list(ALWAYS_FROZEN)
  out = []
  for p in pats:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"config.trainable.freeze: bad regex {p!r}: {e}") from e
  return out


def trainable_mask(config, params: Mapping) -> dict:
  """Nested dict of bools, same structure as `params`: True = trained."""
  pats = _patterns(config)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: not any(p.fullmatch(path_str(k)) for p in pats) for k in flat})


def split(params: Mapping, mask: Mapping) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts holding only their own leaves (frozen subtrees vanish)."""
  flat, fmask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
  t = {k: v for k, v in flat.items() if fmask[k]}
  f = {k: v for k, v in flat.items() if not fmask[k]}
  return traverse_util.unflatten_dict(t), traverse_util.unflatten_dict(f)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def decay_mask(params: Mapping) -> dict:
  """Weight decay on matrices (kernels, embeddings) only; never on norm scales or biases."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: not (k[-1] in ("scale", "bias") or any("norm" in str(p) for p in k)) for k in flat})


def make_schedule(config) -> optax.Schedule:
  """lr as a function of the number of updates already applied (0 for the first update).

  The first update uses lr / warmup_steps (not 0) and the peak is reached at update warmup_steps.
  """
  base = _base_schedule(config)
  return lambda count: base(count + 1)


def _base_schedule(config) -> optax.Schedule:
  o = config.optim
  lr, warm, total = float(o.lr), int(o.warmup_steps), int(config.train_steps)
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warm, decay_steps=max(total, warm + 1),
        end_value=lr * float(o.min_lr_ratio))
  if o.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)], [warm])
  raise ValueError(f"config.optim.schedule must be 'cosine' or 'constant', got {o.schedule!r}")


def freeze_embedding_rows(start: int, stop: int) -> optax.GradientTransformation:
  """Zeroes rows [start, stop) of embed_tokens/embedding in the updates (no state)."""

  def update(updates, state, params=None):
    del params
    emb = updates
    for p in EMBED_PATH:
      if not isinstance(emb, Mapping) or p not in emb:
        return updates, state  # embedding frozen entirely or absent: nothing to do
      emb = emb[p]
    rows = jnp.arange(emb.shape[0])[:, None]
    keep = (rows < start) | (rows >= stop)
    flat = traverse_util.flatten_dict(updates)
    flat[EMBED_PATH] = jnp.where(keep, emb, jnp.zeros_like(emb))
    return traverse_util.unflatten_dict(flat), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config, model_cfg: ModelConfig) -> optax.GradientTransformation:
  """The transformation applied to the TRAINABLE param tree only (see `split`)."""
  o = config.optim
  row_mask = []
  if config.trainable.freeze_text_embedding_rows:
    row_mask = [freeze_embedding_rows(model_cfg.num_specials, model_cfg.codec_start)]
  return optax.chain(
      *row_mask,  # before the clip, so frozen rows do not count in the global norm
      optax.clip_by_global_norm(float(o.clip_norm)),
      optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), mu_dtype=jnp.float32),
      optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask),
      optax.scale_by_learning_rate(make_schedule(config)),
      *row_mask,  # after weight decay, so decay does not move the frozen rows either
  )
