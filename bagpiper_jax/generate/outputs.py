"""Decoded rows -> what a user gets: text (with the SFT `<think>` part split off), codes, 16 kHz WAV.

Text segments: stream 0 of the content rows, unified ids -> tokenizer ids -> the tokenizer's decode.
Audio segments: content rows de-interleaved by the data templating's inverse
(template.deinterleave_rows) into codes [T, 8], decoded by X-Codec (bagpiper_jax/codec.py, a local
`transformers` XcodecModel directory) and written as 16 kHz 16-bit PCM WAV.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import soundfile as sf

from bagpiper_jax import codec as codec_lib
from bagpiper_jax.data import template
from bagpiper_jax.generate import engine
from bagpiper_jax.generate.requests import from_unified
from bagpiper_jax.model.config import ModelConfig


@dataclasses.dataclass
class Answer:
  text: str  # all text segments, joined by newlines ("" if none)
  thinking: str  # the `<think>` part of the text, "" if none
  answer: str  # the text after `</think>` (the whole text when there is no thinking)
  codes: Optional[np.ndarray]  # [T, 8] of all audio segments, in order; None if none
  invalid_cells: int  # codec cells that were not their stream's codes (pads inside frames)
  segments: list[dict]  # per segment: modality, end, rows
  unknown_ids: int = 0  # text ids beyond the tokenizer's vocabulary (dropped)


def decode_text(tokenizer, unified_ids) -> tuple[str, int]:
  """(text, ids the tokenizer does not have). A model's text range can be wider than its tokenizer
  (configs/tiny.py: 1,024 text ids, a 512-piece demo tokenizer); such ids are dropped and counted.
  Without a tokenizer the ids are written out."""
  ids = from_unified(unified_ids)
  if tokenizer is None:
    return " ".join(map(str, ids)), 0
  known = [i for i in ids if i < tokenizer.vocab_size]
  return tokenizer.decode(known), len(ids) - len(known)


def interpret(out: engine.Output, cfg: ModelConfig, tokenizer) -> Answer:
  texts, codes, invalid, summary, unknown = [], [], 0, [], 0
  for seg in out.segments:
    summary.append({"modality": seg.modality, "end": seg.end, "rows": int(seg.rows.shape[0])})
    if seg.modality == "text":
      text, bad = decode_text(tokenizer, seg.rows[:, 0])
      texts.append(text)
      unknown += bad
    else:
      c, bad = engine.segment_codes(seg, cfg)
      invalid += bad
      if len(c):
        codes.append(c)
  text = "\n".join(texts)
  thinking, answer = template.split_thinking(text)
  return Answer(text, thinking, answer, np.concatenate(codes) if codes else None, invalid, summary, unknown)


class WavWriter:
  """X-Codec decode + 16 kHz WAV. The codec loads lazily (torch) on first use."""

  def __init__(self, codec_dir: str):
    self.codec_dir = codec_dir
    self._codec: Optional[codec_lib.XCodec] = None

  def waveform(self, codes: np.ndarray) -> np.ndarray:
    if self._codec is None:
      self._codec = codec_lib.XCodec(self.codec_dir)
    return self._codec.decode(codes)

  def write(self, codes: np.ndarray, path: str) -> float:
    """Writes the decoded codes to `path`; returns the seconds written."""
    return write_wav(path, self.waveform(codes))


def write_wav(path: str, wav: np.ndarray) -> float:
  """16 kHz mono 16-bit PCM WAV; returns its seconds."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sf.write(path, np.clip(wav, -1.0, 1.0), codec_lib.SAMPLE_RATE, subtype="PCM_16")
  return wav.shape[0] / codec_lib.SAMPLE_RATE
