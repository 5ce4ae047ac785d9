"""X-Codec (`xcodec-hubert-general`): 16 kHz waveform <-> codes int16 [T, 8] (50 Hz, 0..1023).

`XCodec(local_dir)` wraps `transformers.XcodecModel` loaded from a LOCAL directory (the real
codec once downloaded by hand, or the tiny random model of `build_tiny_xcodec` in tests and the
demo): `encode(wav)` for the offline data tool (data_pipeline/codes.py), `decode(codes)` for
generation (codes -> waveform).

Framing (docs/model.md#output-codec-frozen-offline): a clip of n samples has floor(n / 320) frames.
The reference trims the waveform to floor(n / 320) * 320 samples before encoding; X-Codec pads 160
samples on each side internally, so the untrimmed clip would get one extra frame for most remainders
(and the shared frames' codes change too). `encode` trims exactly like the reference.

Every code array passes `check_codes`, so a wrong layout ([8, T]), a 4-codebook model or an
out-of-range id fails here rather than as garbage ids at training time. `XCodec.from_model` wraps a
model built elsewhere (convert/release.py `codec_from_release`: the codec shipped in a release).

torch and transformers are imported lazily: they are the optional PyTorch peer (extra `torch`),
and the training path never needs them.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024
FRAME_RATE = 50  # 16 kHz / hop 320
SAMPLE_RATE = 16_000
HOP_LENGTH = SAMPLE_RATE // FRAME_RATE  # 320 samples per codec frame


class CodecError(ValueError):
  """Codes that cannot be produced or are malformed; the message names the file."""


def check_codes(codes: np.ndarray, where: str) -> np.ndarray:
  """Validates [T, 8] ids in 0..1023 and returns them as int16."""
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS or codes.shape[0] == 0:
    raise CodecError(f"{where}: codes must be [T>0, {NUM_CODEBOOKS}], got shape {codes.shape}")
  if not np.issubdtype(codes.dtype, np.integer):
    raise CodecError(f"{where}: codes must be integers, got dtype {codes.dtype}")
  lo, hi = int(codes.min()), int(codes.max())
  if lo < 0 or hi >= CODEBOOK_SIZE:
    raise CodecError(f"{where}: codes must lie in [0, {CODEBOOK_SIZE}), got range [{lo}, {hi}]")
  return codes.astype(np.int16)


def num_frames(num_samples: int) -> int:
  """Codec frames of a clip of `num_samples` at 16 kHz: floor(n / 320) (the reference's framing)."""
  return int(num_samples) // HOP_LENGTH


def trim_to_frames(wav: np.ndarray) -> np.ndarray:
  """The first floor(n / 320) * 320 samples: what the reference encodes."""
  return wav[..., : num_frames(wav.shape[-1]) * HOP_LENGTH]


class XCodec:
  """`transformers.XcodecModel.from_pretrained(local_dir)` at its full bandwidth (8 codebooks)."""

  def __init__(self, local_dir: str, *, device: str = "cpu", num_threads: Optional[int] = None):
    import torch  # pylint: disable=g-import-not-at-top  (optional PyTorch peer)
    from transformers import XcodecModel  # pylint: disable=g-import-not-at-top  (optional PyTorch peer)

    if not os.path.isfile(os.path.join(local_dir, "config.json")):
      raise FileNotFoundError(f"codec directory {local_dir}: no config.json there (the codec must be "
                              "a local directory; nothing is downloaded)")
    if num_threads:
      torch.set_num_threads(num_threads)
    _quiet_transformers()
    self._setup(XcodecModel.from_pretrained(local_dir, local_files_only=True), local_dir, device)

  @classmethod
  def from_model(cls, model, *, where: str, device: str = "cpu") -> "XCodec":
    """Wraps an already built `transformers.XcodecModel` (e.g. rebuilt from a release's tensors)."""
    self = cls.__new__(cls)
    self._setup(model, where, device)
    return self

  def _setup(self, model, where: str, device: str) -> None:
    import torch  # pylint: disable=g-import-not-at-top  (optional PyTorch peer)
    self._torch = torch
    self.local_dir = where
    self.device = device
    self.model = model.eval().to(device)
    cfg = self.model.config
    if cfg.sample_rate != SAMPLE_RATE or cfg.frame_rate != FRAME_RATE:
      raise ValueError(f"{where}: codec runs at {cfg.sample_rate} Hz / {cfg.frame_rate} Hz frames; "
                       f"Bagpiper needs {SAMPLE_RATE} Hz / {FRAME_RATE} Hz")
    if cfg.num_quantizers < NUM_CODEBOOKS or cfg.codebook_size != CODEBOOK_SIZE:
      raise ValueError(f"{where}: codec has {cfg.num_quantizers} codebooks of {cfg.codebook_size}; "
                       f"Bagpiper needs {NUM_CODEBOOKS} of {CODEBOOK_SIZE}")
    self._bandwidth = next(b for b in cfg.target_bandwidths
                           if self.model.quantizer.get_num_quantizers_for_bandwidth(b) == NUM_CODEBOOKS)

  def encode(self, wav_16k: np.ndarray) -> np.ndarray:
    """Mono 16 kHz waveform of n samples -> int16 codes [n // 320, 8] (trimmed as the reference)."""
    wav = np.asarray(wav_16k, dtype=np.float32)
    if wav.ndim != 1:
      raise CodecError(f"xcodec expects a mono 1-D waveform, got shape {wav.shape}")
    return self.encode_batch([wav])[0]

  def encode_batch(self, wavs: list) -> list:
    """Several mono 16 kHz waveforms of EQUAL length -> their codes, one model call (`encode` is a
    batch of one: the same trimming and frame-count check).

    The encoder has no padding mask, so only equal lengths batch exactly: each result equals `encode`
    of that clip (tests/test_data_writer_codec.py checks it).
    """
    torch = self._torch
    x = np.stack([np.asarray(w, dtype=np.float32) for w in wavs])
    if x.ndim != 2:
      raise CodecError(f"xcodec encode_batch expects equal-length mono 1-D waveforms, got {x.shape}")
    frames = num_frames(x.shape[1])
    if frames == 0:
      raise CodecError(f"xcodec: {x.shape[1]} samples is shorter than one codec frame ({HOP_LENGTH})")
    xt = torch.from_numpy(np.ascontiguousarray(trim_to_frames(x))).to(self.device)[:, None, :]
    with torch.inference_mode():
      codes = self.model.encode(xt, bandwidth=self._bandwidth, return_dict=False)  # [B, 8, T]
    out = [check_codes(c.T.cpu().numpy(), "xcodec output") for c in codes]
    if out[0].shape[0] != frames:
      raise CodecError(f"xcodec gave {out[0].shape[0]} frames for {frames * HOP_LENGTH} samples; expected "
                       f"{frames} ({HOP_LENGTH} samples per frame)")
    return out

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """int codes [T, 8] -> mono float32 waveform at 16 kHz."""
    torch = self._torch
    codes = check_codes(codes, "codes to decode")
    x = torch.from_numpy(codes.T.astype(np.int64))[None].to(self.device)  # [1, 8, T]
    with torch.inference_mode():
      wav = self.model.decode(x, return_dict=False)
    wav = wav[0] if isinstance(wav, (tuple, list)) else wav
    return wav.reshape(-1).float().cpu().numpy()


def _quiet_transformers() -> None:
  """No per-load progress bars in worker logs (they would interleave with the writer's own line)."""
  from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top  (optional peer)
  hf_logging.disable_progress_bar()


def build_tiny_xcodec(out_dir: str, *, seed: int = 0) -> str:
  """Saves a tiny random-weight XcodecModel (8 x 1024 codebooks, 16 kHz, 50 Hz) to `out_dir`.

  For tests and the demo only: codes are a deterministic function of the audio, nothing more.
  Sizes: DAC acoustic encoder width 4 / latent 8, decoder width 32 (it halves per upsampling block,
  so < 16 reaches 0 channels), HuBERT semantic model of 1 layer x 16 dims with 8-channel convs (its
  conv strides still give 320 samples/frame). XcodecModel initialises codebooks to zeros (every
  code would be 0), so they are drawn N(0, 1) here. ~90k parameters, ~2 MB on disk.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import XcodecConfig, XcodecModel  # pylint: disable=g-import-not-at-top

  cfg = XcodecConfig(
      acoustic_model_config=dict(encoder_hidden_size=4, decoder_hidden_size=32, hidden_size=8,
                                 codebook_size=CODEBOOK_SIZE, codebook_dim=8, n_codebooks=1),
      semantic_model_config=dict(model_type="hubert", hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, conv_dim=[8] * 7,
                                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
      codebook_size=CODEBOOK_SIZE,
  )
  assert cfg.num_quantizers == NUM_CODEBOOKS and cfg.frame_rate == FRAME_RATE, cfg
  _quiet_transformers()
  state = torch.random.get_rng_state()
  try:
    torch.manual_seed(seed)
    model = XcodecModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for q in model.quantizer.quantizers:
        q.codebook.embed.copy_(torch.randn(q.codebook.embed.shape, generator=g))
        q.codebook.embed_avg.copy_(q.codebook.embed)
  finally:
    torch.random.set_rng_state(state)
  model.save_pretrained(out_dir)
  return out_dir
