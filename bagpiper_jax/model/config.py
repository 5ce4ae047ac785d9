"""Model hyper-parameters as frozen dataclasses (hashable, so Linen modules can hold them).

Configs in `configs/` are ml_collections dicts; `ModelConfig.from_dict(cfg.model)` turns the
`model` field into this. The unified vocabulary layout (docs/model.md#vocabulary) is derived, never stored twice:

    [0, num_specials)                         special tokens (<|pad|>=0, <|bos|>=1, ...)
    [num_specials, codec_start)               text ids, shifted by +num_specials
    [codec_start + n*(codebook_size+1), ...)  codec stream n: its pad id, then codes 0..codebook_size-1
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
  """Qwen3-Omni audio tower (AuT). Defaults are the real sizes."""

  num_mel_bins: int = 128
  d_model: int = 1280
  num_layers: int = 32
  num_heads: int = 20
  ffn_dim: int = 4096 + 1024  # 5120
  downsample_hidden_size: int = 480
  output_dim: int = 2048
  n_window: int = 50  # chunk = 2 * n_window = 100 mel frames
  n_window_infer: int = 800  # attention window in mel frames (8 chunks)
  max_source_positions: int = 1500
  activation: str = "gelu"

  @property
  def chunk_frames(self) -> int:
    return 2 * self.n_window

  @property
  def frames_per_chunk_out(self) -> int:
    """Encoder frames produced by one full chunk (13 for 100 mel frames)."""
    return conv_out_length(self.chunk_frames)

  @property
  def chunks_per_window(self) -> int:
    return self.n_window_infer // self.chunk_frames

  @property
  def frames_per_window_out(self) -> int:
    return self.chunks_per_window * self.frames_per_chunk_out


def conv_out_length(n, layers: int = 3):
  """Length after `layers` k3/s2/p1 convolutions: ceil(n / 2) per layer (0 stays 0).

  The one place this arithmetic lives; works on ints and on numpy / jax integer arrays.
  """
  for _ in range(layers):
    n = (n + 1) // 2
  return n


def encoder_output_length(num_mel_frames: int, n_window: int = 50) -> int:
  """Encoder frames for an audio of `num_mel_frames` (= transformers' _get_feat_extract_output_lengths)."""
  chunk = 2 * n_window
  full, rest = divmod(num_mel_frames, chunk)
  return full * conv_out_length(chunk) + conv_out_length(rest)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Bagpiper decoder + multi-stream I/O + audio encoder + adapter. Defaults = 8B."""

  # Vocabulary layout.
  text_vocab_size: int = 151936
  num_specials: int = 256
  num_streams: int = 8
  codebook_size: int = 1024
  # Qwen3 decoder.
  hidden_size: int = 4096
  intermediate_size: int = 12288
  num_layers: int = 36
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  # Audio encoder and adapter.
  audio_encoder: AudioEncoderConfig = dataclasses.field(default_factory=AudioEncoderConfig)
  # Numerics and memory.
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"
  # What the backward pass keeps (layers.py): none | full | nothing_saveable | dots | dots_no_batch, or a
  # MaxText-style named policy (minimal | minimal_with_context | save_qkv_proj | ... | custom).
  remat_policy: str = "nothing_saveable"
  remat_save: str = ""  # comma-separated checkpoint names saved on top of a named policy
  remat_offload: str = ""  # comma-separated checkpoint names moved to host memory (named policies)
  # xla | splash, splash_docs (TPU Pallas) | cudnn (NVIDIA) | pallas_gpu, pallas_gpu_docs (Triton) | *_interpret; layers.py
  attention_impl: str = "xla"
  attention_fused_bwd: bool = False  # splash: one fused dq/dk/dv backward kernel
  attention_q_chunk: int = 1024  # query rows per attention block (0: one block, O(L^2) memory)
  # pallas_gpu(_docs) kernel blocks "q,k,q_dkv,kv_dkv,q_dq,kv_dq" ('': layers.PALLAS_GPU_BLOCKS); launch/gpu_check.py
  attention_blocks: str = ""
  # How streams 1..7 are embedded (bagpiper.py, embed_rows): "lookup" (7 gathers; their gradients are
  # scatter-adds, which sort the ids on TPU) or "matmul" (one multi-hot contraction with the codec blocks
  # of the table: 2 x tokens x 7,175 x hidden more FLOPs, no sort; for TPU slices, see configs/bagpiper_8b.py).
  codec_embedding: str = "lookup"
  scan_unroll: int = 1  # decoder layers per iteration of the training step's layer scan (1: flat in depth)
  loss_chunk_size: int = 1024  # sequence positions per loss chunk (never all logits at once)
  # The lm_head gradient of the chunked loss (loss.py): False sums each chunk over rows and positions;
  # True keeps it per row ([rows, E, V] float32) and sums the rows once after the chunk loop, so on a
  # sharded batch the [E, V] cross-device reduction runs once per loss call instead of once per chunk
  # (for TPU slices, see configs/bagpiper_8b.py; on one device it only costs memory).
  lm_head_grad_per_row: bool = False
  z_loss_weight: float = 0.0
  init_std: float = 0.02

  # ---- derived vocabulary facts ----
  @property
  def codec_start(self) -> int:
    return self.num_specials + self.text_vocab_size

  @property
  def codec_block(self) -> int:
    return self.codebook_size + 1

  @property
  def vocab_size(self) -> int:
    return self.codec_start + self.num_streams * self.codec_block

  def codec_pad_id(self, stream: int) -> int:
    return self.codec_start + stream * self.codec_block

  def codec_id(self, stream: int, code):
    return self.codec_start + stream * self.codec_block + 1 + code

  @property
  def codec_loss_weight(self) -> float:
    """Loss weight of a codec target (any stream, pads included): 1 / num_streams, so an audio row
    weighs as much as one text token (docs/model.md#loss); text and special targets weigh 1."""
    return 1.0 / self.num_streams

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    enc = d.pop("audio_encoder", {})
    enc = dict(enc.to_dict() if hasattr(enc, "to_dict") else enc)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    enc_known = {f.name for f in dataclasses.fields(AudioEncoderConfig)}
    if set(enc) - enc_known:
      raise ValueError(f"unknown model.audio_encoder config keys: {sorted(set(enc) - enc_known)}")
    return cls(audio_encoder=AudioEncoderConfig(**enc), **d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Special token ids (docs/model.md#vocabulary).
PAD, BOS, EOS, EOT = 0, 1, 2, 3
SYSTEM, USER, ASSISTANT = 4, 5, 6
TEXT, AUDIO, IMAGE, VIDEO, TOOLCALL = 7, 8, 9, 10, 11
ROLE_IDS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
MODALITY_IDS = {"text": TEXT, "audio": AUDIO, "image": IMAGE, "video": VIDEO, "toolcall": TOOLCALL}
