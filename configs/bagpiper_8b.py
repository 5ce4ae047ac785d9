"""Bagpiper 8B (Qwen3-8B-Base decoder, Qwen3-Omni audio tower). Stage after ':' (default pretrain).

  python -m bagpiper_jax.train --config=configs/bagpiper_8b.py:warmup --workdir=gs://...
"""

from bagpiper_jax import config_lib


def get_config(stage: str = "pretrain"):
  c = config_lib.base_config(stage or "pretrain")
  # c.model keeps the 8B defaults: vocab 160392 = 256 specials + 151936 text + 8 x 1025 codec.
  c.model.attention_impl = "splash"  # TPU Pallas flash attention with segment ids (use "xla" elsewhere)
  c.data.seq_len = 20_000 if c.stage == "sft" else 8192
  c.data.max_audio_windows = 32
  c.mesh.ici = dict(data=1, fsdp=-1, tensor=1, sequence=1)
  return c
