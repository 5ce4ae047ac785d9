"""The README's main command, as a new user runs it: from a fresh current directory, with the
README's own argv (read from the README), the default relative workdir, and only the step counts
shortened through --config overrides. Also: bad input stops before any compilation with one line.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys

import pytest
import readme_commands  # tests/readme_commands.py: the README's commands, read from the README
from conftest import with_default_xla_optimisation

from bagpiper_jax import paths
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
SHORTEN = [f"--config.train_steps={STEPS}", "--config.checkpoint.every_steps=2", "--config.eval_every_steps=2",
           "--config.log_every_steps=1", "--config.optim.warmup_steps=2"]
TPU_PROBE_NOISE = ("jellyfish", "unexpected worker hostname", "could not determine TPU", "libtpu")


def _run(cwd, argv, timeout=900):
  env = with_default_xla_optimisation(
      {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "PYTHONPATH")})
  env["PYTHONPATH"] = REPO  # the checkout under test, wherever the command runs from
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
  """A new current directory that, like a checkout, has configs/ (the README's --config path)."""
  d = tmp_path_factory.mktemp("user")
  os.symlink(os.path.join(REPO, "configs"), d / "configs")
  return d


def test_readme_main_command_from_a_fresh_directory(user_dir):
  argv = shlex.split(readme_commands.command("main"))
  assert argv[:3] == ["python", "-m", "bagpiper_jax.train"], argv
  p = _run(user_dir, [sys.executable] + argv[1:] + SHORTEN)
  assert p.returncode == 0, p.stderr[-4000:]
  wd = user_dir / "workdirs" / "tiny"  # the README's relative default workdir
  assert paths.finished_steps(str(wd / "checkpoints")) == [2, 4]
  assert paths.find_checkpoint(str(wd)).step == STEPS
  assert glob.glob(str(wd / "tensorboard" / "events.out.tfevents.*"))
  recs = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, STEPS + 1))
  assert [r["step"] for r in recs if r["kind"] == "eval"] == [2, 4]
  assert (user_dir / "workdirs" / "demo_data" / "shards" / "train" / "index.json").exists()
  noise = [w for w in TPU_PROBE_NOISE if w in p.stderr]
  assert not noise, f"TPU probe messages on a CPU host: {noise}\n{p.stderr[-2000:]}"

  # Again: resumes at the last step, nothing to do, exit 0.
  again = _run(user_dir, [sys.executable] + argv[1:] + SHORTEN)
  assert again.returncode == 0 and f"resumed from step {STEPS}" in again.stdout, again.stderr[-2000:]


@pytest.mark.parametrize("case", ["other_config", "not_writable", "missing_init_from"])
def test_bad_input_is_one_line_before_compiling(user_dir, case, tmp_path):
  argv = [sys.executable, "-m", "bagpiper_jax.train", "--config=configs/tiny.py", "--config.data.synthetic=True"]
  if case == "other_config":
    wd = tmp_path / "wd"
    wd.mkdir()
    other = tiny.get_config()
    other.model.hidden_size = 128
    (wd / "config.json").write_text(other.to_json_best_effort())
    argv += [f"--workdir={wd}"]
    want = f"workdir {wd} holds a run of another config (model.hidden_size: workdir 128 vs config 64);"
  elif case == "not_writable":
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv += [f"--workdir={blocker / 'wd'}"]
    want = f"workdir {blocker / 'wd'} is not writable"
  else:
    argv += [f"--workdir={tmp_path / 'wd'}", f"--config.init_from={tmp_path / 'nope'}"]
    want = f"config.init_from: {tmp_path / 'nope'}: no such file or directory"
  p = _run(user_dir, argv, timeout=300)
  assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
  errors = [l for l in p.stderr.splitlines() if l.startswith("ERROR: ")]
  assert len(errors) == 1 and errors[0].startswith("ERROR: " + want), p.stderr[-2000:]
  assert "Traceback" not in p.stderr and "first step (incl. compilation)" not in p.stderr + p.stdout
