"""bagpiper_jax: JAX/TPU-native pretraining and SFT for Bagpiper-style unified audio models."""

__version__ = "0.1.0"
