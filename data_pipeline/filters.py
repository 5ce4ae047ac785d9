"""Curation filters of the reference recipe, each configurable and off-able (docs/data.md#curation-filters).

The reference (ESPnet egs2/bagpiper, `local/data_filtering.sh` and its heuristic caption filter)
drops a captioned clip when its caption is not Latin script, repeats itself, is lexically poor, has
odd word lengths or too many capitals, is too short or too long in tokens, or when the clip is too
long. The checks run in the reference's order and the first one that fails names the reason; the
record becomes an error of kind `filter_<reason>` (counted in index.json, listed in errors.jsonl).

They apply to pretraining records (the `rich_caption` of `und` / `gen` items) and to the duration of
every audio clip loaded for them. Every threshold is None (off) by default; `REFERENCE` holds the
recipe's values. Differences from the reference: the token count is the caption tokenised with the
writer's tokenizer (the reference used its captioning LLM's reported completion length), and the
n-grams are built here (the reference calls nltk; same definition).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

# Unicode blocks the reference treats as non-Latin script (a caption with any such character goes).
NON_LATIN_RANGES = (
    (0x0400, 0x052F),  # Cyrillic (+ supplement)
    (0x0590, 0x05FF),  # Hebrew
    (0x0600, 0x06FF), (0x0750, 0x077F),  # Arabic (+ supplement)
    (0x0900, 0x097F),  # Devanagari
    (0x0980, 0x09FF),  # Bengali
    (0x0E00, 0x0E7F),  # Thai
    (0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF),  # Hangul
    (0x3000, 0x303F),  # CJK symbols and punctuation
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # CJK ideographs (+ compatibility)
    (0xFF00, 0xFFEF),  # half- and full-width forms
)
_NON_LATIN = re.compile("[" + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in NON_LATIN_RANGES) + "]")
_RUN = re.compile(r"(.)\1+")  # "." skips newlines, as the reference's pattern


@dataclasses.dataclass(frozen=True)
class FilterSettings:
  """Thresholds; None turns a check off. Part of the build settings (and the shard fingerprint)."""

  non_latin: bool = False
  max_char_repetition: Optional[int] = None  # longest run of one character
  max_word_repetition: Optional[int] = None  # longest run of one word (case-insensitive)
  max_ngram_repetition_ratio: Optional[float] = None  # 1 - distinct / all word n-grams
  ngram_n: int = 5
  min_unique_word_ratio: Optional[float] = None  # distinct lower-cased words / words
  min_avg_word_length: Optional[float] = None
  max_avg_word_length: Optional[float] = None
  max_uppercase_ratio: Optional[float] = None  # upper-case letters / letters
  min_caption_tokens: Optional[int] = None
  max_caption_tokens: Optional[int] = None
  min_duration: Optional[float] = None  # seconds
  max_duration: Optional[float] = None

  @property
  def enabled(self) -> bool:
    return any(v not in (None, False) for k, v in dataclasses.asdict(self).items() if k != "ngram_n")


# The recipe's thresholds (data_filtering.sh defaults; its min_audio_duration is 0, i.e. off).
REFERENCE = FilterSettings(non_latin=True, max_char_repetition=5, max_word_repetition=3,
                           max_ngram_repetition_ratio=0.1, ngram_n=5, min_unique_word_ratio=0.3,
                           min_avg_word_length=2.0, max_avg_word_length=15.0, max_uppercase_ratio=0.5,
                           min_caption_tokens=200, max_caption_tokens=800, min_duration=None,
                           max_duration=30.0)
PRESETS = {"none": FilterSettings(), "reference": REFERENCE}


def longest_char_run(text: str) -> int:
  return max((len(m.group()) for m in _RUN.finditer(text)), default=1 if text else 0)


def longest_word_run(words: list[str]) -> int:
  best = run = 1 if words else 0
  for a, b in zip(words, words[1:]):
    run = run + 1 if a.lower() == b.lower() else 1
    best = max(best, run)
  return best


def ngram_repetition_ratio(words: list[str], n: int) -> float:
  grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
  return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def unique_word_ratio(words: list[str]) -> float:
  return len({w.lower() for w in words}) / len(words) if words else 0.0


def avg_word_length(words: list[str]) -> float:
  return sum(map(len, words)) / len(words) if words else 0.0


def uppercase_ratio(text: str) -> float:
  letters = [c for c in text if c.isalpha()]
  return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def caption_reason(s: FilterSettings, caption: str, num_tokens: int) -> Optional[tuple[str, str]]:
  """(kind, reason) of the first caption check that fails, or None when the caption passes."""
  words = caption.split()
  checks = (
      ("non_latin", s.non_latin or None, lambda: bool(_NON_LATIN.search(caption)), lambda v, t: v,
       "has non-Latin script characters"),
      ("char_repetition", s.max_char_repetition, lambda: longest_char_run(caption), lambda v, t: v > t,
       "a character repeats {v} times in a row (max {t})"),
      ("word_repetition", s.max_word_repetition, lambda: longest_word_run(words), lambda v, t: v > t,
       "a word repeats {v} times in a row (max {t})"),
      ("ngram_repetition", s.max_ngram_repetition_ratio,
       lambda: ngram_repetition_ratio(words, s.ngram_n), lambda v, t: v > t,
       f"{s.ngram_n}-gram repetition ratio {{v:.3f}} > {{t}}"),
      ("unique_word_ratio_low", s.min_unique_word_ratio, lambda: unique_word_ratio(words),
       lambda v, t: v < t, "unique word ratio {v:.3f} < {t}"),
      ("avg_word_length_low", s.min_avg_word_length, lambda: avg_word_length(words), lambda v, t: v < t,
       "average word length {v:.2f} < {t}"),
      ("avg_word_length_high", s.max_avg_word_length, lambda: avg_word_length(words), lambda v, t: v > t,
       "average word length {v:.2f} > {t}"),
      ("uppercase_ratio_high", s.max_uppercase_ratio, lambda: uppercase_ratio(caption),
       lambda v, t: v > t, "upper-case letter ratio {v:.3f} > {t}"),
      ("tokens_low", s.min_caption_tokens, lambda: num_tokens, lambda v, t: v < t,
       "caption has {v} tokens < {t}"),
      ("tokens_high", s.max_caption_tokens, lambda: num_tokens, lambda v, t: v > t,
       "caption has {v} tokens > {t}"),
  )
  for name, threshold, value, fails, why in checks:
    if threshold is None:
      continue
    v = value()
    if fails(v, threshold):
      return f"filter_{name}", "caption " + why.format(v=v, t=threshold)
  return None


def duration_reason(s: FilterSettings, seconds: float) -> Optional[tuple[str, str]]:
  """(kind, reason) when a clip of `seconds` is outside [min_duration, max_duration], else None."""
  if s.min_duration is not None and seconds < s.min_duration:
    return "filter_duration_low", f"clip lasts {seconds:.2f} s < {s.min_duration} s"
  if s.max_duration is not None and seconds > s.max_duration:
    return "filter_duration_high", f"clip lasts {seconds:.2f} s > {s.max_duration} s"
  return None
