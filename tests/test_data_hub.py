"""The published data's own files as input (Hub parquet with Ogg/Opus bytes, WebDataset tars), the
curation filters, an object-store file system (paths with a scheme), and bad input that must stop
before any work."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata, FileSystem

from bagpiper_jax import audio as features
from bagpiper_jax import tokenizer
from bagpiper_jax.data import records
from data_pipeline import build
from data_pipeline import codes
from data_pipeline import filters
from data_pipeline import hub
from data_pipeline import tokenizer_train
from data_pipeline import writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tone(seconds: float, freq: float, sr: int = 16000) -> np.ndarray:
  t = np.arange(int(seconds * sr)) / sr
  return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _encode(x: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
  b = io.BytesIO()
  sf.write(b, x, sr, format=fmt, subtype=subtype)
  return b.getvalue()


def opus(x, sr=16000) -> bytes:
  return _encode(x, sr, "OGG", "OPUS")


def flac(x, sr=16000) -> bytes:
  return _encode(x, sr, "FLAC", "PCM_16")


def _read_file(path: str) -> list[dict]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  r = array_record_module.ArrayRecordReader(path)
  out = [records.decode(b) for b in r.read_all()]
  r.close()
  return out


def _read(out_dir: str, source: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(out_dir, source, "*.array_record")))
  return [r for p in paths for r in _read_file(p)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  return tokenizer_train.train_sentencepiece(
      ["A 440 Hz tone.", "A low 220 Hz hum.", "Noise.", "A chirp rising."] * 5, str(d / "spm"), 300)


@pytest.fixture(scope="module")
def xcodec(tmp_path_factory):
  pytest.importorskip("transformers")
  from bagpiper_jax import codec  # pylint: disable=g-import-not-at-top
  return codec.build_tiny_xcodec(str(tmp_path_factory.mktemp("xcodec")))


def hub_row(audio, caption, direction="und", category="music", sample_rate=16000, i=0, **kw):
  row = {"audio": None if audio is None else {"bytes": audio, "path": None}, "rich_caption": caption,
         "direction": direction, "category": category, "example_id": f"ds/{category}/{direction}/utt{i}",
         "dataset": "ds", "source_utt_id": f"utt{i}", "sample_rate": sample_rate, "channels": 1,
         "audio_format": "opus", "start_time": 10.0, "end_time": 10.0 + 2.0}
  row.update(kw)
  return row


def write_parquet(path, rows, row_group_size=2):
  schema = pa.schema([("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("rich_caption", pa.string()), ("direction", pa.string()), ("category", pa.string()),
                      ("example_id", pa.string()), ("dataset", pa.string()), ("source_utt_id", pa.string()),
                      ("sample_rate", pa.int32()), ("channels", pa.int32()), ("audio_format", pa.string()),
                      ("start_time", pa.float64()), ("end_time", pa.float64())])
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
  return str(path)


def test_opus_bytes_decode_here():
  """The Hub's audio is Ogg/Opus: libsndfile (via soundfile) decodes it from memory, here too."""
  x = _tone(2.0, 440)
  data = opus(x)
  assert data[:4] == b"OggS" and data[28:36] == b"OpusHead"  # the layout seen in the Hub preview
  wav, sr = features.load_audio("x.parquet#row=0", data=data)
  assert sr == 16000 and wav.shape == (32000,)
  spec = np.abs(np.fft.rfft(wav[:16000]))
  assert abs(int(np.argmax(spec)) - 440) <= 2  # 1 Hz bins: the tone survives the lossy codec


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("hub")
  hi = _tone(1.0, 500, 44100)
  rows = [hub_row(opus(_tone(2.0, 440)), "A 440 Hz tone.", "und,gen", i=0),
          hub_row(flac(hi, 44100), "A 500 Hz tone.", "und", "sound", sample_rate=44100, i=1),  # resampled
          hub_row(opus(_tone(2.0, 220)), None, i=2),  # missing caption
          hub_row(None, "Gone.", "gen", "sound", i=3),  # no audio
          hub_row(b"\x00junk" * 50, "Broken.", "und", "sound", i=4),  # corrupt bytes
          hub_row(opus(_tone(2.0, 220), 48000), "A low 220 Hz hum.", "und", "music", i=5),  # says 16 kHz
          hub_row(opus(_tone(2.0, 330)), "A chirp rising.", "gen", "music", i=6)]
  return write_parquet(d / "train-00000-of-00001.parquet", rows), rows


def test_parquet_rows_become_records_and_errors(parquet_corpus, tok, xcodec, tmp_path):
  path, rows = parquet_corpus
  settings = build.BuildSettings(tokenizer=tok, codec=f"xcodec:{xcodec}")
  index = writer.write_shards([path], str(tmp_path), settings, shard_size=2, num_workers=1, progress=False)
  assert {k: v["records"] for k, v in index["sources"].items()} == {
      "music_und": 1, "music_gen": 2, "sound_und": 1, "sound_gen": 0}
  errs = [json.loads(l) for l in open(tmp_path / "errors.jsonl")]
  got = {(e["kind"], e["line"], e["audio"]) for e in errs}
  assert got == {("missing_field", 3, f"{path}#row=2"), ("missing_audio", 4, f"{path}#row=3"),
                 ("corrupt_audio", 5, f"{path}#row=4"), ("sample_rate", 6, f"{path}#row=5")}
  assert all(e["manifest"] == path for e in errs)
  assert "'rich_caption'" in next(e for e in errs if e["kind"] == "missing_field")["reason"]
  warns = [json.loads(l) for l in open(tmp_path / "warnings.jsonl")]
  assert [(w["kind"], w["line"]) for w in warns] == [("resampled_from_44100", 2)]

  und = {r["id"]: r for r in _read(str(tmp_path), "music_und")}
  (rec,) = und.values()
  assert rec["id"] == "ds/music/und,gen/utt0:und"
  wav, _ = features.load_audio("ref", data=rows[0]["audio"]["bytes"])
  np.testing.assert_array_equal(rec["messages"][0]["mel"], features.mel_features(wav))
  gen = {r["id"]: r for r in _read(str(tmp_path), "music_gen")}
  assert set(gen) == {"ds/music/und,gen/utt0:gen", "ds/music/gen/utt6:gen"}
  backend = codes.XcodecBackend(xcodec)
  wav6, _ = features.load_audio("ref", data=rows[6]["audio"]["bytes"])
  np.testing.assert_array_equal(gen["ds/music/gen/utt6:gen"]["messages"][1]["codes"], backend.encode(wav6))
  # The 44.1 kHz FLAC row: resampled to 16 kHz, 1 s.
  assert _read(str(tmp_path), "sound_und")[0]["messages"][0]["mel"].shape == (128, 100)


def test_parquet_segments_cut_only_when_asked(tmp_path, tok):
  path = write_parquet(tmp_path / "long.parquet", [hub_row(flac(_tone(4.0, 440)), "A 440 Hz tone.", i=0,
                                                           start_time=1.0, end_time=2.5)])
  settings = build.BuildSettings(tokenizer=tok)
  (items,), _ = zip(*hub.read_parquet(path))
  assert items[0].row["source_start"] == 1.0 and "start" not in items[0].row
  whole = writer.write_shards([path], str(tmp_path / "a"), settings, num_workers=1, progress=False)
  cut = writer.write_shards([path], str(tmp_path / "b"), settings, num_workers=1, progress=False,
                            cut_segments=True)
  assert whole["num_records"] == cut["num_records"] == 1
  assert _read(str(tmp_path / "a"), "music_und")[0]["messages"][0]["mel"].shape == (128, 400)
  assert _read(str(tmp_path / "b"), "music_und")[0]["messages"][0]["mel"].shape == (128, 150)


def _tar(path, members: list[tuple[str, bytes]]) -> str:
  mode = "w:gz" if str(path).endswith(".gz") else "w"
  with tarfile.open(path, mode) as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      info.mtime = 0
      tf.addfile(info, io.BytesIO(data))
  return str(path)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_webdataset_tar(tmp_path, tok, suffix):
  meta = lambda i, cap, d="und": json.dumps({"rich_caption": cap, "direction": d, "category": "sound",
                                             "dataset": "ds", "example_id": f"ex{i}"}).encode()
  path = _tar(tmp_path / f"shard-000{suffix}", [
      ("s/k0.json", meta(0, "A 440 Hz tone.")), ("s/k0.flac", flac(_tone(1.0, 440))),
      ("s/k1.opus", opus(_tone(1.5, 220))), ("s/k1.json", meta(1, "A low 220 Hz hum.")),
      ("s/k2.json", meta(2, "Noise.")),  # no audio
      ("s/k3.wav", flac(_tone(1.0, 330))),  # no json
      ("s/k4.json", b"{broken"), ("s/k4.flac", flac(_tone(1.0, 330))),
      ("s/k5.json", meta(5, "A chirp rising.")), ("s/k5.flac", flac(_tone(0.5, 660)))])
  settings = build.BuildSettings(tokenizer=tok)
  index = writer.write_shards([path], str(tmp_path / "out"), settings, shard_size=2, num_workers=1,
                              progress=False)
  recs = _read(str(tmp_path / "out"), "sound_und")
  assert [r["id"] for r in recs] == ["ex0:und", "ex1:und", "ex5:und"] == [
      f"ex{i}:und" for i in (0, 1, 5)]
  assert recs[1]["messages"][0]["mel"].shape == (128, 150)
  errs = [json.loads(l) for l in open(tmp_path / "out" / "errors.jsonl")]
  assert [(e["kind"], e["line"]) for e in errs] == [("missing_pair", 3), ("missing_pair", 4), ("bad_json", 5)]
  assert "s/k2.json" in errs[0]["reason"] and "without an audio member" in errs[0]["reason"]
  assert "s/k3.wav" in errs[1]["reason"] and "without s/k3.json" in errs[1]["reason"]
  assert index["num_records"] == 3


def _de_bruijn(words: tuple, k: int, n: int = 5) -> str:
  """k words over a small vocabulary with no 5-gram repeated (a window of a de Bruijn sequence)."""
  a, seq = [0] * len(words) * n, []

  def db(t, p):
    if t > n:
      if n % p == 0:
        seq.extend(a[1:p + 1])
    else:
      a[t] = a[t - p]
      db(t + 1, p)
      for j in range(a[t - p] + 1, len(words)):
        a[t] = j
        db(t + 1, t)

  db(1, 1)
  for start in range(len(seq) - k):  # a window without 4 equal words in a row
    window = [words[i] for i in seq[start:start + k]]
    if filters.longest_word_run(window) <= 3:
      return " ".join(window)
  raise AssertionError("no window")


def test_curation_filters_reference_definitions():
  s = filters.REFERENCE
  ok = ("A bright solo violin plays a slow melody in a large hall while soft rain falls on a window "
        "and a distant train passes by.")
  assert filters.caption_reason(s, ok, 300) is None
  cases = {
      "non_latin": ok + " 音楽", "char_repetition": ok + " Soooooo", "word_repetition": "very " * 4 + ok,
      "ngram_repetition": ok + " " + ok, "unique_word_ratio_low": _de_bruijn(("red", "blue", "green"), 16),
      "avg_word_length_low": "a b c d e f g h i j k l m n o p", "uppercase_ratio_high": ok.upper()}
  assert filters.ngram_repetition_ratio(cases["unique_word_ratio_low"].split(), 5) == 0.0
  for name, cap in cases.items():
    assert filters.caption_reason(s, cap, 300)[0] == f"filter_{name}", name
  assert filters.caption_reason(s, "Supercalifragilisticexpialidocious extraordinarily", 300)[0] == \
      "filter_avg_word_length_high"
  assert filters.caption_reason(s, ok, 199)[0] == "filter_tokens_low"
  assert filters.caption_reason(s, ok, 801)[0] == "filter_tokens_high"
  assert filters.duration_reason(s, 30.5)[0] == "filter_duration_high"
  assert filters.duration_reason(s, 0.1) is None  # the recipe's minimum is 0
  assert filters.ngram_repetition_ratio("a b c d".split(), 5) == 0.0  # fewer words than n
  off = filters.FilterSettings()
  assert not off.enabled and filters.REFERENCE.enabled
  for cap in cases.values():
    assert filters.caption_reason(off, cap, 0) is None


def test_filters_drop_records_counted_by_reason(parquet_corpus, tok, xcodec, tmp_path):
  path, rows = parquet_corpus
  n_tok = lambda cap: len(tokenizer.load_tokenizer(tok).encode(cap))
  shortest = n_tok("Gone.")
  assert all(n_tok(r["rich_caption"]) > shortest for r in rows if r["rich_caption"] not in (None, "Gone."))
  settings = build.BuildSettings(tokenizer=tok, codec=f"xcodec:{xcodec}", filters=filters.FilterSettings(
      max_duration=1.5, min_caption_tokens=shortest + 1))
  index = writer.write_shards([path], str(tmp_path), settings, shard_size=4, num_workers=1, progress=False)
  errs = [json.loads(l) for l in open(tmp_path / "errors.jsonl")]
  dropped = sorted((e["kind"], e["line"], e["source"]) for e in errs if e["kind"].startswith("filter_"))
  # The 2 s clips go (duration; line 1 twice: und and gen), the 1 s 500 Hz clip stays; line 4's caption
  # is too short (checked before its audio, which is missing, would be opened).
  assert dropped == [("filter_duration_high", 1, "music_gen"), ("filter_duration_high", 1, "music_und"),
                     ("filter_duration_high", 7, "music_gen"), ("filter_tokens_low", 4, "sound_gen")]
  assert index["filtered"] == {"total": 4, "by_reason": {"duration_high": 3, "tokens_low": 1}}
  assert index["errors"]["by_kind"]["filter_duration_high"] == 3
  assert index["num_records"] == 1 and index["sources"]["sound_und"]["records"] == 1


# -- an object store (paths with a scheme), in memory, for the remote code paths ----------------------

_STORE: dict[str, bytes] = {}


class _MemWrite(io.BytesIO):
  def __init__(self, path):
    super().__init__()
    self.path = path

  def close(self):
    _STORE[self.path] = self.getvalue()  # an object appears when its upload finishes
    super().close()


class MemFileSystem(FileSystem):
  """`mem://bucket/key`: flat keys, no directories, like gs://. Registered by subclassing."""

  @classmethod
  def scheme(cls):
    return "mem"

  def join(self, basepath, *paths):
    return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

  def split(self, path):
    head, _, tail = path.rpartition("/")
    return head, tail

  def mkdirs(self, path):
    pass

  def has_dirs(self):
    return False

  def _list(self, dir_or_prefix):
    for k, v in sorted(_STORE.items()):
      if k.startswith(dir_or_prefix):
        yield FileMetadata(k, len(v), time.time())

  def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
    return _MemWrite(path)

  def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
    if path not in _STORE:
      raise BeamIOError(f"no {path}")
    raw = io.BytesIO(_STORE[path])
    if compression_type == CompressionTypes.AUTO:
      compression_type = CompressionTypes.detect_compression_type(path)
    return raw if compression_type == CompressionTypes.UNCOMPRESSED else CompressedFile(raw, compression_type)

  def copy(self, source_file_names, destination_file_names):
    for s, d in zip(source_file_names, destination_file_names):
      _STORE[d] = _STORE[s]

  def rename(self, source_file_names, destination_file_names):
    for s, d in zip(source_file_names, destination_file_names):
      _STORE[d] = _STORE.pop(s)

  def exists(self, path):
    return path in _STORE

  def size(self, path):
    return len(_STORE[path])

  def last_updated(self, path):
    return time.time()

  def checksum(self, path):
    return str(hash(_STORE[path]))

  def metadata(self, path):
    return FileMetadata(path, len(_STORE[path]), time.time())

  def delete(self, paths):
    for p in paths:
      _STORE.pop(p, None)


def test_object_store_inputs_and_outputs(parquet_corpus, tok, xcodec, tmp_path):
  """Manifest, audio, parquet, tokenizer and output all behind a scheme: the paths a cluster job
  uses (gs://), through the same Beam file system calls."""
  _STORE.clear()
  path, _ = parquet_corpus
  _STORE["mem://b/in/hub.parquet"] = open(path, "rb").read()
  _STORE["mem://b/in/wavs/a.flac"] = flac(_tone(1.0, 440))
  _STORE["mem://b/in/m.jsonl"] = (json.dumps({"audio": "wavs/a.flac", "rich_caption": "A 440 Hz tone.",
                                             "direction": "und", "category": "music", "dataset": "x"})
                                  + "\n").encode()
  _STORE["mem://b/tok/spm.model"] = open(tok, "rb").read()
  settings = build.BuildSettings(tokenizer="mem://b/tok/spm.model", codec=f"xcodec:{xcodec}")
  inputs = ["mem://b/in/m.jsonl", "mem://b/in/hub.parquet"]
  index = writer.write_shards(inputs, "mem://b/out", settings, shard_size=2, num_workers=1, progress=False)
  # music_und spans both inputs: the JSONL line, then parquet rows 0 and 5 (5: wrong sample rate).
  assert {k: v["records"] for k, v in index["sources"].items()} == {
      "music_und": 2, "music_gen": 2, "sound_und": 1, "sound_gen": 0}
  shards = sorted(k for k in _STORE if k.endswith(".array_record"))
  assert shards == ["mem://b/out/music_gen/shard-00000-of-00001.array_record",
                    "mem://b/out/music_und/shard-00000-of-00002.array_record",
                    "mem://b/out/sound_und/shard-00000-of-00001.array_record"]
  reader_ids = []
  for k in shards:
    local = tmp_path / "shard.array_record"
    local.write_bytes(_STORE[k])
    reader_ids += [r["id"] for r in _read_file(str(local))]
  assert reader_ids[:3] == ["ds/music/und,gen/utt0:gen", "ds/music/gen/utt6:gen", "m.jsonl:1:und"]
  assert json.loads(_STORE["mem://b/out/index.json"])["num_records"] == 5
  assert len(_STORE["mem://b/out/errors.jsonl"].decode().splitlines()) == 4
  assert not [k for k in _STORE if ".write_run" in k or ".partial" in k]
  again = writer.write_shards(inputs, "mem://b/out", settings, shard_size=2, num_workers=1, progress=False)
  assert (again["last_run"]["shards_built"], again["last_run"]["shards_skipped"]) == (0, 5)


def test_bad_paths_stop_before_any_work(parquet_corpus, tok, tmp_path):
  path, _ = parquet_corpus
  settings = build.BuildSettings(tokenizer=tok)
  with pytest.raises(ValueError, match=r"--manifest .*nope.parquet: no such file"):
    writer.write_shards([path, str(tmp_path / "nope.parquet")], str(tmp_path / "o"), settings, progress=False)
  with pytest.raises(ValueError, match=r"--manifest .*data.csv: unknown kind of input"):
    writer.write_shards([str(tmp_path / "data.csv")], str(tmp_path / "o"), settings, progress=False)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match=r"--out_dir .*a_file/out: not writable"):
    writer.write_shards([path], str(blocker / "out"), settings, progress=False)
  with pytest.raises(ValueError, match="has no file name to find precomputed .npy codes"):
    writer.write_shards([path], str(tmp_path / "o"), build.BuildSettings(tokenizer=tok, codec="npy"),
                        progress=False)
  assert not (tmp_path / "o").exists()  # nothing was started
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-m", "data_pipeline.write", f"--manifest={path}",
                        f"--out_dir={blocker}/out", f"--tokenizer={tok}"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr
