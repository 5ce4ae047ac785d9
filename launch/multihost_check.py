r"""Multi-host equivalence probe: K train steps on a fixed global batch stream, checkpoint, restore.

  python -m launch.local_multiprocess --num_processes=2 --devices_per_process=4 -- \
      launch.multihost_check --config=configs/tiny.py --out_dir=/tmp/mh2 --steps=4 --save_step=3
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m launch.multihost_check \
      --config=configs/tiny.py --out_dir=/tmp/mh1 --steps=4 --save_step=3 --restore_dir=/tmp/mh2/checkpoints

Why a probe of its own (and not `bagpiper_jax.train`): the question is whether the *same global
computation* gives the same numbers however the devices are split over processes, step by step,
with params dumps to compare (tests/test_elastic.py does the same for the real training command,
whose data slots make the global batches independent of the process count). Here every process
builds the same global batch for step i (the synthetic iterator with a fixed process index) and
feeds only its own rows, exactly as `make_array_from_process_local_data` expects. Everything else is the real
thing: `trainer.Setup` (mesh rules, sharded init, the jitted train step) and
`checkpoint.Checkpointer` (Orbax, async save, restore with the target shardings).

Writes to --out_dir (process 0): `result.json` {process_count, device_count, mesh, losses {step:
loss}, restored_step, restored_data_state (None when the checkpoint came from another process
count: this probe's iterator states are per process)}, and `params_step<k>.npz` (the full params
at the save step, gathered from all processes) and `restored_params.npz` (right after a restore), for bit-exact comparison.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from ml_collections import config_flags

from bagpiper_jax import checkpoint as ckpt_lib
from bagpiper_jax import batch as batch_lib
from bagpiper_jax import sharding, trainer
from bagpiper_jax.data import slots as slots_lib
from bagpiper_jax.synthetic import SyntheticIterator

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_OUT = flags.DEFINE_string("out_dir", None, "Where result.json, the npz dumps and checkpoints/ go.")
_STEPS = flags.DEFINE_integer("steps", 4, "Train until this step.")
_SAVE_STEP = flags.DEFINE_integer("save_step", 0, "Checkpoint (and dump params) after this step (0: never).")
_FRESH = flags.DEFINE_bool("fresh", True, "Train from a fresh init to --steps (losses -> 'losses').")
_RESTORE = flags.DEFINE_string("restore_dir", "", "Then restore the latest step of this checkpoint dir and train "
                               "on from it to --steps (losses -> 'restored_losses').")
_DATA_SEED = flags.DEFINE_integer("data_seed", 1234, "Seed of the global synthetic batch stream.")


def global_micro_batches(setup, step: int) -> list[dict]:
  """This process's rows of the global micro-batches of `step` (1-based), the same on any process count."""
  config, mesh = setup.config, setup.mesh
  rows = batch_lib.global_rows(config, mesh.size)
  host_rows = batch_lib.host_rows(config, mesh.size, jax.process_count())
  a = int(config.optim.grad_accum_steps)
  it = SyntheticIterator(setup.cfg, rows=rows, seq_len=int(config.data.seq_len),
                         audio_windows=int(config.data.max_audio_windows), seed=_DATA_SEED.value, process_index=0)
  it.set_state({"next": (step - 1) * a})
  lo = jax.process_index() * host_rows
  return [{k: v[lo:lo + host_rows] for k, v in next(it).items()} for _ in range(a)]


def gather_params(params, mesh) -> dict[str, np.ndarray]:
  """Full params as numpy on every process (one replicating jit, not one per leaf)."""
  full = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))(params)
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(full).items()}


def train(setup, state, step: int, losses: dict, ckpt, out: str, result: dict):
  """Steps step+1 .. --steps; loss per step into `losses`; checkpoint + params dump at --save_step."""
  t = time.perf_counter()
  while step < _STEPS.value:
    step += 1
    batch = setup.host_to_device(global_micro_batches(setup, step))
    state, metrics = setup.train_step(state, batch)
    losses[step] = float(jax.device_get(metrics["loss"]))
    result.setdefault("first_step_s", time.perf_counter() - t)
    if ckpt is not None and step == _SAVE_STEP.value:
      params = gather_params(state.params, setup.mesh)  # before the next step donates the state
      if jax.process_index() == 0:
        np.savez(os.path.join(out, f"params_step{step}.npz"), **params)
      pi, pc = jax.process_index(), jax.process_count()
      ckpt.save(step, state, {slots_lib.process_key(pi, pc): {"next": step}},
                slots_lib.stream_description(None, pc))
  return state


def main(argv):
  del argv
  config, out = _CONFIG.value, _OUT.value
  if config is None or not out:
    raise app.UsageError("--config and --out_dir are required")
  with config.unlocked():
    config.checkpoint.async_save = True  # the path a real run takes
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(config)
  setup = trainer.Setup(config, mesh)
  p0 = jax.process_index() == 0
  logging.info("process %d/%d, %d local devices, mesh %s", jax.process_index(), jax.process_count(),
               jax.local_device_count(), dict(mesh.shape))
  result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "mesh": dict(mesh.shape), "losses": {}, "restored_step": None, "restored_losses": {}}

  t1 = time.perf_counter()
  if _FRESH.value:
    state = setup.layout.init_state(setup.layout.init_params())
    ckpt = ckpt_lib.Checkpointer(os.path.join(out, "checkpoints"), config) if _SAVE_STEP.value else None
    train(setup, state, 0, result["losses"], ckpt, out, result)
    if ckpt is not None:
      ckpt.close()
  if _RESTORE.value:
    src = ckpt_lib.Checkpointer(_RESTORE.value, config)
    step = src.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"--restore_dir={_RESTORE.value}: no finished checkpoint")
    # This probe's iterator states are per process: they restore only onto the same process count.
    key = slots_lib.process_key(jax.process_index(), jax.process_count())
    same_processes = os.path.exists(os.path.join(_RESTORE.value, str(step), "data", f"{key}.json"))
    state, data = src.restore(step, setup.layout.abstract_state, data_keys=[key] if same_processes else None)
    src.close()
    result["restored_step"] = step
    result["restored_data_state"] = data.parts[key] if data is not None else None
    restored = gather_params(state.params, mesh)
    if p0:
      np.savez(os.path.join(out, "restored_params.npz"), **restored)
    train(setup, state, step, result["restored_losses"], None, out, result)
  multihost_utils.sync_global_devices("multihost_check done")
  result["setup_s"], result["total_s"] = t1 - t0, time.perf_counter() - t0
  if p0:
    with open(os.path.join(out, "result.json"), "w") as f:
      json.dump(result, f, indent=1)
  print(f"process {jax.process_index()}: losses {result['losses']}, after restore {result['restored_losses']} "
        f"(setup {result['setup_s']:.1f} s, first step incl. compile {result['first_step_s']:.1f} s, "
        f"total {result['total_s']:.1f} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
