"""One table maps every Flax parameter to its PyTorch tensor name (ESPnet/HF names, verbatim).

A `TensorRule` says where one torch tensor lives in the Flax tree and how to transpose/reshape it.
Decoder layers are scanned in Flax (leading `layers` axis), so a per-layer torch tensor maps to
one slice `layer` of a stacked Flax array. Everything that copies weights (tests, init from HF,
release export, import of ESPnet checkpoints) goes through these rules; nothing else knows names.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from bagpiper_jax.convert import audio_tower
from bagpiper_jax.convert.tensor_rule import Array, TensorRule, dense, same
from bagpiper_jax.model.config import ModelConfig


def decoder_rules(cfg: ModelConfig, prefix: str = "") -> list[TensorRule]:
  """Qwen3 decoder + Bagpiper multi-stream I/O + adapter (not the audio tower)."""
  E, H, K, D, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size, cfg.vocab_size)
  rules = [
      TensorRule(f"{prefix}model.embed_tokens.weight", ("embed_tokens", "embedding"), None, (V, E), *same()),
      TensorRule(f"{prefix}model.norm.weight", ("norm", "scale"), None, (E,), *same()),
      TensorRule(f"{prefix}lm_head.weight", ("lm_head", "kernel"), None, (V, E), *dense((E,), (V,))),
  ]
  per_layer = [
      ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (H * D, E), dense((E,), (H, D))),
      ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (K * D, E), dense((E,), (K, D))),
      ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (K * D, E), dense((E,), (K, D))),
      ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (E, H * D), dense((H, D), (E,))),
      ("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), (D,), same()),
      ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), (D,), same()),
      ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (F, E), dense((E,), (F,))),
      ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (F, E), dense((E,), (F,))),
      ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (E, F), dense((F,), (E,))),
      ("input_layernorm.weight", ("input_layernorm", "scale"), (E,), same()),
      ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (E,), same()),
  ]
  for i in range(cfg.num_layers):
    for name, path, shape, fns in per_layer:
      rules.append(TensorRule(f"{prefix}model.layers.{i}.{name}", ("layers",) + path, i, shape, *fns))
  return rules


def bagpiper_io_rules(cfg: ModelConfig) -> list[TensorRule]:
  """Multi-stream output embedding and the audio adapter (ESPnet names)."""
  E, A, S = cfg.hidden_size, cfg.audio_encoder.output_dim, cfg.num_streams
  return [
      TensorRule("stream_emb.weight", ("stream_emb", "embedding"), None, (S, E), *same()),
      TensorRule("adaptor.continuous_audio.weight", ("adapter", "kernel"), None, (E, A), *dense((A,), (E,))),
      TensorRule("adaptor.continuous_audio.bias", ("adapter", "bias"), None, (E,), *same()),
  ]


AUDIO_TOWER_PREFIX = "multimodal_io_dict.continuous_audio.model.audio_tower."


def bagpiper_rules(cfg: ModelConfig, *, with_audio_tower: bool = True) -> list[TensorRule]:
  """Every tensor of the release layout (docs/release.md), codec excluded."""
  rules = decoder_rules(cfg) + bagpiper_io_rules(cfg)
  if with_audio_tower:
    rules += audio_tower.audio_tower_rules(cfg.audio_encoder, prefix=AUDIO_TOWER_PREFIX,
                                           flax_root=("audio_encoder",))
  return rules


# ---------------------------------------------------------------------------------------------
# Applying rules.


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def to_torch_tensors(params: Mapping, rules: Iterable[TensorRule]) -> Iterator[tuple[str, Array]]:
  """Yields (torch_key, numpy array) one tensor at a time, in rule order."""
  for r in rules:
    leaf = _get(params, r.flax_path)
    x = np.asarray(leaf if r.layer is None else leaf[r.layer])
    y = r.to_torch(x)
    if tuple(y.shape) != r.torch_shape:
      raise ValueError(f"{r.torch_key}: Flax {'/'.join(r.flax_path)} gives shape {y.shape}, "
                       f"expected {r.torch_shape}")
    yield r.torch_key, y


def check_tensors(available: Mapping[str, tuple[int, ...]], rules: Iterable[TensorRule]) -> None:
  """Raises ValueError listing every missing key and every shape mismatch at once."""
  rules = list(rules)
  missing = [r.torch_key for r in rules if r.torch_key not in available]
  wrong = [f"{r.torch_key}: got {tuple(available[r.torch_key])}, expected {r.torch_shape}"
           for r in rules if r.torch_key in available and tuple(available[r.torch_key]) != r.torch_shape]
  if missing or wrong:
    lines = []
    if missing:
      lines.append(f"{len(missing)} missing tensors: " + ", ".join(missing[:20]) +
                   (" ..." if len(missing) > 20 else ""))
    if wrong:
      lines.append(f"{len(wrong)} tensors with the wrong shape:\n  " + "\n  ".join(wrong[:20]))
    raise ValueError("checkpoint does not match the model config:\n" + "\n".join(lines))


def from_torch_tensors(get: Callable[[str], Array], rules: Iterable[TensorRule], *,
                       shapes: Mapping | None = None, num_layers: int | None = None,
                       dtype=None) -> dict:
  """Builds a nested Flax param dict from torch tensors fetched one at a time by `get(key)`.

  Stacked (scanned) leaves are allocated once and filled slice by slice, so peak memory is
  the output tree plus one tensor.
  """
  out: dict = {}
  rules = list(rules)
  depth = {}
  for r in rules:
    if r.layer is not None:
      depth[r.flax_path] = max(depth.get(r.flax_path, 0), r.layer + 1)
  for r in rules:
    x = r.to_flax(np.asarray(get(r.torch_key)))
    if dtype is not None:
      x = x.astype(dtype)
    node = out
    for p in r.flax_path[:-1]:
      node = node.setdefault(p, {})
    leaf = r.flax_path[-1]
    if r.layer is None:
      node[leaf] = x
    else:
      if leaf not in node:
        node[leaf] = np.zeros((num_layers or depth[r.flax_path],) + x.shape, x.dtype)
      node[leaf][r.layer] = x
  return out
