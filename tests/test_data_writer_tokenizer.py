"""Tokenizers: SentencePiece training + round trip, HF tokenizer.json, dispatch by file name."""

from __future__ import annotations

import pytest
import tokenizers as tk

from bagpiper_jax import tokenizer
from data_pipeline import tokenizer_train

TEXTS = [f"A steady {f} Hz sine tone, {lvl}, lasting {d:.1f} seconds, with a soft fade-in."
         for f in range(100, 2000, 37) for lvl in ("quiet", "loud") for d in (1.5, 2.5)]


def test_sentencepiece_train_encode_roundtrip(tmp_path):
  path = tokenizer_train.train_sentencepiece(TEXTS, str(tmp_path / "spm"), 512)
  tok = tokenizer.load_tokenizer(path)
  assert isinstance(tok, tokenizer.SentencePieceTokenizer)
  assert 260 <= tok.vocab_size <= 512
  for text in ("A steady 440 Hz sine tone, loud.", "Unseen: ünïcode, 你好, <think>x</think>"):
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text  # byte fallback: nothing becomes <unk>
  # Learned pieces: a frequent word is one piece, not spelt out in bytes.
  assert len(tok.encode("seconds")) <= 2


def test_sentencepiece_is_deterministic(tmp_path):
  a = tokenizer.load_tokenizer(tokenizer_train.train_sentencepiece(TEXTS, str(tmp_path / "a"), 400))
  b = tokenizer.load_tokenizer(tokenizer_train.train_sentencepiece(TEXTS, str(tmp_path / "b"), 400))
  assert a.vocab_size == b.vocab_size
  assert [a.encode(t) for t in TEXTS[:20]] == [b.encode(t) for t in TEXTS[:20]]


def test_sentencepiece_rejects_bad_args(tmp_path):
  with pytest.raises(ValueError, match="no non-empty texts"):
    tokenizer_train.train_sentencepiece(["", "  "], str(tmp_path / "x"), 512)
  with pytest.raises(ValueError, match="too small"):
    tokenizer_train.train_sentencepiece(TEXTS, str(tmp_path / "x"), 100)


def test_hf_tokenizer_json(tmp_path):
  hf = tk.Tokenizer(tk.models.BPE(unk_token="[UNK]"))
  hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  hf.train_from_iterator(TEXTS, trainer)
  path = str(tmp_path / "tokenizer.json")
  hf.save(path)
  for p in (path, str(tmp_path)):  # the file, or the directory holding tokenizer.json
    tok = tokenizer.load_tokenizer(p)
    assert isinstance(tok, tokenizer.HFTokenizer)
    ids = tok.encode("A steady 440 Hz sine tone.")
    assert ids == hf.encode("A steady 440 Hz sine tone.", add_special_tokens=False).ids
    assert tok.decode(ids) == "A steady 440 Hz sine tone."
    assert tok.vocab_size == hf.get_vocab_size()


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="expected a tokenizer.json"):
    tokenizer.load_tokenizer(str(tmp_path / "vocab.txt"))
  with pytest.raises(FileNotFoundError, match="not found"):
    tokenizer.load_tokenizer(str(tmp_path / "missing.model"))
