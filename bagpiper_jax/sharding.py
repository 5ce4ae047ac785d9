"""Device mesh and the ONE table that maps the model's logical axis names onto it.

Mesh axes (always all four, in this order; unused ones have size 1):

  data      pure data parallelism (replicated params; across slices over DCN in multi-slice runs)
  fsdp      data parallelism with params and optimizer state sharded (ZeRO-3 style)
  tensor    Megatron-style tensor parallelism over heads / MLP / vocab
  sequence  sequence (context) parallelism over the packed length

The model names every parameter dimension with a logical name (vocab, embed, heads, ...); `LOGICAL_RULES` below is the only place that decides where each name goes. A logical name
that the table does not know is an error (`check_rules_cover`), never a silent replication.

Mesh shapes come from `config.mesh.ici` (within a slice) and `config.mesh.dcn` (across slices);
-1 in `ici` means "all remaining devices". One slice -> `mesh_utils.create_device_mesh`; several
slices -> `mesh_utils.create_hybrid_device_mesh`. `make_mesh(config, devices=...)` also accepts
the devices of a TPU topology description, so the AOT path can build a pod mesh on a CPU host.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bagpiper_jax import batch as batch_lib

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over

# Logical name -> mesh axis (or axes, or None = replicated). Flax assigns rules in order and skips a
# mesh axis already used by an earlier dimension of the same array, so e.g. an activation
# ('batch', 'length', 'embed') puts fsdp on batch and leaves embed unsharded, while a kernel
# ('embed', 'mlp') puts fsdp on embed and tensor on mlp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("batch", BATCH_AXES),
    ("length", "sequence"),
    # Decoder parameters: the "row" dimension of every matrix goes to fsdp, the "column" one to tensor.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),  # the scanned layer axis stays whole: each scan step slices one layer
    ("norm", None),
    ("streams", None),
    ("audio_embed", "tensor"),  # adapter input (2048); its output dimension is 'embed'
    # Audio encoder (frozen; forward only). Same pattern as the decoder.
    ("enc_embed", "fsdp"),
    ("enc_mlp", "tensor"),
    ("enc_heads", "tensor"),
    ("enc_head_dim", None),
    ("enc_layers", None),
    ("enc_conv", None),  # conv channels (480): small, replicated
)


def rules_dict() -> dict[str, Any]:
  return dict(LOGICAL_RULES)


# ---------------------------------------------------------------------------------------------
# Mesh.


def _resolve(shape: Mapping[str, int], n: int, what: str) -> list[int]:
  shape = dict(shape)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh.{what} has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  free = [i for i, d in enumerate(dims) if d == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh.{what}: at most one axis may be -1, got {shape}")
  known = math.prod(d for d in dims if d != -1)
  if free:
    if n % known:
      raise ValueError(f"config.mesh.{what}={shape}: {n} devices are not divisible by {known}")
    dims[free[0]] = n // known
  if math.prod(dims) != n:
    raise ValueError(f"config.mesh.{what}={shape} uses {math.prod(dims)} devices but {n} are available")
  return dims


def mesh_shapes(config, num_devices: int, num_slices: int = 1) -> tuple[list[int], list[int]]:
  """(ici_shape, dcn_shape) over MESH_AXES with -1 resolved."""
  dcn = _resolve(config.mesh.dcn, num_slices, "dcn")
  if num_devices % num_slices:
    raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
  ici = _resolve(config.mesh.ici, num_devices // num_slices, "ici")
  return ici, dcn


def _num_slices(devices) -> int:
  ids = {getattr(d, "slice_index", 0) for d in devices}
  return len(ids)


def make_mesh(config, devices: Sequence[Any] | None = None) -> Mesh:
  """The training mesh (axes MESH_AXES) from config.mesh.ici / config.mesh.dcn."""
  devices = list(jax.devices() if devices is None else devices)
  slices = _num_slices(devices)
  ici, dcn = mesh_shapes(config, len(devices), slices)
  if slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  elif len(devices) == 1 or devices[0].platform == "cpu":
    arr = np.asarray(devices).reshape(ici)  # no physical topology to respect
  else:
    arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(arr, MESH_AXES)


# ---------------------------------------------------------------------------------------------
# Logical names -> shardings.


def check_rules_cover(logical_specs) -> None:
  """Raises if any logical name used in `logical_specs` (tree of PartitionSpec) has no rule."""
  known = rules_dict()
  missing = set()
  for spec in jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P)):
    for name in spec:
      names = name if isinstance(name, tuple) else (name,)
      missing.update(n for n in names if n is not None and n not in known)
  if missing:
    raise ValueError(f"logical axis names {sorted(missing)} have no rule in "
                     "bagpiper_jax/sharding.py LOGICAL_RULES; add one (None = replicated)")


def _fit(spec: P, shape: Sequence[int], mesh: Mesh, where: str, dropped: list[str]) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. 2 KV heads over tensor=4)."""
  out = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    keep = []
    size = shape[i]
    for a in names:
      if size % (math.prod(mesh.shape[k] for k in keep) * mesh.shape[a]) == 0:
        keep.append(a)
      else:
        dropped.append(f"{where} dim {i} (size {size}) not split over '{a}' ({mesh.shape[a]})")
    out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return P(*out)


def logical_to_sharding(logical_specs, abstract_tree, mesh: Mesh, *, log: bool = True):
  """Tree of PartitionSpec over logical names + matching shapes -> tree of NamedSharding."""
  check_rules_cover(logical_specs)
  mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_RULES)
  dropped: list[str] = []
  paths_specs = jax.tree_util.tree_flatten_with_path(mesh_specs, is_leaf=lambda x: isinstance(x, P))
  shapes = jax.tree.leaves(abstract_tree)
  if len(paths_specs[0]) != len(shapes):
    raise ValueError(f"{len(paths_specs[0])} partition specs for {len(shapes)} arrays")
  out = []
  for (path, spec), leaf in zip(paths_specs[0], shapes):
    out.append(NamedSharding(mesh, _fit(spec, leaf.shape, mesh, jax.tree_util.keystr(path), dropped)))
  if dropped and log:
    logging.info("sharding: %d dimensions left unsplit because the mesh axis does not divide them:\n  %s",
                 len(dropped), "\n  ".join(dropped))
  return jax.tree_util.tree_unflatten(paths_specs[1], out)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------
# Batches. Every batch carries a leading micro-batch axis [A, B, ...] (A = grad_accum_steps).


def batch_sharding(abstract_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  """Shardings of a step batch [A, B, ...] (micro-batch axis whole) from batch.FIELDS' logical axes."""
  specs = {}
  for k in abstract_batch:
    if k not in batch_lib.FIELDS:
      raise ValueError(f"batch key {k!r} is not in the batch contract (bagpiper_jax/batch.py FIELDS)")
    specs[k] = P(None, *batch_lib.FIELDS[k].logical)
  return logical_to_sharding(specs, dict(abstract_batch), mesh, log=False)


def batch_rows_by_process(sharding: jax.sharding.Sharding, shape: Sequence[int], axis: int = 1
                          ) -> dict[int, list[int]]:
  """{process index: the global batch rows (along `axis`) its devices hold, sorted}.

  Sorted is the order `jax.make_array_from_process_local_data` reads a process's local rows in, so
  local row j of process p is global row `rows[p][j]` (data/slots.py builds the data slots on it).
  """
  out: dict[int, set[int]] = {}
  for dev, idx in sharding.devices_indices_map(tuple(shape)).items():
    out.setdefault(dev.process_index, set()).update(range(*idx[axis].indices(shape[axis])))
  return {p: sorted(rows) for p, rows in sorted(out.items())}


def place_batch(host_batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
                global_shapes: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Process-local numpy rows -> global jax.Arrays (`make_array_from_process_local_data`)."""
  out = {}
  for k, sh in shardings.items():
    if k not in host_batch:
      raise ValueError(f"host batch lacks key {k!r}; has {sorted(host_batch)}")
    out[k] = jax.make_array_from_process_local_data(sh, np.asarray(host_batch[k]),
                                                    tuple(global_shapes[k].shape))
  return out
