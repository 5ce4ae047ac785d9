"""Checkpoint conversion between the Flax parameter tree and PyTorch/ESPnet/HF tensor names."""
