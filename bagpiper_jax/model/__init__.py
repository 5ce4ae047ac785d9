"""Flax model: Qwen3 decoder, multi-stream head and loss, Qwen3-Omni audio tower, adapter."""

from bagpiper_jax.model.bagpiper import Bagpiper
from bagpiper_jax.model.config import AudioEncoderConfig, ModelConfig

__all__ = ["Bagpiper", "AudioEncoderConfig", "ModelConfig"]
