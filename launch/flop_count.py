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

Dead code is not counted (`count_traced`): a traced backward pass can hold equations whose results
nothing uses (e.g. the rematerialised forward of a kernel whose outputs the remat policy saved),
which XLA deletes and which therefore never run. jax 0.10.2 has no public dead-code elimination
(`partial_eval.dce_jaxpr` is private), so `_Liveness` is our own, over the public jaxpr API only
(`jax.extend.core`: equations' primitive, invars, outvars, params, effects), with the rules of jax's
own pass: an equation runs when one of its outputs is needed or it has an effect; call-like
primitives (jit, closed_call, remat, custom_jvp/custom_vjp, shard_map) need of their body what their
needed outputs need; `cond` runs every branch for the same needed outputs; `scan` and `while` carries
are needed to a fixpoint (a carry output is needed when the body needs that carry as input). Unlike
jax's, it also prunes `while` bodies (XLA drops dead loop-carried values too: on CPU a while loop
carrying two matmul chains, one unused, compiles to one dot); like jax's, it keeps a `pallas_call`
whole (a kernel may write through aliased inputs). Loop trip counts are applied after, as above.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

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


def _open(jaxpr) -> jex_core.Jaxpr:
  return jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr


def _bodies(eqn) -> list[jex_core.Jaxpr]:
  """The sub-jaxprs of `eqn`, in the order `_count_eqn` reads them (a while loop: body, then cond)."""
  name, params = eqn.primitive.name, eqn.params
  if name == "while":
    return [_open(params["body_jaxpr"]), _open(params["cond_jaxpr"])]
  if name == "pallas_call":
    return [_open(params["jaxpr"])]
  return [sub for v in params.values() for sub in _sub_jaxprs(v)]


# ---- Liveness (our own dead-code elimination; see the module docstring) ----

# Effects that do not keep an unused equation alive: reading a ref, naming a mesh axis (psum in a
# shard_map), jax-internal mutable arrays. The same set as jax's own DCE (`dceable_effects`); matched
# by class name, as jax exports no public names for them.
_REMOVABLE_EFFECTS = frozenset({"ReadEffect", "NamedAxisEffect", "InternalMutableArrayEffect"})
# Call-like primitives (names as in jax 0.10.2; `remat2` is jax.checkpoint) -> the param holding the body,
# whose invars and outvars are the equation's.
_CALLS = {"jit": "jaxpr", "remat2": "jaxpr", "shard_map": "jaxpr", "closed_call": "call_jaxpr",
          "call": "call_jaxpr"}
_CUSTOM_CALLS = ("custom_jvp_call", "custom_vjp_call")

Used = tuple[bool, ...]  # which of a jaxpr's (or an equation's) outputs are needed
# The equations that run, in program order, each with its bodies and their needed outputs (None: the
# whole body, no liveness inside).
Plan = list[tuple[Any, list[tuple[jex_core.Jaxpr, "Used | None"]]]]


def _has_effects(eqn) -> bool:
  return any(type(e).__name__ not in _REMOVABLE_EFFECTS for e in eqn.effects)


def _or(a, b) -> Used:
  return tuple(x or y for x, y in zip(a, b))


class _Liveness:
  """Which equations of a jaxpr run, given which of its outputs are needed (memoised per call)."""

  def __init__(self):
    self._memo: dict[tuple[int, Used], tuple[jex_core.Jaxpr, Plan, Used]] = {}

  def live(self, jaxpr, used_outputs: Used) -> tuple[Plan, Used]:
    """(the equations that run, each with its bodies and their needed outputs; the needed invars)."""
    jaxpr = _open(jaxpr)
    key = (id(jaxpr), tuple(used_outputs))
    if key not in self._memo:  # the jaxpr is kept in the value, so its id stays its own
      self._memo[key] = (jaxpr, *self._live(jaxpr, key[1]))
    return self._memo[key][1:]

  def _live(self, jaxpr, used_outputs: Used) -> tuple[Plan, Used]:
    needed: set = set()

    def need(atoms, flags):
      needed.update(v for v, f in zip(atoms, flags) if f and isinstance(v, jex_core.Var))

    need(jaxpr.outvars, used_outputs)
    plan = []
    for eqn in reversed(jaxpr.eqns):  # backwards: an equation's readers come after it
      outs = tuple(v in needed for v in eqn.outvars)
      if eqn.primitive.name == "pallas_call":  # kept whole, as by jax's DCE (it may write through its inputs)
        used_ins, subs = (True,) * len(eqn.invars), [(b, None) for b in _bodies(eqn)]
      elif not any(outs) and not _has_effects(eqn):
        continue
      else:
        used_ins, subs = self._rule(eqn, outs)
      need(eqn.invars, used_ins)
      plan.append((eqn, subs))
    plan.reverse()
    return plan, tuple(v in needed for v in jaxpr.invars)

  def _rule(self, eqn, outs: Used) -> tuple[Used, list]:
    """(which inputs `eqn` needs when its outputs `outs` are needed; its bodies with their needed outputs)."""
    name, params = eqn.primitive.name, eqn.params
    if name in _CALLS:
      body = params[_CALLS[name]]
      return self.live(body, outs)[1], [(_open(body), outs)]
    if name in _CUSTOM_CALLS:  # every input stays (jax keeps them for the custom rule)
      return (True,) * len(eqn.invars), [(_open(params["call_jaxpr"]), outs)]
    if name == "cond":  # index, then operands; a branch needs what it needs for the same outputs
      used = (False,) * (len(eqn.invars) - 1)
      for b in params["branches"]:
        used = _or(used, self.live(b, outs)[1])
      return (True, *used), [(_open(b), outs) for b in params["branches"]]
    if name == "scan":  # invars: consts, carry, xs; outvars: carry, ys
      nc, nk = _scan_counts(params)
      carry, ys = outs[:nk], outs[nk:]
      while True:  # a carry output is needed when the body needs that carry input: to a fixpoint
        _, ins = self.live(params["jaxpr"], carry + ys)
        grown = _or(carry, ins[nc:nc + nk])
        if grown == carry:
          break
        carry = grown
      return ins[:nc] + carry + ins[nc + nk:], [(_open(params["jaxpr"]), carry + ys)]
    if name == "while":  # invars: cond consts, body consts, carry; outvars: carry
      cn, bn = params["cond_nconsts"], params["body_nconsts"]
      _, cond_ins = self.live(params["cond_jaxpr"], (True,))
      carry = _or(outs, cond_ins[cn:])  # the loop test reads its carries on every trip
      while True:
        _, ins = self.live(params["body_jaxpr"], carry)
        grown = _or(carry, ins[bn:])
        if grown == carry:
          break
        carry = grown
      return (cond_ins[:cn] + ins[:bn] + carry,
              [(_open(params["body_jaxpr"]), carry), (_open(params["cond_jaxpr"]), (True,))])
    # Any other primitive (scatter-add's combiner, ...): all inputs, bodies whole (jax's default rule).
    return (True,) * len(eqn.invars), [(b, None) for b in _bodies(eqn)]


def _scan_counts(params) -> tuple[int, int]:
  """(consts, carries) of a scan equation: jax 0.10 names the counts; later jax (0.12, MaxText's side of
  launch/maxtext_compare.py) keeps the groups in `ft_in` = (consts, carry, xs) flat trees."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  consts, carry, _ = params["ft_in"].unpack()
  return len(list(consts)), len(list(carry))


# ---- Counting ----

def _count(jaxpr, used_outputs: Used | None, liveness: _Liveness) -> FlopCount:
  """FLOPs of `jaxpr`: every equation (used_outputs None) or those the needed outputs need."""
  jaxpr = _open(jaxpr)
  if used_outputs is None:
    plan = [(eqn, [(b, None) for b in _bodies(eqn)]) for eqn in jaxpr.eqns]
  else:
    plan, _ = liveness.live(jaxpr, used_outputs)
  total = FlopCount()
  for eqn, subs in plan:
    total.add(_count_eqn(eqn, [(b, u, liveness) for b, u in subs]))
  return total


def _count_eqn(eqn, subs) -> FlopCount:
  total = FlopCount()
  name = eqn.primitive.name
  if name == "dot_general":
    f = _dot_flops(eqn)
    total.flops += f
    total.dot_flops += f
    return total
  if name == "conv_general_dilated":
    f = _conv_flops(eqn)
    total.flops += f
    total.conv_flops += f
    return total
  if name == "scan":
    total.add(_count(*subs[0]), float(eqn.params["length"]))
    return total
  if name == "cond":
    branches = [_count(*s) for s in subs]
    total.add(max(branches, key=lambda c: c.flops))
    return total
  if name == "pallas_call":
    est = eqn.params.get("cost_estimate")
    if est is not None and getattr(est, "flops", None):
      f = float(est.flops)
      total.flops += f
      total.kernel_flops += f
    else:
      body = _count(*subs[0])  # one grid cell's work
      cells = float(math.prod(eqn.params["grid_mapping"].grid))
      body.kernel_flops = body.flops
      total.add(body, cells)
    return total
  if name == "shard_map":
    # The body sees one shard along the manual axes: it runs once per shard.
    total.add(_count(*subs[0]), float(_manual_shards(eqn.params)))
    return total
  if name == "while":
    body = _count(*subs[0])
    total.add(body)
    total.add(_count(*subs[1]))  # the loop test
    if body.flops:
      total.unknown_trip_loops += 1
    return total
  for s in subs:  # pjit, remat/checkpoint, custom_jvp/vjp, ...
    total.add(_count(*s))
  return total


def count_jaxpr(jaxpr, *, live: bool = False) -> FlopCount:
  """FLOPs of a Jaxpr or ClosedJaxpr (see module docstring): every equation in it, or with `live`
  only those its outputs need (dead code not counted, as XLA deletes it)."""
  jaxpr = _open(jaxpr)
  return _count(jaxpr, (True,) * len(jaxpr.outvars) if live else None, _Liveness())


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


def count_traced(traced) -> FlopCount:
  """FLOPs of a `jax.jit(f).trace(*args)` result (global, all devices together), dead code not counted."""
  return count_jaxpr(traced.jaxpr, live=True)
