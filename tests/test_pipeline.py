"""Grain pipeline: ArrayRecord -> template -> best-fit packing -> batches (bagpiper_jax/batch.py).

Expected matrices come from `ref_doc`, a deliberately naive cell-by-cell builder of the docs/data.md
format (independent of template.py's vectorised code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bagpiper_jax import batch as batch_lib
from bagpiper_jax import config_lib
from data_pipeline import bench
from data_pipeline import synthetic_records
from bagpiper_jax.data import input_pipeline as pipeline
from bagpiper_jax.data import records
from bagpiper_jax.data import slots as slots_lib
from bagpiper_jax.model import config as mc

CFG = mc.ModelConfig(text_vocab_size=1000)
S = CFG.num_streams
FRAMES_PER_WINDOW = 8 * 13


# ---------------------------------------------------------------------------------------------
# Synthetic documents and the naive reference.


def make_doc(idx: int, kind: str, rng, *, frames=(250,), caption=3, codes=4, text=40):
  """A document whose system message carries the marker 256 + idx (row 3 of the document)."""
  msgs = [{"role": "system", "modality": "text", "text_ids": np.array([256 + idx], np.int32)}]
  if kind == "und":
    for t in frames:
      msgs.append({"role": "user", "modality": "audio",
                   "mel": rng.standard_normal((128, t)).astype(np.float16)})
    msgs.append({"role": "assistant", "modality": "text", "text_ids": 256 + rng.integers(0, 1000, caption).astype(np.int32)})
  elif kind == "gen":
    msgs.append({"role": "user", "modality": "text", "text_ids": 256 + rng.integers(0, 1000, caption).astype(np.int32)})
    msgs.append({"role": "assistant", "modality": "audio", "codes": rng.integers(0, 1024, (codes, S)).astype(np.int16)})
  else:
    msgs.append({"role": "assistant", "modality": "text", "text_ids": 256 + rng.integers(0, 1000, text).astype(np.int32)})
  return {"id": f"doc{idx}", "source": "test", "task": "dialogue", "messages": msgs}


def ref_doc(ex):
  """Cell by cell: ids [L, 8], weights [L, 8], doc-local audio rows [L], windows, chunk lens."""
  ids, w, ar, wins, lens = [], [], [], [], []
  nwin = 0

  def put(tok, weight=0.0, row=-1):
    ids.append([tok] + [0] * (S - 1))
    w.append([weight] + [0.0] * (S - 1))
    ar.append(row)

  put(mc.BOS)
  msgs = ex["messages"]
  for i, m in enumerate(msgs):
    tr = 1.0 if m["role"] == "assistant" else 0.0
    put(mc.ROLE_IDS[m["role"]], tr)
    put(mc.MODALITY_IDS[m["modality"]], tr)
    if "text_ids" in m:
      for t in m["text_ids"]:
        put(int(t), tr)
    elif "codes" in m:
      c = m["codes"]
      for r in range(len(c) + S - 1):
        ids.append([CFG.codec_id(n, int(c[r - n, n])) if 0 <= r - n < len(c) else CFG.codec_pad_id(n)
                    for n in range(S)])
        w.append([0.125 * tr] * S)
        ar.append(-1)
    else:
      mel = m["mel"]
      t = mel.shape[1]
      chunks = -(-t // 100)
      nw = -(-chunks // 8)
      for k in range(nw):
        win = np.zeros((8, 128, 100), np.float32)
        ln = np.zeros(8, np.int32)
        for c in range(8):
          lo = (k * 8 + c) * 100
          n = max(0, min(100, t - lo))
          win[c, :, :n] = mel[:, lo:lo + n]
          ln[c] = n
        wins.append(win)
        lens.append(ln)
      for c in range(chunks):
        for j in range(mc.conv_out_length(min(100, t - c * 100))):
          put(0, 0.0, (nwin * 8 + c) * 13 + j)
      nwin += nw
    same = i + 1 < len(msgs) and msgs[i + 1]["role"] == m["role"]
    put(mc.EOT if same else mc.EOS, tr)
  return {"input_ids": np.array(ids, np.int32), "loss_weights": np.array(w, np.float32),
          "audio_rows": np.array(ar, np.int32), "windows": wins, "lens": lens}


def config_for(train=None, evals=None, *, seq_len=256, windows=3, host_batch=2, bins=4, workers=0,
               seed=0, **extra):
  c = config_lib.base_config("pretrain")
  c.data.train_sources = train or {}
  c.data.eval_sources = evals or {}
  c.data.seq_len = seq_len
  c.data.max_audio_windows = windows
  c.data.num_workers = workers
  c.data.shuffle_seed = seed
  with c.unlocked():
    c.data.per_device_batch = host_batch  # one device per host here: rows per host
    c.data.packing_bins = bins
    c.data.read_threads = 2
    for k, v in extra.items():
      c.data[k] = v
  return c


def split_docs(b):
  """Decomposes a batch into documents, checking segment/position/padding invariants on the way."""
  docs = []
  for i in range(b["input_ids"].shape[0]):
    seg, pos = b["segment_ids"][i], b["positions"][i]
    nseg = int(seg.max())
    used = int(np.count_nonzero(seg))
    np.testing.assert_array_equal(seg[used:], 0)  # documents first, padding after
    assert not b["input_ids"][i, used:].any() and not b["loss_weights"][i, used:].any()
    assert (b["audio_rows"][i, used:] == -1).all()
    win0 = 0
    for k in range(1, nseg + 1):
      (where,) = np.nonzero(seg == k)
      assert where.size and (np.diff(where) == 1).all(), f"segment {k} of row {i} is not contiguous"
      np.testing.assert_array_equal(pos[where], np.arange(where.size))
      ids = b["input_ids"][i, where]
      rows = b["audio_rows"][i, where]
      nw = 0
      if (rows >= 0).any():
        nw = int(rows.max()) // FRAMES_PER_WINDOW + 1 - win0
      docs.append({"marker": int(ids[3, 0]) - 256, "row": i, "segment": k, "input_ids": ids,
                   "loss_weights": b["loss_weights"][i, where], "audio_rows": rows, "win0": win0,
                   "mel": b["audio_mel"][i, win0:win0 + nw], "lens": b["audio_chunk_lens"][i, win0:win0 + nw]})
      win0 += nw
    assert not b["audio_chunk_lens"][i, win0:].any() and not b["audio_mel"][i, win0:].any()
  return docs


def check_doc(got, ex):
  want = ref_doc(ex)
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  np.testing.assert_array_equal(got["loss_weights"], want["loss_weights"])
  shifted = np.where(want["audio_rows"] >= 0, want["audio_rows"] + got["win0"] * FRAMES_PER_WINDOW, -1)
  np.testing.assert_array_equal(got["audio_rows"], shifted)
  assert len(got["mel"]) == len(want["windows"])
  if want["windows"]:
    np.testing.assert_array_equal(got["mel"], np.stack(want["windows"]))
    np.testing.assert_array_equal(got["lens"], np.stack(want["lens"]))


def write_docs(directory, docs, shards):
  return synthetic_records.write_shards(directory, docs, shards)


def random_docs(n, seed=0, start=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(start, start + n):
    kind = ("und", "gen", "text")[i % 3]
    if kind == "und":
      ex = make_doc(i, kind, rng, frames=tuple(int(x) for x in rng.integers(30, 900, 1 + (i % 7 == 0))),
                    caption=int(rng.integers(1, 20)))
    else:
      ex = make_doc(i, kind, rng, caption=int(rng.integers(1, 20)), codes=int(rng.integers(1, 60)),
                    text=int(rng.integers(1, 120)))
    out.append(ex)
  return out


# ---------------------------------------------------------------------------------------------
# Round trip.


def test_round_trip_exact_batch_with_drops(tmp_path):
  """One packing bin, so placement is sequential and the whole batch can be written by hand."""
  rng = np.random.default_rng(0)
  docs = [
      make_doc(0, "und", rng, frames=(250,), caption=5),          # 49 rows, 1 window
      make_doc(1, "gen", rng, caption=3, codes=4),                 # 25 rows
      make_doc(2, "und", rng, frames=(50, 50, 50, 50), caption=1), # 49 rows, 4 windows > 3: dropped
      make_doc(3, "text", rng, text=40),                           # 48 rows
      make_doc(4, "text", rng, text=300),                          # 308 rows > 256: dropped
      make_doc(5, "und", rng, frames=(900,), caption=2),           # 130 rows, 2 windows
      make_doc(6, "und", rng, frames=(120,), caption=3),           # 30 rows, 1 window
  ]
  refs = [ref_doc(d) for d in docs]
  assert [len(r["input_ids"]) for r in refs] == [49, 25, 49, 48, 308, 130, 30]
  paths = write_docs(str(tmp_path / "ev"), docs, 2)
  config = config_for(evals={"ev": {"path": str(tmp_path / "ev")}}, seq_len=256, windows=3, host_batch=2, bins=1)
  it = pipeline.make_eval_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 1
  b = batches[0]
  batch_lib.validate_batch(b, CFG)

  # Row 0 = docs 0, 1, 3, 5 (252 rows, 3 windows); doc 6 would overflow it -> row 1.
  want = {k: np.zeros(v.shape, v.dtype) for k, v in b.items()}
  want["audio_rows"][:] = -1
  for row, members in ((0, (0, 1, 3, 5)), (1, (6,))):
    r0, w0 = 0, 0
    for seg, d in enumerate(members, start=1):
      ref = refs[d]
      n = len(ref["input_ids"])
      want["input_ids"][row, r0:r0 + n] = ref["input_ids"]
      want["loss_weights"][row, r0:r0 + n] = ref["loss_weights"]
      want["segment_ids"][row, r0:r0 + n] = seg
      want["positions"][row, r0:r0 + n] = np.arange(n)
      want["audio_rows"][row, r0:r0 + n] = np.where(ref["audio_rows"] >= 0,
                                                     ref["audio_rows"] + w0 * FRAMES_PER_WINDOW, -1)
      for win, ln in zip(ref["windows"], ref["lens"]):
        want["audio_mel"][row, w0] = win
        want["audio_chunk_lens"][row, w0] = ln
        w0 += 1
      r0 += n
  assert sorted(b) == sorted(want)
  for k in want:
    assert b[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(b[k], want[k], err_msg=k)
  # The second audio document of row 0 reads encoder frames from window 1 on.
  assert b["audio_rows"][0][b["segment_ids"][0] == 4].max() >= FRAMES_PER_WINDOW

  st = pipeline.pipeline_stats(it)
  assert st["docs_read"] == 7 and st["docs_accepted"] == 5
  assert st["docs_dropped_too_long"] == 1 and st["docs_dropped_audio_windows"] == 1
  assert st["tokens_dropped"] == 308 + 49 and st["tokens"] == 252 + 30 and st["batches"] == 1
  assert len(paths) == 2


def test_round_trip_best_fit_random_docs(tmp_path):
  """Many documents through the shuffling train pipeline: each packed document equals its reference."""
  docs = random_docs(60, seed=1)
  write_docs(str(tmp_path / "a"), docs, 3)
  config = config_for(train={"a": {"path": str(tmp_path / "a") + "/*.array_record", "weight": 1.0}},
                      seq_len=512, windows=4, host_batch=3, bins=4)
  it = pipeline.make_train_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1)
  seen = []
  for _ in range(8):
    b = next(it)
    batch_lib.validate_batch(b, CFG)
    assert b["input_ids"].shape == (3, 512, 8) and b["audio_mel"].shape == (3, 4, 8, 128, 100)
    assert b["audio_mel"].dtype == np.float32
    for d in split_docs(b):
      check_doc(d, docs[d["marker"]])
      seen.append(d["marker"])
  assert len(set(seen)) == 60  # 8 x 3 rows of 512 cover more than one epoch of 60 documents
  st = pipeline.pipeline_stats(it)
  assert st["docs_dropped"] == 0 and st["fill"] > 0.8, st


# ---------------------------------------------------------------------------------------------
# Resumption.

_RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import test_pipeline as t
    from bagpiper_jax.data import input_pipeline as pipeline
    args = json.load(open({args!r}))
    config = t.config_for(train=args["train"], **args["kw"])
    it = pipeline.make_train_iterator(config, t.CFG, rows=config.data.per_device_batch, process_index=0, process_count=1)
    it.set_state(json.loads(open({state!r}).read()))
    out = {{}}
    for i in range(args["n"]):
      for k, v in next(it).items():
        out[f"{{i}}/{{k}}"] = v
    np.savez({out!r}, **out)
    json.dump(pipeline.pipeline_stats(it), open({stats!r}, "w"))
    if hasattr(it, "close"):
      it.close()
""")


def _resume_case(tmp_path, workers):
  docs = random_docs(40, seed=2)
  write_docs(str(tmp_path / "a"), docs[:25], 2)
  write_docs(str(tmp_path / "b"), docs[25:], 1)
  train = {"a": {"path": str(tmp_path / "a"), "weight": 1.0}, "b": {"path": str(tmp_path / "b"), "weight": 3.0}}
  kw = dict(seq_len=384, windows=3, host_batch=2, bins=3, workers=workers, seed=7)
  config = config_for(train=train, **kw)
  it = pipeline.make_train_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1)
  for _ in range(3):  # 6 rows: mid-way through the third 3-bin packing round
    next(it)
  state = json.dumps(it.get_state())
  want = [next(it) for _ in range(4)]
  want_stats = pipeline.pipeline_stats(it)
  if hasattr(it, "close"):
    it.close()

  (tmp_path / "state.json").write_text(state)
  (tmp_path / "args.json").write_text(json.dumps({"train": train, "kw": kw, "n": 4}))
  script = _RESUME_SCRIPT.format(tests=os.path.dirname(__file__), args=str(tmp_path / "args.json"),
                                 state=str(tmp_path / "state.json"), out=str(tmp_path / "out.npz"),
                                 stats=str(tmp_path / "stats.json"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  got = np.load(tmp_path / "out.npz")
  for i, b in enumerate(want):
    for k, v in b.items():
      np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {i} key {k}")
  assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(want_stats))
  return want_stats


def test_resume_in_fresh_process(tmp_path):
  st = _resume_case(tmp_path, workers=0)
  assert st["batches"] == 7 and st["rows"] == 14
  # Sampling factors: b has 15 records x weight 3 vs a's 25 x 1 -> b supplies ~45/70 of documents.
  by = st["docs_by_source"]
  assert 0.5 < by["b"] / (by["a"] + by["b"]) < 0.8, by


def test_resume_with_worker_processes(tmp_path):
  st = _resume_case(tmp_path, workers=2)
  assert st["batches"] == 7  # summed over the two workers' states


# ---------------------------------------------------------------------------------------------
# Hosts.


def _slot_sources(tmp_path):
  docs = random_docs(48, seed=11)
  write_docs(str(tmp_path / "a"), docs[:30], 3)
  write_docs(str(tmp_path / "b"), docs[30:], 2)
  return {"a": {"path": str(tmp_path / "a"), "weight": 1.0}, "b": {"path": str(tmp_path / "b"), "weight": 2.0}}


def _hosts(config, processes, rows=4):
  """One train iterator per process, each feeding its contiguous share of `rows` global rows."""
  return [pipeline.make_train_iterator(config, CFG, rows=rows // processes, process_index=p, process_count=processes)
          for p in range(processes)]


def _global(hosts):
  """The global batch: the hosts' batches in process (= slot) order."""
  parts = [next(h) for h in hosts]
  return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}


def _move(src_hosts, dst_hosts):
  """A checkpoint round trip: every slot's state written by its owner, read back by the new owners."""
  parts = {}
  for i, h in enumerate(src_hosts):
    parts.update(json.loads(json.dumps(slots_lib.checkpoint_parts(h, h.get_state(), i, len(src_hosts)))))
  for i, h in enumerate(dst_hosts):
    keys = slots_lib.restore_keys(h, i, len(dst_hosts))
    h.set_state(slots_lib.state_from_parts(h, {k: parts[k] for k in keys}))


def _assert_same(a, b, what):
  assert sorted(a) == sorted(b), what
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


def _elastic_case(tmp_path, workers):
  train = _slot_sources(tmp_path)
  config = config_for(train=train, seq_len=384, windows=3, host_batch=1, bins=3, workers=workers, seed=3)
  one, two, four = _hosts(config, 1), _hosts(config, 2), _hosts(config, 4)
  assert [h.slots.local for h in two] == [(0, 1), (2, 3)] and four[3].slots.local == (3,)
  want = [_global(one) for _ in range(6)]
  assert len({w["input_ids"][i].tobytes() for w in want for i in range(4)}) == 24  # slots differ
  for i in range(3):
    _assert_same(_global(two), want[i], f"2 hosts, batch {i}")
  # Two processes checkpoint after 3 batches; the run resumes on 4 and on 1 process.
  fresh_four, fresh_one = _hosts(config, 4), _hosts(config, 1)
  _move(two, fresh_four)
  _move(two, fresh_one)
  for i in range(3, 6):
    _assert_same(_global(fresh_four), want[i], f"resumed on 4 hosts, batch {i}")
    _assert_same(_global(fresh_one), want[i], f"resumed on 1 host, batch {i}")
  for h in one + two + four + fresh_four + fresh_one:
    h.close()


def test_global_batches_do_not_depend_on_the_host_count(tmp_path):
  """4 data slots of 1 row on 1, 2 and 4 hosts: the same global batches, and a state saved on 2
  hosts resumes on 4 and on 1 exactly."""
  _elastic_case(tmp_path, workers=0)


@pytest.mark.heavy
def test_global_batches_do_not_depend_on_the_host_count_with_prefetch_workers(tmp_path):
  """The same with num_workers=1: every slot's pipeline in a Grain worker process (~20 processes)."""
  _elastic_case(tmp_path, workers=1)


def test_prefetch_worker_per_slot_gives_the_same_batches(tmp_path):
  """num_workers=1 (each slot in its own Grain process) yields num_workers=0's batches."""
  train = _slot_sources(tmp_path)
  kw = dict(train=train, seq_len=384, windows=3, host_batch=2, bins=3, seed=3)
  (a,), (b,) = _hosts(config_for(workers=0, **kw), 1, rows=2), _hosts(config_for(workers=1, **kw), 1, rows=2)
  for i in range(3):
    _assert_same(next(b), next(a), f"batch {i}")
  b.close()


def test_data_slots_follow_the_rows_each_process_holds():
  # Process 1's devices hold the first rows: it feeds slots 0, 1.
  s = slots_lib.DataSlots.from_rows(2, {0: [4, 5, 6, 7], 1: [0, 1, 2, 3]}, 1)
  assert (s.num_slots, s.local, s.writes, s.host_rows) == (4, (0, 1), (0, 1), 4)
  # A batch replicated over two processes: both feed slot 0, only the first writes its state.
  rep = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
  assert [slots_lib.DataSlots.from_rows(2, rep, p).writes for p in range(4)] == [(0,), (), (1,), ()]
  with pytest.raises(ValueError, match="rows_per_slot=3"):
    slots_lib.DataSlots.from_rows(3, {0: [0, 1, 2, 3]}, 0)
  with pytest.raises(ValueError, match="do not form whole data slots"):
    slots_lib.DataSlots.from_rows(2, {0: [0, 2], 1: [1, 3]}, 0)


def test_stream_diff_names_the_keys(tmp_path):
  train = _slot_sources(tmp_path)
  it = _hosts(config_for(train=train, bins=2), 1)[0]
  saved = json.loads(json.dumps(slots_lib.stream_description(it, 1)))
  assert slots_lib.stream_diff(saved, slots_lib.stream_description(it, 1)) == []
  train["b"]["weight"] = 1.0
  other = _hosts(config_for(train=train, bins=2, seed=9), 2, rows=8)[0]
  diff = slots_lib.stream_diff(saved, slots_lib.stream_description(other, 2))
  assert diff[0].startswith("global batch: checkpoint 4 data slots x 1 rows = 4 rows per micro-batch vs now 8")
  assert "data.shuffle_seed: checkpoint 0 vs now 9" in diff
  assert "data.train_sources.b.weight: checkpoint 2.0 vs now 1.0" in diff, diff




def test_hosts_partition_each_epoch(tmp_path):
  docs = random_docs(30, seed=3)
  write_docs(str(tmp_path / "a"), docs, 4)
  src = pipeline.ShardSource("a", pipeline.shard_paths("a", str(tmp_path / "a")))
  per_host = [pipeline.host_stream(src, CFG, seed=5, process_index=p, process_count=2) for p in (0, 1)]
  marker = lambda ex: int(ex["input_ids"][3, 0]) - 256  # noqa: E731
  epochs = []
  for e in range(2):  # 30 records, 2 hosts: elements [15e, 15e + 15) of each host form epoch e
    got = [marker(per_host[p][j]) for p in (0, 1) for j in range(15 * e, 15 * e + 15)]
    assert sorted(got) == list(range(30)), f"epoch {e}: {sorted(got)}"
    epochs.append(got)
  assert epochs[0] != epochs[1]  # reshuffled every epoch

  # Packed train iterators of the two hosts never share a document within an epoch.
  config = config_for(train={"a": {"path": str(tmp_path / "a"), "weight": 1.0}}, seq_len=256, host_batch=1, bins=2)
  seen = []
  for p in (0, 1):
    it = pipeline.make_train_iterator(config, CFG, rows=config.data.per_device_batch, process_index=p, process_count=2)
    ids = []
    while pipeline.pipeline_stats(it).get("docs_read", 0) < 8:
      ids += [d["marker"] for d in split_docs(next(it))]
    seen.append(set(ids[:8]))
  assert seen[0] and seen[1] and not seen[0] & seen[1]

  # Eval: one deterministic pass; the hosts' union is every document exactly once.
  config = config_for(evals={"a": {"path": str(tmp_path / "a")}}, seq_len=256, host_batch=2, bins=2)
  got = []
  for p in (0, 1):
    for b in pipeline.make_eval_iterator(config, CFG, rows=config.data.per_device_batch, process_index=p, process_count=2):
      got += [d["marker"] for d in split_docs(b)]
  assert sorted(got) == list(range(30))


def test_eval_fixed_batch_count_pads_with_empty_batches(tmp_path):
  docs = random_docs(6, seed=4)
  write_docs(str(tmp_path / "e"), docs, 1)
  config = config_for(evals={"e": {"path": str(tmp_path / "e")}}, seq_len=1024, host_batch=2, bins=2)
  natural = list(pipeline.make_eval_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1))
  fixed = list(pipeline.make_eval_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1,
                                           num_batches=len(natural) + 2))
  assert len(fixed) == len(natural) + 2
  for a, b in zip(natural, fixed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for b in fixed[len(natural):]:
    batch_lib.validate_batch(b, CFG)
    assert not b["segment_ids"].any() and not b["loss_weights"].any()
  assert sorted(d["marker"] for b in natural for d in split_docs(b)) == list(range(6))


def test_eval_with_worker_processes_covers_everything_once(tmp_path):
  docs = random_docs(12, seed=8)
  write_docs(str(tmp_path / "e"), docs, 2)
  config = config_for(evals={"e": {"path": str(tmp_path / "e")}}, seq_len=512, host_batch=2, bins=2, workers=2)
  it = pipeline.make_eval_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1, num_batches=6)
  got = list(it)
  it.close()
  assert len(got) == 6  # per host, not per worker
  markers = sorted(d["marker"] for b in got for d in split_docs(b))
  assert markers == list(range(12))


# ---------------------------------------------------------------------------------------------
# Errors.


def test_bad_record_names_shard_and_index(tmp_path):
  docs = random_docs(6, seed=5)
  items = [records.encode(d) for d in docs]
  items[4] = b"\xc1 definitely not msgpack"  # shard 1 (records 3..5), record 1
  paths = synthetic_records.write_shards(str(tmp_path / "bad"), items, 2)
  config = config_for(evals={"bad": {"path": str(tmp_path / "bad")}}, seq_len=1024, host_batch=1, bins=1)
  with pytest.raises(ValueError) as e:
    list(pipeline.make_eval_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1))
  msg = str(e.value)
  assert paths[1] in msg and "record 1" in msg and "'bad'" in msg, msg


def test_record_outside_model_layout_names_shard_and_index(tmp_path):
  docs = random_docs(3, seed=6)
  docs[2]["messages"][0]["text_ids"] = np.array([CFG.codec_start + 5], np.int32)  # a codec id as text
  paths = synthetic_records.write_shards(str(tmp_path / "lay"), docs, 1)
  config = config_for(evals={"lay": {"path": str(tmp_path / "lay")}}, seq_len=1024, host_batch=1, bins=1)
  with pytest.raises(ValueError) as e:
    list(pipeline.make_eval_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1))
  msg = str(e.value)
  assert paths[0] in msg and "record 2" in msg and "text_ids" in msg and "doc2" in msg, msg


def test_missing_source_is_a_clear_error(tmp_path):
  config = config_for(train={"nope": {"path": str(tmp_path / "missing/*.array_record"), "weight": 1.0}})
  with pytest.raises(FileNotFoundError, match="'nope'"):
    pipeline.make_train_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="train_sources is empty"):
    pipeline.make_train_iterator(config_for(), CFG, rows=2, process_index=0, process_count=1)


def test_bench_mixture_smoke(tmp_path):
  """The benchmark's synthetic pretraining sources go through the real 8B layout and budgets."""
  sources = synthetic_records.write_pretrain_sources(str(tmp_path / "bench"), records_per_source=3, shards_per_source=1)
  config = bench.bench_config(sources, seq_len=8192, max_audio_windows=32, num_workers=0,
                              read_threads=2, packing_bins=2)
  cfg = mc.ModelConfig()
  it = pipeline.make_train_iterator(config, cfg, rows=2, process_index=0, process_count=1)
  r = bench.measure(it, seconds=0.2, warmup_batches=1)
  assert r["batches"] >= 1 and r["tokens_per_s"] > 0
  b = next(it)
  batch_lib.validate_batch(b, cfg)
  assert (b["audio_rows"] >= 0).any() and (b["input_ids"][..., 1:] >= cfg.codec_start).any()
  assert set(pipeline.pipeline_stats(it)["docs_by_source"]) == set(config_lib.PRETRAIN_MIXTURE)


@pytest.mark.parametrize("weighting, share_b", [("factor", 0.8), ("proportion", 0.5)])
def test_mixture_weighting(tmp_path, weighting, share_b):
  """a: 10 records, b: 40 records, both weight 1: factor -> shares by size; proportion -> equal."""
  rng = np.random.default_rng(9)
  write_docs(str(tmp_path / "a"), [make_doc(i, "text", rng, text=5) for i in range(10)], 1)
  write_docs(str(tmp_path / "b"), [make_doc(i, "text", rng, text=5) for i in range(10, 50)], 1)
  config = config_for(train={"a": {"path": str(tmp_path / "a"), "weight": 1.0},
                             "b": {"path": str(tmp_path / "b"), "weight": 1.0}},
                      seq_len=120, host_batch=4, bins=1, mixture_weighting=weighting)
  it = pipeline.make_train_iterator(config, CFG, rows=config.data.per_device_batch, process_index=0, process_count=1)
  for _ in range(25):  # 10 documents of 12 rows per row -> 1000 documents
    next(it)
  by = pipeline.pipeline_stats(it)["docs_by_source"]
  assert by["b"] / (by["a"] + by["b"]) == pytest.approx(share_b, abs=0.01), by


def test_shard_record_counts_match_the_shards(tmp_path):
  """input_pipeline's one private-API call (grain's per-shard counts) against public readers."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  docs = [make_doc(i, "text", rng) for i in range(7)]
  paths = synthetic_records.write_shards(str(tmp_path / "c"), docs, 3)
  src = pipeline.ShardSource("c", paths)
  want = []
  for p in paths:
    r = array_record_module.ArrayRecordReader(p)
    want.append(r.num_records())
    r.close()
  assert pipeline.shard_record_counts(src._ds) == want == [3, 3, 1]  # pylint: disable=protected-access
