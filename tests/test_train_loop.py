"""The train loop end to end on CPU: loss goes down on the real Grain pipeline, eval, checkpoint,
NaN policy, SIGTERM (subprocess: `python -m bagpiper_jax.train`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bagpiper_jax import sharding, train_loop, trainer
from bagpiper_jax.data import input_pipeline as pipeline
from bagpiper_jax.metrics import read_jsonl
from bagpiper_jax.model import ModelConfig
from configs.tiny import for_tests as tiny_train_config
from conftest import with_default_xla_optimisation
from data_pipeline.synthetic_records import write_tiny_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One config + compiled Setup shared by the in-process loop tests."""
  root = tmp_path_factory.mktemp("loop")
  c = tiny_train_config(steps=30, seq_len=128, rows_per_device=4)
  cfg = ModelConfig.from_dict(c.model)
  c.data.synthetic = False
  c.data.train_sources = write_tiny_sources(str(root / "train"), cfg, records=96)
  c.data.eval_sources = write_tiny_sources(str(root / "eval"), cfg, records=16, seed=1)
  c.log_every_steps = 5
  c.eval_every_steps = 15
  c.eval_steps = 2
  c.checkpoint.every_steps = 15
  c.optim.warmup_steps = 5
  setup = trainer.Setup(c, sharding.make_mesh(c))
  return root, c, setup


class _PoisonAt:
  """Wraps an iterator; the batch of step `at` gets NaN mel (so a NaN loss and NaN grads)."""

  def __init__(self, it, at):
    self.it, self.at, self.n = it, at, 0

  def __next__(self):
    b = next(self.it)
    self.n += 1
    if self.n == self.at:
      b = dict(b)
      b["audio_mel"] = np.full_like(b["audio_mel"], np.nan)
    return b

  def get_state(self):
    return {"inner": self.it.get_state(), "n": self.n}

  def set_state(self, s):
    self.it.set_state(s["inner"])
    self.n = s["n"]


def test_loss_goes_down_evals_and_ends_with_checkpoint(run, capsys):
  root, c, setup = run
  wd = root / "wd_main"
  out = train_loop.train_and_evaluate(c, str(wd), setup=setup)
  console = capsys.readouterr().out
  recs = read_jsonl(str(wd / "metrics.jsonl"))
  tr = [r for r in recs if r["kind"] == "train"]
  ev = [r for r in recs if r["kind"] == "eval"]
  losses = [x for r in tr for x in r["step_losses"]]
  assert len(losses) == 30 and all(np.isfinite(losses))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  print(f"train loss first5 {first:.3f} last5 {last:.3f}; eval {[round(r['loss'], 3) for r in ev]}")
  assert last < first - 1.0, (first, last)
  assert [r["step"] for r in ev] == [15, 30] and ev[1]["loss"] < ev[0]["loss"]
  for k in ("text_loss", "audio_loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu"):
    assert k in tr[-1], k
  assert len(tr[-1]["stream_loss"]) == 8
  assert tr[-1]["data"]["rows"] > 0  # pipeline counters are logged
  assert sorted(os.listdir(wd / "checkpoints")) == ["15", "30"]
  assert os.listdir(wd / "tensorboard")
  assert json.load(open(wd / "config.json"))["model"]["hidden_size"] == 64
  assert out["eval_loss"] == pytest.approx(ev[-1]["loss"])
  # Data waits on the console line; goodput in metrics.jsonl, TensorBoard and one summary line.
  lines = [ln for ln in console.splitlines() if ln.startswith("step ")]
  assert len(lines) == 6 and all("| data wait " in ln for ln in lines[1:]), lines
  assert 0 <= tr[-1]["data_wait_frac"] < 1
  gp = [r for r in recs if r["kind"] == "goodput"]
  assert [r["step"] for r in gp] == [5, 10, 15, 20, 25, 30, 30]  # every log step, and at exit
  g = gp[-1]
  for k in ("compile_s", "step_s", "data_wait_s", "checkpoint_s", "eval_s", "init_s"):
    assert g[k] > 0, k
  assert g["restore_s"] == 0 and g["lost_to_restart_steps"] == 0 and g["first_step"] == 0
  parts = sum(g[f"{k}_s"] for k in ("init", "restore", "compile", "step", "data_wait", "checkpoint", "eval",
                                    "actions"))
  assert parts == pytest.approx(g["wall_s"], rel=0.02)  # every second is booked somewhere
  assert g["goodput"] == pytest.approx(g["step_s"] / g["wall_s"])
  summary = [ln for ln in console.splitlines() if ln.startswith("goodput ")]
  assert len(summary) == 1 and "data wait" in summary[0] and "compile" in summary[0], console[-2000:]
  events = b"".join(open(os.path.join(wd / "tensorboard", f), "rb").read() for f in os.listdir(wd / "tensorboard"))
  assert b"goodput/step_s" in events and b"goodput/goodput" in events and b"train/data_wait_frac" in events


def test_nan_policy_stop_names_the_step_and_skip_goes_on(run):
  root, c, setup = run
  c = c.copy_and_resolve_references()
  c.train_steps = 8
  c.eval_every_steps = 0
  c.checkpoint.every_steps = 4
  mk = lambda: (_PoisonAt(pipeline.make_train_iterator(c, setup.cfg, rows=setup.host_rows, process_index=0,
                                                       process_count=1), at=3), None)
  wd = root / "wd_stop"
  with pytest.raises(train_loop.NonFiniteError, match="at step 3"):
    train_loop.train_and_evaluate(c, str(wd), setup=setup, data=mk())
  assert not os.path.exists(wd / "checkpoints") or not os.listdir(wd / "checkpoints")
  c.nan_policy = "skip"
  wd = root / "wd_skip"
  train_loop.train_and_evaluate(c, str(wd), setup=setup, data=mk())
  tr = [r for r in read_jsonl(str(wd / "metrics.jsonl")) if r["kind"] == "train"]
  assert tr[-1]["skipped_steps"] == 1 and tr[-1]["step"] == 8
  assert not np.isfinite(tr[0]["step_losses"][2]) and np.isfinite(tr[-1]["loss"])
  assert sorted(os.listdir(wd / "checkpoints")) == ["4", "8"]


def test_resume_checks_the_data_stream_and_falls_back_on_request(run, tmp_path, capsys):
  """A changed mixture is refused by key (or accepted, restarting the stream); --resume_from_step
  goes back to an older step once, redoes the steps bit for bit, and goodput counts them as lost."""
  root, c, setup = run
  c = c.copy_and_resolve_references()
  c.train_steps, c.eval_every_steps, c.checkpoint.every_steps, c.log_every_steps = 8, 0, 4, 4
  wd = tmp_path / "wd"
  train_loop.train_and_evaluate(c, str(wd), setup=setup)
  first = {r["step"]: r["step_losses"] for r in read_jsonl(str(wd / "metrics.jsonl")) if r["kind"] == "train"}

  other = c.copy_and_resolve_references()
  name = sorted(other.data.train_sources)[0]
  other.data.train_sources[name]["weight"] = 2.0
  with pytest.raises(train_loop.RunError, match=rf"data.train_sources.{name}.weight: checkpoint 1.0 vs now 2.0"
                     r"(.|\n)*--accept_data_change"):
    train_loop.train_and_evaluate(other, str(wd), setup=setup)
  shutil.copytree(wd, tmp_path / "wd_accept")
  capsys.readouterr()
  train_loop.train_and_evaluate(other, str(tmp_path / "wd_accept"), setup=setup, accept_data_change=True)
  assert "--accept_data_change: the data stream restarts from its beginning" in capsys.readouterr().out

  train_loop.train_and_evaluate(c, str(wd), setup=setup, resume_from_step=4)
  assert sorted(os.listdir(wd / "checkpoints")) == ["4", "8"]
  assert [n.split("-")[0] for n in os.listdir(wd / "abandoned_checkpoints") if n != "fallbacks.json"] == ["8"]
  recs = read_jsonl(str(wd / "metrics.jsonl"))
  redone = [r for r in recs if r["kind"] == "train"][-1]
  assert redone["step"] == 8 and redone["step_losses"] == first[8]  # the same steps, bit for bit
  gp = [r for r in recs if r["kind"] == "goodput"][-1]
  assert gp["first_step"] == 4 and gp["lost_to_restart_steps"] == 4 and gp["restore_s"] > 0
  assert gp["lost_to_restart_s"] > 0
  out = capsys.readouterr().out
  assert "lost to restart: 4 steps redone" in out and "job over 2 runs" in out, out[-1000:]
  # The same command again: no second fallback, nothing left to train.
  train_loop.train_and_evaluate(c, str(wd), setup=setup, resume_from_step=4)
  assert "resumed from step 8" in capsys.readouterr().out


def test_sigterm_saves_and_exits_cleanly(run, tmp_path):
  root, c, _ = run
  cfg_py = tmp_path / "cfg.py"
  cfg_py.write_text(
      "from configs.tiny import for_tests as tiny_train_config\n"
      "def get_config():\n"
      "  c = tiny_train_config(steps=10000, seq_len=128)\n"
      "  c.checkpoint.every_steps = 5000\n"
      "  c.checkpoint.async_save = True\n"
      "  return c\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  p = subprocess.Popen([sys.executable, "-m", "bagpiper_jax.train", f"--config={cfg_py}",
                        f"--workdir={tmp_path / 'wd'}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
  lines = []
  deadline = time.time() + 300
  for line in p.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      p.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, lines
  rest, _ = p.communicate(timeout=300)
  assert p.returncode == 0, (p.returncode, lines, rest)
  assert "preempted: checkpoint at step" in rest
  saved = [int(x) for x in os.listdir(tmp_path / "wd" / "checkpoints") if x.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 10000, saved


@pytest.mark.heavy
def test_readme_command_on_demo_data(tmp_path):
  """`python -m bagpiper_jax.train --config=configs/tiny.py` as in the README (~5 min on 2 cores):
  generates the demo data, trains 200 steps, evals, ends with a checkpoint."""
  env = with_default_xla_optimisation(dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  wd = tmp_path / "workdirs" / "tiny"
  p = subprocess.run([sys.executable, "-m", "bagpiper_jax.train", "--config=configs/tiny.py",
                      f"--workdir={wd}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0, p.stderr[-4000:]
  recs = read_jsonl(str(wd / "metrics.jsonl"))
  tr = [r for r in recs if r["kind"] == "train"]
  ev = [r for r in recs if r["kind"] == "eval"]
  assert tr[-1]["step"] == 200 and tr[-1]["loss"] < tr[0]["loss"] - 2.0, (tr[0]["loss"], tr[-1]["loss"])
  assert len(ev) == 2 and ev[1]["loss"] < ev[0]["loss"]
  assert "200" in os.listdir(wd / "checkpoints")
  assert os.path.isdir(tmp_path / "workdirs" / "demo_data" / "shards")
