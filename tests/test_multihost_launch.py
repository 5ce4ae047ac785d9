"""The launchers themselves: child environment, failure propagation, the TPU VM script's commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from launch import local_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_child_env_sets_per_process_devices_and_coordinator():
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x",
          "JAX_NUM_CPU_DEVICES": "8", "PYTHONPATH": "/elsewhere"}
  env = local_multiprocess.child_env(1, 2, 4, 12345, base=base)
  assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=4"]
  assert "JAX_NUM_CPU_DEVICES" not in env  # it would override the per-process count
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:12345"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
  assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo" and env["JAX_PLATFORMS"] == "cpu"
  assert env["PYTHONPATH"].split(os.pathsep) == [REPO, "/elsewhere"]


def test_two_processes_see_eight_devices_and_sum_across_processes(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(
      "import jax, jax.numpy as jnp, numpy as np\n"
      "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
      "mesh = Mesh(np.array(jax.devices()), ('x',))\n"
      "local = np.arange(4, dtype=np.float32) + 4 * jax.process_index()\n"
      "x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('x')), local, (8,))\n"
      "s = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)\n"
      "print('RESULT', jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count(),"
      " float(s), flush=True)\n")
  r = local_multiprocess.launch("probe", [], num_processes=2, devices_per_process=4, timeout=120, echo=False,
                                cwd=str(tmp_path))
  assert r.ok, r.outputs
  for i, out in enumerate(r.outputs):
    line = [l for l in out.splitlines() if l.startswith("RESULT")]
    assert line == [f"RESULT {i} 2 8 4 28.0"], out[-2000:]


def test_a_failing_process_stops_the_others_and_sets_the_exit_status(tmp_path):
  script = tmp_path / "fail.py"
  script.write_text(
      "import sys, time, jax\n"
      "if jax.process_index() == 1:\n"
      "  sys.exit(7)\n"
      "time.sleep(120)\n")
  t = time.monotonic()
  r = local_multiprocess.launch("fail", [], num_processes=2, devices_per_process=1, timeout=100, echo=False,
                                cwd=str(tmp_path))
  assert time.monotonic() - t < 60  # process 0 was stopped, not waited for
  assert r.first_failed == 1 and r.returncode == 7 and not r.ok
  assert r.returncodes[0] != 0


def test_cli_passes_module_arguments_through(tmp_path):
  (tmp_path / "echo_args.py").write_text("import sys\nprint('ARGS', sys.argv[1:], flush=True)\n")
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "launch.local_multiprocess", "--num_processes=1",
                      "--devices_per_process=2", "--", "echo_args", "--a=1", "b"],
                     cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "[p0] ARGS ['--a=1', 'b']" in r.stdout


def _tpu_vm(*args, **env):
  e = dict(os.environ, DRY_RUN="1", **env)
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), *args], env=e, capture_output=True,
                     text=True, timeout=60)
  return r


def test_tpu_vm_train_runs_on_all_workers_of_all_slices():
  r = _tpu_vm("train", "pod", "us-east5-a", "--", "--config=configs/bagpiper_8b.py:pretrain",
              "--workdir=gs://b/run", NUM_SLICES="2")
  assert r.returncode == 0, r.stderr
  lines = [l for l in r.stdout.splitlines() if l.startswith("gcloud")]
  assert len(lines) == 2
  for i, l in enumerate(sorted(lines)):
    assert f"tpu-vm ssh pod-{i} --zone us-east5-a --worker=all" in l
    assert "bagpiper_jax.train\\ --jax_distributed\\ --config=configs/bagpiper_8b.py:pretrain" in l
    assert "train.pid" in l


def test_tpu_vm_create_picks_runtime_and_rejects_unknown():
  r = _tpu_vm("create", "pod", "z", "v6e-256")
  assert r.returncode == 0 and "--accelerator-type v6e-256 --runtime-version v2-alpha-tpuv6e" in r.stdout
  r = _tpu_vm("create", "pod", "z", "v9-8")
  assert r.returncode != 0 and "RUNTIME_VERSION" in r.stderr
  r = _tpu_vm("bogus", "pod", "z")
  assert r.returncode == 2
