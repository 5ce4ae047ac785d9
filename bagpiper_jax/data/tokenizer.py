"""Text tokenisers behind one small interface.

`Tokenizer.encode` returns RAW tokenizer ids. The unified vocabulary (SPEC.md) puts text ids at
+256 (after the specials); that shift is the record writer's job (`UNIFIED_TEXT_OFFSET`), so one
tokenizer file serves both this code and any PyTorch-side tooling unchanged.

  HFTokenizer(".../tokenizer.json")          the Qwen3 tokenizer (or any `tokenizers` JSON)
  SentencePieceTokenizer(".../spm.model")    small from-scratch vocabularies (demo, tiny configs)
  load_tokenizer(path)                       picks one by file name
  train_sentencepiece(texts, prefix, size)   trains the latter (byte fallback: never an <unk> byte)
"""

from __future__ import annotations

import abc
import os
from typing import Iterable

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
    from tokenizers import Tokenizer as _HF  # pylint: disable=g-import-not-at-top

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
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

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


def train_sentencepiece(texts: Iterable[str], out_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe", seed: int = 0) -> str:
  """Trains a SentencePiece model on `texts`; returns the path of `<out_prefix>.model`.

  BPE by default: on small, repetitive corpora (the demo's captions) unigram keeps few whole words
  and spells common ones out in characters; BPE merges them. Byte fallback is on (any UTF-8 text
  encodes without <unk>), there are no BOS/EOS/pad pieces (the unified specials play those roles),
  and `vocab_size` is an upper bound: a small corpus gets a smaller vocabulary instead of a
  training error. Single-threaded and seeded, so the same texts give
  the same model file.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  texts = [t for t in texts if t and t.strip()]
  if not texts:
    raise ValueError("train_sentencepiece: no non-empty texts")
  if vocab_size < 260:
    raise ValueError(f"vocab_size {vocab_size} too small: byte fallback alone needs 256 + 1 pieces")
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  spm.set_random_generator_seed(seed)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_prefix=out_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      hard_vocab_limit=False,
      byte_fallback=True,
      character_coverage=1.0,
      unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
      num_threads=1,
      minloglevel=2,
  )
  return out_prefix + ".model"
