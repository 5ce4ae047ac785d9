"""A tiny Bagpiper that trains in minutes on a CPU, on the generated demo data.

  python -m bagpiper_jax.train --config=configs/tiny.py            # pretrain (default)
  python -m bagpiper_jax.train --config=configs/tiny.py:warmup
"""

from bagpiper_jax import config_lib


def get_config(stage: str = "pretrain"):
  c = config_lib.base_config(stage or "pretrain")
  c.model = config_lib.model_config(
      text_vocab_size=1024,
      hidden_size=64,
      intermediate_size=192,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      dtype="float32",
      loss_chunk_size=128,
      audio_encoder=dict(
          d_model=32, num_layers=2, num_heads=4, ffn_dim=64, downsample_hidden_size=8, output_dim=48
      ),
  )
  c.data.demo = True
  c.data.seq_len = 512
  c.data.max_audio_windows = 4
  c.data.per_device_batch = 4
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.train_steps = 200
  c.checkpoint.every_steps = 100
  c.log_every_steps = 10
  c.eval_every_steps = 100
  c.eval_steps = 2
  c.sample_every_steps = 100
  c.sample.max_audio_steps = 400  # demo clips are at most ~7.5 s
  return c


def for_tests(stage: str = "pretrain", *, seq_len: int = 128, rows_per_device: int = 2,
              audio_windows: int = 1, steps: int = 8):
  """This config shrunk for tests and benchmarks: short rows, synthetic data, log every step, sync saves."""
  c = get_config(stage)
  c.data.demo = False
  c.data.synthetic = True
  c.data.seq_len = seq_len
  c.data.max_audio_windows = audio_windows
  c.data.per_device_batch = rows_per_device
  c.train_steps = steps
  c.optim.warmup_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.sample_every_steps = 0
  c.checkpoint.every_steps = steps
  c.checkpoint.async_save = False
  c.mesh.ici = dict(data=1, fsdp=-1, tensor=1, sequence=1)
  return c
