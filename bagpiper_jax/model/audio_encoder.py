"""Qwen3-Omni audio tower ("AuT") in Flax Linen, numerically equal to transformers'
`Qwen3OmniMoeAudioEncoder` (the executable reference, docs/model.md#audio-encoder-frozen).

Layout. The reference takes a ragged batch (concatenated mel + lengths) and builds everything
dynamically; under jit we need fixed shapes, so the host cuts each audio into *windows* of
C = n_window_infer / (2 * n_window) = 8 chunks of F = 2 * n_window = 100 mel frames
(`bagpiper_jax.audio.mel_to_windows`). One window is exactly one attention window of the reference (its `cu_seqlens`
split every audio into runs of 8 chunks' worth of post-CNN frames), so attention never crosses a
window and a window never mixes two audios.

Per chunk (as the reference, which also runs the CNN chunk by chunk):
  three Conv2d(k3, s2, p1) + exact gelu over (mel, time), 1 -> H channels  (100 frames -> 13)
  conv_out Linear (no bias) on the flattened (channel, freq) features
  + sinusoidal position embedding of the frame index *within the chunk* (0..12)
Per window: the pre-LN transformer layers with full bidirectional attention over the valid frames
of the window, then ln_post, proj1, gelu, proj2.

Padding. The reference right-pads every chunk of the batch with zeros to the longest chunk
(`pad_sequence`) before the CNN; we always pad to F = 100. The two agree bit for bit whenever the
reference batch holds a full 100-frame chunk, which is always true for an audio of >= 100 frames
(its own full chunks set the pad length) and for any audio batched with such a one. Only an audio
shorter than 100 frames encoded *alone* (or with only other sub-100-frame audios) differs: there the
reference's conv edge padding replaces the gelu(bias) activations our longer zero padding yields just
past the chunk end, which changes the last one or two valid frames of that chunk. The reference is
itself batch-dependent there; we take the batch-independent choice that equals its common case.
The encoder zeroes mel columns past chunk_lens itself, so callers' padding content never matters.

Output frames of chunk c sit at [c*13, c*13 + conv_out_length(len_c)); the rest are padding
(`valid` False, zeroed). These are exactly the reference's `valid_indices` with
max_len_after_cnn = 13.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bagpiper_jax.model.config import AudioEncoderConfig, conv_out_length
from bagpiper_jax.model.layers import Proj, remat_policy

Dtype = jnp.dtype


def _exact_gelu(x):
  """torch's exact GELU, in its own erf form: x/2 (1 + erf(x/sqrt 2)). (jax.nn.gelu's exact form
  goes through erfc, whose TPU expansion is several times larger: on v5p-128 the encoder's two
  conv+gelu fusions took 760k of the step's 8.5M backend instructions; launch/README.md.)"""
  # In float32 and rounded once, as torch's kernel does for bf16 input (in bf16 arithmetic sqrt(1/2)
  # itself rounds to 0.70703125, and XLA:CPU rounds every intermediate; tests/test_audio_encoder.py).
  xf = x.astype(jnp.float32)
  return (0.5 * xf * (1 + jax.lax.erf(xf * np.float32(np.sqrt(0.5))))).astype(x.dtype)


# transformers' ACT2FN names used by the audio tower config -> jax functions.
_ACTIVATIONS = {
    "gelu": _exact_gelu,
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
_LN_EPS = 1e-5  # torch.nn.LayerNorm default (Flax's default is 1e-6).


def activation(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown model.audio_encoder.activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def sinusoid_position_embedding(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """[length, channels] float32, as transformers' SinusoidsPositionEmbedding (sin half, then cos half)."""
  if channels % 2:
    raise ValueError(f"audio encoder d_model must be even for the sinusoid embedding, got {channels}")
  log_inc = np.float32(np.log(max_timescale) / (channels // 2 - 1))
  inv = np.exp(-log_inc * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
  t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
  return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def conv_freq_bins(num_mel_bins: int) -> int:
  """Frequency bins left after the three stride-2 convolutions (128 -> 16)."""
  return conv_out_length(num_mel_bins)


def frame_valid_mask(chunk_lens, cfg: AudioEncoderConfig):
  """[..., C] valid mel frames per chunk -> [..., C*13] bool validity of the output frames."""
  per_chunk = conv_out_length(chunk_lens)
  k = cfg.frames_per_chunk_out
  valid = jnp.arange(k) < per_chunk[..., None]
  return valid.reshape(*chunk_lens.shape[:-1], chunk_lens.shape[-1] * k)


# ---------------------------------------------------------------------------------------------
# Flax modules.


def _init(axes, init=nn.initializers.lecun_normal()):
  return nn.with_logical_partitioning(init, axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _layer_norm(name, dtype, param_dtype):
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, param_dtype=param_dtype,
                      scale_init=_init(("norm",), nn.initializers.ones_init()),
                      bias_init=_zeros(("norm",)), name=name)


class _ProjParams(nn.Module):
  """The kernel and bias of a Proj over the last input axis, returned unapplied."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  param_dtype: Dtype

  @nn.compact
  def __call__(self):
    return (self.param("kernel", _init(self.axes), self.shape, self.param_dtype),
            self.param("bias", _zeros(self.axes[1:]), self.shape[1:], self.param_dtype))


class EncoderAttention(nn.Module):
  """Bidirectional MHA with biases; `mask` [N, 1, S, S] bool says which keys each query may see."""

  cfg: AudioEncoderConfig
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.cfg
    h = cfg.num_heads
    if cfg.d_model % h:
      raise ValueError(f"audio encoder d_model {cfg.d_model} is not divisible by num_heads {h}")
    d = cfg.d_model // h
    # q, k and v as one matmul over the three kernels stacked (same parameters as three Proj).
    params = [_ProjParams((x.shape[-1], h, d), ("enc_embed", "enc_heads", "enc_head_dim"), self.param_dtype,
                          name=f"{n}_proj")() for n in "qkv"]
    kernel = jnp.stack([p[0] for p in params], axis=1).astype(self.dtype)  # [E, 3, H, D]
    bias = jnp.stack([p[1] for p in params]).astype(self.dtype)  # [3, H, D]
    qkv = jnp.einsum("bse,ethd->tbshd", x.astype(self.dtype), kernel) + bias[:, None, None]
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return Proj((cfg.d_model,), _init(("enc_heads", "enc_head_dim", "enc_embed")), in_axes=2,
                bias_init=_zeros(("enc_embed",)), dtype=self.dtype, param_dtype=self.param_dtype,
                name="out_proj")(out)


class EncoderLayer(nn.Module):
  """Pre-LN block (Whisper style). Signature (carry, mask) -> (carry, None) for nn.scan."""

  cfg: AudioEncoderConfig
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    cfg, dt, pdt = self.cfg, self.dtype, self.param_dtype
    x = nn.with_logical_constraint(x, ("batch", "length", "enc_embed"))
    h = _layer_norm("self_attn_layer_norm", dt, pdt)(x)
    x = x + EncoderAttention(cfg, dt, pdt, name="self_attn")(h, mask)
    h = _layer_norm("final_layer_norm", dt, pdt)(x)
    h = nn.Dense(cfg.ffn_dim, dtype=dt, param_dtype=pdt, kernel_init=_init(("enc_embed", "enc_mlp")),
                 bias_init=_zeros(("enc_mlp",)), name="fc1")(h)
    h = nn.with_logical_constraint(activation(cfg.activation)(h), ("batch", "length", "enc_mlp"))
    h = nn.Dense(cfg.d_model, dtype=dt, param_dtype=pdt, kernel_init=_init(("enc_mlp", "enc_embed")),
                 bias_init=_zeros(("enc_embed",)), name="fc2")(h)
    return (x + h).astype(dt), None


class AudioEncoder(nn.Module):
  """mel [N, C, M, F], chunk_lens [N, C] -> (frames [N, C*13, output_dim], valid [N, C*13] bool).

  N windows (callers flatten any batch dims), C = cfg.chunks_per_window, M = cfg.num_mel_bins,
  F = cfg.chunk_frames; see the module docstring for the layout and the padding semantics.
  Param names mirror the torch module (conv2d1..3, conv_out, layers/..., ln_post, proj1, proj2);
  bagpiper_jax/convert/audio_tower.py maps them.
  """

  cfg: AudioEncoderConfig
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, mel, chunk_lens):
    cfg, dt, pdt = self.cfg, self.dtype, self.param_dtype
    n, c, m, f = mel.shape
    want = (cfg.chunks_per_window, cfg.num_mel_bins, cfg.chunk_frames)
    if (c, m, f) != want:
      raise ValueError(f"AudioEncoder expects mel [N, {want[0]}, {want[1]}, {want[2]}], got {mel.shape}")
    if tuple(chunk_lens.shape) != (n, c):
      raise ValueError(f"AudioEncoder expects chunk_lens [{n}, {c}], got {chunk_lens.shape}")
    hc = cfg.downsample_hidden_size

    # The reference zero-pads each chunk past its length, and the k3 convs do read one column past
    # the end; zeroing here makes the result independent of whatever the caller left in the padding.
    in_chunk = jnp.arange(f) < chunk_lens[..., None]  # [N, C, F]
    mel = jnp.where(in_chunk[:, :, None, :], mel, jnp.zeros((), mel.dtype))
    # CNN per chunk, NHWC with H = mel bins, W = time.
    x = mel.reshape(n * c, m, f, 1).astype(dt)
    for i in range(3):
      x = nn.Conv(hc, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dt, param_dtype=pdt,
                  kernel_init=_init((None, None, None, "enc_conv")), bias_init=_zeros(("enc_conv",)),
                  name=f"conv2d{i + 1}")(x)
      x = _exact_gelu(x)  # the reference's CNN uses F.gelu (erf form) whatever config.activation says
    # x: [N*C, freq, time, ch] -> [N*C, time, ch, freq], as torch's permute before it flattens
    # (ch, freq) channel-major; the conv_out kernel keeps both axes, [ch, freq, d_model].
    k = x.shape[2]
    if k != cfg.frames_per_chunk_out:
      raise AssertionError(f"CNN gave {k} frames per chunk, expected {cfg.frames_per_chunk_out}")
    x = x.transpose(0, 2, 3, 1)
    x = Proj((cfg.d_model,), _init(("enc_conv", None, "enc_embed")), in_axes=2, dtype=dt, param_dtype=pdt,
             name="conv_out")(x)
    pos = sinusoid_position_embedding(cfg.max_source_positions, cfg.d_model)[:k]
    x = x + jnp.asarray(pos, dt)[None]
    x = x.reshape(n, c * k, cfg.d_model)

    valid = frame_valid_mask(chunk_lens, cfg)  # [N, S]
    mask = (valid[:, None, :] & jnp.ones_like(valid)[:, :, None])[:, None]  # [N, 1, S(q), S(k)]
    layer = EncoderLayer
    if self.remat_policy != "none":
      layer = nn.remat(layer, policy=remat_policy(self.remat_policy), prevent_cse=False)
    stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast,), length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: "enc_layers"})
    x, _ = stack(cfg, dt, pdt, name="layers")(x, mask)

    x = _layer_norm("ln_post", dt, pdt)(x)
    x = nn.Dense(cfg.d_model, dtype=dt, param_dtype=pdt, kernel_init=_init(("enc_embed", "enc_mlp")),
                 bias_init=_zeros(("enc_mlp",)), name="proj1")(x)
    x = activation(cfg.activation)(x)
    x = nn.Dense(cfg.output_dim, dtype=dt, param_dtype=pdt, kernel_init=_init(("enc_embed", "audio_embed")),
                 bias_init=_zeros(("audio_embed",)), name="proj2")(x)
    x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
    return x, valid
