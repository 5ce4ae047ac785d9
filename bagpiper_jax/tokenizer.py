"""Text tokenisers behind one small interface.

`Tokenizer.encode` returns RAW tokenizer ids. The unified vocabulary (docs/model.md#vocabulary) puts
text ids at +256 (after the specials); `to_unified` / `from_unified` are the one place that mapping
lives (the record writer, generation and the release tokenizer use them), so one tokenizer file
serves both this code and any PyTorch-side tooling unchanged.

Raw id 0. The reference maps the tokenizer's raw id 0 (Qwen3's `!`) to `<|pad|>` (0) instead of 256
(`np.where(ids == 0, 0, ids + 256)`); this project does the same by default (`id0_as_pad=True`), so a
model trained here reads the ids a reference-trained release was trained on. The data tool records
the choice (`text_id0_as_pad` in its index.json and shard fingerprints); see docs/model.md#vocabulary
for its effect on the loss.

  HFTokenizer(".../tokenizer.json")          the Qwen3 tokenizer (or any `tokenizers` JSON)
  SentencePieceTokenizer(".../spm.model")    small from-scratch vocabularies (demo, tiny configs)
  load_tokenizer(path)                       picks one by file name

(Training a SentencePiece model is an offline job: data_pipeline/tokenizer_train.py.)
"""

from __future__ import annotations

import abc
import os
from typing import Iterable

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as _HF

UNIFIED_TEXT_OFFSET = 256  # = ModelConfig.num_specials
PAD_ID = 0  # <|pad|>


def to_unified(raw_ids, *, id0_as_pad: bool = True) -> np.ndarray:
  """Raw tokenizer ids -> unified-vocabulary ids (int32): raw + 256, and raw 0 -> <|pad|> (0) when
  `id0_as_pad` (the reference's mapping; docs/model.md#vocabulary)."""
  raw = np.asarray(raw_ids, dtype=np.int64)
  if raw.size and raw.min() < 0:
    raise ValueError(f"raw token ids must be >= 0, got {int(raw.min())}")
  out = raw + UNIFIED_TEXT_OFFSET
  if id0_as_pad:
    out = np.where(raw == 0, PAD_ID, out)
  return out.astype(np.int32)


def from_unified(unified_ids, *, text_vocab_size: int | None = None) -> np.ndarray:
  """Unified ids -> raw tokenizer ids of the text among them (int64).

  Ids below 256 (specials, <|pad|> included) are not text and are dropped, as the reference's
  `decode(..., skip_special_tokens=True)` drops them. An id at or above 256 + text_vocab_size (a codec
  id) is an error: it is not text of this vocabulary.
  """
  ids = np.asarray(unified_ids, dtype=np.int64).reshape(-1)
  if text_vocab_size is not None and ids.size and ids.max() >= UNIFIED_TEXT_OFFSET + text_vocab_size:
    bad = ids[ids >= UNIFIED_TEXT_OFFSET + text_vocab_size]
    raise ValueError(f"from_unified: ids {bad[:5].tolist()} are past the text range [256, "
                     f"{UNIFIED_TEXT_OFFSET + text_vocab_size}) (codec ids are not text)")
  return ids[ids >= UNIFIED_TEXT_OFFSET] - UNIFIED_TEXT_OFFSET


class Tokenizer(abc.ABC):
  """Raw text <-> ids. No BOS/EOS is added: the template adds the unified special tokens."""

  path: str

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    ...

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    ...

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...


class HFTokenizer(Tokenizer):
  """A `tokenizers` JSON file (e.g. Qwen3's tokenizer.json), encoded without added special tokens."""

  def __init__(self, path: str):

    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self.path = path
    self._tok = _HF.from_file(path)

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file."""

  def __init__(self, path: str):

    if not os.path.exists(path):
      raise FileNotFoundError(f"sentencepiece model not found: {path}")
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())


def load_tokenizer(path: str) -> Tokenizer:
  """`*.json` -> HFTokenizer, `*.model` -> SentencePieceTokenizer; a directory -> its tokenizer.json."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if path.endswith(".json"):
    return HFTokenizer(path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  raise ValueError(f"--tokenizer {path!r}: expected a tokenizer.json, a SentencePiece .model, "
                   "or a directory holding tokenizer.json")
