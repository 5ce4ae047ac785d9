"""Text tokenisers behind one small interface.

`Tokenizer.encode` returns RAW tokenizer ids. The unified vocabulary (docs/model.md#vocabulary) puts text ids at
+256 (after the specials); that shift is the record writer's job (`UNIFIED_TEXT_OFFSET`), so one
tokenizer file serves both this code and any PyTorch-side tooling unchanged.

  HFTokenizer(".../tokenizer.json")          the Qwen3 tokenizer (or any `tokenizers` JSON)
  SentencePieceTokenizer(".../spm.model")    small from-scratch vocabularies (demo, tiny configs)
  load_tokenizer(path)                       picks one by file name

(Training a SentencePiece model is an offline job: data_pipeline/tokenizer_train.py.)
"""

from __future__ import annotations

import abc
import os
from typing import Iterable

import sentencepiece as spm
from tokenizers import Tokenizer as _HF

UNIFIED_TEXT_OFFSET = 256  # = ModelConfig.num_specials


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
