"""Files through Apache Beam's file systems: local paths and gs:// (or any scheme Beam has) alike.

The writer runs on whatever machines the Beam runner gives it, so every input and output path goes
through `apache_beam.io.filesystems.FileSystems` (gs:// needs `apache-beam[gcp]` on the machines that
touch such paths). Local paths keep their local behaviour where it matters: an atomic rename for
files that readers may glob while the job runs (ArrayRecordWriter writes local files only, so a
shard is written to a local temporary file and then renamed, or uploaded, into place).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from typing import Any, Iterator, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from bagpiper_jax import paths

RAW = CompressionTypes.UNCOMPRESSED


def is_remote(path: str) -> bool:
  """True for URLs (gs://, s3://, ...): read and written through Beam's file systems."""
  return paths.is_url(path)


def join(base: str, *parts: str) -> str:
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
  return posixpath.basename(path) if is_remote(path) else os.path.basename(path)


def absolute(path: str) -> str:
  return paths.resolve(path)


def relative(path: str, base: str) -> str:
  if is_remote(path):
    return posixpath.relpath(path.split("://", 1)[1], base.split("://", 1)[1])
  return os.path.relpath(path, base)


def exists(path: str) -> bool:
  return os.path.exists(path) if not is_remote(path) else FileSystems.exists(path)


def match(pattern: str) -> list[str]:
  """Sorted paths matching a glob (local or remote); [] when nothing matches."""
  try:
    res = FileSystems.match([pattern])[0]
  except Exception:  # pylint: disable=broad-except  (BeamIOError for "no match" on some file systems)
    return []
  return sorted(m.path for m in res.metadata_list)


def open_read(path: str, *, decompress: bool = False):
  """A binary read handle; `decompress` undoes .gz/.zst/.bz2 by the file's extension."""
  return FileSystems.open(path, compression_type=CompressionTypes.AUTO if decompress else RAW)


def read_bytes(path: str) -> bytes:
  with open_read(path) as f:
    return f.read()


def makedirs(path: str) -> None:
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)  # object stores have no directories


def delete(paths: list[str]) -> None:
  if paths:
    FileSystems.delete(paths)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` so that `path` appears complete or not at all (local: tmp + rename)."""
  if is_remote(path):
    with FileSystems.create(path, compression_type=RAW) as f:  # an object appears when closed
      f.write(data)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: str) -> Optional[Any]:
  """The parsed file, or None when it is missing or not valid JSON."""
  try:
    return json.loads(read_bytes(path))
  except Exception:  # pylint: disable=broad-except  (missing, half-written or unreadable: same answer)
    return None


def publish(local_tmp: str, path: str) -> None:
  """Moves a finished local file to `path` (same-directory rename locally, upload otherwise)."""
  if not is_remote(path):
    os.replace(local_tmp, path)
    return
  with open(local_tmp, "rb") as src, FileSystems.create(path, compression_type=RAW) as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
  os.remove(local_tmp)


def local_tmp_for(path: str, tag: str) -> str:
  """Where to write `path` locally before publish(): next to it (local) or in the temp dir."""
  if not is_remote(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"{path}.partial-{tag}"
  fd, tmp = tempfile.mkstemp(prefix="bagpiper_shard_", suffix=".partial")
  os.close(fd)
  return tmp


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local path holding `path`'s content (the path itself when it is local)."""
  if not is_remote(path):
    yield path
    return
  d = tempfile.mkdtemp(prefix="bagpiper_fetch_")
  try:
    local = os.path.join(d, basename(path))
    with open(local, "wb") as f:
      f.write(read_bytes(path))
    yield local
  finally:
    shutil.rmtree(d, ignore_errors=True)


def localize(path: str, into: str) -> str:
  """A local copy of a remote file or directory (one level of files) under `into`; local: as is.

  For the tokenizer file and the codec directory on workers that see only gs://.
  """
  if not is_remote(path):
    return path
  dest = os.path.join(into, basename(path.rstrip("/")))
  files = match(path.rstrip("/") + "/*")
  if not files:  # a single file
    with open(dest, "wb") as f:
      f.write(read_bytes(path))
    return dest
  os.makedirs(dest, exist_ok=True)
  for p in files:
    with open(os.path.join(dest, basename(p)), "wb") as f:
      f.write(read_bytes(p))
  return dest
