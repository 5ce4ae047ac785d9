"""Matmul/conv FLOPs of a traced program, with every loop counted as many times as it runs.

Why not only `compiled.cost_analysis()`: XLA's cost analysis of a compiled TPU program counts each
while-loop body ONCE, whatever its trip count (checked on jax 0.10 + libtpu: a `lax.scan` of 36
matmuls reports the FLOPs of one). Our train step is loops almost everywhere that matters (the
scanned decoder layers, the chunked loss, gradient accumulation), so that number is a severe
undercount for the 8B model. The jaxpr still knows every scan length, and it already holds the
backward pass and the remat recompute (jax.checkpoint sub-jaxprs), so counting dot_general and
conv FLOPs over it, times the scan lengths, gives the matmul work the chips will execute.

Counted: dot_general (2 * output elements * contracted size) and conv_general_dilated (2 * output
elements * kernel window * input features per group). Elementwise work, softmax, norms, and
collectives are not counted, as in MFU accounting. `cond` counts its most expensive branch. A
`while` with a data-dependent trip count is counted once and reported in `unknown_trip_loops`.
A Pallas kernel (`pallas_call`, e.g. splash attention) counts its own cost estimate when it has
one, else its body times the number of grid cells; kernels that skip fully masked blocks at run
time (causal splash) are therefore counted dense, an upper bound for their share. A `shard_map`
body holds one shard's shapes along its manual axes, so it counts once per shard: the totals are
global (all devices together).

Dead code is removed first (`live_jaxpr`): a traced backward pass can hold equations whose results
nothing uses (e.g. the rematerialised forward of a kernel whose outputs the remat policy saved),
which XLA deletes and which therefore never run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax._src.interpreters import partial_eval as pe  # dead-code elimination: no public API (jax 0.10.2)
from jax.extend import core as jex_core


@dataclasses.dataclass
class FlopCount:
  flops: float = 0.0
  dot_flops: float = 0.0
  conv_flops: float = 0.0
  kernel_flops: float = 0.0  # inside Pallas kernels (included in flops)
  unknown_trip_loops: int = 0

  def add(self, other: "FlopCount", times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.dot_flops += times * other.dot_flops
    self.conv_flops += times * other.conv_flops
    self.kernel_flops += times * other.kernel_flops
    self.unknown_trip_loops += other.unknown_trip_loops


def _dot_flops(eqn) -> float:
  (lc, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lc)


def _conv_flops(eqn) -> float:
  dn = eqn.params["dimension_numbers"]
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  # rhs spec: (out feature dim, in feature dim, spatial dims...)
  rhs_spec = dn.rhs_spec
  in_feat = rhs[rhs_spec[1]]
  window = math.prod(rhs[d] for d in rhs_spec[2:])
  return 2.0 * math.prod(out) * in_feat * window


def _manual_shards(params) -> int:
  mesh = params["mesh"]
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  axes = params.get("newly_manual_axes", params.get("manual_axes"))
  if axes is None:
    axes = set(mesh.axis_names) - set(params.get("auto", ()))
  return math.prod(sizes[a] for a in axes)


def _sub_jaxprs(value: Any):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _sub_jaxprs(v)


def count_jaxpr(jaxpr) -> FlopCount:
  """FLOPs of a Jaxpr or ClosedJaxpr (see module docstring)."""
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = FlopCount()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      f = _dot_flops(eqn)
      total.flops += f
      total.dot_flops += f
      continue
    if name == "conv_general_dilated":
      f = _conv_flops(eqn)
      total.flops += f
      total.conv_flops += f
      continue
    if name == "scan":
      total.add(count_jaxpr(eqn.params["jaxpr"]), float(eqn.params["length"]))
      continue
    if name == "cond":
      branches = [count_jaxpr(b) for b in eqn.params["branches"]]
      total.add(max(branches, key=lambda c: c.flops))
      continue
    if name == "pallas_call":
      est = eqn.params.get("cost_estimate")
      if est is not None and getattr(est, "flops", None):
        f = float(est.flops)
        total.flops += f
        total.kernel_flops += f
      else:
        body = count_jaxpr(eqn.params["jaxpr"])  # one grid cell's work
        cells = float(math.prod(eqn.params["grid_mapping"].grid))
        body.kernel_flops = body.flops
        total.add(body, cells)
      continue
    if name == "shard_map":
      # The body sees one shard along the manual axes: it runs once per shard.
      total.add(count_jaxpr(eqn.params["jaxpr"]), float(_manual_shards(eqn.params)))
      continue
    if name == "while":
      body = count_jaxpr(eqn.params["body_jaxpr"])
      total.add(body)
      total.add(count_jaxpr(eqn.params["cond_jaxpr"]))
      if body.flops:
        total.unknown_trip_loops += 1
      continue
    for v in eqn.params.values():  # pjit, remat/checkpoint, custom_jvp/vjp, shard_map, ...
      for sub in _sub_jaxprs(v):
        total.add(count_jaxpr(sub))
  return total


def count_eqns(jaxpr) -> int:
  """Equations of a (closed) jaxpr and all its sub-jaxprs, each counted once (a loop body once):
  the size of the program handed to XLA, for compile-time comparisons."""
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for v in eqn.params.values():
      for sub in _sub_jaxprs(v):
        n += count_eqns(sub)
  return n


def live_jaxpr(closed) -> jex_core.Jaxpr:
  """The jaxpr without the equations none of its outputs depends on (what XLA keeps).

  jax 0.10.2 has no public dead-code elimination; this is the one call to its internal
  `partial_eval.dce_jaxpr` (which recurses into pjit, scan, cond, remat and custom_vjp bodies).
  tests/test_aot_compile.py::test_flop_count_skips_dead_code fails if it moves or changes.
  """
  jaxpr = closed.jaxpr if isinstance(closed, jex_core.ClosedJaxpr) else closed
  live, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  return live


def count_traced(traced) -> FlopCount:
  """FLOPs of a `jax.jit(f).trace(*args)` result (global, all devices together), dead code removed."""
  return count_jaxpr(live_jaxpr(traced.jaxpr))

