"""Assistant-audio codes for the record writer: one interface, two ways to get them.

  XcodecBackend(local_dir)   runs the X-Codec encoder (bagpiper_jax.codec.XCodec) on the audio,
                             torch, CPU or CUDA; `encode_batch` takes clips of equal length.
  NpyCodesBackend(dir=None)  reads codes precomputed elsewhere (e.g. on GPUs) from `<stem>.npy`
                             next to the audio file, or in `dir`.

Writers call `encode_file(path, start, end)`. Every result passes `codec.check_codes`, naming the
file on failure.
"""

from __future__ import annotations

import abc
import os
from typing import Optional

import numpy as np

from bagpiper_jax import audio
from bagpiper_jax import codec as codec_lib
from bagpiper_jax.codec import FRAME_RATE, CodecError, check_codes

from data_pipeline import fs


class CodecBackend(abc.ABC):
  """Waveform (16 kHz mono float) -> int16 codes [T, 8]."""

  name: str = "codec"

  @abc.abstractmethod
  def encode(self, wav_16k: np.ndarray) -> np.ndarray:
    ...

  def encode_file(self, path: str, *, start: Optional[float] = None,
                  end: Optional[float] = None, wav_16k: Optional[np.ndarray] = None) -> np.ndarray:
    """Codes of the [start, end) segment of `path`. `wav_16k`: the already-loaded segment, if any."""
    if wav_16k is None:
      wav_16k, _ = audio.load_audio(path, start=start, end=end)
    try:
      return check_codes(self.encode(wav_16k), path)
    except CodecError:
      raise
    except Exception as e:  # a model failure on this clip: report it against the file
      raise CodecError(f"{path}: {self.name} failed ({type(e).__name__}: {e})") from e

  def encode_batch(self, wavs: list[np.ndarray], paths: list[str]) -> list[np.ndarray]:
    """Codes of several clips of EQUAL length (the same codes as one at a time); paths name them."""
    return [self.encode_file(p, wav_16k=w) for w, p in zip(wavs, paths)]

  @property
  def needs_waveform(self) -> bool:
    return True


class XcodecBackend(CodecBackend):
  """Codes from the X-Codec encoder in a local directory."""

  name = "xcodec"

  def __init__(self, local_dir: str, *, device: str = "cpu", num_threads: Optional[int] = None):
    self.codec = codec_lib.XCodec(local_dir, device=device, num_threads=num_threads)

  def encode(self, wav_16k: np.ndarray) -> np.ndarray:
    return self.codec.encode(wav_16k)

  def encode_batch(self, wavs: list[np.ndarray], paths: list[str]) -> list[np.ndarray]:
    if len(wavs) == 1:
      return [self.encode_file(paths[0], wav_16k=wavs[0])]
    where = f"{paths[0]} (+{len(paths) - 1} clips batched with it)"
    try:
      out = self.codec.encode_batch(wavs)
    except CodecError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (the caller retries clip by clip)
      raise CodecError(f"{where}: {self.name} failed ({type(e).__name__}: {e})") from e
    return [check_codes(c, p) for c, p in zip(out, paths)]


class NpyCodesBackend(CodecBackend):
  """Precomputed codes: `<dir or audio's dir>/<audio stem>.npy`, int [T, 8] for the WHOLE file.

  A segment [start, end) is cut as frames round(start*50) .. round(end*50). Arrays stored [8, T]
  are rejected (not transposed) because a silent transpose would hide a wrong export.
  """

  name = "npy"

  def __init__(self, codes_dir: Optional[str] = None):
    self.codes_dir = codes_dir

  def codes_path(self, audio_path: str) -> str:
    stem = os.path.splitext(os.path.basename(audio_path))[0]
    return os.path.join(self.codes_dir or os.path.dirname(audio_path), stem + ".npy")

  def encode(self, wav_16k: np.ndarray) -> np.ndarray:
    raise NotImplementedError("NpyCodesBackend reads codes by audio path: use encode_file(path)")

  @property
  def needs_waveform(self) -> bool:
    return False

  def encode_file(self, path: str, *, start: Optional[float] = None,
                  end: Optional[float] = None, wav_16k: Optional[np.ndarray] = None) -> np.ndarray:
    del wav_16k
    npy = self.codes_path(path)
    if not os.path.exists(npy):
      raise CodecError(f"{path}: precomputed codes not found at {npy}")
    try:
      codes = np.load(npy, allow_pickle=False)
    except Exception as e:
      raise CodecError(f"{npy}: unreadable codes ({type(e).__name__}: {e})") from e
    codes = check_codes(codes, npy)
    if start is not None or end is not None:
      a = int(round(float(start or 0.0) * FRAME_RATE))
      b = codes.shape[0] if end is None else int(round(float(end) * FRAME_RATE))
      if not 0 <= a < b <= codes.shape[0] + 1:  # one frame of slack for rounding
        raise CodecError(f"{npy}: segment [{start}, {end}) s = frames [{a}, {b}) outside the "
                         f"{codes.shape[0]} frames stored")
      codes = codes[a:b]
    return codes


def check_codec_spec(spec: str) -> tuple[str, str]:
  """Parses the writer's --codec flag without loading anything: "" (none), "npy", "npy:<dir>",
  "xcodec:<dir or gs:// URL>". Returns (kind, arg); raises ValueError naming the flag."""
  if not spec:
    return "", ""
  kind, _, arg = spec.partition(":")
  if kind == "npy":
    if arg and not os.path.isdir(arg):
      raise ValueError(f"--codec {spec!r}: {arg} is not a directory")
    return kind, arg
  if kind == "xcodec":
    if not arg or not fs.exists(fs.join(arg, "config.json")):
      raise ValueError(f"--codec {spec!r}: needs a directory (local or gs://...) holding an XcodecModel "
                       "(config.json + weights); nothing is downloaded from the Hub")
    return kind, arg
  raise ValueError(f"--codec {spec!r}: expected '', 'npy', 'npy:<dir>' or 'xcodec:<local dir>'")


CODEC_DEVICES = ("cpu", "cuda")


def load_codec(spec: str, *, device: str = "cpu") -> Optional[CodecBackend]:
  """The backend for a --codec flag (see check_codec_spec); None for "".

  device: where the X-Codec encoder runs. "cpu" uses one torch thread (the writer runs one worker
  per core); "cuda" needs a GPU on this machine and says so when there is none.
  """
  kind, arg = check_codec_spec(spec)
  if device not in CODEC_DEVICES:
    raise ValueError(f"--codec_device {device!r}: expected one of {CODEC_DEVICES}")
  if kind == "npy":
    return NpyCodesBackend(arg or None)
  if kind == "xcodec":
    if device == "cuda":
      import torch  # pylint: disable=g-import-not-at-top  (optional PyTorch peer)
      if not torch.cuda.is_available():
        raise RuntimeError("--codec_device=cuda but torch sees no CUDA device on this worker "
                           f"({torch.__version__}); use --codec_device=cpu or a GPU worker")
      # Full fp32, no TF32: measured on an H100 (full-size random X-Codec, 32 x 10 s clips), TF32
      # convolutions (torch's default) change 0.4-0.7% of the codes against the CPU and 0.35% between
      # batched and one-at-a-time; without TF32, 0-0.03% and 0.0008%, at 1000 instead of 1600
      # audio-s/s (batch 32). docs/data.md#writing-the-shards-at-scale.
      torch.backends.cuda.matmul.allow_tf32 = False
      torch.backends.cudnn.allow_tf32 = False
      return XcodecBackend(arg, device="cuda")
    return XcodecBackend(arg, num_threads=1)
  return None


