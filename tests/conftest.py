"""Shared test fixtures: tiny configs and a reference torch Qwen3 built from them."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from bagpiper_jax.model.config import AudioEncoderConfig, ModelConfig  # noqa: E402


def tiny_model_config(**overrides) -> ModelConfig:
  base = dict(
      text_vocab_size=200, codebook_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32", param_dtype="float32",
      remat_policy="none", loss_chunk_size=8,
      audio_encoder=AudioEncoderConfig(d_model=16, num_layers=2, num_heads=2, ffn_dim=32,
                                       downsample_hidden_size=4, output_dim=24),
  )
  base.update(overrides)
  return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
  return tiny_model_config()


def randomize_torch_(module, seed: int = 0, std: float = 0.2) -> None:
  """Random values for every parameter (norm weights too), so a wrong mapping cannot hide."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
      else:
        p.copy_(std * torch.randn(p.shape, generator=g))


def hf_qwen3(cfg: ModelConfig, seed: int = 0):
  """transformers' Qwen3ForCausalLM with the decoder sizes of `cfg` and random weights (fp32, eager)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen3Config, Qwen3ForCausalLM  # pylint: disable=g-import-not-at-top
  hf_cfg = Qwen3Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, attention_bias=False,
      max_position_embeddings=cfg.max_position_embeddings, attn_implementation="eager")
  torch.manual_seed(seed)
  model = Qwen3ForCausalLM(hf_cfg).eval().to(torch.float32)
  randomize_torch_(model, seed)
  return model


def replace(cfg: ModelConfig, **kw) -> ModelConfig:
  return dataclasses.replace(cfg, **kw)
