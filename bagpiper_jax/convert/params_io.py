"""The on-disk params checkpoint: one Orbax PyTree item `params/` (+ `model_config.json`).

Layout written by `save_params(path, ...)`:

    <path>/params/              Orbax PyTree checkpoint (OCDBT + zarr) of the unboxed param dict
                                {embed_tokens: {embedding}, layers: {...}, ..., audio_encoder: {...}}
    <path>/model_config.json    ModelConfig.to_dict() of the model the params belong to

This is a "step directory" in the sense of bagpiper_jax/checkpoint.py: `config.init_from=<path>`
restores `<path>/params` with `ocp.StandardCheckpointer`, and `load_params` here does the same.
A training checkpoint (`<workdir>/checkpoints/<step>/` with items params/train/data/config, or the
`checkpoints/` directory itself: latest step) is accepted wherever a params path is read.

Streaming (the 8B model is 36 GB in fp32; conversions must run on a 24 GB host):
  * write: a leaf may be a `LazyArray` (shape, dtype, and a generator of blocks). A dedicated Orbax
    TypeHandler writes its blocks one at a time into the leaf's zarr array, whose chunks are the
    block shape (one layer slice for scanned leaves), and records it as an ordinary `np.ndarray`
    leaf, so restoring needs nothing special. Only public Orbax API is used (`ocp.type_handlers`,
    `ocp.future`); the one convention copied from Orbax's own NumpyHandler (which process writes
    and under which OCDBT process subdirectory) is isolated in `_ocdbt_process_index`.
  * read: `ParamsReader` opens each leaf's zarr array with TensorStore and reads one leaf or one
    layer slice, without the cache (a read allocates exactly its result, plus the chunks in flight).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from bagpiper_jax import paths
from bagpiper_jax.model.config import ModelConfig

PARAMS_ITEM = paths.PARAMS_ITEM
MODEL_CONFIG_FILE = "model_config.json"

Block = tuple[tuple, np.ndarray]  # (index into the leaf, values)
# zarr chunk size for leaves written in blocks: small enough that TensorStore's per-chunk encode
# buffers stay negligible next to the one tensor a conversion holds.
DEFAULT_BLOCK_BYTES = 16 * 2**20


class ParamsIOError(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------
# Writing.


@dataclasses.dataclass
class LazyArray:
  """A leaf produced block by block at save time, so the whole array is never in memory.

  `blocks()` yields (index, values) pairs that together cover the array exactly once, each of
  shape `block_shape` (the zarr chunk shape); index is a tuple usable as `array[index]`.
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  blocks: Callable[[], Iterator[Block]]
  block_shape: tuple[int, ...] | None = None

  def __post_init__(self):
    self.shape = tuple(int(s) for s in self.shape)
    self.dtype = np.dtype(self.dtype)
    self.block_shape = tuple(self.block_shape or self.shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  @classmethod
  def per_layer(cls, shape, dtype, layer_fn: Callable[[int], np.ndarray],
                max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> "LazyArray":
    """A scanned leaf [N, ...] whose slice i is `layer_fn(i)` (computed once per layer, written in
    blocks of its next axis, so zarr chunks never span layers)."""
    shape = tuple(int(s) for s in shape)
    rows = _rows_per_block(shape[1:], dtype, max_block_bytes)

    def blocks():
      for i in range(shape[0]):
        x = np.asarray(layer_fn(i), dtype)
        if x.shape != shape[1:]:
          raise ParamsIOError(f"layer {i} has shape {x.shape}, expected {shape[1:]}")
        if x.ndim == 0:
          yield (slice(i, i + 1),), x[None]
        else:
          for lo in range(0, shape[1], rows):
            yield (slice(i, i + 1), slice(lo, min(lo + rows, shape[1]))), x[None, lo:lo + rows]
        del x
    return cls(shape, dtype, blocks, (1,) + ((min(rows, shape[1]),) + shape[2:] if len(shape) > 1 else ()))

  @classmethod
  def blocked(cls, shape, dtype, fn: Callable[[int, int], np.ndarray], axis: int = 0,
              max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> "LazyArray":
    """Blocks along `axis` of at most ~max_block_bytes; block j is `fn(lo, hi)` (indices lo:hi)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
      return cls(shape, dtype, lambda: iter([((), np.asarray(fn(0, 1), dtype))]))
    other = shape[:axis] + shape[axis + 1:]
    step = _rows_per_block((shape[axis],) + other, dtype, max_block_bytes)
    block_shape = shape[:axis] + (step,) + shape[axis + 1:]

    def blocks():
      for lo in range(0, shape[axis], step):
        hi = min(lo + step, shape[axis])
        yield (slice(None),) * axis + (slice(lo, hi),), np.asarray(fn(lo, hi), dtype)
    return cls(shape, dtype, blocks, block_shape)

  @classmethod
  def computed(cls, shape, dtype, fn: Callable[[], np.ndarray],
               max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> "LazyArray":
    """A leaf computed whole by `fn()` at write time (then written in row blocks and dropped)."""
    shape = tuple(int(s) for s in shape)
    holder: list = []

    def rows(lo, hi):
      if not holder:
        x = np.asarray(fn(), dtype)
        if x.shape != shape:
          raise ParamsIOError(f"computed leaf has shape {x.shape}, expected {shape}")
        holder.append(x)
      out = holder[0][lo:hi] if shape else holder[0]
      if hi >= (shape[0] if shape else 1):
        holder.clear()
      return out
    return cls.blocked(shape, dtype, rows, 0, max_block_bytes)


def _rows_per_block(shape, dtype, max_block_bytes: int) -> int:
  """How many entries of the leading axis of `shape` fit in max_block_bytes (at least 1)."""
  if not shape:
    return 1
  row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
  return max(1, min(shape[0], max_block_bytes // max(row, 1)))


def _ocdbt_process_index(use_ocdbt: bool) -> int | None:
  """The OCDBT per-process subdirectory index a writer uses, as Orbax's NumpyHandler chooses it.

  orbax-checkpoint 0.12.8 has no public accessor for this (`ocdbt_utils.get_process_index_for_subdir`
  is private): with OCDBT each process writes under its own index, merged at the end of the save;
  without OCDBT there is none. tests/test_convert_params_io.py restores what we write with the
  stock StandardCheckpointer, so a changed convention fails there, loudly, on upgrade.
  """
  return jax.process_index() if use_ocdbt else None


class _LazyArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes LazyArray leaves sequentially, block by block; metadata says 'np.ndarray'."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    return [ocp.future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args),
                                                             name="lazy_array_handler")]

  async def _write_all(self, values, infos, args):
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      if jax.process_index() != 0:  # host arrays are written by the primary process (as NumpyHandler)
        continue
      spec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.block_shape,
          dtype=value.dtype, process_index=_ocdbt_process_index(info.is_ocdbt_checkpoint), arg=arg)
      t = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
      covered = 0
      for index, block in value.blocks():
        block = np.asarray(block, value.dtype)
        # The block is not modified afterwards, so TensorStore may keep a reference instead of a copy.
        await t[index].write(block, can_reference_source_data_indefinitely=True)
        covered += block.size
        del block
      if covered != int(np.prod(value.shape, dtype=np.int64)):
        raise ParamsIOError(f"LazyArray {info.name}: blocks covered {covered} of "
                            f"{int(np.prod(value.shape))} elements")


def _registry():
  """Handlers for the leaves save_params takes: LazyArray, numpy and jax arrays, scalars.

  A registry of our own (public `create_type_handler_registry`) rather than Orbax's global one: the
  LazyArray handler shares the typestr 'np.ndarray' with NumpyHandler, so it must not replace it
  globally. NumpyHandler comes last, so a typestr lookup (restore) resolves to it.
  """
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (LazyArray, _LazyArrayHandler()), (jax.Array, th.ArrayHandler()),
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler()))


def save_params(path: str, params: Mapping, model_config: ModelConfig | None = None) -> str:
  """Writes `<path>/params` (+ model_config.json). Leaves: np/jax arrays or LazyArray.

  Returns the params item directory. Refuses to overwrite an existing one.
  """
  path = os.path.abspath(path)
  item = os.path.join(path, PARAMS_ITEM)
  if os.path.exists(item):
    raise ParamsIOError(f"{item} already exists; refusing to overwrite (choose a new output dir)")
  os.makedirs(path, exist_ok=True)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=_registry())) as ckptr:
    ckptr.save(item, args=ocp.args.PyTreeSave(dict(params)))
  if model_config is not None:
    write_model_config(path, model_config)
  return item


def write_model_config(path: str, cfg: ModelConfig) -> None:
  with open(os.path.join(path, MODEL_CONFIG_FILE), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Finding and reading.


def _is_params_item(d: epath.Path) -> bool:
  return (d / "_METADATA").is_file()


def resolve_params_dir(path: str, step: int | None = None) -> str:
  """The Orbax params item for `path`: the params item itself, or anything paths.find_checkpoint
  takes (a workdir, its checkpoints/ folder, one step folder, a save_params dir). Local or gs://."""
  p = epath.Path(paths.resolve(path))
  if step is None and p.name == PARAMS_ITEM and _is_params_item(p):
    return str(p)
  if not p.exists():
    raise ParamsIOError(f"{path}: no such directory")
  try:
    ref = paths.find_checkpoint(str(p), step)
  except paths.CheckpointNotFound as e:
    raise ParamsIOError(f"{path}: not a params checkpoint ({e})") from e
  return ref.params_dir


def read_run_config(path: str) -> dict | None:
  """The training run's config (a checkpoint's `config` item, as JSON), or None for a params dir."""
  fn = os.path.join(os.path.dirname(resolve_params_dir(path)), "config", "metadata")
  if not os.path.isfile(fn):
    return None
  with open(fn) as f:
    return json.load(f)


def read_model_config(path: str) -> ModelConfig | None:
  """The ModelConfig stored next to the params (model_config.json, or a training checkpoint's
  `config` item), or None if there is none."""
  fn = os.path.join(os.path.dirname(resolve_params_dir(path)), MODEL_CONFIG_FILE)
  if os.path.isfile(fn):
    with open(fn) as f:
      return ModelConfig.from_dict(json.load(f))
  run = read_run_config(path)
  if run is not None and "model" in run:
    return ModelConfig.from_dict(run["model"])
  return None


def load_params(path: str, abstract_params: Any = None) -> Any:
  """Restores the whole param tree. With `abstract_params` (jax.ShapeDtypeStruct leaves, with
  shardings) arrays land where the train state wants them; without, as host numpy arrays."""
  item = resolve_params_dir(path)
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is None:
      return ckptr.restore(item)
    return ckptr.restore(item, abstract_params)


@dataclasses.dataclass(frozen=True)
class LeafInfo:
  name: str  # Orbax parameter name ('.'-joined keys)
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]


class ParamsReader:
  """Reads single leaves or single layer slices of a params item via TensorStore.

  Stacked leaves whose zarr chunks span several layers (a training checkpoint: FSDP shards split
  the feature axes, not the layer axis, and Orbax chunks = shards) cannot be sliced per layer
  cheaply: every slice read would decode every chunk of the leaf. Such leaves are read in bands
  of consecutive layers of at most `band_bytes` (a whole chunk extent when that fits), and the
  band is kept until a slice outside it is asked for; callers should ask for all layers of one
  leaf before moving to the next (streaming.leaf_major). Leaves chunked per layer (everything
  save_params writes) are read slice by slice.
  """

  def __init__(self, path: str, band_bytes: int = 2 * 2**30):
    self.band_bytes = int(band_bytes)
    self.item = resolve_params_dir(path)
    meta = json.loads((epath.Path(self.item) / "_METADATA").read_text())
    self._use_ocdbt = bool(meta.get("use_ocdbt", True))
    self._use_zarr3 = bool(meta.get("use_zarr3", False))
    # No chunk cache (a read allocates its result only); OCDBT B-tree nodes may be cached (small).
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
    self.paths: list[tuple[str, ...]] = []
    for entry in meta["tree_metadata"].values():
      self.paths.append(tuple(str(k["key"]) for k in entry["key_metadata"]))
    self._stores: dict[tuple[str, ...], Any] = {}
    self._band: tuple[tuple[str, ...], int, int, np.ndarray] | None = None

  def _open(self, path: tuple[str, ...]):
    if path not in self._stores:
      if path not in self.paths:
        raise ParamsIOError(f"{self.item}: no parameter {'/'.join(path)}")
      info = ocp.type_handlers.ParamInfo(name=".".join(path), parent_dir=epath.Path(self.item),
                                         is_ocdbt_checkpoint=self._use_ocdbt, use_zarr3=self._use_zarr3,
                                         ts_context=self._context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
      self._stores[path] = ts.open(spec, open=True, read=True, context=self._context).result()
    return self._stores[path]

  def info(self, path: tuple[str, ...]) -> LeafInfo:
    t = self._open(path)
    return LeafInfo(".".join(path), tuple(t.shape), np.dtype(t.dtype.numpy_dtype),
                    tuple(t.chunk_layout.read_chunk.shape))

  def infos(self) -> dict[tuple[str, ...], LeafInfo]:
    return {p: self.info(p) for p in self.paths}

  def read(self, path: tuple[str, ...], layer: int | None = None) -> np.ndarray:
    t = self._open(path)
    if layer is None:
      self._band = None
      return np.asarray(t.read().result())
    chunk0 = t.chunk_layout.read_chunk.shape[0] or t.shape[0]
    if chunk0 <= 1:
      return np.asarray(t[layer].read().result())
    if self._band is None or self._band[0] != path or not self._band[1] <= layer < self._band[2]:
      self._band = None  # drop the old band before reading the next
      slice_bytes = int(np.prod(t.shape[1:], dtype=np.int64)) * np.dtype(t.dtype.numpy_dtype).itemsize
      fit = max(1, self.band_bytes // max(slice_bytes, 1))
      n = chunk0 if chunk0 <= fit else fit
      lo = (layer // chunk0) * chunk0 + ((layer % chunk0) // n) * n
      hi = min(lo + n, (layer // chunk0 + 1) * chunk0, t.shape[0])
      self._band = (path, lo, hi, np.asarray(t[lo:hi].read().result()))
    return np.array(self._band[3][layer - self._band[1]])

  def close(self):
    self._stores.clear()
    self._band = None

