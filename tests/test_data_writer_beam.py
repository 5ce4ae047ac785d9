"""The Beam writer against the multiprocessing pool engine it replaced (data_pipeline/pool_writer.py):
the same shard files byte for byte, the same markers, index.json, errors.jsonl and warnings.jsonl for
the same manifests and settings; every input line ends up in a shard or in errors.jsonl.

(This test was first run against the original pool writer, unchanged, before that was reduced to
the peer that shares the shard writer and the summary with the pipeline; what it checks now is the
Beam plan, grouping and ordering against a plain sequential plan.)"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import soundfile as sf

from bagpiper_jax import codec
from bagpiper_jax.data import records
from data_pipeline import writer as beam_writer
from data_pipeline import build
from data_pipeline import demo
from data_pipeline import manifest as manifest_lib
from data_pipeline import pool_writer


def _tone(seconds: float, freq: float, sr: int = 16000) -> np.ndarray:
  t = np.arange(int(seconds * sr)) / sr
  return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
  pytest.importorskip("transformers")
  d = tmp_path_factory.mktemp("demo")
  paths = demo.make_demo_data(str(d), num_clips=40, seed=0, use_espeak=False)
  return paths, codec.build_tiny_xcodec(str(d / "xcodec"))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, demo_inputs):
  """A manifest with every kind of bad line, split over two files (sources span both)."""
  d = tmp_path_factory.mktemp("bad")
  (d / "w").mkdir()
  sf.write(d / "w/a.wav", _tone(1.5, 440), 16000)
  sf.write(d / "w/b.wav", _tone(2.0, 220), 16000)
  sf.write(d / "w/hi.wav", _tone(1.0, 500, 44100), 44100)
  (d / "w/corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 16)
  row = lambda audio, cap, direction, cat, **kw: dict(audio=audio, rich_caption=cap, direction=direction,
                                                      category=cat, dataset="t", **kw)
  first = [row("w/a.wav", "A 440 Hz tone.", "und,gen", "music"),
           row("w/corrupt.wav", "Broken.", "und,gen", "sound"),
           row("w/missing.wav", "Gone.", "und", "sound"),
           row("w/hi.wav", "A 500 Hz tone.", "und", "music"),
           row("w/a.wav", "  ", "und", "music"),
           {"text": "Pink noise has equal energy per octave."}]
  second = [row("w/b.wav", "A 220 Hz tone.", "gen", "music", start=0.5, end=1.5),
            row("w/a.wav", "x", "sideways", "music"),
            row("w/b.wav", "A 220 Hz tone.", "und", "sound", sample_rate=48000),
            {"text": "A square wave has odd harmonics."},
            row("w/a.wav", "A tone again.", "und", "music")]
  paths = []
  for name, rows in (("m1.jsonl", first), ("m2.jsonl", second)):
    with open(d / name, "w") as f:
      for i, r in enumerate(rows):
        f.write(json.dumps(r) + "\n")
        if i == 2:
          f.write("{not json\n\n")
    paths.append(str(d / name))
  return paths, demo_inputs[0].tokenizer, demo_inputs[1]


def _tree(root: str) -> dict[str, bytes]:
  out = {}
  for p in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
    if os.path.isfile(p):
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _assert_same_output(a: str, b: str) -> int:
  """Pool output dir `a` vs Beam output dir `b`; returns the number of shard files compared."""
  ta, tb = _tree(a), _tree(b)
  assert sorted(ta) == sorted(tb)  # the shard layout (and nothing else left behind)
  shards = [k for k in ta if k.endswith(".array_record")]
  for k in shards:
    assert ta[k] == tb[k], k  # the ArrayRecord files, byte for byte
  for k in (k for k in ta if k.endswith(".done")):
    ma, mb = json.loads(ta[k]), json.loads(tb[k])
    ma.pop("seconds"), mb.pop("seconds")
    assert ma == mb, k
  for name in (beam_writer.ERRORS_FILE, beam_writer.WARNINGS_FILE):
    assert ta[name] == tb[name], name
  ia, ib = json.loads(ta["index.json"]), json.loads(tb["index.json"])
  assert set(ib) == set(ia)
  for k in ia:
    if k != "last_run":
      assert ia[k] == ib[k], k
  return len(shards)


def _run_both(tmp_path, inputs, settings, shard_size, workers):
  """Pool (`workers` processes; 1: in this process) and Beam (DirectRunner, as many workers)."""
  pool = pool_writer.write_shards(inputs, str(tmp_path / "pool"), settings, shard_size=shard_size,
                                  num_workers=workers if workers > 1 else 0, progress=False)
  beam = beam_writer.write_shards(inputs, str(tmp_path / "beam"), settings, shard_size=shard_size,
                                  num_workers=workers, progress=False)
  return pool, beam


def test_demo_manifests_same_bytes_as_pool_writer(demo_inputs, tmp_path):
  paths, xcodec = demo_inputs
  settings = build.BuildSettings(tokenizer=paths.tokenizer, codec=f"xcodec:{xcodec}")
  pool, beam = _run_both(tmp_path, paths.manifests["train"], settings, shard_size=8, workers=2)
  assert beam["num_records"] == pool["num_records"] > 50 and beam["errors"]["total"] == 0
  assert beam["last_run"]["runner"] == "DirectRunner" and beam["last_run"]["num_workers"] == 2
  assert _assert_same_output(str(tmp_path / "pool"), str(tmp_path / "beam")) >= 8


def test_bad_lines_same_reports_as_pool_writer(bad_inputs, tmp_path):
  manifests, tok, xcodec = bad_inputs
  settings = build.BuildSettings(tokenizer=tok, codec=f"xcodec:{xcodec}")
  pool, beam = _run_both(tmp_path, manifests, settings, shard_size=2, workers=1)
  assert beam["errors"]["by_kind"] == {"bad_json": 2, "corrupt_audio": 2, "missing_audio": 1,
                                       "empty_caption": 1, "bad_direction": 1, "sample_rate": 1}
  _assert_same_output(str(tmp_path / "pool"), str(tmp_path / "beam"))


def _read_ids(out_dir: str) -> list[str]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  ids = []
  for path in glob.glob(os.path.join(out_dir, "*", "*.array_record")):
    reader = array_record_module.ArrayRecordReader(path)
    ids += [records.decode(b)["id"] for b in reader.read_all()]
    reader.close()
  return ids


def test_every_input_line_in_a_shard_or_in_errors(bad_inputs, tmp_path):
  manifests, tok, xcodec = bad_inputs
  settings = build.BuildSettings(tokenizer=tok, codec=f"xcodec:{xcodec}")
  index = beam_writer.write_shards(manifests, str(tmp_path), settings, shard_size=3, num_workers=1,
                                   progress=False)
  errors = [json.loads(l) for l in open(tmp_path / "errors.jsonl")]
  lines = {(m, i) for m in manifests for i, l in enumerate(open(m), start=1) if l.strip()}
  items, _ = manifest_lib.read_manifests(manifests)
  item_lines = {(it.manifest, it.line) for it in items}
  line_errors = [e for e in errors if (e["manifest"], e["line"]) not in item_lines]
  item_errors = [e for e in errors if (e["manifest"], e["line"]) in item_lines]
  # Each non-blank line became items or exactly one line error ...
  assert item_lines | {(e["manifest"], e["line"]) for e in line_errors} == lines
  assert len(line_errors) == len(lines - item_lines) == 4
  # ... and each item a record or an error: counted both ways.
  ids = _read_ids(str(tmp_path))
  assert sorted(ids + [e["id"] for e in item_errors]) == sorted(it.id for it in items)
  assert index["num_records"] == len(ids) == len(items) - len(item_errors) == 7
