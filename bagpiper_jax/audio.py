"""Audio in: loading, the Whisper-style log-mel that feeds the Qwen3-Omni audio encoder, encoder windows.

Shared by the offline data tool (records), the training input path (templating) and generation.

The encoder consumes 128-bin log-mel at 16 kHz with a 10 ms hop, exactly as the reference computes it
(docs/data.md#log-mel): `transformers.WhisperFeatureExtractor(feature_size=128)` called with
`do_normalize=True` on one clip at its own length. That is:
  1. the waveform is scaled to zero mean and unit variance over the clip, in float32:
     (x - mean) / sqrt(var + 1e-7) with the population variance (`normalize_waveform`);
  2. periodic Hann window of 400, centred STFT with reflect padding, power spectrum, Slaney mel
     filters 0..8 kHz, log10 floored at 1e-10, clamp to (max - 8), then (x + 4) / 4;
  3. the last STFT frame is dropped, so T = n_samples // 160.
The frozen encoder and the adapter were trained on such input; skipping step 1 shifts the
features (max abs diff 0.36 on a test clip).

Nothing is padded to 30 s: the reference passes `max_length = n_samples`, so a clip is featurised at
its true length and the encoder sees exactly T frames. `log_mel(..., normalize=False)` is the
extractor's default call (`do_normalize=False`); the tests check both against the real extractor.

Numpy only (librosa for resampling and the mel filter matrix); no torch/transformers at run time.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from typing import Optional

import librosa
import numpy as np
import soundfile as sf

from bagpiper_jax.model.config import AudioEncoderConfig

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
NUM_MEL_BINS = 128


class AudioError(ValueError):
  """An audio file that cannot be turned into features (missing, unreadable, bad segment, ...)."""


def load_audio(path: str, *, start: Optional[float] = None, end: Optional[float] = None,
               sample_rate: int = SAMPLE_RATE, data: Optional[bytes] = None) -> tuple[np.ndarray, int]:
  """Reads `path` as mono float32 at `sample_rate`, cut to [start, end) seconds.

  `data`: the file's bytes, already read (audio embedded in a parquet row or a tar member, or
  fetched from a remote file system); `path` then only names it in messages. Decoding is the same.
  Returns (waveform, original_sample_rate) so callers can report files that were not at the
  expected rate. Raises AudioError naming the file for anything unusable.
  """

  if data is None and not os.path.exists(path):
    raise AudioError(f"{path}: file not found")
  src = (lambda: io.BytesIO(data)) if data is not None else (lambda: path)
  try:
    info = sf.info(src())
    orig_sr, duration = int(info.samplerate), float(info.frames) / float(info.samplerate)
  except Exception as sf_err:  # soundfile cannot parse it; audioread may (mp3/m4a), else it is corrupt.
    try:
      with warnings.catch_warnings():  # librosa's "PySoundFile failed, trying audioread" noise
        warnings.simplefilter("ignore")
        orig_sr = int(librosa.get_samplerate(src()))
        duration = float(librosa.get_duration(path=src()))
    except Exception as e:
      raise AudioError(f"{path}: unreadable audio (soundfile: {sf_err}; audioread: "
                       f"{type(e).__name__} {e})".rstrip()) from e
  start = float(start or 0.0)
  if start < 0 or start >= duration:
    raise AudioError(f"{path}: segment start {start:.3f}s outside the audio (duration {duration:.3f}s)")
  if end is not None:
    end = float(end)
    if end <= start:
      raise AudioError(f"{path}: segment end {end:.3f}s is not after start {start:.3f}s")
    if end > duration + 0.05:  # 50 ms of slack for rounding in manifests
      raise AudioError(f"{path}: segment end {end:.3f}s beyond the audio (duration {duration:.3f}s)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      wav, _ = librosa.load(src(), sr=sample_rate, mono=True, offset=start,
                            duration=None if end is None else end - start, dtype=np.float32)
  except Exception as e:
    raise AudioError(f"{path}: unreadable audio ({type(e).__name__}: {e})") from e
  if wav.size == 0:
    raise AudioError(f"{path}: no samples in segment [{start}, {end})")
  if not np.all(np.isfinite(wav)):
    raise AudioError(f"{path}: audio contains NaN/inf samples")
  return wav.astype(np.float32, copy=False), orig_sr


def load_clip(path: str) -> tuple[np.ndarray, list[str]]:
  """A whole file as mono float32 at 16 kHz for a generation prompt, and notes on what was changed.

  Like the data tool: another sample rate is resampled and a multi-channel file downmixed (the
  mean of its channels), and each is SAID in the notes. Raises AudioError naming the file when it is
  missing, unreadable, empty, or shorter than two mel hops.
  """
  if not os.path.exists(path):
    raise AudioError(f"{path}: file not found")
  channels = None
  try:
    info = sf.info(path)
    channels, frames = int(info.channels), int(info.frames)
    if frames == 0:
      raise AudioError(f"{path}: empty audio file (0 samples)")
  except AudioError:
    raise
  except Exception:  # not a soundfile format: load_audio tries audioread and names the error
    pass
  wav, orig_sr = load_audio(path)
  notes = []
  if orig_sr != SAMPLE_RATE:
    notes.append(f"{path}: resampled {orig_sr} Hz -> {SAMPLE_RATE} Hz")
  if channels is not None and channels > 1:
    notes.append(f"{path}: {channels} channels downmixed to mono")
  if wav.shape[0] < 2 * HOP_LENGTH:
    raise AudioError(f"{path}: only {wav.shape[0]} samples at {SAMPLE_RATE} Hz; at least "
                     f"{2 * HOP_LENGTH} needed")
  return wav, notes


@functools.lru_cache(maxsize=4)
def mel_filters(num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
  """[num_mel_bins, 1 + N_FFT // 2] Slaney mel filter bank, 0..8 kHz (Whisper's, via librosa)."""

  return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=num_mel_bins, fmin=0.0,
                             fmax=SAMPLE_RATE / 2, htk=False, norm="slaney").astype(np.float64)


def num_frames(num_samples: int) -> int:
  """Mel frames for a clip of `num_samples` (the extractor drops the last STFT frame)."""
  return num_samples // HOP_LENGTH


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
  """Zero mean, unit variance over the clip, float32, as WhisperFeatureExtractor(do_normalize=True).

  (x - mean) / sqrt(var + 1e-7), population variance, computed in float32 like the extractor (its
  `zero_mean_unit_var_norm` on the float32 input).
  """
  x = np.asarray(wav, dtype=np.float32)
  return (x - x.mean()) / np.sqrt(x.var() + np.float32(1e-7))


def log_mel(wav: np.ndarray, *, num_mel_bins: int = NUM_MEL_BINS, normalize: bool = True) -> np.ndarray:
  """Whisper log-mel of a 16 kHz mono clip, float32 [num_mel_bins, n_samples // 160].

  normalize=True (the reference, docs/data.md#log-mel) scales the waveform to zero mean and unit
  variance first; see the module docstring for the exact recipe.
  """
  wav = np.asarray(wav)
  if wav.ndim != 1:
    raise ValueError(f"log_mel expects a 1-D waveform, got shape {wav.shape}")
  t = num_frames(wav.shape[0])
  if t == 0:
    raise ValueError(f"waveform of {wav.shape[0]} samples is shorter than one hop ({HOP_LENGTH})")
  if normalize:
    wav = normalize_waveform(wav)
  wav = wav.astype(np.float64)
  # Centred STFT as torch.stft(center=True, pad_mode="reflect"); numpy's reflect also copes with
  # clips shorter than the 200-sample pad (torch would refuse), which only matters for T == 1.
  padded = np.pad(wav, N_FFT // 2, mode="reflect")
  frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:t]
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
  power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [T, 201]
  mel = mel_filters(num_mel_bins) @ power.T  # [bins, T]
  log_spec = np.log10(np.maximum(mel, 1e-10))
  log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
  return ((log_spec + 4.0) / 4.0).astype(np.float32)


def mel_features(wav: np.ndarray) -> np.ndarray:
  """The record's user-audio content: float16 [128, T] (records.py "mel"), normalised as the reference."""
  return log_mel(wav).astype(np.float16)


def file_features(path: str, *, start: Optional[float] = None,
                  end: Optional[float] = None) -> np.ndarray:
  """Convenience: load (mono, 16 kHz, segment) and featurise, float16 [128, T]."""
  wav, _ = load_audio(path, start=start, end=end)
  return mel_features(wav)


# ---------------------------------------------------------------------------------------------
# Encoder windows (the host side of the audio encoder's fixed-shape layout, model/audio_encoder.py).


def num_windows(num_mel_frames: int, cfg: AudioEncoderConfig = AudioEncoderConfig()) -> int:
  """Encoder windows needed for an audio of `num_mel_frames` (ceil over chunks, then over windows)."""
  chunks = -(-num_mel_frames // cfg.chunk_frames)
  return -(-chunks // cfg.chunks_per_window)


def mel_to_windows(mel: np.ndarray, cfg: AudioEncoderConfig = AudioEncoderConfig()):
  """Cuts one audio's log-mel [M, T] into encoder windows.

  Returns (windows [W, C, M, F], chunk_lens [W, C] int32) with W = num_windows(T), C = 8, F = 100:
  mel frame t lands in window t // (C*F), chunk (t // F) % C, column t % F. Columns past the end
  of the audio are zero (the reference pads with zeros too); chunk_lens counts the real frames
  (F for full chunks, T % F for a partial last chunk, 0 for unused chunks of the last window).
  Encoder output frame j of the audio is then the j-th True of `valid` over these windows, in order.
  """
  mel = np.asarray(mel)
  if mel.ndim != 2 or mel.shape[0] != cfg.num_mel_bins:
    raise ValueError(f"mel_to_windows expects a log-mel of shape [{cfg.num_mel_bins}, T], got {mel.shape}")
  m, t = mel.shape
  if t == 0:
    raise ValueError("mel_to_windows got an audio with 0 mel frames; the encoder needs at least one")
  c, f = cfg.chunks_per_window, cfg.chunk_frames
  w = num_windows(t, cfg)
  # One strided copy [M, T] -> [chunks, M, F] (this is the hot path of audio-understanding data).
  windows = np.zeros((w, c, m, f), mel.dtype)
  flat = windows.reshape(w * c, m, f)
  full = t // f
  if full:
    flat[:full] = mel[:, :full * f].reshape(m, full, f).transpose(1, 0, 2)
  if t > full * f:
    flat[full, :, :t - full * f] = mel[:, full * f:]
  lens = np.clip(t - np.arange(w * c) * f, 0, f).astype(np.int32).reshape(w, c)
  return windows, lens
