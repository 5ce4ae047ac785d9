"""The Flax audio tower equals transformers' Qwen3OmniMoeAudioEncoder, weights copied via the real rules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import torch
from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as qwen3_omni_cfg
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as qwen3_omni

from bagpiper_jax import audio
from bagpiper_jax.convert import audio_tower, rules
from bagpiper_jax.model import audio_encoder as ae
from bagpiper_jax.model.config import AudioEncoderConfig, conv_out_length, encoder_output_length

CFG = AudioEncoderConfig(d_model=32, num_layers=2, num_heads=4, ffn_dim=64, downsample_hidden_size=8,
                         output_dim=48)
# Partial chunk only; exactly one chunk; 2.5 chunks; one full window; one window + a 1-frame chunk;
# 10 chunks (two windows, the second partial).
LENGTHS = (37, 100, 250, 800, 801, 1000)


@pytest.fixture(scope="module")
def reference():
  """A tiny random torch tower with every tensor (LayerNorms included) randomised."""
  hf_cfg = qwen3_omni_cfg.Qwen3OmniMoeAudioEncoderConfig(
      num_mel_bins=CFG.num_mel_bins, encoder_layers=CFG.num_layers, encoder_attention_heads=CFG.num_heads,
      encoder_ffn_dim=CFG.ffn_dim, d_model=CFG.d_model, output_dim=CFG.output_dim,
      downsample_hidden_size=CFG.downsample_hidden_size, n_window=CFG.n_window,
      n_window_infer=CFG.n_window_infer, max_source_positions=CFG.max_source_positions,
      activation_function=CFG.activation, attn_implementation="eager")
  torch.manual_seed(0)
  model = qwen3_omni.Qwen3OmniMoeAudioEncoder(hf_cfg).eval()
  assert model.config._attn_implementation == "eager"  # pylint: disable=protected-access
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      base = 1.0 if ("norm" in name or "ln_post" in name) and name.endswith("weight") else 0.0
      t.copy_(base + 0.3 * torch.randn(t.shape, generator=gen))
  return model


@pytest.fixture(scope="module")
def params(reference):
  sd = reference.state_dict()
  return rules.from_torch_tensors(sd.__getitem__, audio_tower.audio_tower_rules(CFG, flax_root=()))


@functools.lru_cache(maxsize=None)
def _apply(dtype_name: str, remat_policy: str = "none"):
  model = ae.AudioEncoder(CFG, dtype=jnp.dtype(dtype_name), param_dtype=jnp.float32, remat_policy=remat_policy)
  return jax.jit(lambda p, mel, lens: model.apply({"params": p}, mel, lens))


def _audios(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((CFG.num_mel_bins, t)).astype(np.float32) for t in LENGTHS]


def _windows(mels):
  parts = [audio.mel_to_windows(m, CFG) for m in mels]
  counts = [w.shape[0] for w, _ in parts]
  return (np.concatenate([w for w, _ in parts]), np.concatenate([l for _, l in parts]), counts)


def _reference_frames(reference, mels):
  """Per-audio outputs of one reference call over all audios (it returns valid frames concatenated)."""
  with torch.no_grad():
    out = reference(torch.from_numpy(np.concatenate(mels, axis=1)),
                    torch.tensor([m.shape[1] for m in mels])).last_hidden_state.numpy()
  sizes = [encoder_output_length(m.shape[1], CFG.n_window) for m in mels]
  assert out.shape[0] == sum(sizes)
  return np.split(out, np.cumsum(sizes)[:-1])


def _per_audio(frames, valid, counts):
  frames, valid = np.asarray(frames, np.float32), np.asarray(valid)
  bounds = np.cumsum(counts)[:-1]
  return [f[v] for f, v in zip(np.split(frames, bounds), np.split(valid, bounds))]


def test_matches_reference_several_audios_in_one_call(reference, params):
  mels = _audios()
  want = _reference_frames(reference, mels)
  mel, lens, counts = _windows(mels)
  frames, valid = _apply("float32")(params, mel, lens)
  assert frames.shape == (mel.shape[0], CFG.frames_per_window_out, CFG.output_dim)
  assert valid.shape == frames.shape[:2] and valid.dtype == jnp.bool_
  got = _per_audio(frames, valid, counts)
  diffs = {t: float(np.abs(g - w).max()) for t, g, w in zip(LENGTHS, got, want)}
  print("max abs diff per audio length:", diffs)
  for t, g, w in zip(LENGTHS, got, want):
    assert g.shape == w.shape, (t, g.shape, w.shape)
  assert max(diffs.values()) < 1e-4, diffs
  assert float(np.abs(want[0]).max()) > 0.1  # the comparison is not between near-zero outputs
  # Padding frames are zeroed, not garbage.
  assert not np.asarray(frames)[~np.asarray(valid)].any()


def test_padding_content_is_ignored(params):
  """Whatever sits past chunk_lens in the mel (here noise, not zeros) does not change the output."""
  mel, lens, _ = _windows(_audios(seed=3))
  noisy = mel.copy()
  pad = np.arange(CFG.chunk_frames) >= lens[..., None]  # [N, C, F]
  noisy += np.where(pad[:, :, None, :], 5.0, 0.0).astype(np.float32)
  a, va = _apply("float32")(params, mel, lens)
  b, vb = _apply("float32")(params, noisy, lens)
  np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_valid_layout_matches_encoder_output_length(params):
  mels = _audios()
  mel, lens, counts = _windows(mels)
  _, valid = _apply("float32")(params, mel, lens)
  valid = np.asarray(valid)
  k = CFG.frames_per_chunk_out
  per_chunk = valid.reshape(*lens.shape, k)
  for w in range(lens.shape[0]):
    for c in range(lens.shape[1]):
      n = conv_out_length(int(lens[w, c])) if lens[w, c] else 0
      assert per_chunk[w, c].tolist() == [True] * n + [False] * (k - n), (w, c, lens[w, c])
  bounds = np.cumsum(counts)[:-1]
  for t, v, cnt in zip(LENGTHS, np.split(valid, bounds), counts):
    assert cnt == audio.num_windows(t, CFG)
    assert int(v.sum()) == encoder_output_length(t, CFG.n_window), t


def test_mel_to_windows_layout():
  rng = np.random.default_rng(5)
  for t in (1, 99, 100, 101, 800, 801, 1650):
    mel = rng.standard_normal((CFG.num_mel_bins, t)).astype(np.float32)
    win, lens = audio.mel_to_windows(mel, CFG)
    c, f = CFG.chunks_per_window, CFG.chunk_frames
    assert win.shape == (audio.num_windows(t, CFG), c, CFG.num_mel_bins, f) and lens.shape == win.shape[:2]
    assert lens.dtype == np.int32 and int(lens.sum()) == t
    flat = win.transpose(2, 0, 1, 3).reshape(CFG.num_mel_bins, -1)  # frame t at column t
    np.testing.assert_array_equal(flat[:, :t], mel)
    assert not flat[:, t:].any()
    # chunk_lens: full chunks, then the remainder, then zeros.
    full, rest = divmod(t, f)
    assert lens.reshape(-1).tolist() == [f] * full + ([rest] if rest else []) + [0] * (lens.size - full - bool(rest))
  assert audio.num_windows(800, CFG) == 1 and audio.num_windows(801, CFG) == 2
  with pytest.raises(ValueError, match="0 mel frames"):
    audio.mel_to_windows(np.zeros((CFG.num_mel_bins, 0), np.float32), CFG)
  with pytest.raises(ValueError, match=r"\[128, T\]"):
    audio.mel_to_windows(np.zeros((80, 10), np.float32), CFG)


def test_rules_round_trip_and_cover_every_param(reference, params):
  sd = {k: v.numpy() for k, v in reference.state_dict().items()}
  rl = audio_tower.audio_tower_rules(CFG, flax_root=())
  assert sorted(r.torch_key for r in rl) == sorted(sd)  # every tensor mapped, none invented
  back = dict(rules.to_torch_tensors(params, rl))
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  # Rules produce exactly the tree the Flax module initialises (same paths and shapes).
  init = ae.AudioEncoder(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, CFG.chunks_per_window,
                                                                      CFG.num_mel_bins, CFG.chunk_frames)),
                                   jnp.zeros((1, CFG.chunks_per_window), jnp.int32))
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(init["params"]))
  assert shapes == jax.tree.map(lambda x: x.shape, params)
  # The release layout prefix and Bagpiper's flax root.
  prefixed = audio_tower.audio_tower_rules(CFG, prefix=rules.AUDIO_TOWER_PREFIX)
  assert all(r.torch_key.startswith(rules.AUDIO_TOWER_PREFIX) and r.flax_path[0] == "audio_encoder"
             for r in prefixed)
  rules.check_tensors({rules.AUDIO_TOWER_PREFIX + k: v.shape for k, v in sd.items()}, prefixed)


def test_params_carry_logical_axis_names():
  init = ae.AudioEncoder(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, CFG.chunks_per_window,
                                                                      CFG.num_mel_bins, CFG.chunk_frames)),
                                   jnp.zeros((1, CFG.chunks_per_window), jnp.int32))
  leaves = jax.tree_util.tree_leaves_with_path(init["params"],
                                               is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, (name, leaf.names)
    assert leaf.value.dtype == jnp.float32, name
    if "'layers'" in name:
      assert leaf.names[0] == "enc_layers" and leaf.value.shape[0] == CFG.num_layers, (name, leaf.names)
  names = {n for _, leaf in leaves for n in leaf.names}
  assert {"enc_layers", "enc_embed", "enc_heads", "enc_mlp", "audio_embed", "norm"} <= names
  # Under the project's logical->mesh rules no param may use one mesh axis twice (an error at shard time).
  try:
    from bagpiper_jax import sharding  # pylint: disable=g-import-not-at-top
    mesh_of = dict(sharding.LOGICAL_RULES)
  except (ImportError, AttributeError) as e:
    pytest.skip(f"bagpiper_jax.sharding.LOGICAL_RULES unavailable: {e}")
  for path, leaf in leaves:
    unknown = [n for n in leaf.names if n is not None and n not in mesh_of]
    assert not unknown, (jax.tree_util.keystr(path), unknown)
    axes = [mesh_of[n] for n in leaf.names if n is not None and mesh_of[n] is not None]
    flat = [a for ax in axes for a in (ax if isinstance(ax, tuple) else (ax,))]
    assert len(flat) == len(set(flat)), (jax.tree_util.keystr(path), leaf.names, axes)


def test_bf16_and_remat_smoke(params):
  mels = _audios(seed=7)
  mel, lens, _ = _windows(mels)
  f32, valid = _apply("float32")(params, mel, lens)
  bf16, valid_bf16 = _apply("bfloat16")(params, mel, lens)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(valid_bf16))
  f32, bf16 = np.asarray(f32), np.asarray(bf16, np.float32)
  assert np.isfinite(bf16).all()
  rel = np.abs(bf16 - f32).max() / np.abs(f32).max()
  print("bf16 vs f32 max abs diff / max |f32|:", rel)
  assert rel < 0.1
  remat, _ = _apply("float32", "nothing_saveable")(params, mel, lens)
  np.testing.assert_allclose(np.asarray(remat), f32, atol=1e-5)


def test_bf16_gelu_rounds_once_as_torch():
  """On bf16 input torch's GELU computes in float32 and rounds once; so does ours. Where float32 erf
  agrees (|x| < 2.5 here) the results are bit-equal; further out float32 erf implementations differ
  (1 + erf(x) cancels for x < -3), by at most one bf16 ulp or 1e-6. (The former
  form, bf16 arithmetic with sqrt(1/2) rounded to 0.70703125, was off by up to 1/256 for |x| < 1 here.)"""
  x = np.random.RandomState(0).randn(100_000).astype(np.float32) * 3
  ref = torch.nn.functional.gelu(torch.from_numpy(x).to(torch.bfloat16))
  ordered = lambda bits: np.where(bits < 0, -32768 - bits, bits)  # bf16 bit patterns -> ulp steps
  ref_bits = ordered(ref.view(torch.int16).numpy().astype(np.int32))
  ours = ae._exact_gelu(jnp.asarray(x, jnp.bfloat16))  # pylint: disable=protected-access
  assert ours.dtype == jnp.bfloat16
  our_bits = ordered(np.asarray(jax.lax.bitcast_convert_type(ours, jnp.int16)).astype(np.int32))
  inner = np.abs(x) < 2.5
  np.testing.assert_array_equal(our_bits[inner], ref_bits[inner])
  ulps = np.abs(our_bits - ref_bits)
  off = np.abs(np.asarray(ours, np.float32) - ref.float().numpy())
  assert ((ulps <= 1) | (off <= 1e-6)).all(), (x[ulps > 1], off[ulps > 1])
