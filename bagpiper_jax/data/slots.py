"""Data slots: the training stream belongs to the global batch, not to the hosts.

The global micro-batch of G rows (batch.global_rows) is cut into S = G / R fixed data slots of
R = config.data.rows_per_slot rows each; slot s fills global rows [s*R, (s+1)*R). Each slot is a
deterministic stream of its own (bagpiper_jax/data/input_pipeline.py: its share of every source,
mixed and packed by itself; or synthetic rows), so the sequence of global batches is a function of
the config and S only. A process feeds the slots whose rows its devices hold (`DataSlots`, derived
from the batch sharding: trainer.Setup.data_slots) and concatenates them in slot order
(`SlotIterator`). Restoring onto another number of processes hands the same slots to other hosts:
with S unchanged the global batches after a resume are the same, bit for bit, on 1, 2 or 4 hosts.

Checkpoints (bagpiper_jax/checkpoint.py, the `data` item) hold one JSON file per slot,
`slot_<s>-of-<S>.json`, written by the slot's first owner (`DataSlots.writes`), and `stream.json`
(`stream_description`): S, R and the `signature` of the stream (what defines it: sources with their
weights and record counts, seeds, packing and row budgets, prefetch workers). A resume compares the
signature with the run's (`stream_diff`) and refuses a different stream by key unless told to
restart it. Iterators without slots (a notebook's own, a test's wrapper) are saved per process as
`process_<i>-of-<n>.json`, restorable onto the same process count only.

docs/training.md#data-slots has the rules (what may change across a resume and what may not).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

STREAM_FORMAT = "bagpiper-data-slots-v1"


def slot_key(slot: int, num_slots: int) -> str:
  """File stem of one slot's state in a checkpoint's data item."""
  return f"slot_{slot}-of-{num_slots}"


def process_key(process_index: int, process_count: int) -> str:
  """File stem of a whole process's iterator state (iterators without slots)."""
  return f"process_{process_index}-of-{process_count}"


@dataclasses.dataclass(frozen=True)
class DataSlots:
  """Which data slots this process feeds.

  Attributes:
    num_slots: S, slots per global micro-batch.
    rows_per_slot: R, rows each slot gives per micro-batch (config.data.rows_per_slot).
    local: the slots of this process's rows, in the order of its local rows.
    writes: the slots whose state this process saves (each slot by exactly one process, its
      lowest-numbered owner; several own a slot only when the batch is replicated across processes).
  """
  num_slots: int
  rows_per_slot: int
  local: tuple[int, ...]
  writes: tuple[int, ...]

  @property
  def global_rows(self) -> int:
    return self.num_slots * self.rows_per_slot

  @property
  def host_rows(self) -> int:
    return len(self.local) * self.rows_per_slot

  @classmethod
  def contiguous(cls, rows_per_slot: int, host_rows: int, process_index: int = 0,
                 process_count: int = 1) -> "DataSlots":
    """Process p holds global rows [p * host_rows, (p + 1) * host_rows) (no mesh at hand)."""
    rows = {p: list(range(p * host_rows, (p + 1) * host_rows)) for p in range(process_count)}
    return cls.from_rows(rows_per_slot, rows, process_index)

  @classmethod
  def from_rows(cls, rows_per_slot: int, rows_by_process: Mapping[int, Sequence[int]],
                process_index: int) -> "DataSlots":
    """From the global batch rows each process's devices hold (sharding.batch_rows_by_process)."""
    r = int(rows_per_slot)
    if r < 1:
      raise ValueError(f"config.data.rows_per_slot must be >= 1, got {r}")
    g = 1 + max(max(rows) for rows in rows_by_process.values() if len(rows))
    if g % r:
      raise ValueError(f"the global batch of {g} rows per micro-batch does not split into data slots of "
                       f"config.data.rows_per_slot={r} rows; choose a divisor of {g}")
    owners: dict[int, list[int]] = {}
    for p in sorted(rows_by_process):
      rows = list(rows_by_process[p])
      for j in range(0, len(rows), r):
        chunk = rows[j:j + r]
        if len(chunk) != r or chunk[0] % r or chunk != list(range(chunk[0], chunk[0] + r)):
          raise ValueError(
              f"process {p} feeds global batch rows {rows[:8]}{'...' if len(rows) > 8 else ''}, which do "
              f"not form whole data slots of config.data.rows_per_slot={r} rows; use a rows_per_slot that "
              "divides each process's rows")
        owners.setdefault(chunk[0] // r, []).append(p)
    if sorted(owners) != list(range(g // r)):
      raise ValueError(f"data slots {sorted(set(range(g // r)) - set(owners))} are fed by no process")
    mine = list(rows_by_process.get(process_index, []))
    local = tuple(mine[j] // r for j in range(0, len(mine), r))
    writes = tuple(s for s in local if min(owners[s]) == process_index)
    return cls(num_slots=g // r, rows_per_slot=r, local=local, writes=writes)


class SlotIterator:
  """Host batches made of whole data slots: slot iterators' batches concatenated in slot order.

  `get_state()` -> {'slots': {str(slot): that slot's state}}; `set_state` takes the same. Each slot
  iterator yields R-row batches (dicts of numpy arrays) and has get_state/set_state.
  """

  def __init__(self, slots: DataSlots, iterators: Mapping[int, Iterator], signature: Mapping[str, Any]):
    if sorted(iterators) != sorted(slots.local):
      raise ValueError(f"slot iterators {sorted(iterators)} do not match this process's slots {slots.local}")
    self.slots = slots
    self.signature = dict(signature)
    self._its = [iterators[s] for s in slots.local]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._its]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {"slots": {str(s): it.get_state() for s, it in zip(self.slots.local, self._its)}}

  def set_state(self, state: Mapping) -> None:
    have = state["slots"]
    for s, it in zip(self.slots.local, self._its):
      it.set_state(have[str(s)])

  def close(self) -> None:
    for it in self._its:
      if hasattr(it, "close"):
        it.close()


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds for an iterator (bagpiper_jax/checkpoint.py writes and reads the files).


def checkpoint_parts(it, state: Any, process_index: int, process_count: int) -> dict[str, Any]:
  """{file stem: state} this process writes for iterator `it` whose state is `state`."""
  if isinstance(it, SlotIterator):
    n = it.slots.num_slots
    return {slot_key(s, n): state["slots"][str(s)] for s in it.slots.writes}
  return {process_key(process_index, process_count): state}


def restore_keys(it, process_index: int, process_count: int) -> list[str]:
  """The file stems this process reads to restore `it`."""
  if isinstance(it, SlotIterator):
    return [slot_key(s, it.slots.num_slots) for s in it.slots.local]
  return [process_key(process_index, process_count)]


def state_from_parts(it, parts: Mapping[str, Any]) -> Any:
  """The iterator state assembled from the parts `restore_keys` named."""
  if isinstance(it, SlotIterator):
    n = it.slots.num_slots
    return {"slots": {str(s): parts[slot_key(s, n)] for s in it.slots.local}}
  (only,) = parts.values()
  return only


def stream_description(it, process_count: int) -> dict:
  """stream.json: what the stream is, so a resume can check it is the same one."""
  if isinstance(it, SlotIterator):
    return {"format": STREAM_FORMAT, "num_slots": it.slots.num_slots, "rows_per_slot": it.slots.rows_per_slot,
            "signature": it.signature}
  return {"format": STREAM_FORMAT, "per_process": True, "process_count": int(process_count)}


def _diff(saved: Any, current: Any, prefix: str, out: list[str]) -> None:
  if isinstance(saved, Mapping) and isinstance(current, Mapping):
    for k in sorted(set(saved) | set(current)):
      _diff(saved.get(k, "<absent>"), current.get(k, "<absent>"), f"{prefix}.{k}", out)
  elif saved != current:
    out.append(f"{prefix}: checkpoint {saved!r} vs now {current!r}")


def stream_diff(saved: Mapping | None, current: Mapping) -> list[str]:
  """One line per key where a checkpoint's stream.json and this run's stream differ."""
  if saved is None:
    return ["data stream: the checkpoint has no data/stream.json"]
  out: list[str] = []
  if saved.get("per_process") or current.get("per_process"):
    if saved.get("per_process") != current.get("per_process") or saved.get("process_count") != current.get(
        "process_count"):
      out.append(f"data iterator: checkpoint {_kind(saved)} vs now {_kind(current)} (states of iterators "
                 "without data slots restore onto the same process count only)")
    return out
  if (saved["num_slots"], saved["rows_per_slot"]) != (current["num_slots"], current["rows_per_slot"]):
    out.append(
        f"global batch: checkpoint {saved['num_slots']} data slots x {saved['rows_per_slot']} rows = "
        f"{saved['num_slots'] * saved['rows_per_slot']} rows per micro-batch vs now {current['num_slots']} x "
        f"{current['rows_per_slot']} = {current['num_slots'] * current['rows_per_slot']} (data.per_device_batch x "
        "devices, data.rows_per_slot)")
  _diff(saved.get("signature", {}), current.get("signature", {}), "data", out)
  return out


def _kind(d: Mapping) -> str:
  if d.get("per_process"):
    return f"per-process states of {d.get('process_count')} processes"
  return f"{d.get('num_slots')} data slots"
