"""Shared test fixtures: tiny configs, a reference torch Qwen3 built from them, jitted model init, and
the XLA flags of the suite (inherited by the subprocesses its tests start)."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA:CPU spends most of this suite's time in LLVM's optimisation passes over programs that then run a
# few times on tiny shapes: without them (XLA's backend optimisation level 0) a typical test compiles in
# half the time. For the suite only; the product, its commands and its benchmarks keep XLA's defaults,
# and CI runs the README's main command outside the suite with them.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0"
if SUITE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from bagpiper_jax.model import Bagpiper  # noqa: E402
from bagpiper_jax.model.config import AudioEncoderConfig, ModelConfig  # noqa: E402


def xla_flags(*flags: str) -> str:
  """The suite's XLA_FLAGS plus `flags`, for a subprocess's environment."""
  return " ".join([os.environ["XLA_FLAGS"], *flags])


def with_default_xla_optimisation(env: dict) -> dict:
  """`env` (a subprocess's environment) without the suite's flags: for commands whose time goes into
  running steps rather than compiling them (the README's main command, the benchmark), which run
  slower without LLVM's optimisations than they compile faster."""
  flags = env.get("XLA_FLAGS", "").replace(SUITE_XLA_FLAGS, "").strip()
  return {k: v for k, v in env.items() if k != "XLA_FLAGS"} | ({"XLA_FLAGS": flags} if flags else {})


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


def init_params(cfg: ModelConfig, batch, seed: int = 0):
  """Bagpiper(cfg)'s initial params (unboxed) for `batch`, from one compiled program.

  The same random bits as the eager `Bagpiper(cfg).init(jax.random.PRNGKey(seed), batch)`; the values
  agree to float rounding (within 1e-7 for the tiny config: the fused program rounds the bits-to-normal
  transform differently). Eagerly, each of init's ops compiles a program of its own (~20 s on XLA:CPU).
  The batch is closed over, so the model's checks on its concrete values still run.
  """
  model = Bagpiper(cfg)
  return jax.jit(lambda key: nn.meta.unbox(model.init(key, batch)["params"]))(jax.random.PRNGKey(seed))
