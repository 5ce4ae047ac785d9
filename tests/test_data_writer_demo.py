"""Demo data: deterministic, captions true of the audio, espeak optional, shards end to end."""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import sys

import numpy as np

from bagpiper_jax import audio as features
from bagpiper_jax import evaluate
from bagpiper_jax import tokenizer
from bagpiper_jax.data import records
from data_pipeline import demo


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for sub in ("manifests", "wavs"):
    for p in sorted(glob.glob(os.path.join(root, sub, "*"))):
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def test_same_seed_same_data(tmp_path):
  a = demo.make_demo_data(str(tmp_path / "a"), num_clips=30, seed=3, use_espeak=False)
  b = demo.make_demo_data(str(tmp_path / "b"), num_clips=30, seed=3, use_espeak=False)
  fa, fb = _files(a.root), _files(b.root)
  assert len([k for k in fa if k.startswith("wavs")]) == 30
  assert fa == fb  # manifests and wavs, byte for byte (paths inside are relative)
  ta, tb = tokenizer.load_tokenizer(a.tokenizer), tokenizer.load_tokenizer(b.tokenizer)
  line = open(a.manifests["train"][0]).readline()
  assert ta.vocab_size == tb.vocab_size <= demo.DEMO_VOCAB_SIZE and ta.encode(line) == tb.encode(line)
  c = demo.make_demo_data(str(tmp_path / "c"), num_clips=30, seed=4, use_espeak=False)
  assert _files(c.root)["manifests/pretrain.train.jsonl"] != fa["manifests/pretrain.train.jsonl"]


def _rows(paths, split="train", kind="pretrain"):
  (p,) = [m for m in paths.manifests[split] if os.path.basename(m).startswith(kind)]
  return [json.loads(l) for l in open(p)], os.path.dirname(p)


def test_captions_are_true(tmp_path):
  paths = demo.make_demo_data(str(tmp_path), num_clips=80, seed=0, use_espeak=False)
  rows, base = _rows(paths)
  rows += _rows(paths, "eval")[0]
  assert {r["direction"] for r in rows} == {"und", "gen", "und,gen"}
  assert {r["category"] for r in rows} == {"music", "sound"}
  assert any("start" in r for r in rows)
  checked = {"duration": 0, "pitch": 0, "level": 0}
  for r in rows:
    wav, _ = features.load_audio(os.path.join(base, r["audio"]), start=r.get("start"), end=r.get("end"))
    cap = r["rich_caption"]
    secs = re.search(r"(?:lasting|over) ([\d.]+) seconds|([\d.]+) seconds in total", cap)
    assert secs, cap
    assert abs(float(secs.group(1) or secs.group(2)) - len(wav) / 16000) < 0.03, (cap, len(wav))
    checked["duration"] += 1
    m = re.match(r"A steady ([\d.]+) Hz (?:sine|square|sawtooth|triangle) tone", cap)
    if m:  # the spectral peak (the fundamental, for every waveform here) is the stated frequency
      spec = np.abs(np.fft.rfft(wav[:16000]))
      assert abs(int(np.argmax(spec)) - float(m.group(1))) <= 1.5, cap
      checked["pitch"] += 1
    level = re.search(r"\b(quiet|moderately loud|loud)\b", cap)
    if level and not cap.startswith(("Silence", "A quiet burst", "A loud burst", "A moderately")) \
        and "seconds of silence" not in cap:
      rms_db = 20 * np.log10(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))
      assert demo.level_word(rms_db) == level.group(1), (cap, rms_db)
      checked["level"] += 1
  assert checked["duration"] == len(rows) and checked["pitch"] >= 2 and checked["level"] >= 20, checked
  sft, _ = _rows(paths, kind="sft")
  assert {d["sft_task"] for d in sft} == {"understanding", "generation"}
  for d in sft:
    assert d["messages"][-1]["role"] == "assistant"


def test_espeak_speech_when_installed(tmp_path, monkeypatch):
  """A stand-in espeak-ng on PATH (writes a 22.05 kHz tone) exercises the speech branch."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  fake = bindir / "espeak-ng"
  fake.write_text(f"""#!{sys.executable}
import sys, numpy as np, soundfile as sf
out = sys.argv[sys.argv.index("-w") + 1]
sf.write(out, 0.3 * np.sin(2 * np.pi * 150 * np.arange(26460) / 22050), 22050)
""")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
  assert demo.find_espeak() == str(fake)
  paths = demo.make_demo_data(str(tmp_path / "d"), num_clips=40, seed=0)
  rows, base = _rows(paths)
  speech = [r for r in rows if r["category"] == "speech"]
  assert speech and all("voice" in r["rich_caption"] and "(1.2 seconds)" in r["rich_caption"]
                        for r in speech if "start" not in r)
  assert json.load(open(os.path.join(paths.root, "demo.json")))["espeak"] is True


def test_ensure_demo_shards_end_to_end(tmp_path):
  root = demo.ensure_demo_shards(str(tmp_path), num_clips=20, seed=0, num_workers=0, shard_size=8)
  assert root == os.path.join(str(tmp_path), "shards")
  stamp = os.path.join(root, "demo_shards.json")
  before = os.stat(stamp).st_mtime_ns
  assert demo.ensure_demo_shards(str(tmp_path), num_clips=20, seed=0) == root
  assert os.stat(stamp).st_mtime_ns == before  # second call: nothing regenerated

  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  text_vocab = 1024  # configs/tiny.py
  for split in ("train", "eval"):
    index = json.load(open(os.path.join(root, split, "index.json")))
    assert index["errors"]["total"] == 0 and index["tokenizer_vocab_size"] <= text_vocab
    for name, src in index["sources"].items():
      n = 0
      for shard in src["shards"]:
        for b in array_record_module.ArrayRecordReader(os.path.join(root, split, shard)).read_all():
          rec = records.decode(b)
          assert rec["source"] == name
          for m in rec["messages"]:
            if "text_ids" in m:
              assert 256 <= m["text_ids"].min() and m["text_ids"].max() < 256 + text_vocab
            if "codes" in m:
              assert m["codes"].shape[1] == 8 and m["codes"].max() < 1024
          n += 1
      assert n == src["records"]
  train, evals = demo.demo_sources(root, "pretrain")
  assert set(train) <= {"music_und", "music_gen", "sound_und", "sound_gen", "speech_und", "speech_gen",
                        "text_only"}
  assert {"music_und", "sound_gen", "text_only"} <= set(train)
  assert train["music_gen"]["weight"] == 4.21 and os.path.isdir(train["music_gen"]["path"])
  assert set(evals) <= set(train)
  sft_train, sft_eval = demo.demo_sources(root, "sft")
  assert set(sft_train) == {"sft"} == set(sft_eval)


def test_attributes_read_back_from_the_true_captions(tmp_path):
  """The evaluator's reading of captions (manifests/attributes.json) recovers every attribute the
  manifest rows carry from the demo's own true captions: accuracy 1.0, while chance is below it."""
  paths = demo.make_demo_data(str(tmp_path), num_clips=60, seed=0, use_espeak=False)
  data = evaluate.DemoEvalSet.load(paths.root)
  rows = data.train_rows + data.rows
  assert all("attributes" in r and r["attributes"]["kind"] for r in rows)
  scores = evaluate.score_captions([r["attributes"] for r in rows], [r["rich_caption"] for r in rows],
                                   data.spec, evaluate.majority(data.train_rows))
  assert scores["accuracy"] == 1.0, {k: v for k, v in scores["attributes"].items() if v["accuracy"] < 1}
  assert scores["chance"] < 0.6 and scores["items"] > 2 * len(rows)
  assert {"kind", "level", "wave"} <= set(scores["attributes"])
  # A caption of another clip scores lower; a caption that states nothing scores 0.
  shifted = [r["rich_caption"] for r in rows[1:] + rows[:1]]
  assert evaluate.score_captions([r["attributes"] for r in rows], shifted, data.spec, {})["accuracy"] < 0.7
  empty = evaluate.score_captions([r["attributes"] for r in rows], [""] * len(rows), data.spec, {})
  assert empty["accuracy"] == 0
