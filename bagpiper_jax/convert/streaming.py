"""Applying the TensorRule tables (rules.py) one tensor at a time, in both directions.

`rules.to_torch_tensors` / `from_torch_tensors` work on an in-memory param tree; these variants
work on disk: a `ParamsReader` (Orbax, one leaf or layer slice per read) on one side and a tensor
getter (safetensors / torch .pt, one tensor per read) on the other. Each tensor is converted in
the narrower of its source and target dtypes, so the peak is about two copies of the largest
tensor, never the model.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn

from bagpiper_jax import batch as batch_lib
from bagpiper_jax.convert import params_io
from bagpiper_jax.convert.tensor_rule import TensorRule
from bagpiper_jax.convert.safetensors_io import PlannedTensor
from bagpiper_jax.model import Bagpiper
from bagpiper_jax.model.config import ModelConfig

Path = tuple[str, ...]


def expected_params(cfg: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  """Every leaf of the Bagpiper param tree for `cfg` (shapes and param dtype), without allocating."""
  shapes = jax.eval_shape(lambda: Bagpiper(cfg).init(jax.random.PRNGKey(0), batch_lib.example(cfg, 1, 8, 1)))
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes["params"]))[0]
  return {tuple(str(k.key) for k in kp): v for kp, v in flat}


def check_rules_cover(rules: Sequence[TensorRule], expected: Mapping[Path, jax.ShapeDtypeStruct]) -> None:
  """Every Flax leaf is produced by some rule and every rule targets a real leaf (an internal check)."""
  by_path = {r.flax_path for r in rules}
  missing = sorted("/".join(p) for p in expected if p not in by_path)
  unknown = sorted("/".join(p) for p in by_path if p not in expected)
  if missing or unknown:
    raise AssertionError(f"conversion rules do not cover the model: no rule for {missing}; rules for "
                         f"non-existent leaves {unknown}")


def check_leaves(have: Mapping[Path, tuple[int, ...]], expected: Mapping[Path, jax.ShapeDtypeStruct],
                 where: str) -> None:
  """Raises one ValueError listing missing, unexpected and wrongly shaped params of a checkpoint."""
  missing = sorted("/".join(p) for p in expected if p not in have)
  extra = sorted("/".join(p) for p in have if p not in expected)
  wrong = sorted(f"{'/'.join(p)}: got {tuple(have[p])}, expected {tuple(expected[p].shape)}"
                 for p in expected if p in have and tuple(have[p]) != tuple(expected[p].shape))
  if missing or extra or wrong:
    lines = [f"{where} does not match the model config:"]
    if missing:
      lines.append(f"{len(missing)} missing params: " + ", ".join(missing))
    if extra:
      lines.append(f"{len(extra)} params the model does not have: " + ", ".join(extra))
    if wrong:
      lines.append(f"{len(wrong)} params with the wrong shape:\n  " + "\n  ".join(wrong))
    raise ValueError("\n".join(lines))


def convert(fetch: Callable[[], np.ndarray], fn: Callable[[np.ndarray], np.ndarray], dtype=None) -> np.ndarray:
  """fn(fetch()) cast to dtype (None: unchanged), computed in the narrower of the two dtypes.

  Bit-exact either way (fn only moves data). The source is fetched here, so this frame holds the
  only reference and each intermediate is freed as soon as the next exists: peak 1.5x the tensor
  at its wider dtype (a caller holding the source would make it 2x+).
  """
  x = fetch()
  dtype = x.dtype if dtype is None else np.dtype(dtype)
  if dtype.itemsize < x.dtype.itemsize:
    x = x.astype(dtype)
  y = fn(x)
  del x
  return y.astype(dtype, copy=False)


def leaf_major(rules: Iterable[TensorRule]) -> list[TensorRule]:
  """Rules grouped by Flax leaf (first appearance order), layers ascending: all slices of one
  stacked leaf are read consecutively (see ParamsReader)."""
  groups: dict[Path, list[TensorRule]] = collections.OrderedDict()
  for r in rules:
    groups.setdefault(r.flax_path, []).append(r)
  return [r for rs in groups.values() for r in sorted(rs, key=lambda r: -1 if r.layer is None else r.layer)]


# ---------------------------------------------------------------------------------------------
# Orbax -> torch names.


def export_plan(rules: Sequence[TensorRule], reader: params_io.ParamsReader, dtype=None) -> list[PlannedTensor]:
  """(name, torch shape, dtype) of every tensor; dtype None keeps each leaf's stored dtype."""
  return [PlannedTensor(r.torch_key, tuple(r.torch_shape),
                        np.dtype(dtype) if dtype is not None else reader.info(r.flax_path).dtype)
          for r in rules]


def export_tensors(rules: Sequence[TensorRule], reader: params_io.ParamsReader,
                   dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  for r in rules:
    y = convert(lambda r=r: reader.read(r.flax_path, r.layer), r.to_torch, dtype)
    if tuple(y.shape) != tuple(r.torch_shape):
      raise ValueError(f"{r.torch_key}: Flax {'/'.join(r.flax_path)} gives shape {y.shape}, expected "
                       f"{r.torch_shape}")
    yield r.torch_key, y
    del y  # before converting the next tensor


# ---------------------------------------------------------------------------------------------
# torch names -> Orbax (a tree of LazyArrays for params_io.save_params).


def _set(tree: dict, path: Path, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def lazy_tree(get: Callable[[str], np.ndarray], rules: Sequence[TensorRule],
              expected: Mapping[Path, jax.ShapeDtypeStruct], dtype=None, tree: dict | None = None) -> dict:
  """LazyArray leaves that read and convert their torch tensors only when Orbax writes them.

  dtype None: each leaf gets the model's param dtype (expected[path].dtype).
  """
  tree = {} if tree is None else tree
  groups: dict[Path, list[TensorRule]] = collections.OrderedDict()
  for r in rules:
    groups.setdefault(r.flax_path, []).append(r)
  for path, rs in groups.items():
    exp = expected[path]
    dt = np.dtype(dtype) if dtype is not None else np.dtype(exp.dtype)
    if rs[0].layer is None:
      if len(rs) != 1:
        raise AssertionError(f"several rules for unstacked leaf {'/'.join(path)}")
      r = rs[0]
      _set(tree, path, params_io.LazyArray.computed(exp.shape, dt, lambda r=r, dt=dt: convert(
          lambda: get(r.torch_key), r.to_flax, dt)))
    else:
      by_layer = {r.layer: r for r in rs}
      if sorted(by_layer) != list(range(exp.shape[0])):
        raise AssertionError(f"{'/'.join(path)}: rules for layers {sorted(by_layer)}, leaf has {exp.shape[0]}")
      _set(tree, path, params_io.LazyArray.per_layer(exp.shape, dt, lambda i, b=by_layer, dt=dt: convert(
          lambda: get(b[i].torch_key), b[i].to_flax, dt)))
  return tree
