"""Log-mel parity with transformers' WhisperFeatureExtractor, and audio loading edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import transformers

from bagpiper_jax import audio as features


def _clip(n: int, seed: int = 0) -> np.ndarray:
  """A tone plus noise with a 0.1 s fade-out, so the loudest frame is never in the last 25 ms."""
  rng = np.random.default_rng(seed)
  t = np.arange(n) / 16000
  x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t * (1 + t))
  x = x + 0.05 * rng.standard_normal(n)
  x *= np.minimum(1.0, (n - np.arange(n)) / 1600)
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def extractor():
  return transformers.WhisperFeatureExtractor(feature_size=128)


def _reference(extractor, x):
  """The reference's call (ESPnet ContinuousAudioIO.preprocess): one clip, do_normalize=True,
  max_length = its own length, so no padding; then its first n // 160 frames."""
  n = x.shape[0]
  out = extractor([x], sampling_rate=16000, do_normalize=True, max_length=n, truncation=False,
                  return_attention_mask=True, return_tensors="np")["input_features"][0]
  return out[:, : n // 160]


@pytest.mark.parametrize("n", [16000 * 2 + 100, 48000, 48020, 5000, 250, 19752])
def test_matches_reference_extractor_with_normalization(extractor, n):
  """The default log_mel is WhisperFeatureExtractor(feature_size=128, do_normalize=True) on the clip."""
  x = _clip(n) + np.float32(0.05)  # a DC offset too, so the mean matters
  ours = features.log_mel(x)
  ref = _reference(extractor, x)
  assert ours.shape == (128, n // 160) == ref.shape
  assert np.abs(ours - ref).max() < 5e-5, np.abs(ours - ref).max()
  # Without the waveform normalisation the features are far off (why the reference's do_normalize matters).
  assert np.abs(features.log_mel(x, normalize=False) - ref).max() > 0.05


def test_normalize_waveform_is_the_extractors():
  x = _clip(7001, seed=3) * np.float32(3.0) + np.float32(0.2)
  y = features.normalize_waveform(x)
  assert y.dtype == np.float32
  # transformers' own normaliser (the do_normalize step), on the float32 input.
  transformers = pytest.importorskip("transformers")
  ref = transformers.WhisperFeatureExtractor.zero_mean_unit_var_norm([x], attention_mask=None)[0]
  np.testing.assert_array_equal(y, ref)
  assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1.0) < 1e-4


@pytest.mark.parametrize("n", [16000 * 2 + 100, 48000, 48020, 5000, 250])
def test_unnormalized_matches_unpadded_extractor(extractor, n):
  """normalize=False is the extractor's default (do_normalize=False) at the clip's own length."""
  x = _clip(n)
  ours = features.log_mel(x, normalize=False)
  ref = extractor(x, sampling_rate=16000, padding="longest", return_tensors="np")["input_features"][0]
  assert ours.shape == (128, n // 160) == ref.shape
  assert np.abs(ours - ref).max() < 1e-3, np.abs(ours - ref).max()


@pytest.mark.parametrize("n", [16000 * 2 + 100, 16000 * 4 + 41])
def test_matches_30s_padded_prefix(extractor, n):
  """Against the default 30 s padding, the first T frames agree exactly when (a) the loudest frame is
  inside the clip (fade-out), so the padded array's max equals ours, and (b) n % 160 >= 40, so the
  last kept frame's window ends inside the real samples (otherwise it sees padding zeros, we see the
  reflected signal)."""
  x = _clip(n, seed=1)
  ours = features.log_mel(x, normalize=False)
  ref = extractor(x, sampling_rate=16000, return_tensors="np")["input_features"][0]
  assert ref.shape == (128, 3000)
  t = n // 160
  diff = np.abs(ours - ref[:, :t]).max()
  assert diff < 1e-3, diff


def test_padding_changes_max_when_loudest_at_end(extractor):
  """Documents why the test clips fade out: a click in the last samples lifts the padded max."""
  n = 16000 + 20
  x = 0.01 * _clip(n)
  x[-30:] = 0.9
  ours = features.log_mel(x, normalize=False)
  ref = extractor(x, sampling_rate=16000, return_tensors="np")["input_features"][0][:, : n // 160]
  assert np.abs(ours[:, :-1] - ref[:, :-1]).max() > 1e-2


def test_mel_features_dtype_and_length():
  x = _clip(16000 + 159)
  m = features.mel_features(x)
  assert m.dtype == np.float16 and m.shape == (128, 100)
  np.testing.assert_allclose(m.astype(np.float32), features.log_mel(x), atol=2e-3)
  with pytest.raises(ValueError, match="shorter than one hop"):
    features.log_mel(np.zeros(100, np.float32))


def test_load_audio_resamples_mixes_and_cuts(tmp_path):
  sr = 44100
  t = np.arange(int(2.0 * sr)) / sr
  left = 0.5 * np.sin(2 * np.pi * 440 * t)
  stereo = np.stack([left, left], axis=1).astype(np.float32)
  path = str(tmp_path / "a.wav")
  sf.write(path, stereo, sr)
  wav, orig = features.load_audio(path)
  assert orig == sr and wav.dtype == np.float32
  assert abs(len(wav) - 32000) <= 1
  seg, _ = features.load_audio(path, start=0.5, end=1.25)
  assert abs(len(seg) - 12000) <= 1
  # Still a 440 Hz tone after resampling: the spectral peak sits at 440 Hz (1 Hz bins over 16 k).
  spec = np.abs(np.fft.rfft(wav[:16000]))
  assert abs(int(np.argmax(spec)) - 440) <= 1


def test_load_audio_errors_name_the_file(tmp_path):
  with pytest.raises(features.AudioError, match="missing.wav: file not found"):
    features.load_audio(str(tmp_path / "missing.wav"))
  bad = tmp_path / "corrupt.wav"
  bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
  with pytest.raises(features.AudioError, match="corrupt.wav: unreadable audio"):
    features.load_audio(str(bad))
  good = str(tmp_path / "ok.wav")
  sf.write(good, np.zeros(16000, np.float32), 16000)
  with pytest.raises(features.AudioError, match="outside the audio"):
    features.load_audio(good, start=2.0)
  with pytest.raises(features.AudioError, match="beyond the audio"):
    features.load_audio(good, start=0.0, end=3.0)
  with pytest.raises(features.AudioError, match="not after start"):
    features.load_audio(good, start=0.5, end=0.5)
