"""Streaming safetensors: read one tensor at a time, write shards without holding them in memory.

Why not `safetensors.safe_open` / `save_file`? Reading: its numpy backend cannot return bfloat16
(every released Qwen3/Bagpiper weight), and its torch backend maps the file, so every page a
conversion touches stays in the resident set until the file is closed; `np.fromfile` into an
anonymous buffer keeps the peak at one tensor. Writing: `save_file` needs the whole shard in
memory (5 GB); the format is a JSON header (names, dtypes, shapes, byte offsets) followed by the
raw bytes, so once every shape and dtype is known up front (they are: the TensorRule tables say
so) we write the header first and then each tensor as it is produced. The files are plain
safetensors; tests read them back with the `safetensors` package and `transformers`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


def dtype_code(dtype) -> str:
  dt = np.dtype(dtype)
  if dt not in _CODES:
    raise ValueError(f"dtype {dt} has no safetensors code (supported: {sorted(map(str, _CODES))})")
  return _CODES[dt]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offset in `file`
  nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
  """Names -> TensorInfo of one .safetensors file (reads only the header)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 * 2**20:
      raise ValueError(f"{path}: not a safetensors file (header length {n})")
    header = json.loads(f.read(n))
  base = 8 + n
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    if meta["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
    dt = _DTYPES[meta["dtype"]]
    begin, end = meta["data_offsets"]
    shape = tuple(int(s) for s in meta["shape"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
      raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {dt}")
    out[name] = TensorInfo(path, dt, shape, base + begin, end - begin)
  return out


class TensorIndex:
  """What every streaming reader offers: `self.tensors` maps names to entries with a `.shape`."""

  tensors: Mapping

  def keys(self) -> list[str]:
    return list(self.tensors)

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in self.tensors.items()}


class SafetensorsReader(TensorIndex):
  """All tensors of a checkpoint directory (sharded with an index, or loose *.safetensors files).

  `get(name)` reads exactly one tensor into fresh memory. Only headers are read up front.
  """

  def __init__(self, path: str, extra_files: Sequence[str] = ()):
    """`extra_files`: further .safetensors files to read besides the checkpoint's (e.g. a release's
    espnet_buffers.safetensors, which its index deliberately does not list)."""
    self.path = path
    if os.path.isfile(path):
      files = [path]
    elif os.path.isdir(path):
      index = os.path.join(path, INDEX_NAME)
      if os.path.exists(index):
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
        files = [os.path.join(path, n) for n in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
          raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
      else:
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    else:
      raise FileNotFoundError(f"{path}: no such file or directory")
    self.tensors: dict[str, TensorInfo] = {}
    for fn in list(files) + list(extra_files):
      for name, info in read_header(fn).items():
        if name in self.tensors:
          raise ValueError(f"tensor {name} appears in both {self.tensors[name].file} and {fn}")
        self.tensors[name] = info

  def get(self, name: str, rows: slice | None = None) -> np.ndarray:
    """One tensor (or a contiguous block of its leading axis) as a new numpy array."""
    if name not in self.tensors:
      raise KeyError(f"{self.path}: no tensor named {name}")
    info = self.tensors[name]
    shape, start = info.shape, info.start
    if rows is not None:
      lo, hi, step = rows.indices(shape[0])
      if step != 1:
        raise ValueError("rows must be a contiguous slice")
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * info.dtype.itemsize
      start += lo * row_bytes
      shape = (hi - lo,) + shape[1:]
    out = np.empty(shape, info.dtype)
    with open(info.file, "rb") as f:
      f.seek(start)
      view = memoryview(out.reshape(-1).view(np.uint8))
      got = f.readinto(view)
    if got != out.nbytes:
      raise ValueError(f"{info.file}: tensor {name} is truncated ({got} of {out.nbytes} bytes)")
    return out


# ---------------------------------------------------------------------------------------------
# Writing.


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
  """Greedy, order-preserving split into shards of at most max_shard_bytes (a bigger tensor alone)."""
  shards, cur, size = [], [], 0
  for t in tensors:
    if cur and size + t.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(t)
    size += t.nbytes
  if cur:
    shards.append(cur)
  return shards


def shard_names(n: int) -> list[str]:
  return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(shard: Sequence[PlannedTensor], metadata: Mapping[str, str]) -> bytes:
  header, offset = {"__metadata__": dict(metadata)}, 0
  for t in shard:
    header[t.name] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape),
                      "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes
  return struct.pack("<Q", len(raw)) + raw


def write_sharded(out_dir: str, plan: Sequence[PlannedTensor], arrays: Iterable[tuple[str, np.ndarray]], *,
                  max_shard_bytes: int, metadata: Mapping[str, str] | None = None) -> dict:
  """Writes `arrays` (yielded in plan order, one at a time) into shards + the index JSON.

  Each array is written as soon as it is yielded and then dropped, so memory holds one tensor.
  Returns the index dict. Raises if an array does not match its planned name/shape/dtype.
  """
  metadata = {"format": "pt", **(metadata or {})}
  shards = plan_shards(plan, max_shard_bytes)
  names = shard_names(len(shards))
  os.makedirs(out_dir, exist_ok=True)
  it: Iterator = iter(arrays)
  weight_map = {}
  for shard, fname in zip(shards, names):
    path = os.path.join(out_dir, fname)
    with open(path + ".tmp", "wb") as f:
      f.write(_header_bytes(shard, metadata))
      for t in shard:
        try:
          name, x = next(it)
        except StopIteration:
          raise ValueError(f"tensor stream ended before {t.name}") from None
        if name != t.name or tuple(x.shape) != t.shape or np.dtype(x.dtype) != np.dtype(t.dtype):
          raise ValueError(f"tensor stream gave {name} {tuple(x.shape)} {x.dtype}, planned {t.name} "
                           f"{t.shape} {np.dtype(t.dtype)}")
        x = np.ascontiguousarray(x)
        f.write(memoryview(x.reshape(-1).view(np.uint8)))
        weight_map[name] = fname
        del x
    os.replace(path + ".tmp", path)
  extra = next(it, None)
  if extra is not None:
    raise ValueError(f"tensor stream has more tensors than planned, first extra: {extra[0]}")
  index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
  with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
    json.dump(index, f, indent=2)
  return index


def write_file(path: str, tensors: Sequence[tuple[str, np.ndarray]],
               metadata: Mapping[str, str] | None = None) -> None:
  """One small .safetensors file holding `tensors` (written through a temporary name)."""
  arrays = [(n, np.ascontiguousarray(x)) for n, x in tensors]
  plan = [PlannedTensor(n, tuple(x.shape), x.dtype) for n, x in arrays]
  with open(path + ".tmp", "wb") as f:
    f.write(_header_bytes(plan, {"format": "pt", **(metadata or {})}))
    for _, x in arrays:
      f.write(memoryview(x.reshape(-1).view(np.uint8)))
  os.replace(path + ".tmp", path)
