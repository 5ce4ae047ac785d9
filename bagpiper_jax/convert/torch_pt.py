"""ESPnet-style `{"module": state_dict}` torch checkpoints, read and written one tensor at a time.

`torch.save` needs every tensor in memory and `torch.load` (even with mmap) keeps every page it
touched resident; for the 8B model either is most of a 24 GB host. A torch checkpoint is a zip
archive: `data.pkl` (the object, tensors pickled as `_rebuild_tensor_v2(persistent storage ref,
offset, size, stride, ...)`) plus one uncompressed record `data/<key>` per storage. So:

  * reading: a restricted unpickler (state dicts only: tensors, OrderedDict, plain containers; any
    other global is refused, like `torch.load(weights_only=True)`) turns tensors into lazy
    references, and `get(name)` reads that one record's bytes with `zipfile`;
  * writing: the pickle is built from placeholders (shape and dtype are known up front) and each
    storage record is written by torch's own zip writer as soon as its tensor is produced.

Files written here load with plain `torch.load(path, weights_only=True)`; tests check both ways.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import sys
import zipfile
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

from bagpiper_jax.convert.safetensors_io import PlannedTensor, TensorIndex

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
_STORAGE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _StorageType(str):
  """A `torch.<X>Storage` global, remembered by name only."""


class _Unpickler(pickle.Unpickler):
  _ALLOWED = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
  }

  def __init__(self, f, path):
    super().__init__(f)
    self._path = path

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"{self._path}: refusing to unpickle global {module}.{name}; only state dicts of tensors "
        "(optionally under 'module') are supported")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self._path}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    return _StorageRef(str(key), _STORAGE_DTYPES[str(storage_type)], int(numel))


class PtReader(TensorIndex):
  """Tensors of a torch zip checkpoint holding a state dict (at top level or under 'module')."""

  def __init__(self, path: str):
    self.path = path
    if not zipfile.is_zipfile(path):
      raise ValueError(f"{path}: not a torch zip checkpoint (legacy pre-1.6 torch.save format is "
                       "not supported; re-save it with a current torch)")
    self._zip = zipfile.ZipFile(path)
    pkl = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise ValueError(f"{path}: expected one <archive>/data.pkl record, found {pkl}")
    self._prefix = pkl[0][: -len("data.pkl")]
    with self._zip.open(pkl[0]) as f:
      obj = _Unpickler(io.BytesIO(f.read()), path).load()
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
      extra = sorted(k for k in obj if k != "module")
      if extra:
        print(f"[torch_pt] {path}: ignoring top-level entries {extra} (reading 'module')", file=sys.stderr)
      obj = obj["module"]
    if not isinstance(obj, dict):
      raise ValueError(f"{path}: expected a state dict or {{'module': state_dict}}, got {type(obj).__name__}")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, _LazyTensor))
    if bad:
      raise ValueError(f"{path}: state dict entries that are not tensors: {bad[:20]}")
    self.tensors: dict[str, _LazyTensor] = dict(obj)

  def get(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise KeyError(f"{self.path}: no tensor named {name}")
    t = self.tensors[name]
    dt = t.dtype
    n = int(np.prod(t.shape, dtype=np.int64))
    contiguous = tuple(t.stride) == tuple(int(np.prod(t.shape[i + 1:], dtype=np.int64)) for i in range(len(t.shape)))
    with self._zip.open(f"{self._prefix}data/{t.storage.key}") as f:
      if contiguous or n <= 1:
        out = np.empty(t.shape, dt)
        f.seek(t.offset * dt.itemsize)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        got = f.readinto(buf)
        if got != out.nbytes:
          raise ValueError(f"{self.path}: tensor {name} is truncated")
        return out
      whole = np.frombuffer(f.read(), dt)
    view = np.lib.stride_tricks.as_strided(whole[t.offset:], t.shape, tuple(s * dt.itemsize for s in t.stride))
    return np.ascontiguousarray(view)

  def close(self):
    self._zip.close()


# ---------------------------------------------------------------------------------------------
# Writing.


class _Stub:
  """Pickles exactly like a contiguous CPU torch tensor whose storage is written later."""

  def __init__(self, key: str, t: PlannedTensor):
    self.key, self.t = key, t

  def __reduce_ex__(self, protocol):
    import torch  # pylint: disable=g-import-not-at-top  (optional PyTorch peer, only to pickle/write .pt)
    shape = tuple(self.t.shape)
    stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
    return (torch._utils._rebuild_tensor_v2,  # pylint: disable=protected-access
            (_StubStorage(self.key, self.t), 0, shape, stride, False, collections.OrderedDict()))


class _StubStorage:
  def __init__(self, key: str, t: PlannedTensor):
    self.key, self.t = key, t


def write_module_pt(path: str, plan: Sequence[PlannedTensor], arrays: Iterable[tuple[str, np.ndarray]]) -> None:
  """Writes `{"module": OrderedDict(name -> tensor)}`, one tensor in memory at a time."""
  import torch  # pylint: disable=g-import-not-at-top  (optional PyTorch peer, only to write .pt)

  for t in plan:
    if np.dtype(t.dtype) not in _STORAGE_NAMES:
      raise ValueError(f"{t.name}: dtype {t.dtype} cannot be written to a torch checkpoint")
  stubs = collections.OrderedDict((t.name, _Stub(str(i), t)) for i, t in enumerate(plan))

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _StubStorage):
        storage_type = getattr(torch, _STORAGE_NAMES[np.dtype(obj.t.dtype)])
        return ("storage", storage_type, obj.key, "cpu", int(np.prod(obj.t.shape, dtype=np.int64)))
      return None

  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump({"module": stubs})
  data = buf.getvalue()
  writer = torch._C.PyTorchFileWriter(path, True, 64)  # pylint: disable=protected-access
  writer.write_record("data.pkl", data, len(data))
  writer.write_record(".format_version", "1", 1)
  writer.write_record(".storage_alignment", "64", 2)
  writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
  it = iter(arrays)
  for t in plan:
    name, x = next(it, (None, None))
    if name != t.name or tuple(x.shape) != tuple(t.shape) or np.dtype(x.dtype) != np.dtype(t.dtype):
      raise ValueError(f"tensor stream gave {name}, planned {t.name} {t.shape} {np.dtype(t.dtype)}")
    raw = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8))  # zero-copy byte view
    writer.write_record(f"data/{stubs[t.name].key}", raw.untyped_storage(), x.nbytes)
    del x, raw
  if next(it, None) is not None:
    raise ValueError("tensor stream has more tensors than planned")
  writer.write_end_of_file()
