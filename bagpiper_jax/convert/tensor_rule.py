"""`TensorRule`: where one torch tensor lives in the Flax tree and how to transpose / reshape it.

The rules themselves are in rules.py (decoder, stream I/O, adapter) and audio_tower.py (the Qwen3-Omni
audio tower); this module holds the record type and the common transforms both use.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class TensorRule:
  torch_key: str
  flax_path: tuple[str, ...]
  layer: int | None  # slice of the scanned leading axis, or None
  torch_shape: tuple[int, ...]
  to_flax: Callable[[Array], Array]
  to_torch: Callable[[Array], Array]


def dense(in_dims: tuple[int, ...], out_dims: tuple[int, ...]):
  """torch Linear weight [prod(out), prod(in)] <-> Flax kernel [*in_dims, *out_dims]."""
  n_in, n_out = int(np.prod(in_dims)), int(np.prod(out_dims))

  def to_flax(w):
    return np.ascontiguousarray(w.reshape(n_out, n_in).T).reshape(*in_dims, *out_dims)

  def to_torch(k):
    return np.ascontiguousarray(k.reshape(n_in, n_out).T)
  return to_flax, to_torch


def same():
  return (lambda x: x), (lambda x: x)
