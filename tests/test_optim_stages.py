"""Optimizer, schedule and stage freezing (1 CPU device, tiny model, a few real train steps)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from bagpiper_jax import checkpoint as ckpt_lib
from bagpiper_jax import optim, sharding, train_loop, trainer
from bagpiper_jax.data import slots as slots_lib
from bagpiper_jax.model import ModelConfig
from bagpiper_jax.synthetic import SyntheticIterator
from configs.tiny import for_tests as tiny_train_config


def _flat(tree):
  return {optim.path_str(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


class _Run:
  """One compiled Setup, reused by several tests (compiles dominate CPU test time)."""

  def __init__(self, config):
    self.config = config
    self.mesh = sharding.make_mesh(config)
    self.setup = trainer.Setup(config, self.mesh)
    self.it = SyntheticIterator(self.setup.cfg, rows=self.setup.host_rows,
                                seq_len=config.data.seq_len, audio_windows=config.data.max_audio_windows)

  def fresh_state(self):
    return self.setup.layout.fresh_state()

  def steps(self, state, n, *, batches=None):
    losses = []
    for i in range(n):
      micro = batches[i] if batches else [next(self.it) for _ in range(self.config.optim.grad_accum_steps)]
      state, m = self.setup.train_step(state, self.setup.host_to_device(micro))
      losses.append((float(m["loss"]), float(m["grad_norm"])))
    return state, losses


@pytest.fixture(scope="module")
def pretrain_run():
  return _Run(tiny_train_config("pretrain", rows_per_device=4))


def _run(config_or_run, steps, *, batches=None):
  r = config_or_run if isinstance(config_or_run, _Run) else _Run(config_or_run)
  state = r.fresh_state()
  before = _flat(state.params)
  state, losses = r.steps(state, steps, batches=batches)
  return r.setup, state, before, _flat(state.params), losses


def test_schedule_warmup_then_cosine_to_min_ratio():
  c = tiny_train_config(steps=100)
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule, c.optim.min_lr_ratio = 1e-3, 10, "cosine", 0.3
  f = optim.make_schedule(c)
  assert float(f(0)) == pytest.approx(1e-4)  # first update: lr / warmup, not 0
  assert float(f(9)) == pytest.approx(1e-3)  # peak at update 10
  assert float(f(99)) == pytest.approx(3e-4, rel=1e-4)  # min ratio at the last step
  mid = float(f(54))
  assert 3e-4 < mid < 1e-3
  c.optim.schedule = "constant"
  g = optim.make_schedule(c)
  assert float(g(4)) == pytest.approx(5e-4) and float(g(50)) == pytest.approx(1e-3)
  c.optim.schedule = "linear?"
  with pytest.raises(ValueError, match="config.optim.schedule"):
    optim.make_schedule(c)


def test_weight_decay_mask_skips_norms_and_biases():
  params = {"layers": {"input_layernorm": {"scale": 1}, "mlp": {"up_proj": {"kernel": 1}},
                       "self_attn": {"q_norm": {"scale": 1}}},
            "adapter": {"kernel": 1, "bias": 1}, "norm": {"scale": 1}, "embed_tokens": {"embedding": 1}}
  m = {optim.path_str(k): v for k, v in traverse_util.flatten_dict(optim.decay_mask(params)).items()}
  assert m == {"layers/input_layernorm/scale": False, "layers/mlp/up_proj/kernel": True,
               "layers/self_attn/q_norm/scale": False, "adapter/kernel": True, "adapter/bias": False,
               "norm/scale": False, "embed_tokens/embedding": True}


def test_adamw_hyperparameters_match_spec():
  """One update on a toy tree equals optax.adamw with the reference numbers (docs/training.md) (+ clip), masked decay."""
  c = tiny_train_config()
  c.optim.schedule, c.optim.warmup_steps = "constant", 0
  params = {"w": {"kernel": np.full((3,), 2.0, np.float32)}, "n": {"scale": np.ones((3,), np.float32)}}
  grads = {"w": {"kernel": np.array([3.0, -4.0, 0.0], np.float32)}, "n": {"scale": np.ones((3,), np.float32)}}
  tx = optim.make_optimizer(c, ModelConfig.from_dict(c.model))
  up, _ = tx.update(grads, tx.init(params), params)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(c.optim.lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=3e-7,
                                mask=optim.decay_mask))
  want, _ = ref.update(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  adam = [s for s in jax.tree.leaves(tx.init(params), is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert all(x.dtype == np.float32 for x in jax.tree.leaves((adam.mu, adam.nu)))


def test_warmup_stage_freezes_decoder_layers_encoder_and_text_rows():
  c = tiny_train_config("warmup", steps=3)
  c.trainable.freeze_text_embedding_rows = True
  c.optim.lr = 1e-2
  s, state, before, after, _ = _run(c, 3)
  # Frozen params have no optimizer state at all.
  opt_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  assert opt_paths and not any("layers" in p or "audio_encoder" in p for p in opt_paths), opt_paths
  n_trainable = sum(1 for k in before if not (k.startswith("layers/") or k.startswith("audio_encoder/")))
  adam_leaves = [p for p in opt_paths if ".mu[" in p]
  assert len(adam_leaves) == n_trainable
  changed = [k for k in before if not np.array_equal(before[k], after[k])]
  frozen = [k for k in before if k.startswith("layers/") or k.startswith("audio_encoder/")]
  assert frozen and not set(frozen) & set(changed), set(frozen) & set(changed)
  for k in ("embed_tokens/embedding", "lm_head/kernel", "stream_emb/embedding", "adapter/kernel", "norm/scale"):
    assert k in changed, k
  # freeze_text_embedding_rows: ids [256, codec_start) keep their values; specials and codec rows train.
  e0, e1 = before["embed_tokens/embedding"], after["embed_tokens/embedding"]
  lo, hi = s.cfg.num_specials, s.cfg.codec_start
  np.testing.assert_array_equal(e0[lo:hi], e1[lo:hi])
  assert not np.array_equal(e0[:lo], e1[:lo])
  assert not np.array_equal(e0[hi:], e1[hi:])


def test_pretrain_stage_trains_layers_never_the_encoder(pretrain_run):
  _, _, before, after, _ = _run(pretrain_run, 2)
  enc = [k for k in before if k.startswith("audio_encoder/")]
  assert enc and all(np.array_equal(before[k], after[k]) for k in enc)
  assert not np.array_equal(before["layers/mlp/up_proj/kernel"], after["layers/mlp/up_proj/kernel"])
  assert not np.array_equal(before["embed_tokens/embedding"][256:1280], after["embed_tokens/embedding"][256:1280])


def test_bad_freeze_regex_is_an_error():
  c = tiny_train_config("pretrain")
  c.trainable.freeze = ["layerz/.*"]
  with pytest.raises(ValueError, match="layerz"):
    trainer.Setup(c, sharding.make_mesh(c))


def test_grad_accumulation_equals_one_big_batch(pretrain_run):
  """2 micro-batches of 2 rows == 1 batch of 4 rows (loss weighted by target positions)."""
  c2 = tiny_train_config(steps=1, rows_per_device=2)
  c2.optim.grad_accum_steps = 2
  big = next(pretrain_run.it)
  halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
  _, state1, p0, a1, l1 = _run(pretrain_run, 1, batches=[[big]])
  s2 = trainer.Setup(c2, pretrain_run.mesh)  # only its A=2 train step is compiled
  state, m = s2.train_step(pretrain_run.fresh_state(), s2.host_to_device(halves))
  a2, l2 = _flat(state.params), [(float(m["loss"]), float(m["grad_norm"]))]
  assert l1[0][0] == pytest.approx(l2[0][0], rel=1e-6)  # loss
  assert l1[0][1] == pytest.approx(l2[0][1], rel=1e-5)  # gradient norm (Adam hides a scale error)
  # The gradients themselves, element by element: Adam's first moment after one step is (1 - b1) g.
  g1, g2 = (_flat(optax.tree_utils.tree_get(s.opt_state, "mu")) for s in (state1, state))
  for k in g1:
    np.testing.assert_allclose(g2[k], g1[k], rtol=1e-5, atol=1e-6 * np.abs(g1[k]).max(), err_msg=k)
  # The updates: the first Adam update is lr * g / (|g| + eps), ~lr * sign(g). Where |g| is near eps it
  # amplifies float32 rounding in g by up to 1 / eps (two correct sums differ there), so compare
  # where |g| > 100 eps; the gradients above cover every element.
  lr, eps = float(optim.make_schedule(c2)(0)), float(c2.optim.eps)
  for k in a1:
    if k not in g1:  # frozen (no optimizer state): unchanged in both runs
      np.testing.assert_array_equal(a1[k], a2[k], err_msg=k)
      continue
    sure = np.abs(g1[k]) / (1.0 - float(c2.optim.b1)) > 100 * eps
    assert sure.sum() >= 0.5 * (g1[k] != 0).sum(), k  # most elements with a gradient are compared
    np.testing.assert_allclose((a1[k] - p0[k])[sure], (a2[k] - p0[k])[sure], atol=1e-3 * lr, rtol=0, err_msg=k)


def test_nonfinite_step_is_dropped_and_remembered(pretrain_run):
  c, s, it = pretrain_run.config.copy_and_resolve_references(), pretrain_run.setup, pretrain_run.it
  state = pretrain_run.fresh_state()
  state, _ = s.train_step(state, s.host_to_device([next(it)]))
  before = _flat(state.params)
  bad = next(it)
  bad["audio_mel"][:] = np.nan
  state, m = s.train_step(state, s.host_to_device([bad]))
  assert not np.isfinite(float(m["loss"])) and not bool(m["finite"])
  after = _flat(state.params)
  assert all(np.array_equal(before[k], after[k]) for k in before)
  assert int(state.step) == 2 and int(state.nonfinite["count"]) == 1
  assert int(state.nonfinite["first_step"]) == 2
  with pytest.raises(train_loop.NonFiniteError, match="step 2"):
    train_loop._check_finite(c, 2, None)  # pylint: disable=protected-access
  c.nan_policy = "skip"
  train_loop._check_finite(c, 2, None)  # pylint: disable=protected-access


def test_offloaded_optimizer_state_lives_on_the_host_and_changes_nothing(pretrain_run, tmp_path):
  """optim.offload_state: the Adam moments stay in host memory (pinned_host) between steps, the params
  on the device; two steps give bit-identical params and moments; a checkpoint restores them to the
  host again."""
  c = tiny_train_config("pretrain", rows_per_device=4)
  c.optim.offload_state = True
  r = _Run(c)
  batches = [[next(pretrain_run.it)] for _ in range(2)]
  ref, _ = pretrain_run.steps(pretrain_run.fresh_state(), 2, batches=batches)
  state = r.fresh_state()
  kinds = lambda tree: {x.sharding.memory_kind for x in jax.tree.leaves(tree)}
  assert kinds(state.opt_state) == {"pinned_host"} and kinds(state.params) == {"device"}
  state, _ = r.steps(state, 2, batches=batches)
  assert kinds(state.opt_state) == {"pinned_host"} and kinds(state.params) == {"device"}
  for got, want in ((state.params, ref.params), (state.opt_state, ref.opt_state)):
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
      np.testing.assert_array_equal(a, b)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), c)
  key = slots_lib.process_key(0, 1)
  ck.save(2, state, {key: {"next": 2}}, slots_lib.stream_description(None, 1))
  ck.wait()
  back, _ = ck.restore(2, r.setup.layout.abstract_state, data_keys=None)
  ck.close()
  assert kinds(back.opt_state) == {"pinned_host"}
  for a, b in zip(jax.tree.leaves(jax.device_get(back.opt_state)), jax.tree.leaves(jax.device_get(state.opt_state))):
    np.testing.assert_array_equal(a, b)
