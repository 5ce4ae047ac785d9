"""Checkpoints: exact resume after SIGKILL (subprocesses, real Grain pipeline), clear errors.

Exact resume: run A trains 8 steps straight; run B trains with a checkpoint every 4 steps and
SIGKILLs itself after step 6; run C resumes B's workdir to step 8. Every logged loss and the final
params/optimizer state of A and B+C must be bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bagpiper_jax import checkpoint as ckpt_lib
from bagpiper_jax import train_state
from bagpiper_jax.data import slots as slots_lib
from bagpiper_jax.model import ModelConfig
from configs.tiny import for_tests as tiny_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = """
from configs.tiny import for_tests as tiny_train_config
def get_config():
  c = tiny_train_config(steps=8, seq_len=128, rows_per_device=2)
  c.data.synthetic = False
  c.data.train_sources = {sources!r}
  c.checkpoint.every_steps = 4
  c.checkpoint.async_save = True
  c.checkpoint.keep = 5
  return c
"""


def _train(config_path, workdir, *extra, kill_after_step=None):
  # A persistent compilation cache shared by the runs: the resumed run reuses the executable
  # (the same program, so results are unaffected) instead of compiling again.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(str(workdir)), "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = ([sys.executable, "-m", "bagpiper_jax.train"] if kill_after_step is None else
         [sys.executable, os.path.join(REPO, "tests", "kill_after_step.py"), str(kill_after_step)])
  return subprocess.Popen(cmd + [f"--config={config_path}", f"--workdir={workdir}", *extra], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(workdir):
  out = {}
  for rec in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))):
    if rec["kind"] == "train":
      out.setdefault(rec["step"], []).append(rec["step_losses"])
  return out


def _restore_raw(step_dir, item):
  with ocp.StandardCheckpointer() as c:
    return jax.device_get(c.restore(os.path.join(step_dir, item)))


def test_resume_after_sigkill_is_bit_exact(tmp_path):
  from data_pipeline.synthetic_records import write_tiny_sources  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_dict(tiny_train_config().model)
  sources = write_tiny_sources(str(tmp_path / "data"), cfg)
  config_path = tmp_path / "cfg.py"
  config_path.write_text(_CONFIG.format(sources=sources))
  a, b = tmp_path / "straight", tmp_path / "killed"
  pa = _train(config_path, a)
  pb = _train(config_path, b, kill_after_step=6)
  out_a, err_a = pa.communicate(timeout=600)
  out_b, err_b = pb.communicate(timeout=600)
  assert pa.returncode == 0, err_a[-3000:]
  assert pb.returncode == -9, (pb.returncode, err_b[-3000:])
  assert sorted(os.listdir(b / "checkpoints")) == ["4"]  # 6 was not a save step; 8 never came
  pc = _train(config_path, b)
  out_c, err_c = pc.communicate(timeout=600)
  assert pc.returncode == 0, err_c[-3000:]
  assert "resumed from step 4" in out_c

  la, lb = _losses(a), _losses(b)
  assert sorted(la) == list(range(1, 9)) and all(len(v) == 1 for v in la.values())
  assert sorted(lb) == list(range(1, 9))
  assert [len(lb[s]) for s in range(1, 9)] == [1, 1, 1, 1, 2, 2, 1, 1]  # steps 5, 6 ran twice
  for s in range(1, 9):
    for got in lb[s]:
      assert got == la[s][0], (s, got, la[s])  # exact float equality, not approx
  assert la[8][0][0] < la[1][0][0]

  pa_, pb_ = _restore_raw(a / "checkpoints" / "8", "params"), _restore_raw(b / "checkpoints" / "8", "params")
  ta, tb = _restore_raw(a / "checkpoints" / "8", "train"), _restore_raw(b / "checkpoints" / "8", "train")
  for x, y in zip(jax.tree.leaves(pa_) + jax.tree.leaves(ta), jax.tree.leaves(pb_) + jax.tree.leaves(tb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(ta["step"]) == 8
  # The data-iterator state was checkpointed too (Grain's JSON state, one file per data slot: 2 rows
  # per micro-batch, 1 row per slot), with the stream's description.
  data_dir = b / "checkpoints" / "8" / "data"
  for s in (0, 1):
    data = json.loads((data_dir / f"slot_{s}-of-2.json").read_text())
    assert data["format"] == "json" and data["state"]
  stream = json.loads((data_dir / "stream.json").read_text())
  assert (stream["num_slots"], stream["rows_per_slot"]) == (2, 1)
  assert sorted(stream["signature"]["train_sources"]) == sorted(json.loads(json.dumps(sources)))


# ---------------------------------------------------------------------------------------------
# Checkpointer unit tests on a small hand-made state (no model compile).


def _toy_state(v=1.0):
  return train_state.TrainState(
      step=jnp.asarray(3, jnp.int32),
      params={"w": jnp.full((4, 2), v, jnp.float32), "n": {"scale": jnp.ones((2,), jnp.float32)}},
      opt_state={"mu": jnp.full((4, 2), 0.5 * v, jnp.float32)},
      nonfinite={"count": jnp.asarray(0, jnp.int32), "first_step": jnp.asarray(-1, jnp.int32)})


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


KEY = slots_lib.process_key(0, 1)  # a per-process iterator state (no data slots) of 1 process


def _save(ck, step, state, data_state):
  return ck.save(step, state, {KEY: data_state}, slots_lib.stream_description(None, 1))


def _restore(ck, step, abstract, data=True):
  state, d = ck.restore(step, abstract, data_keys=[KEY] if data else None)
  return state, (d.parts[KEY] if d is not None else None)


def test_roundtrip_keep_last_k_and_data_state(tmp_path):
  c = tiny_train_config()
  c.checkpoint.keep = 2
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), c)
  for step in (1, 2, 3):
    assert _save(ck, step, _toy_state(step), {"next": step})
  _save(ck, 4, _toy_state(4), b"\x00grain-bytes\xff")
  ck.wait()
  assert ck.all_steps() == [3, 4]
  state, data = _restore(ck, 4, _abstract(_toy_state()))
  assert data == b"\x00grain-bytes\xff"
  np.testing.assert_array_equal(state.params["w"], np.full((4, 2), 4.0))
  np.testing.assert_array_equal(state.opt_state["mu"], np.full((4, 2), 2.0))
  state, data = _restore(ck, 3, _abstract(_toy_state()))
  assert data == {"next": 3} and int(state.step) == 3
  ck.close()
  # init_from: params only, from the run directory (latest step) or a step directory.
  p = ckpt_lib.load_params(str(tmp_path / "ck"), _abstract(_toy_state()).params)
  np.testing.assert_array_equal(p["w"], np.full((4, 2), 4.0))
  with pytest.raises(ckpt_lib.CheckpointError, match="init_from"):
    ckpt_lib.load_params(str(tmp_path / "nope"), _abstract(_toy_state()).params)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  c = tiny_train_config()
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), c)
  _save(ck, 5, _toy_state(), {"next": 5})
  ck.close()
  # Garble every data file of the params item.
  n = 0
  for root, _, files in os.walk(tmp_path / "ck" / "5" / "params"):
    for f in files:
      if "manifest" in f or f.startswith("d") or "ocdbt" in root:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
        n += 1
  assert n
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), c)
  assert ck.latest_step() == 5  # it is there: resume must not silently start fresh
  # The integrity record names the first garbled file and its sizes.
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint file .*/5/params/.* has 7 bytes"):
    _restore(ck, 5, _abstract(_toy_state()))
  # Without the record (a run killed right after the save) Orbax's own error still stops the resume.
  os.remove(tmp_path / "ck" / "5" / ckpt_lib.SEAL)
  with pytest.raises(ckpt_lib.CheckpointError, match="Refusing to start fresh"):
    _restore(ck, 5, _abstract(_toy_state()))


def test_missing_data_state_and_incompatible_config_are_errors(tmp_path):
  c = tiny_train_config()
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), c)
  _save(ck, 2, _toy_state(), {"next": 2})
  ck.close()
  other = tiny_train_config()
  other.model.hidden_size = 32
  with pytest.raises(ckpt_lib.CheckpointError, match="model.hidden_size: checkpoint 64 vs config 32"):
    _restore(ckpt_lib.Checkpointer(str(tmp_path / "ck"), other), 2, _abstract(_toy_state()))
  os.remove(tmp_path / "ck" / "2" / "data" / "process_0-of-1.json")
  with pytest.raises(ckpt_lib.CheckpointError, match="process_0-of-1.json"):
    _restore(ckpt_lib.Checkpointer(str(tmp_path / "ck"), c), 2, _abstract(_toy_state()))
  # Arrays alone still restore (e.g. onto another process count); the iterator state is then None.
  state, data = _restore(ckpt_lib.Checkpointer(str(tmp_path / "ck"), c), 2, _abstract(_toy_state()), data=False)
  assert data is None and int(state.step) == 3
  # Shape mismatch against the abstract state (e.g. an edited model file): clear error too.
  bad = _abstract(_toy_state())
  bad = bad.replace(params={"w": jax.ShapeDtypeStruct((8, 2), jnp.float32), "n": bad.params["n"]})
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck2"), c)
  _save(ck, 1, _toy_state(), None)
  ck.wait()
  with pytest.raises(ckpt_lib.CheckpointError, match="could not be restored"):
    _restore(ck, 1, bad)
  ck.close()
