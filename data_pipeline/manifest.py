"""JSONL manifests -> work items. Cheap, line-level checks only (no audio is opened here).

Three kinds of line, told apart by their keys:

  pretraining  {"audio", "rich_caption", "direction", "category", "dataset", ["start", "end"],
                ["sample_rate"], ["id"]}
               direction "und" -> audio_to_text in subset f"{category}_und";
               "gen" -> text_to_audio in f"{category}_gen"; "und,gen" -> one item for each.
  text only    {"text", ["id"]} (no "audio")           -> text_only in subset "text_only".
  SFT          {"messages": [{"role", "modality", "content"}, ...], ["id"], ["category"]}
               -> dialogue in the subset named by --sft_source. Audio content is a path, or
               {"path", ["start"], ["end"]}.

Relative audio paths are resolved against the manifest's directory (local or gs://). A line that
cannot become an item (bad JSON, empty caption, unknown direction/category, malformed messages)
becomes an error dict with the manifest, line number and reason; it never stops the run.

The same rows also come from the published data's own files (data_pipeline/hub.py: parquet rows,
WebDataset samples); there `line` is the 1-based row or sample number and the audio is embedded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator, Optional

from bagpiper_jax.data import records
from data_pipeline import fs

CATEGORIES = ("speech", "music", "sound")
DIRECTIONS = {"und": ("und",), "gen": ("gen",), "und,gen": ("und", "gen"), "gen,und": ("und", "gen")}
TEXT_ONLY_SOURCE = "text_only"


@dataclasses.dataclass(frozen=True)
class Item:
  """One record to build. `row` is the manifest line (audio paths already absolute)."""

  manifest: str
  line: int  # 1-based
  id: str
  source: str
  task: str
  category: str
  row: dict
  # Where the bytes of row["audio"] live when they are embedded in an input file (hub.EmbeddedAudio);
  # row["audio"] is then a reference such as "<file>#row=12" that names it in messages.
  embedded: Optional[Any] = None

  def audio_path(self) -> Optional[str]:
    return self.row.get("audio")


def error(manifest: str, line: int, reason_kind: str, reason: str, *, item_id: str = "",
          source: str = "", audio: Optional[str] = None) -> dict[str, Any]:
  """The errors.jsonl row. `kind` is a short key for the summary counts; `reason` is for people."""
  return {"manifest": manifest, "line": line, "id": item_id, "source": source, "audio": audio,
          "kind": reason_kind, "reason": reason}


def _resolve(path: str, base: Optional[str]) -> str:
  """`path` relative to `base` (the manifest's directory); None: `path` is a reference, kept as is."""
  if base is None or fs.is_remote(path):
    return path
  if fs.is_remote(base):
    return fs.join(base, path)
  path = os.path.expanduser(path)
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _audio_content(content: Any, base: str) -> Optional[dict]:
  if isinstance(content, str) and content.strip():
    return {"path": _resolve(content.strip(), base)}
  if isinstance(content, dict):
    path = content.get("path") or content.get("audio")
    if isinstance(path, str) and path.strip():
      return {**content, "path": _resolve(path.strip(), base)}
  return None


def parse_line(manifest: str, line_no: int, text: str, *, sft_source: str = "sft"
               ) -> tuple[list[Item], list[dict]]:
  """One manifest line -> (items, errors). Blank lines give neither."""
  if not text.strip():
    return [], []
  try:
    row = json.loads(text)
  except json.JSONDecodeError as e:
    return [], [error(manifest, line_no, "bad_json", f"invalid JSON: {e}")]
  if not isinstance(row, dict):
    return [], [error(manifest, line_no, "bad_json", f"line is a JSON {type(row).__name__}, not an object")]
  return parse_row(manifest, line_no, row, sft_source=sft_source, base=fs.dirname(manifest))


def parse_row(manifest: str, line_no: int, row: dict, *, sft_source: str = "sft",
              base: Optional[str] = None, embedded: Any = None) -> tuple[list[Item], list[dict]]:
  """One row (a parsed manifest line, parquet row or WebDataset sample) -> (items, errors).

  base: the directory relative audio paths are resolved against; None keeps paths as given.
  embedded: where row["audio"]'s bytes are (see Item.embedded), carried into the items.
  """
  err = lambda kind, why, **kw: ([], [error(manifest, line_no, kind, why, **kw)])
  base_id = str(row.get("id") or f"{fs.basename(manifest)}:{line_no}")

  if "messages" in row:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
      return err("bad_messages", "'messages' must be a non-empty list", item_id=base_id, source=sft_source)
    clean = []
    for i, m in enumerate(msgs):
      if not isinstance(m, dict):
        return err("bad_messages", f"messages[{i}] is not an object", item_id=base_id, source=sft_source)
      role, modality, content = m.get("role"), m.get("modality"), m.get("content")
      if role not in records.ROLES:
        return err("bad_messages", f"messages[{i}].role {role!r} not in {records.ROLES}",
                   item_id=base_id, source=sft_source)
      if modality not in records.MODALITIES:
        return err("bad_messages", f"messages[{i}].modality {modality!r} not in {records.MODALITIES}",
                   item_id=base_id, source=sft_source)
      if modality == "text":
        if not isinstance(content, str) or not content.strip():
          return err("empty_text", f"messages[{i}] has empty text content", item_id=base_id,
                     source=sft_source)
        clean.append({"role": role, "modality": modality, "content": content})
      else:
        audio = _audio_content(content, base)
        if audio is None:
          return err("bad_messages", f"messages[{i}] audio content must be a path or "
                     "{'path', 'start', 'end'}", item_id=base_id, source=sft_source)
        clean.append({"role": role, "modality": modality, "content": audio})
    category = str(row.get("category") or sft_source)
    return [Item(manifest, line_no, base_id, sft_source, "dialogue", category,
                 {**row, "messages": clean})], []

  if "audio" not in row and "text" in row:
    text_ = row["text"]
    if not isinstance(text_, str) or not text_.strip():
      return err("empty_text", "empty 'text'", item_id=base_id, source=TEXT_ONLY_SOURCE)
    return [Item(manifest, line_no, base_id, TEXT_ONLY_SOURCE, "text_only", "text", row)], []

  audio = row.get("audio")
  if not isinstance(audio, str) or not audio.strip():
    return err("missing_field", "no 'audio' path (and no 'text' or 'messages')", item_id=base_id)
  row = {**row, "audio": _resolve(audio.strip(), base)}
  kw = dict(item_id=base_id, audio=row["audio"])
  direction = str(row.get("direction", "")).replace(" ", "")
  if direction not in DIRECTIONS:
    return err("bad_direction", f"direction {row.get('direction')!r} not one of "
               "'und', 'gen', 'und,gen'", **kw)
  category = row.get("category")
  if category not in CATEGORIES:
    return err("bad_category", f"category {category!r} not in {CATEGORIES}", **kw)
  caption = row.get("rich_caption")
  if not isinstance(caption, str) or not caption.strip():
    return err("empty_caption", "empty 'rich_caption'", **kw)
  items = []
  for d in DIRECTIONS[direction]:
    task = "audio_to_text" if d == "und" else "text_to_audio"
    items.append(Item(manifest, line_no, f"{base_id}:{d}", f"{category}_{d}", task, category, row,
                      embedded))
  return items, []


def iter_manifest(path: str, *, sft_source: str = "sft") -> Iterator[tuple[list[Item], list[dict]]]:
  """(items, errors) of each line of one JSONL manifest, in line order (.gz/.zst decompressed)."""
  with fs.open_read(path, decompress=True) as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield [], [error(path, line_no, "bad_json", f"line is not UTF-8 ({e})")]
        continue
      yield parse_line(path, line_no, text, sft_source=sft_source)


def read_manifests(paths: Iterable[str], *, sft_source: str = "sft") -> tuple[list[Item], list[dict]]:
  """All items and line errors of `paths`, in manifest then line order (deterministic)."""
  items, errors = [], []
  for path in paths:
    if not fs.exists(path):
      raise FileNotFoundError(f"--manifest {path}: no such file")
    for it, er in iter_manifest(path, sft_source=sft_source):
      items += it
      errors += er
  return items, errors
