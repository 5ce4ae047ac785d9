"""Conversions stream: peak RSS stays under 2x the largest single tensor plus a fixed overhead.

Each conversion runs as its CLI in a fresh process, started by a small wrapper that reports the
child's ru_maxrss (RUSAGE_CHILDREN), so nothing this test process allocated is counted. The fixed
overhead is measured, not guessed: the same CLI converting a tiny model (imports, JAX, TensorStore,
Orbax). A conversion that held the model (or a whole 5 GB shard) in memory would fail the bound:
each model below is bigger than two copies of its largest tensor plus the slack (asserted).

Default run: ~100M parameters (largest tensor 83 MB). `pytest -m heavy`: ~1B parameters (largest
tensor 1.3 GB, the size class of the 8B embeddings; figures for the README).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bagpiper_jax.convert import params_io, rules, safetensors_io, streaming
from bagpiper_jax.model.config import AudioEncoderConfig, ModelConfig
from conftest import tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_TOWER = AudioEncoderConfig(d_model=64, num_layers=2, num_heads=4, ffn_dim=128, downsample_hidden_size=8,
                                 output_dim=128)
# ~103M params: vocab 40,456 x 512 embed/lm_head (83 MB each in fp32), 16 layers of 3.9M.
CFG_100M = ModelConfig(text_vocab_size=32000, hidden_size=512, intermediate_size=2048, num_layers=16, num_heads=8,
                       num_kv_heads=4, head_dim=64, audio_encoder=SMALL_TOWER)
# ~1.03B params: the real 160,392-row vocabulary x 2048 (1.31 GB each in fp32), 8 layers of 47M.
CFG_1B = ModelConfig(hidden_size=2048, intermediate_size=5632, num_layers=8, num_heads=16, num_kv_heads=8,
                     head_dim=128, audio_encoder=SMALL_TOWER)
SLACK = 64 * 2**20  # run-to-run noise of the fixed overhead

_WRAPPER = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:])\n"
            "print('CHILD_MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
            "sys.exit(r.returncode)\n")


def run_measured(module: str, *args: str) -> tuple[int, str]:
  """(peak RSS bytes of `python -m module args`, its stdout)."""
  r = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-m", module, *args], capture_output=True,
                     text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=1200)
  assert r.returncode == 0, (module, args, r.stdout[-2000:], r.stderr[-4000:])
  kib = int(re.search(r"CHILD_MAXRSS_KIB (\d+)", r.stdout).group(1))
  assert "peak RSS:" in r.stdout  # the CLI's own report (the README figure)
  return kib * 1024, r.stdout


def write_random_checkpoint(path, cfg: ModelConfig) -> int:
  """Random params written leaf by leaf (never all in memory). Returns the largest leaf slice bytes."""
  tree: dict = {}
  largest = 0
  for i, (p, s) in enumerate(sorted(streaming.expected_params(cfg).items())):
    dt = np.dtype(s.dtype)
    stacked = p[0] == "layers" or p[:2] == ("audio_encoder", "layers")
    if stacked:
      leaf = params_io.LazyArray.per_layer(
          s.shape, dt, lambda j, i=i, s=s: np.random.default_rng([i, j]).random(s.shape[1:], dtype=np.float32) - 0.5)
      largest = max(largest, int(np.prod(s.shape[1:])) * dt.itemsize)
    else:
      leaf = params_io.LazyArray.blocked(
          s.shape, dt, lambda lo, hi, i=i, s=s: np.random.default_rng([i, lo]).random(
              (hi - lo,) + tuple(s.shape[1:]), dtype=np.float32) - 0.5 if s.shape else np.float32(0.5))
      largest = max(largest, int(np.prod(s.shape)) * dt.itemsize)
    node = tree
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = leaf
  params_io.save_params(path, tree, cfg)
  return largest


def write_fake_qwen3(path, cfg: ModelConfig) -> None:
  """A Qwen3-layout bf16 checkpoint (text vocab) + config.json, streamed shard by shard."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  T, E = cfg.text_vocab_size, cfg.hidden_size
  rs = [dataclasses.replace(r, torch_shape=(T, E)) if r.torch_key in ("model.embed_tokens.weight", "lm_head.weight")
        else r for r in rules.decoder_rules(cfg)]
  plan = [safetensors_io.PlannedTensor(r.torch_key, r.torch_shape, ml_dtypes.bfloat16) for r in rs]
  gen = ((t.name, (np.random.default_rng(k).random(t.shape, dtype=np.float32) - 0.5).astype(ml_dtypes.bfloat16))
         for k, t in enumerate(plan))
  safetensors_io.write_sharded(path, plan, gen, max_shard_bytes=2 * 10**9)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"vocab_size": T, "hidden_size": E, "intermediate_size": cfg.intermediate_size,
               "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
               "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
               "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": False}, f)


def _config_file(path, cfg: ModelConfig) -> str:
  path.write_text("from bagpiper_jax import config_lib\n"
                  "def get_config(stage='pretrain'):\n"
                  "  c = config_lib.base_config(stage)\n"
                  f"  c.model = config_lib.model_config(**{cfg.to_dict()!r})\n"
                  "  return c\n")
  return str(path)


def conversions(tmp, cfg: ModelConfig) -> dict[str, int]:
  """Peak RSS of export (fp32 Orbax -> bf16 release + ESPnet .pt), import (-> fp32 Orbax), hf_init."""
  write_random_checkpoint(tmp / "ck", cfg)
  peaks = {}
  peaks["export"], out = run_measured("bagpiper_jax.convert.release", "export", f"--ckpt={tmp / 'ck'}",
                                      f"--out={tmp / 'rel'}", f"--espnet_pt={tmp / 'base.pt'}", "--no_codec",
                                      "--no_tokenizer")
  peaks["import"], _ = run_measured("bagpiper_jax.convert.release", "import", f"--src={tmp / 'rel'}",
                                    f"--out={tmp / 'back'}")
  write_fake_qwen3(tmp / "qwen3", cfg)
  peaks["hf_init"], _ = run_measured("bagpiper_jax.convert.hf_init", f"--config={_config_file(tmp / 'c.py', cfg)}",
                                     f"--qwen3={tmp / 'qwen3'}", "--random_audio_tower", f"--out={tmp / 'init'}")
  return peaks


def largest_tensor_bytes(cfg: ModelConfig) -> int:
  """Largest single tensor of the model in fp32 (a layer slice for scanned leaves)."""
  return max(int(np.prod(r.torch_shape)) * 4 for r in rules.bagpiper_rules(cfg))


def total_bytes(cfg: ModelConfig) -> int:
  return sum(int(np.prod(r.torch_shape)) * 4 for r in rules.bagpiper_rules(cfg))


def _check(tmp_path, cfg: ModelConfig, label: str):
  base = conversions(tmp_path / "tiny", tiny_model_config())  # fixed overhead per conversion
  peaks = conversions(tmp_path / "big", cfg)
  big = largest_tensor_bytes(cfg)
  mib = lambda b: f"{b / 2**20:.0f} MiB"
  report = {k: dict(peak=mib(v), overhead=mib(base[k]), over_overhead=mib(v - base[k])) for k, v in peaks.items()}
  print(f"\n{label}: params {total_bytes(cfg) / 4 / 1e6:.0f}M, fp32 {mib(total_bytes(cfg))}, largest tensor "
        f"{mib(big)}; peak RSS per conversion: {json.dumps(report)}")
  assert total_bytes(cfg) > 2 * big + SLACK  # so holding the whole model would break the bound
  for k, v in peaks.items():
    assert v <= base[k] + 2 * big + SLACK, (k, report[k], mib(big))
  # Sanity: the round trip through the release is exact at the bf16 rounding (one leaf checked).
  r1 = params_io.ParamsReader(tmp_path / "big" / "ck")
  r2 = params_io.ParamsReader(tmp_path / "big" / "back")
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  a, b = r1.read(("layers", "mlp", "up_proj", "kernel"), 3), r2.read(("layers", "mlp", "up_proj", "kernel"), 3)
  np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16).astype(np.float32), b)


@pytest.mark.heavy  # 45 s; the memory bound also has the ~1B version below
def test_peak_memory_100m(tmp_path):
  _check(tmp_path, CFG_100M, "~100M")


@pytest.mark.heavy
def test_peak_memory_1b(tmp_path):
  _check(tmp_path, CFG_1B, "~1B")
