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


def interpret(out: engine.Output, cfg: ModelConfig, tokenizer) -> Answer:
  texts, codes, invalid, summary = [], [], 0, []
  for seg in out.segments:
    summary.append({"modality": seg.modality, "end": seg.end, "rows": int(seg.rows.shape[0])})
    if seg.modality == "text":
      ids = from_unified(seg.rows[:, 0])
      texts.append(tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids)))
    else:
      c, bad = engine.segment_codes(seg, cfg)
      invalid += bad
      if len(c):
        codes.append(c)
  text = "\n".join(texts)
  thinking, answer = template.split_thinking(text)
  return Answer(text, thinking, answer, np.concatenate(codes) if codes else None, invalid, summary)


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
    wav = self.waveform(codes)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, np.clip(wav, -1.0, 1.0), codec_lib.SAMPLE_RATE, subtype="PCM_16")
    return wav.shape[0] / codec_lib.SAMPLE_RATE
