"""Checkpoint integrity: damaged files are named at restore, temporary directories are never taken,
and --resume_from_step falls back to an older finished step once. Small hand-made states, no model.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagpiper_jax import checkpoint as ckpt_lib
from bagpiper_jax import paths, train_state
from bagpiper_jax.data import slots as slots_lib
from configs.tiny import for_tests as tiny_train_config

KEY = slots_lib.slot_key(0, 1)


def _state(v: float = 1.0):
  # A params array big enough to get a data file of its own in the OCDBT store.
  return train_state.TrainState(
      step=jnp.asarray(int(v), jnp.int32),
      params={"w": jnp.full((256, 64), v, jnp.float32), "n": {"scale": jnp.ones((2,), jnp.float32)}},
      opt_state={"mu": jnp.full((4, 2), 0.5 * v, jnp.float32)},
      nonfinite={"count": jnp.asarray(0, jnp.int32), "first_step": jnp.asarray(-1, jnp.int32)})


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state())


def _stream():
  return {"format": slots_lib.STREAM_FORMAT, "num_slots": 1, "rows_per_slot": 1, "signature": {}}


def _write(directory, steps, keep=5):
  c = tiny_train_config()
  c.checkpoint.keep = keep
  ck = ckpt_lib.Checkpointer(str(directory), c, async_save=True)
  for s in steps:
    assert ck.save(s, _state(s), {KEY: {"next": s}}, _stream())
  ck.close()
  return c


def _restore(directory, config, step):
  return ckpt_lib.Checkpointer(str(directory), config).restore(step, _abstract(), data_keys=[KEY])


def test_orbax_writes_the_files_we_require(tmp_path):
  """The table the verification relies on matches what this Orbax writes (fails on a layout change)."""
  _write(tmp_path / "ck", [1])
  step = tmp_path / "ck" / "1"
  for item, names in ckpt_lib.REQUIRED_FILES.items():
    for name in names:
      assert (step / item / name if item else step / name).is_file(), (item, name)
  sealed = json.loads((step / ckpt_lib.SEAL).read_text())["files"]
  assert f"data/{KEY}.json" in sealed and "params/_METADATA" in sealed
  assert any(k.startswith("params/") and "/d/" in k for k in sealed)


def _biggest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "params") for f in fs if "/d" in r]
  return max(files, key=os.path.getsize)


def test_truncated_shard_file_is_named(tmp_path):
  c = _write(tmp_path / "ck", [2])
  bad = _biggest_data_file(tmp_path / "ck" / "2")
  n = os.path.getsize(bad)
  with open(bad, "r+b") as f:
    f.truncate(n - 10)  # the last bytes only: the arrays may even read back, the file is still damaged
  with pytest.raises(ckpt_lib.CheckpointError, match=f"{bad} has {n - 10} bytes, {n} when it was written"):
    _restore(tmp_path / "ck", c, 2)


def test_missing_metadata_file_is_named(tmp_path):
  c = _write(tmp_path / "ck", [2])
  shutil.copytree(tmp_path / "ck", tmp_path / "ck2")
  os.remove(tmp_path / "ck" / "2" / "params" / "_METADATA")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"ck/2/params/_METADATA is missing"):
    _restore(tmp_path / "ck", c, 2)
  # Also without the integrity record (a run killed right after the save): the required-files table.
  os.remove(tmp_path / "ck2" / "2" / ckpt_lib.SEAL)
  os.remove(tmp_path / "ck2" / "2" / "_CHECKPOINT_METADATA")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"metadata file .*ck2/2/_CHECKPOINT_METADATA is missing"):
    _restore(tmp_path / "ck2", c, 2)


def test_unparsable_data_state_file_is_named(tmp_path):
  c = _write(tmp_path / "ck", [2])
  path = tmp_path / "ck" / "2" / "data" / f"{KEY}.json"
  text = path.read_text()
  path.write_text("{" + text[1:-1] + "?")  # same size: only parsing can tell
  os.remove(tmp_path / "ck" / "2" / ckpt_lib.SEAL)  # and no size record either
  with pytest.raises(ckpt_lib.CheckpointError, match=f"data-iterator state {path} does not parse"):
    _restore(tmp_path / "ck", c, 2)
  (tmp_path / "ck" / "2" / "data" / "stream.json").write_text("not json")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"data/stream.json does not parse"):
    ckpt_lib.Checkpointer(str(tmp_path / "ck"), c).read_stream(2)


def test_temporary_directories_are_never_taken(tmp_path):
  c = _write(tmp_path / "ck", [3])
  # A save killed mid-write leaves Orbax's temporary directory behind (here a complete-looking one).
  shutil.copytree(tmp_path / "ck" / "3", tmp_path / "ck" / "9.orbax-checkpoint-tmp-1234")
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), c)
  assert ck.latest_step() == 3 and ck.all_steps() == [3]
  assert ck.leftover_tmp_dirs() == ["9.orbax-checkpoint-tmp-1234"]
  state, data = ck.restore(3, _abstract(), data_keys=[KEY])
  assert int(state.step) == 3 and data.parts[KEY] == {"next": 3}
  assert paths.find_checkpoint(str(tmp_path / "ck")).step == 3


def test_resume_from_step_falls_back_once(tmp_path):
  c = _write(tmp_path / "run" / "checkpoints", [2, 4, 6])
  ckdir = tmp_path / "run" / "checkpoints"
  with open(_biggest_data_file(ckdir / "6"), "r+b") as f:
    f.truncate(100)
  ck = ckpt_lib.Checkpointer(str(ckdir), c)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"cut short.*--resume_from_step.*finished: \[2, 4, 6\]"):
    ck.restore(6, _abstract(), data_keys=[KEY])
  with pytest.raises(ckpt_lib.CheckpointError, match="no finished step 5"):
    ck.fall_back_to(5)
  assert ck.fall_back_to(4) == [6]
  assert ck.latest_step() == 4 and ck.all_steps() == [2, 4]
  moved = os.listdir(tmp_path / "run" / ckpt_lib.ABANDONED)
  assert "fallbacks.json" in moved and any(m.startswith("6-") for m in moved)
  state, data = ck.restore(4, _abstract(), data_keys=[KEY])
  np.testing.assert_array_equal(state.params["w"], np.full((256, 64), 4.0))
  # The run goes on past 6 again; a restart with the same command line does not fall back again.
  ck.save(6, _state(6), {KEY: {"next": 6}}, _stream())
  ck.save(8, _state(8), {KEY: {"next": 8}}, _stream())
  ck.close()
  ck = ckpt_lib.Checkpointer(str(ckdir), c)
  assert ck.fall_back_to(4) == [] and ck.latest_step() == 8
  assert ck.restore(8, _abstract(), data_keys=[KEY])[1].parts[KEY] == {"next": 8}
  ck.close()
