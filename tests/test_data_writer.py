"""data_pipeline writer: manifests with good and broken lines -> shards, errors.jsonl, index.json;
restart skips finished shards; the command line."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from bagpiper_jax import audio as features
from bagpiper_jax import codec
from bagpiper_jax import tokenizer
from bagpiper_jax.data import records
from data_pipeline import build
from data_pipeline import codes
from data_pipeline import tokenizer_train
from data_pipeline import writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_source(out_dir: str, source: str) -> list[dict]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  out = []
  # The pattern bagpiper_jax.data.pipeline uses for a source directory.
  for path in sorted(glob.glob(os.path.join(out_dir, source, "*.array_record*"))):
    reader = array_record_module.ArrayRecordReader(path)
    out += [records.decode(b, where=path) for b in reader.read_all()]
    reader.close()
  return out


def _tone(seconds: float, freq: float, sr: int = 16000) -> np.ndarray:
  t = np.arange(int(seconds * sr)) / sr
  return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Audio files, a tokenizer, a tiny X-Codec and one manifest mixing every kind of line."""
  d = tmp_path_factory.mktemp("corpus")
  (d / "wavs").mkdir()
  sf.write(d / "wavs/a.wav", _tone(1.5, 440), 16000)
  sf.write(d / "wavs/b.wav", _tone(2.0, 220), 16000)
  sf.write(d / "wavs/c.wav", _tone(3.0, 330), 16000)
  sf.write(d / "wavs/hi.wav", _tone(1.0, 500, 44100), 44100)
  (d / "wavs/corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 16)
  lines = [
      dict(audio="wavs/a.wav", rich_caption="A 440 Hz tone.", direction="und", category="music", dataset="t"),
      dict(audio="wavs/b.wav", rich_caption="A 220 Hz tone.", direction="gen", category="sound", dataset="t"),
      dict(audio="wavs/c.wav", rich_caption="A 330 Hz tone, cut.", direction="und,gen", category="music",
           dataset="t", start=0.5, end=2.0),
      dict(audio="wavs/hi.wav", rich_caption="A 500 Hz tone.", direction="und", category="speech",
           dataset="t"),  # 44.1 kHz: resampled and reported as a warning
      dict(audio="wavs/corrupt.wav", rich_caption="Broken.", direction="und,gen", category="sound",
           dataset="t"),  # 2 errors (one per record)
      dict(audio="wavs/missing.wav", rich_caption="Gone.", direction="und", category="sound", dataset="t"),
      dict(audio="wavs/a.wav", rich_caption="   ", direction="und", category="music", dataset="t"),
      dict(audio="wavs/a.wav", rich_caption="x", direction="sideways", category="music", dataset="t"),
      dict(audio="wavs/a.wav", rich_caption="x", direction="und", category="music", dataset="t",
           sample_rate=48000),  # the manifest contradicts the file
      {"text": "Pink noise has equal energy per octave."},
      {"id": "dlg1", "messages": [
          {"role": "system", "modality": "text", "content": "You are helpful."},
          {"role": "user", "modality": "audio", "content": "wavs/a.wav"},
          {"role": "user", "modality": "text", "content": "Now make a lower one."},
          {"role": "assistant", "modality": "text", "content": "<think>lower</think> A 220 Hz tone."},
          {"role": "assistant", "modality": "audio", "content": {"path": "wavs/b.wav", "start": 0.0,
                                                                  "end": 1.0}}]},
  ]
  with open(d / "m.jsonl", "w") as f:
    for i, row in enumerate(lines):
      f.write(json.dumps(row) + "\n")
      if i == 5:
        f.write("{this is not json\n")  # line 7
  spm = tokenizer_train.train_sentencepiece(
      [r.get("rich_caption", "") or r.get("text", "") for r in lines] + ["lower tone helpful make"],
      str(d / "spm"), 300)
  xc = codec.build_tiny_xcodec(str(d / "xcodec"))
  return {"dir": d, "manifest": str(d / "m.jsonl"), "tokenizer": spm, "xcodec": xc}


EXPECTED_ERRORS = {"corrupt_audio": 2, "missing_audio": 1, "empty_caption": 1, "bad_direction": 1,
                   "bad_json": 1, "sample_rate": 1}


@pytest.fixture(scope="module")
def written(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out"))
  settings = build.BuildSettings(tokenizer=corpus["tokenizer"], codec=f"xcodec:{corpus['xcodec']}")
  index = writer.write_shards([corpus["manifest"]], out, settings, shard_size=2, num_workers=1,
                              progress=False)
  return out, index, settings


def test_errors_are_reported_not_fatal(written, corpus):
  out, index, _ = written
  assert index["errors"]["by_kind"] == EXPECTED_ERRORS
  errs = [json.loads(l) for l in open(os.path.join(out, "errors.jsonl"))]
  assert len(errs) == sum(EXPECTED_ERRORS.values()) == index["errors"]["total"]
  by = {(e["kind"], e["line"]) for e in errs}
  assert {("corrupt_audio", 5), ("missing_audio", 6), ("bad_json", 7), ("empty_caption", 8),
          ("bad_direction", 9), ("sample_rate", 10)} <= by
  for e in errs:
    assert e["manifest"] == corpus["manifest"] and e["reason"]
  corrupt = [e for e in errs if e["kind"] == "corrupt_audio"]
  assert {e["source"] for e in corrupt} == {"sound_und", "sound_gen"}
  assert all("corrupt.wav" in e["reason"] for e in corrupt)
  warns = [json.loads(l) for l in open(os.path.join(out, "warnings.jsonl"))]
  assert [w["kind"] for w in warns] == ["resampled_from_44100"] and warns[0]["line"] == 4


def test_index_counts(written):
  out, index, _ = written
  want = {"music_und": 2, "sound_gen": 1, "music_gen": 1, "speech_und": 1, "text_only": 1, "sft": 1,
          "sound_und": 0}
  assert {k: v["records"] for k, v in index["sources"].items()} == want
  assert index["num_records"] == sum(want.values())
  for name, s in index["sources"].items():
    assert len(_read_source(out, name)) == s["records"]
    for shard in s["shards"]:
      assert os.path.exists(os.path.join(out, shard))
  # Token totals add up to what the records hold.
  text = sum(int(m["text_ids"].size) for name in want for r in _read_source(out, name)
             for m in r["messages"] if "text_ids" in m)
  assert sum(c["text_tokens"] for c in index["categories"].values()) == text
  assert index["categories"]["music"]["records"] == 3 and index["categories"]["music"]["audio_rows"] > 0
  assert json.load(open(os.path.join(out, "index.json"))) == json.loads(json.dumps(index))
  # Only finished shards match the reader's glob (markers are *.done, partial files *.partial-*).
  assert all(p.endswith(".array_record") for p in glob.glob(os.path.join(out, "*", "*.array_record*")))


def test_records_hold_the_right_content(written, corpus):
  out, _, _ = written
  d = corpus["dir"]
  tok = tokenizer.load_tokenizer(corpus["tokenizer"])
  xc = codes.XcodecBackend(corpus["xcodec"])
  uid = lambda s: list(np.asarray(tok.encode(s)) + 256)

  und = {r["id"]: r for r in _read_source(out, "music_und")}
  assert set(und) == {"m.jsonl:1:und", "m.jsonl:3:und"}
  r = und["m.jsonl:1:und"]
  assert r["task"] == "audio_to_text" and r["source"] == "music_und"
  (u, a) = r["messages"]
  assert (u["role"], u["modality"], a["role"], a["modality"]) == ("user", "audio", "assistant", "text")
  load = lambda name, **kw: features.load_audio(str(d / "wavs" / name), **kw)[0]  # PCM-16 on disk
  np.testing.assert_array_equal(u["mel"], features.mel_features(load("a.wav")))
  assert u["mel"].shape == (128, 150) and u["mel"].dtype == np.float16
  assert list(a["text_ids"]) == uid("A 440 Hz tone.")
  seg = und["m.jsonl:3:und"]["messages"][0]["mel"]
  assert seg.shape == (128, 150)  # 1.5 s segment [0.5, 2.0)
  np.testing.assert_array_equal(seg, features.mel_features(load("c.wav", start=0.5, end=2.0)))

  (g,) = _read_source(out, "sound_gen")
  assert g["id"] == "m.jsonl:2:gen" and g["task"] == "text_to_audio"
  (u, a) = g["messages"]
  assert u["modality"] == "text" and list(u["text_ids"]) == uid("A 220 Hz tone.")
  assert a["role"] == "assistant" and a["codes"].dtype == np.int16 and a["codes"].shape == (100, 8)
  np.testing.assert_array_equal(a["codes"], xc.encode(load("b.wav")))
  (mg,) = _read_source(out, "music_gen")
  assert mg["messages"][1]["codes"].shape == (75, 8)

  (sp,) = _read_source(out, "speech_und")
  assert sp["messages"][0]["mel"].shape == (128, 100)  # 1 s at 44.1 kHz, resampled

  (t,) = _read_source(out, "text_only")
  assert t["task"] == "text_only" and [m["role"] for m in t["messages"]] == ["assistant"]
  assert list(t["messages"][0]["text_ids"]) == uid("Pink noise has equal energy per octave.")

  (s,) = _read_source(out, "sft")
  assert s["id"] == "dlg1" and s["task"] == "dialogue"
  kinds = [(m["role"], m["modality"], [k for k in records.CONTENT_KEYS if k in m][0]) for m in s["messages"]]
  assert kinds == [("system", "text", "text_ids"), ("user", "audio", "mel"), ("user", "text", "text_ids"),
                   ("assistant", "text", "text_ids"), ("assistant", "audio", "codes")]
  assert s["messages"][4]["codes"].shape == (50, 8)


def test_gen_lines_without_codec_fail_fast(corpus, tmp_path):
  settings = build.BuildSettings(tokenizer=corpus["tokenizer"], codec="")
  with pytest.raises(ValueError, match=r"4 records need assistant audio codes .* but --codec is empty"):
    writer.write_shards([corpus["manifest"]], str(tmp_path), settings, num_workers=1, progress=False)


def _small_manifest(d, n=7) -> str:
  os.makedirs(d / "w", exist_ok=True)
  path = d / "small.jsonl"
  with open(path, "w") as f:
    for i in range(n):
      sf.write(d / f"w/{i}.wav", _tone(0.5 + 0.1 * i, 200 + 50 * i), 16000)
      f.write(json.dumps(dict(audio=f"w/{i}.wav", rich_caption=f"A {200 + 50 * i} Hz tone.",
                              direction="und", category="sound", dataset="t")) + "\n")
      f.write(json.dumps({"text": f"Fact number {i}."}) + "\n")
  return str(path)


def test_restart_skips_finished_shards(corpus, tmp_path):
  manifest = _small_manifest(tmp_path)
  out = str(tmp_path / "out")
  settings = build.BuildSettings(tokenizer=corpus["tokenizer"])
  logs = []
  first = writer.write_shards([manifest], out, settings, shard_size=3, num_workers=1, progress=False,
                              log=logs.append)
  assert first["sources"]["sound_und"]["records"] == 7 and len(first["sources"]["sound_und"]["shards"]) == 3
  assert (first["last_run"]["shards_built"], first["last_run"]["shards_skipped"]) == (6, 0)
  files = sorted(glob.glob(os.path.join(out, "*", "shard-*")))
  assert len(files) == 12  # 2 sources x 3 shards x (array_record + done)
  mtimes = {p: os.stat(p).st_mtime_ns for p in files}

  logs.clear()
  again = writer.write_shards([manifest], out, settings, shard_size=3, num_workers=1, progress=False,
                              log=logs.append)
  assert (again["last_run"]["shards_built"], again["last_run"]["shards_skipped"]) == (0, 6)
  assert "0 shards written, 6 already done" in logs[-1]
  assert {p: os.stat(p).st_mtime_ns for p in files} == mtimes
  assert again["sources"] == first["sources"]

  # A shard lost after its marker was written (or a killed run's partial file) is rebuilt alone.
  lost = os.path.join(out, "sound_und", "shard-00001-of-00003.array_record")
  os.remove(lost)
  partial = os.path.join(out, "sound_und", "shard-00001-of-00003.partial-999")
  open(partial, "wb").close()
  logs.clear()
  third = writer.write_shards([manifest], out, settings, shard_size=3, num_workers=1, progress=False,
                              log=logs.append)
  assert (third["last_run"]["shards_built"], third["last_run"]["shards_skipped"],
          third["last_run"]["items_built"]) == (1, 5, 3)
  assert os.path.exists(lost) and not os.path.exists(partial)
  rebuilt = os.path.join(out, "sound_und", "shard-00001-of-00003")
  assert {p: os.stat(p).st_mtime_ns for p in files if not p.startswith(rebuilt)} == {
      p: t for p, t in mtimes.items() if not p.startswith(rebuilt)}
  assert os.stat(rebuilt + ".done").st_mtime_ns != mtimes[rebuilt + ".done"]
  assert third["sources"] == first["sources"]
  ids = [r["id"] for r in _read_source(out, "sound_und")]
  assert ids == [f"small.jsonl:{2 * i + 1}:und" for i in range(7)]

  # A changed manifest line changes its shard's fingerprint: that shard is rebuilt.
  with open(manifest) as f:
    lines = f.readlines()
  lines[0] = lines[0].replace("A 200 Hz tone.", "A 200 Hz sine tone.")
  with open(manifest, "w") as f:
    f.writelines(lines)
  changed = writer.write_shards([manifest], out, settings, shard_size=3, num_workers=1, progress=False)
  assert (changed["last_run"]["shards_built"], changed["last_run"]["shards_skipped"]) == (1, 5)

  # Another shard size: the old plan's shards are removed, so a directory reader sees no duplicates.
  fourth = writer.write_shards([manifest], out, settings, shard_size=4, num_workers=1, progress=False)
  assert len(fourth["removed_stale_files"]) == 12
  assert len(_read_source(out, "sound_und")) == 7 and len(_read_source(out, "text_only")) == 7


def test_command_line(corpus, tmp_path):
  _small_manifest(tmp_path, n=2)
  out = tmp_path / "cli"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run(
      [sys.executable, "-m", "data_pipeline.write", f"--manifest={tmp_path}/small*.jsonl",
       f"--out_dir={out}", f"--tokenizer={corpus['tokenizer']}", "--direct_num_workers=1", "--shard_size=10"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert res.returncode == 0, res.stderr
  index = json.load(open(out / "index.json"))
  assert index["num_records"] == 4 and index["errors"]["total"] == 0
  assert "items/s" in res.stdout + res.stderr
  bad = subprocess.run(
      [sys.executable, "-m", "data_pipeline.write", f"--manifest={tmp_path}/nothing*.jsonl",
       f"--out_dir={out}", f"--tokenizer={corpus['tokenizer']}"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert bad.returncode != 0 and "matches no file" in bad.stderr


def test_progress_line(corpus, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(writer, "PROGRESS_EVERY_S", 0.05)
  manifest = _small_manifest(tmp_path, n=6)
  settings = build.BuildSettings(tokenizer=corpus["tokenizer"])
  writer.write_shards([manifest], str(tmp_path / "out"), settings, shard_size=1, num_workers=1, progress=True)
  err = capsys.readouterr().err
  assert "[data_pipeline.write] reading inputs" in err or "shards (12 items)" in err
  lines = [l for l in err.splitlines() if "shards (12 items)" in l]
  assert lines and "/12 shards" in lines[-1] and "ETA" in lines[-1]
