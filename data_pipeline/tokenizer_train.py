"""Trains a SentencePiece tokenizer (small from-scratch vocabularies: the demo, tiny configs)."""

from __future__ import annotations

import os
from typing import Iterable

import sentencepiece as spm


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
