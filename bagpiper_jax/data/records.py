"""The on-disk record: one pre-tokenised example, serialised with msgpack.

Written by `data_pipeline/` into ArrayRecord shards, read by the Grain pipeline, which turns it into
the `[L, 8]` id matrix at load time (`bagpiper_jax.data.template`). Layout:

  {
    "id": str,              # stable example id (manifest path + line, or the manifest's own id)
    "source": str,          # mixture subset, e.g. "music_und", "speech_gen", "text_only", "sft"
    "task": str,            # audio_to_text | text_to_audio | text_only | dialogue
    "messages": [
      {"role": "system" | "user" | "assistant",
       "modality": "text" | "audio",
       # exactly one of:
       "text_ids": int32 [n]        unified ids (tokenizer id + 256), text only
       "mel":      float16 [128, T] user audio: Whisper-style log-mel, 16 kHz, hop 160
       "codes":    int16 [T, 8]     assistant audio: raw X-Codec codes 0..1023, 50 Hz
      }, ...]
  }

Arrays are stored as {"__nd__": True, "dtype": str, "shape": list, "data": bytes}.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

ROLES = ("system", "user", "assistant")
MODALITIES = ("text", "audio")
TASKS = ("audio_to_text", "text_to_audio", "text_only", "dialogue")
CONTENT_KEYS = ("text_ids", "mel", "codes")


def _default(obj):
  if isinstance(obj, np.ndarray):
    return {"__nd__": True, "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"cannot serialise {type(obj).__name__}")


def _hook(d):
  if d.get("__nd__"):
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
  return d


def encode(example: dict[str, Any]) -> bytes:
  validate(example)
  return msgpack.packb(example, default=_default, use_bin_type=True)


def decode(data: bytes, *, where: str = "record") -> dict[str, Any]:
  try:
    ex = msgpack.unpackb(data, object_hook=_hook, raw=False)
  except Exception as e:  # msgpack raises several unrelated types
    raise ValueError(f"{where}: not a bagpiper record ({type(e).__name__}: {e})") from e
  validate(ex, where=where)
  return ex


def validate(ex: dict[str, Any], *, where: str = "record") -> None:
  """Raises ValueError naming the record and field at fault."""
  where = f"{where} (id={ex.get('id', '?')!r})"
  for k in ("id", "source", "task", "messages"):
    if k not in ex:
      raise ValueError(f"{where}: missing key {k!r}")
  if ex["task"] not in TASKS:
    raise ValueError(f"{where}: task {ex['task']!r} not in {TASKS}")
  if not ex["messages"]:
    raise ValueError(f"{where}: no messages")
  for i, m in enumerate(ex["messages"]):
    if m.get("role") not in ROLES:
      raise ValueError(f"{where}: messages[{i}].role {m.get('role')!r} not in {ROLES}")
    if m.get("modality") not in MODALITIES:
      raise ValueError(f"{where}: messages[{i}].modality {m.get('modality')!r} not in {MODALITIES}")
    content = [k for k in CONTENT_KEYS if k in m]
    if len(content) != 1:
      raise ValueError(f"{where}: messages[{i}] must hold exactly one of {CONTENT_KEYS}, has {content}")
    key = content[0]
    arr = np.asarray(m[key])
    if m["modality"] == "text" and key != "text_ids":
      raise ValueError(f"{where}: messages[{i}] is text but holds {key!r}")
    if m["modality"] == "audio":
      if m["role"] == "assistant" and key != "codes":
        raise ValueError(f"{where}: messages[{i}] assistant audio must be 'codes', has {key!r}")
      if m["role"] != "assistant" and key != "mel":
        raise ValueError(f"{where}: messages[{i}] {m['role']} audio must be 'mel', has {key!r}")
    if key == "text_ids" and (arr.ndim != 1 or arr.size == 0):
      raise ValueError(f"{where}: messages[{i}].text_ids must be a non-empty 1-D array, got {arr.shape}")
    if key == "mel" and (arr.ndim != 2 or arr.shape[1] == 0):
      raise ValueError(f"{where}: messages[{i}].mel must be [mel_bins, T>0], got {arr.shape}")
    if key == "codes" and (arr.ndim != 2 or arr.shape[0] == 0):
      raise ValueError(f"{where}: messages[{i}].codes must be [T>0, streams], got {arr.shape}")
