"""TensorRules for the Qwen3-Omni audio tower: transformers' `Qwen3OmniMoeAudioEncoder.state_dict()`
names <-> the Flax `AudioEncoder` tree (bagpiper_jax/model/audio_encoder.py).

Every persistent tensor is mapped; the only buffer of the torch module,
`positional_embedding.positional_embedding`, is non-persistent (absent from the state dict) and is
recomputed in Flax, so there is nothing to skip silently.
"""

from __future__ import annotations

from bagpiper_jax.convert.tensor_rule import TensorRule, dense, same
from bagpiper_jax.model.audio_encoder import conv_freq_bins
from bagpiper_jax.model.config import AudioEncoderConfig


def _conv2d():
  """torch Conv2d weight OIHW <-> Flax Conv kernel HWIO (H = mel, W = time in both)."""
  return (lambda w: w.transpose(2, 3, 1, 0).copy()), (lambda k: k.transpose(3, 2, 0, 1).copy())


def _reshape(torch_shape: tuple[int, ...], flax_shape: tuple[int, ...]):
  """Pure reshape, e.g. an attention bias [H*Dh] <-> [H, Dh]."""
  return (lambda b: b.reshape(flax_shape)), (lambda b: b.reshape(torch_shape))


def audio_tower_rules(enc_cfg: AudioEncoderConfig, prefix: str = "",
                      flax_root: tuple[str, ...] = ("audio_encoder",)) -> list[TensorRule]:
  """One rule per tensor of the torch audio tower, in state-dict order.

  `prefix` is prepended to the torch names (e.g. rules.AUDIO_TOWER_PREFIX for the Bagpiper release
  layout, "thinker.audio_tower." for a Qwen3-Omni checkpoint); `flax_root` is where the encoder
  sits in the Flax param tree (() for a standalone AudioEncoder).
  """
  D, H, Fd, Hc, O = (enc_cfg.d_model, enc_cfg.num_heads, enc_cfg.ffn_dim, enc_cfg.downsample_hidden_size,
                     enc_cfg.output_dim)
  Dh = D // H
  Fq = conv_freq_bins(enc_cfg.num_mel_bins)
  root = tuple(flax_root)

  def rule(name, path, shape, fns, layer=None):
    return TensorRule(f"{prefix}{name}", root + path, layer, shape, *fns)

  rules = []
  for i, c_in in ((1, 1), (2, Hc), (3, Hc)):
    rules.append(rule(f"conv2d{i}.weight", (f"conv2d{i}", "kernel"), (Hc, c_in, 3, 3), _conv2d()))
    rules.append(rule(f"conv2d{i}.bias", (f"conv2d{i}", "bias"), (Hc,), same()))
  # torch flattens conv features as index ch * Fq + freq; the Flax kernel keeps [ch, freq, D].
  rules.append(rule("conv_out.weight", ("conv_out", "kernel"), (D, Hc * Fq), dense((Hc, Fq), (D,))))

  per_layer = []
  for p in ("q", "k", "v"):
    per_layer += [
        (f"self_attn.{p}_proj.weight", ("self_attn", f"{p}_proj", "kernel"), (D, D), dense((D,), (H, Dh))),
        (f"self_attn.{p}_proj.bias", ("self_attn", f"{p}_proj", "bias"), (D,), _reshape((D,), (H, Dh))),
    ]
  per_layer += [
      ("self_attn.out_proj.weight", ("self_attn", "out_proj", "kernel"), (D, D), dense((H, Dh), (D,))),
      ("self_attn.out_proj.bias", ("self_attn", "out_proj", "bias"), (D,), same()),
      ("self_attn_layer_norm.weight", ("self_attn_layer_norm", "scale"), (D,), same()),
      ("self_attn_layer_norm.bias", ("self_attn_layer_norm", "bias"), (D,), same()),
      ("fc1.weight", ("fc1", "kernel"), (Fd, D), dense((D,), (Fd,))),
      ("fc1.bias", ("fc1", "bias"), (Fd,), same()),
      ("fc2.weight", ("fc2", "kernel"), (D, Fd), dense((Fd,), (D,))),
      ("fc2.bias", ("fc2", "bias"), (D,), same()),
      ("final_layer_norm.weight", ("final_layer_norm", "scale"), (D,), same()),
      ("final_layer_norm.bias", ("final_layer_norm", "bias"), (D,), same()),
  ]
  for i in range(enc_cfg.num_layers):
    for name, path, shape, fns in per_layer:
      rules.append(rule(f"layers.{i}.{name}", ("layers",) + path, shape, fns, layer=i))

  rules += [
      rule("ln_post.weight", ("ln_post", "scale"), (D,), same()),
      rule("ln_post.bias", ("ln_post", "bias"), (D,), same()),
      rule("proj1.weight", ("proj1", "kernel"), (D, D), dense((D,), (D,))),
      rule("proj1.bias", ("proj1", "bias"), (D,), same()),
      rule("proj2.weight", ("proj2", "kernel"), (O, D), dense((D,), (O,))),
      rule("proj2.bias", ("proj2", "bias"), (O,), same()),
  ]
  return rules
