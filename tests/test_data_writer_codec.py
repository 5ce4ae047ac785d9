"""Codec backends: tiny random X-Codec through save/load, precomputed .npy codes, code validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from bagpiper_jax import audio
from bagpiper_jax import codec
from data_pipeline import codes as codes_lib


@pytest.fixture(scope="module")
def xcodec_dir(tmp_path_factory):
  return codec.build_tiny_xcodec(str(tmp_path_factory.mktemp("xcodec")), seed=0)


def _noise(n, seed=0):
  return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def test_tiny_xcodec_shapes_range_and_determinism(xcodec_dir, tmp_path):
  backend = codes_lib.XcodecBackend(xcodec_dir, num_threads=1)
  for n in (16000, 16000 * 3 + 123, 4000):
    c = backend.encode(_noise(n))
    assert c.dtype == np.int16 and c.ndim == 2 and c.shape[1] == 8
    assert c.shape[0] == n // 320, (n, c.shape)  # the reference framing (tests/test_codec_framing.py)
    assert c.min() >= 0 and c.max() <= 1023
  c = backend.encode(_noise(48000))
  assert c.shape == (150, 8)
  # Random codebooks (XcodecModel would zero them): codes must vary, or the test data is degenerate.
  assert len(np.unique(c)) > 100 and len(np.unique(c[:, 0])) > 10
  # Rebuilding with the same seed elsewhere gives the same model, hence the same codes.
  again = codes_lib.XcodecBackend(codec.build_tiny_xcodec(str(tmp_path / "again"), seed=0))
  np.testing.assert_array_equal(again.encode(_noise(48000)), c)
  other = codes_lib.XcodecBackend(codec.build_tiny_xcodec(str(tmp_path / "other"), seed=1))
  assert not np.array_equal(other.encode(_noise(48000)), c)


def test_xcodec_encode_file_cuts_segment(xcodec_dir, tmp_path):
  backend = codes_lib.load_codec(f"xcodec:{xcodec_dir}")
  x = _noise(16000 * 2)
  path = str(tmp_path / "a.wav")
  sf.write(path, x, 16000, subtype="FLOAT")
  whole = backend.encode_file(path)
  np.testing.assert_array_equal(whole, backend.encode(x))
  seg = backend.encode_file(path, start=0.5, end=1.5)
  assert seg.shape == (50, 8)
  with pytest.raises(audio.AudioError, match="nope.wav: file not found"):
    backend.encode_file(str(tmp_path / "nope.wav"))


def test_check_codes_rejects_bad_layouts():
  good = np.zeros((10, 8), np.int64)
  assert codec.check_codes(good, "x").dtype == np.int16
  with pytest.raises(codec.CodecError, match=r"bad.npy: codes must be \[T>0, 8\], got shape \(8, 10\)"):
    codec.check_codes(good.T, "bad.npy")
  with pytest.raises(codec.CodecError, match=r"must lie in \[0, 1024\), got range \[1024, 1024\]"):
    codec.check_codes(np.full((3, 8), 1024), "x")
  with pytest.raises(codec.CodecError, match="range"):
    codec.check_codes(np.full((3, 8), -1), "x")
  with pytest.raises(codec.CodecError, match="integers"):
    codec.check_codes(np.zeros((3, 8), np.float32), "x")
  with pytest.raises(codec.CodecError, match="shape"):
    codec.check_codes(np.zeros((3, 4), np.int16), "x")


def test_npy_backend_next_to_audio_and_in_dir(tmp_path):
  codes = np.random.default_rng(0).integers(0, 1024, size=(100, 8))
  audio = tmp_path / "clip.flac"
  np.save(tmp_path / "clip.npy", codes)
  b = codes_lib.load_codec("npy")
  assert isinstance(b, codes_lib.NpyCodesBackend) and not b.needs_waveform
  np.testing.assert_array_equal(b.encode_file(str(audio)), codes)
  np.testing.assert_array_equal(b.encode_file(str(audio), start=0.5, end=1.0), codes[25:50])
  with pytest.raises(codec.CodecError, match="outside"):
    b.encode_file(str(audio), start=1.0, end=3.0)
  other = tmp_path / "codes"
  other.mkdir()
  np.save(other / "clip.npy", codes.T)  # wrong layout: rejected, never transposed silently
  with pytest.raises(codec.CodecError, match="shape"):
    codes_lib.load_codec(f"npy:{other}").encode_file(str(audio))
  with pytest.raises(codec.CodecError, match="precomputed codes not found"):
    b.encode_file(str(tmp_path / "missing.wav"))
  with pytest.raises(NotImplementedError):
    b.encode(np.zeros(16000, np.float32))


def test_codec_spec_errors(tmp_path):
  assert codes_lib.load_codec("") is None
  with pytest.raises(ValueError, match="expected"):
    codes_lib.check_codec_spec("encodec:/x")
  with pytest.raises(ValueError, match="needs a directory .* holding an XcodecModel"):
    codes_lib.check_codec_spec(f"xcodec:{tmp_path}")
  with pytest.raises(ValueError, match="not a directory"):
    codes_lib.check_codec_spec(f"npy:{tmp_path / 'nope'}")


def test_batched_encode_equals_one_at_a_time(xcodec_dir):
  """Equal-length clips in one encoder call give exactly the codes of one call per clip."""
  backend = codes_lib.XcodecBackend(xcodec_dir, num_threads=1)
  for n in (16000, 16000 * 2 + 123):
    wavs = [_noise(n, seed=s) for s in range(4)]
    batched = backend.encode_batch(wavs, [f"clip{s}" for s in range(4)])
    for w, c in zip(wavs, batched):
      np.testing.assert_array_equal(c, backend.encode(w))


def test_builder_batches_equal_lengths_and_attributes_failures(xcodec_dir, tmp_path):
  from bagpiper_jax.data import records  # pylint: disable=g-import-not-at-top
  from data_pipeline import build, manifest, tokenizer_train  # pylint: disable=g-import-not-at-top
  tok = tokenizer_train.train_sentencepiece(["A noise clip."] * 4, str(tmp_path / "spm"), 300)
  lines = []
  for i, n in enumerate((16000, 16000, 24000, 16000, 16000)):
    sf.write(tmp_path / f"{i}.wav", _noise(n, seed=i), 16000)
    lines.append({"audio": f"{i}.wav", "rich_caption": "A noise clip.", "direction": "gen",
                  "category": "sound", "dataset": "t"})
  (tmp_path / "3.wav").write_bytes(b"RIFFjunk" * 10)  # fails when loaded, before the batch is encoded
  m = tmp_path / "m.jsonl"
  m.write_text("".join(json.dumps(l) + "\n" for l in lines))
  items, _ = manifest.read_manifests([str(m)])
  settings = build.BuildSettings(tokenizer=tok, codec=f"xcodec:{xcodec_dir}")
  one = build.Builder(settings, codec_batch_size=1)
  calls = []
  batched = build.Builder(settings, codec_batch_size=4)
  real = batched.codec.encode_batch
  batched.codec.encode_batch = lambda w, p: calls.append(len(w)) or real(w, p)
  got, want = batched.build_many(items), [one.build(it) for it in items]
  assert sorted(calls) == [1, 3]  # 3 one-second clips together, the 1.5 s clip alone
  for g, w in zip(got, want):
    assert (g.error is None) == (w.error is None)
    if g.error is None:
      assert records.encode(g.record) == records.encode(w.record)
  assert [r.error["kind"] if r.error else None for r in got] == [None, None, None, "corrupt_audio", None]


def test_codec_device_cuda_without_gpu_says_so(xcodec_dir):
  torch = pytest.importorskip("torch")
  if torch.cuda.is_available():
    pytest.skip("this machine has a GPU")
  with pytest.raises(RuntimeError, match="--codec_device=cuda but torch sees no CUDA device"):
    codes_lib.load_codec(f"xcodec:{xcodec_dir}", device="cuda")
  with pytest.raises(ValueError, match="--codec_device 'tpu'"):
    codes_lib.load_codec(f"xcodec:{xcodec_dir}", device="tpu")


def test_failed_batch_falls_back_to_one_clip_at_a_time(xcodec_dir, tmp_path):
  from data_pipeline import build, manifest, tokenizer_train  # pylint: disable=g-import-not-at-top
  tok = tokenizer_train.train_sentencepiece(["A noise clip."] * 4, str(tmp_path / "spm"), 300)
  rows = []
  for i in range(3):
    sf.write(tmp_path / f"{i}.wav", _noise(16000, seed=i), 16000)
    rows.append({"audio": f"{i}.wav", "rich_caption": "A noise clip.", "direction": "gen",
                 "category": "sound", "dataset": "t"})
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  items, _ = manifest.read_manifests([str(tmp_path / "m.jsonl")])
  b = build.Builder(build.BuildSettings(tokenizer=tok, codec=f"xcodec:{xcodec_dir}"), codec_batch_size=3)

  def broken(wavs, paths):
    raise codec.CodecError(f"{paths[0]}: batch failed")

  real_file = b.codec.encode_file
  b.codec.encode_batch = broken
  b.codec.encode_file = lambda p, **kw: (_ for _ in ()).throw(codec.CodecError(f"{p}: bad clip")) \
      if p.endswith("1.wav") else real_file(p, **kw)
  res = b.build_many(items)
  assert [r.error["kind"] if r.error else None for r in res] == [None, "codec", None]
  assert "1.wav: bad clip" in res[1].error["reason"]
  np.testing.assert_array_equal(res[0].record["messages"][1]["codes"],
                                codes_lib.XcodecBackend(xcodec_dir).encode(_noise(16000, seed=0)))
