"""The published data's own files as input: Hub parquet with embedded audio, WebDataset tar shards.

Read with pyarrow / tarfile through Beam's file systems (local copies or gs://); no `datasets` hub
client is needed at run time. Both yield the same (items, errors) per row as a JSONL manifest line
(manifest.parse_row), so everything after reading is shared.

Parquet (`espnet/Bagpiper_PreTrain_Data`, docs/data.md#pretraining-data): one row per clip. Columns
used: `audio` (the Hugging Face Audio struct {bytes, path}, or plain binary: the encoded file,
Ogg/Opus in the published data), `rich_caption`, `direction`, `category`, `dataset`, `example_id`
(the record id), `sample_rate` (checked against the decoded audio), `start_time`/`end_time` (or
`start`/`end`). The reader reads only the small columns; the audio bytes are read by row when the
shard holding the row is built (EmbeddedAudio), so the shuffle between the two moves no audio.

The embedded audio is the clip itself: `start_time`/`end_time` are kept as provenance (`source_start`,
`source_end`, part of the shard fingerprint) and NOT cut, unless `cut_segments=True` says the
embedded audio is the whole source recording and [start, end) must be cut out of it.

WebDataset: a tar whose adjacent members sharing a key (the member name up to the first "." of its
base name) form a sample: `<key>.json` holds the row's fields (as above, audio excluded) and one of
`<key>.{flac,wav,opus,ogg,mp3}` its audio. A member without its pair is an error naming the tar and
the member. Plain `.tar` members are read by offset when their shard is built; compressed tars
(`.tar.gz`, `.tgz`, `.tar.zst`) cannot be read by offset, so their audio bytes travel with the item.

Row numbers (`line` in errors.jsonl) are 1-based: the parquet row, or the sample's position in the tar.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import tarfile
from typing import Any, Iterable, Iterator, Optional

import pyarrow.parquet as pq

from data_pipeline import fs
from data_pipeline import manifest as manifest_lib

AUDIO_COLUMN = "audio"
AUDIO_EXTENSIONS = ("flac", "wav", "opus", "ogg", "mp3")
REQUIRED = ("rich_caption", "direction", "category")
# Columns read by the reader (those present); `audio` is read later, by row.
META_COLUMNS = ("example_id", "id", "rich_caption", "direction", "category", "dataset", "source_utt_id",
                "sample_rate", "channels", "audio_format", "start_time", "end_time", "start", "end")
INPUT_KINDS = ("jsonl", "parquet", "tar")
_SUFFIXES = ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".jsonl.zst", "jsonl"), (".json", "jsonl"),
             (".parquet", "parquet"), (".tar", "tar"), (".tar.gz", "tar"), (".tgz", "tar"),
             (".tar.zst", "tar"))


@dataclasses.dataclass(frozen=True)
class EmbeddedAudio:
  """Where one item's audio bytes are: a parquet row, a tar member's byte range, or the bytes."""

  file: str
  kind: str  # "parquet" | "tar" | "inline"
  index: int = -1  # parquet: 0-based row; tar: offset of the member's data
  size: int = -1  # tar: the member's size
  data: Optional[bytes] = None  # inline


def input_kind(path: str) -> Optional[str]:
  """'jsonl', 'parquet' or 'tar' by the file name; None when it is none of them."""
  name = path.lower()
  return next((kind for suffix, kind in _SUFFIXES if name.endswith(suffix)), None)


def _hub_row(r: dict, ref: str, *, cut_segments: bool) -> dict:
  """A parquet row / WebDataset json -> the manifest row the rest of the writer reads."""
  out = {k: r[k] for k in ("rich_caption", "direction", "category", "dataset", "source_utt_id")
         if r.get(k) is not None}
  out["audio"] = ref
  rid = r.get("example_id") or r.get("id")
  if rid:
    out["id"] = str(rid)
  if r.get("sample_rate") is not None:
    out["sample_rate"] = int(r["sample_rate"])
  start = r.get("start_time", r.get("start"))
  end = r.get("end_time", r.get("end"))
  if cut_segments:
    out.update({k: float(v) for k, v in (("start", start), ("end", end)) if v is not None})
  else:
    out.update({k: float(v) for k, v in (("source_start", start), ("source_end", end)) if v is not None})
  return out


def _row_items(path: str, line: int, r: dict, ref: str, embedded: EmbeddedAudio, *, sft_source: str,
               cut_segments: bool, missing_columns: tuple = ()) -> tuple[list, list]:
  missing = [k for k in REQUIRED if r.get(k) is None]
  if missing:
    why = ", ".join(f"'{k}'" + (" (no such column in the file)" if k in missing_columns else "")
                    for k in missing)
    return [], [manifest_lib.error(path, line, "missing_field", f"{ref}: no {why}",
                                   item_id=str(r.get("example_id") or r.get("id") or ""), audio=ref)]
  return manifest_lib.parse_row(path, line, _hub_row(r, ref, cut_segments=cut_segments),
                                sft_source=sft_source, base=None, embedded=embedded)


def _open_parquet(path: str) -> pq.ParquetFile:
  return pq.ParquetFile(path if not fs.is_remote(path) else fs.open_read(path))


def read_parquet(path: str, *, sft_source: str = "sft", cut_segments: bool = False,
                 batch_rows: int = 4096) -> Iterator[tuple[list, list]]:
  """(items, errors) of each row of a Hub parquet file, in row order."""
  pf = _open_parquet(path)
  names = set(pf.schema_arrow.names)
  cols = [c for c in META_COLUMNS if c in names]
  absent = tuple(k for k in REQUIRED if k not in names)
  n = 0
  if AUDIO_COLUMN not in names:
    for n in range(1, pf.metadata.num_rows + 1):
      yield [], [manifest_lib.error(path, n, "missing_field", f"{path}#row={n - 1}: the file has no "
                                    f"'{AUDIO_COLUMN}' column")]
    return
  batches = pf.iter_batches(batch_size=batch_rows, columns=cols) if cols else (
      [{}] * pf.metadata.num_rows for _ in (0,))
  for batch in batches:
    rows = batch if isinstance(batch, list) else batch.to_pylist()
    for r in rows:
      ref = f"{path}#row={n}"
      n += 1
      yield _row_items(path, n, r, ref, EmbeddedAudio(path, "parquet", n - 1), sft_source=sft_source,
                       cut_segments=cut_segments, missing_columns=absent)


def _key_and_field(name: str) -> tuple[str, str]:
  """WebDataset: '<dir>/<key>.<field...>' -> (<dir>/<key>, <field...>)."""
  head, _, base = name.rpartition("/")
  key, dot, field = base.partition(".")
  return (f"{head}/{key}" if head else key), (field if dot else "")


def read_tar(path: str, *, sft_source: str = "sft", cut_segments: bool = False
             ) -> Iterator[tuple[list, list]]:
  """(items, errors) of each sample of a WebDataset tar, in member order."""
  inline = input_kind(path) == "tar" and not path.lower().endswith(".tar")
  n = 0

  def flush(key: str, members: dict):
    nonlocal n
    n += 1
    meta = members.get("json")
    audio = next(((f, m) for f, m in members.items() if f.lower() in AUDIO_EXTENSIONS), None)
    if meta is None or audio is None:
      have = ", ".join(f"{key}.{f}" for f in members)
      want = f"{key}.json" if meta is None else f"an audio member {key}.{{{','.join(AUDIO_EXTENSIONS)}}}"
      return [], [manifest_lib.error(path, n, "missing_pair", f"{path}: member(s) {have} without {want}",
                                     audio=f"{path}#{key}")]
    try:
      r = json.loads(meta[1])
      if not isinstance(r, dict):
        raise ValueError(f"a JSON {type(r).__name__}, not an object")
    except ValueError as e:
      return [], [manifest_lib.error(path, n, "bad_json", f"{path}#{meta[0].name}: {e}")]
    field, (info, data) = audio
    ref = f"{path}#{info.name}"
    emb = (EmbeddedAudio(path, "inline", data=data) if inline else
           EmbeddedAudio(path, "tar", index=info.offset_data, size=info.size))
    return _row_items(path, n, r, ref, emb, sft_source=sft_source, cut_segments=cut_segments)

  with fs.open_read(path, decompress=inline) as f:
    with tarfile.open(fileobj=f, mode="r|") as tf:
      key, members = None, {}
      for info in tf:
        if not info.isfile():
          continue
        k, field = _key_and_field(info.name)
        if not field:  # WebDataset ignores members without an extension
          continue
        if k != key and members:
          yield flush(key, members)
          members = {}
        key = k
        keep = field == "json" or inline and field.lower() in AUDIO_EXTENSIONS
        members[field] = (info, tf.extractfile(info).read() if keep else None)
      if members:
        yield flush(key, members)


def read_input(path: str, *, sft_source: str = "sft", cut_segments: bool = False
               ) -> Iterator[tuple[list, list]]:
  """(items, errors) per line / row / sample of one input file of any kind."""
  kind = input_kind(path)
  if kind == "jsonl":
    return manifest_lib.iter_manifest(path, sft_source=sft_source)
  if kind == "parquet":
    return read_parquet(path, sft_source=sft_source, cut_segments=cut_segments)
  if kind == "tar":
    return read_tar(path, sft_source=sft_source, cut_segments=cut_segments)
  raise ValueError(f"{path}: unknown input kind (expected one of {[s for s, _ in _SUFFIXES]})")


# -- audio bytes for building --------------------------------------------------------------------------

def audio_refs(item: manifest_lib.Item) -> list[str]:
  """The audio paths / references an item's build will load."""
  if item.task == "dialogue":
    return [m["content"]["path"] for m in item.row["messages"] if m["modality"] == "audio"]
  return [item.row["audio"]] if item.row.get("audio") else []


def _parquet_bytes(path: str, rows: list[int]) -> dict[int, Any]:
  pf = _open_parquet(path)
  starts, total = [], 0
  for g in range(pf.metadata.num_row_groups):
    starts.append(total)
    total += pf.metadata.row_group(g).num_rows
  by_group = collections.defaultdict(list)
  for r in rows:
    g = max(i for i, s in enumerate(starts) if s <= r) if 0 <= r < total else -1
    by_group[g].append(r)
  out = {}
  for g, rs in by_group.items():
    if g < 0:
      out.update({r: ValueError(f"{path}: row {r} beyond the file's {total} rows") for r in rs})
      continue
    col = pf.read_row_group(g, columns=[AUDIO_COLUMN]).column(0)
    for r in rs:
      v = col[r - starts[g]].as_py()
      if isinstance(v, dict):
        v = v.get("bytes") or ValueError(f"{path}#row={r}: the audio struct holds no bytes"
                                         + (f" (only a path, {v['path']!r})" if v.get("path") else ""))
      out[r] = v if v else ValueError(f"{path}#row={r}: no audio (null or empty '{AUDIO_COLUMN}')")
  return out


def fetch_audio(items: Iterable[manifest_lib.Item]) -> dict[str, Any]:
  """{reference: bytes or an Exception saying why not} for every embedded or remote audio of `items`.

  Local audio files are not read here (the builder opens them). Reads each parquet file / tar once.
  """
  out: dict[str, Any] = {}
  parquet = collections.defaultdict(dict)  # file -> {row: ref}
  tars = collections.defaultdict(dict)  # file -> {(offset, size): ref}
  for it in items:
    emb = it.embedded
    if emb is not None:
      ref = it.row["audio"]
      if emb.kind == "inline":
        out[ref] = emb.data
      elif emb.kind == "parquet":
        parquet[emb.file][emb.index] = ref
      else:
        tars[emb.file][(emb.index, emb.size)] = ref
      continue
    for ref in audio_refs(it):
      if fs.is_remote(ref) and ref not in out:
        try:
          out[ref] = fs.read_bytes(ref)
        except Exception as e:  # pylint: disable=broad-except  (reported against the item)
          out[ref] = FileNotFoundError(f"{ref}: cannot read ({type(e).__name__}: {e})")
  for path, rows in parquet.items():
    try:
      got = _parquet_bytes(path, sorted(rows))
    except Exception as e:  # pylint: disable=broad-except
      got = {r: OSError(f"{path}: cannot read the '{AUDIO_COLUMN}' column ({type(e).__name__}: {e})")
             for r in rows}
    out.update({ref: got[r] for r, ref in rows.items()})
  for path, ranges in tars.items():
    try:
      with fs.open_read(path) as f:
        for (off, size), ref in sorted(ranges.items()):
          f.seek(off)
          out[ref] = f.read(size)
    except Exception as e:  # pylint: disable=broad-except
      out.update({ref: OSError(f"{path}: cannot read ({type(e).__name__}: {e})")
                  for ref in ranges.values() if ref not in out})
  return out
