"""`release_every_steps`: the training loop writes releases, multi-host safe.

The reference is the file-based export: `release.export_release` of the same step's checkpoint, in a
single process. A run of `bagpiper_jax.train` as 2 processes x 4 CPU devices (launch/local_multiprocess,
gloo; mesh fsdp=4 x tensor=2, so every parameter is split across both processes) writes
releases/<step>/ from its live, sharded state; every tensor file, config.json, the tokenizer files and
generation_config.json must be byte-identical to the single-process export of its checkpoint.
"""

from __future__ import annotations

import json
import os
import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bagpiper_jax import codec as codec_lib
from bagpiper_jax import config_lib
from bagpiper_jax.convert import release, release_action
from bagpiper_jax.model.config import ModelConfig
from launch import local_multiprocess
from test_release_assets import base_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_live_source_reads_layers_rows_and_whole_leaves():
  mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  rng = np.random.default_rng(0)
  stacked = rng.standard_normal((3, 5, 4)).astype(np.float32)
  big = rng.standard_normal((11, 6)).astype(np.float32)
  put = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("fsdp")))
  src = release_action.LiveParamsSource({"layers": {"k": put(stacked)}, "emb": {"e": put(big)},
                                         "s": {"x": np.float32(2.0)}}, block_bytes=4 * 6 * 4)  # 4 rows per block
  assert src.info(("emb", "e")).shape == (11, 6) and src.info(("layers", "k")).dtype == np.float32
  np.testing.assert_array_equal(src.read(("layers", "k"), 2), stacked[2])
  np.testing.assert_array_equal(src.read(("emb", "e")), big)  # blocks 0-3, 4-7, 7-10 (last overlaps)
  assert float(src.read(("s", "x"))) == 2.0


@pytest.mark.timeout(900)
def test_two_process_release_equals_single_process_export(tmp_path):
  tok = base_tokenizer(str(tmp_path / "tok"))
  xc = codec_lib.build_tiny_xcodec(str(tmp_path / "xcodec"), seed=0)
  wd = tmp_path / "run"
  args = ["--config=configs/tiny.py", f"--workdir={wd}", "--config.data.demo=False", "--config.data.synthetic=True",
          "--config.data.seq_len=128", "--config.data.max_audio_windows=1", "--config.data.per_device_batch=1",
          "--config.train_steps=2", "--config.log_every_steps=1", "--config.eval_every_steps=0",
          "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False",
          "--config.optim.warmup_steps=1",
          "--config.mesh.ici.fsdp=4", "--config.mesh.ici.tensor=2", "--config.release_every_steps=2",
          f"--config.release.tokenizer={tok}", f"--config.release.codec={xc}",
          "--config.release.max_shard_size=500KB"]
  r = local_multiprocess.launch("bagpiper_jax.train", args, num_processes=2, devices_per_process=4, timeout=800,
                                echo=False, cwd=REPO)
  assert r.ok, f"exit codes {r.returncodes}\n" + "\n".join(o[-4000:] for o in r.outputs)
  assert "release step 2:" in r.outputs[0] and "release step 2:" not in r.outputs[1]  # process 0 writes
  live = wd / "releases" / "2"
  assert (live / "release.json").exists() and not (wd / "releases" / "2.partial").exists()

  # The same step exported from its checkpoint, in this (single) process.
  ref = tmp_path / "ref"
  summary = release.export_release(str(wd), str(ref), step=2)
  assert summary["step"] == 2 and summary["codec_tensors"] > 100
  names = sorted(os.listdir(ref))
  assert names == sorted(os.listdir(live))
  # The run's release.max_shard_size (500 KB) is the default of the export from its checkpoint too.
  assert len([n for n in names if n.startswith("model-") and n.endswith(".safetensors")]) >= 3
  for n in names:
    if n == "release.json":  # says where each came from (a checkpoint path vs the live state)
      continue
    assert (live / n).read_bytes() == (ref / n).read_bytes(), n
  a, b = json.loads((live / "release.json").read_text()), json.loads((ref / "release.json").read_text())
  assert a["files"] == b["files"] and a["total_bytes"] == b["total_bytes"] and a["step"] == b["step"] == 2


def test_a_run_that_cannot_release_fails_before_training(tmp_path):
  """release_every_steps > 0 without a known tokenizer/codec: the action refuses at set-up."""
  c = config_lib.base_config("pretrain")
  c.release_every_steps = 10
  setup = types.SimpleNamespace(cfg=ModelConfig())
  with pytest.raises(ValueError, match="cannot tell which tokenizer made the data.*--tokenizer"):
    release_action.ReleaseAction(c, setup, str(tmp_path))
  c.release_every_steps = 0  # off: nothing resolved, nothing required
  assert not release_action.ReleaseAction(c, setup, str(tmp_path)).due(10, last=True)
