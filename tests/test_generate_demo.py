"""The README main command's model, end to end (issue 11 test f), shortened to a few steps:

train the tiny config on the demo data (the sample action runs at the last step), then
`python -m bagpiper_jax.generate --ckpt=<workdir>` in batch mode captions a held-out demo clip,
renders a caption as a WAV, and records a bad request with its reason without stopping; the
caption attribute score runs on the checkpoint. The full 200-step command and the evaluate command
line are the heavy test at the end (`pytest -m heavy`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from bagpiper_jax import evaluate, paths, sharding, trainer, train_loop
from bagpiper_jax.convert import params_io
from bagpiper_jax.generate import engine
from bagpiper_jax import tokenizer as tokenizer_lib
from configs import tiny
from conftest import with_default_xla_optimisation
from data_pipeline import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  """The README commands' environment: XLA's default optimisation (they spend their time running steps)."""
  return with_default_xla_optimisation(dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))


def test_demo_checkpoint_captions_a_heldout_clip_and_renders_a_wav(tmp_path):
  demo_dir = str(tmp_path / "demo_data")
  shards = demo.ensure_demo_shards(demo_dir, num_clips=40, num_workers=0)
  c = tiny.get_config("pretrain")
  c.data.train_sources, c.data.eval_sources = demo.demo_sources(shards, "pretrain")
  c.data.demo_dir = demo_dir
  files = demo.demo_model_files(demo_dir)
  c.sample.tokenizer, c.sample.codec = files["tokenizer"], files["codec"]
  c.train_steps = 3
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False
  c.eval_every_steps = 3
  c.eval_steps = 1
  c.sample_every_steps = 3
  c.sample.max_text_steps = 24
  c.sample.max_audio_steps = 40
  c.log_every_steps = 1
  wd = str(tmp_path / "workdirs" / "tiny")
  out = train_loop.train_and_evaluate(c, wd)
  assert np.isfinite(out["loss"])
  # Per-source eval went to metrics.jsonl; samples were written at the last step.
  kinds = {json.loads(l)["kind"] for l in open(os.path.join(wd, "metrics.jsonl"))}
  assert "eval" in kinds and {f"eval/{s}" for s in c.data.eval_sources} <= kinds, kinds
  samples = [json.loads(l) for l in open(os.path.join(wd, "samples", "step_3", "samples.jsonl"))]
  assert {s["direction"] for s in samples} == {"caption", "audio"}
  assert any("gen_wav" in s for s in samples) and any("ref_wav" in s for s in samples)
  assert os.listdir(os.path.join(wd, "tensorboard"))

  # The command line on the workdir: a held-out clip, a caption, and a bad request, in one batch.
  rows = [json.loads(l) for l in open(os.path.join(demo_dir, "manifests", "pretrain.eval.jsonl"))]
  clip = next(r for r in rows if "start" not in r)
  reqs = tmp_path / "requests.jsonl"
  reqs.write_text("\n".join(json.dumps(r) for r in [
      {"id": "clip", "audio": os.path.join(demo_dir, "manifests", clip["audio"])},
      {"id": "render", "caption": clip["rich_caption"], "seed": 7},
      {"id": "missing", "audio": str(tmp_path / "nope.wav")}]) + "\n")
  p = subprocess.run([sys.executable, "-m", "bagpiper_jax.generate", f"--ckpt={wd}", f"--requests={reqs}",
                      f"--out_dir={tmp_path / 'out'}", "--text_max_steps=24", "--audio_max_steps=60",
                      "--audio_min_steps=10", "--max_cache_len=1024"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
  assert "[2/2]" in p.stdout and "wrote " in p.stdout, p.stdout
  res = {r["id"]: r for r in map(json.loads, open(tmp_path / "out" / "results.jsonl"))}
  assert res["clip"]["error"] is None and res["clip"]["segments"][0]["modality"] == "text"
  assert res["clip"]["segments"][0]["rows"] >= 1 and isinstance(res["clip"]["text"], str)
  assert res["render"]["error"] is None and res["render"]["segments"][0]["modality"] == "audio"
  wav, sr = sf.read(res["render"]["audio"])
  assert sr == 16000 and res["render"]["frames"] >= 1 and len(wav) == 320 * res["render"]["frames"]
  assert "nope.wav: file not found" in res["missing"]["error"]

  # The caption attribute score on this checkpoint (2 clips: the machinery, not the number).
  ref = paths.find_checkpoint(wd)
  setup = trainer.Setup(c, sharding.make_mesh(c))
  params = params_io.load_params(ref.step_dir, setup.layout.abstract_state.params)
  data = evaluate.DemoEvalSet.load(demo_dir)
  data.rows = data.rows[:2]
  greedy = engine.DecodeSettings(text=engine.SegmentSettings(temperature=0.0, top_k=1, max_steps=24))
  gen = engine.Generator(setup.cfg, params, mesh=setup.mesh, max_cache_len=512, settings=greedy)
  tok = tokenizer_lib.load_tokenizer(files["tokenizer"])
  scores, recs = evaluate.caption_scores(gen, setup.cfg, tok, data)
  assert scores["clips"] == 2 and scores["items"] >= 4 and 0.0 <= scores["accuracy"] <= 1.0
  assert 0.0 <= scores["chance"] <= 1.0 and len(recs) == 2 and all("read" in r for r in recs)


@pytest.mark.heavy
def test_readme_model_generate_and_evaluate_commands(tmp_path):
  """The README's commands in order: train (200 steps), generate, evaluate (~15 min on 2 cores)."""
  wd = tmp_path / "workdirs" / "tiny"
  p = subprocess.run([sys.executable, "-m", "bagpiper_jax.train", "--config=configs/tiny.py",
                      f"--workdir={wd}"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=3600)
  assert p.returncode == 0, p.stderr[-4000:]
  assert os.path.isfile(wd / "samples" / "step_200" / "samples.jsonl")
  demo_dir = tmp_path / "workdirs" / "demo_data"
  clip = json.loads(open(demo_dir / "manifests" / "pretrain.eval.jsonl").readline())
  p = subprocess.run([sys.executable, "-m", "bagpiper_jax.generate", f"--ckpt={wd}",
                      f"--audio={demo_dir / 'manifests' / clip['audio']}"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0 and "[caption] segments text:" in p.stdout, p.stdout + p.stderr[-3000:]
  p = subprocess.run([sys.executable, "-m", "bagpiper_jax.generate", f"--ckpt={wd}",
                      "--caption=A loud 440 Hz tone.", f"--out={tmp_path / 'tone.wav'}"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0 and os.path.isfile(tmp_path / "tone.wav"), p.stdout + p.stderr[-3000:]
  p = subprocess.run([sys.executable, "-m", "bagpiper_jax.evaluate", f"--ckpt={wd}",
                      f"--report={tmp_path / 'r.json'}"], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=1800)
  assert p.returncode == 0, p.stdout + p.stderr[-3000:]
  rep = json.load(open(tmp_path / "r.json"))
  assert set(rep) >= {"loss", "captions", "cycle"} and rep["captions"]["scores"]["clips"] >= 20
