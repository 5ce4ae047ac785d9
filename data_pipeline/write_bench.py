r"""Writer throughput: the Beam pipeline vs the multiprocessing pool it replaced, and the per-core cost
of each kind of record, so a cluster job can be sized.

  python -m data_pipeline.write_bench                       # both parts, this machine's cores
  python -m data_pipeline.write_bench --part=engines --rounds=3
  python -m data_pipeline.write_bench --part=kinds --codec_device=cuda --codec_batch_sizes=1,8,32

Part "engines": the demo manifests (data_pipeline/demo.py: 240 synthetic clips, tiny random X-Codec)
written by writer.write_shards (Beam DirectRunner, `--workers` processes) and by
pool_writer.write_shards (`--workers` pool processes), alternately, `--rounds` times each, into
fresh directories. Reports records/s and audio-seconds/s per core (wall time including start-up,
divided by the workers) and the Beam / pool ratio of the medians. The outputs are compared too
(the shard files must be identical).

Part "kinds": one process, one thread, the writer's Builder on 10 s clips (Ogg/Opus as on the Hub,
or --clip_format=wav):
  mel (understanding records):   decode + 128-bin log-mel, per audio second;
  codec (generation records):    load + X-Codec encode with a FULL-SIZE random-weight XcodecModel
                                 (transformers' XcodecConfig() defaults, the xcodec-hubert-general
                                 architecture: same FLOPs as the real weights), per audio second,
                                 for each --codec_batch_sizes (equal-length clips batch).
Audio-seconds per second per core is what sizes a job: core-hours = audio hours / that rate.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import soundfile as sf
import threadpoolctl
from absl import app, flags
from array_record.python import array_record_module

from bagpiper_jax import backends
from bagpiper_jax import codec
from bagpiper_jax import paths
from bagpiper_jax.data import records
from data_pipeline import build
from data_pipeline import demo
from data_pipeline import manifest as manifest_lib
from data_pipeline import pool_writer
from data_pipeline import tokenizer_train
from data_pipeline import writer

_PART = flags.DEFINE_enum("part", "all", ["all", "engines", "kinds"], "What to measure.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where the demo data / models go (default: a new tmp dir).")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count(), "Worker processes of each engine.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Runs of each engine (alternating).")
_CLIPS = flags.DEFINE_integer("clips", 4, "10 s clips per kind in part 'kinds'.")
_CODEC_DEVICE = flags.DEFINE_enum("codec_device", "cpu", ["cpu", "cuda"],
                                  "Where X-Codec runs (part 'kinds').")
_FORMAT = flags.DEFINE_enum("clip_format", "opus", ["opus", "wav"],
                            "How the clips are stored (part 'kinds'); the Hub's data is Ogg/Opus.")
_BATCHES = flags.DEFINE_list("codec_batch_sizes", ["1", "4"], "X-Codec batch sizes to time (part 'kinds').")


def audio_seconds(out_dir: str) -> tuple[int, float]:
  """(records, seconds of audio they hold: mel frames / 100 + codec frames / 50) under out_dir."""
  n, secs = 0, 0.0
  for d, _, files in os.walk(out_dir):
    for f in files:
      if f.endswith(".array_record"):
        r = array_record_module.ArrayRecordReader(os.path.join(d, f))
        for b in r.read_all():
          n += 1
          for m in records.decode(b)["messages"]:
            secs += m["mel"].shape[1] / 100 if "mel" in m else m["codes"].shape[0] / 50 if "codes" in m else 0
        r.close()
  return n, secs


def _same_shards(a: str, b: str) -> bool:
  names = lambda root: sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs_ in os.walk(root)
                              for f in fs_ if f.endswith(".array_record"))
  return names(a) == names(b) and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)
                                      for n in names(a))


def engines(root: str, workers: int, rounds: int) -> None:
  data = os.path.join(root, "demo")
  if not os.path.exists(os.path.join(data, "demo.json")):
    demo.make_demo_data(data)
  with open(os.path.join(data, "demo.json")) as f:
    p = demo.DemoPaths(**json.load(f)["paths"])
  xc = os.path.join(data, "xcodec_tiny")
  if not os.path.isfile(os.path.join(xc, "config.json")):
    codec.build_tiny_xcodec(xc, seed=0)
  settings = build.BuildSettings(tokenizer=p.tokenizer, codec=f"xcodec:{xc}")
  manifests = p.manifests["train"]
  times = {"beam": [], "pool": []}
  outs = {}
  for r in range(rounds):
    for name in ("pool", "beam") if r % 2 == 0 else ("beam", "pool"):
      out = os.path.join(root, f"out_{name}_{r}")
      shutil.rmtree(out, ignore_errors=True)
      t0 = time.perf_counter()
      if name == "beam":
        writer.write_shards(manifests, out, settings, shard_size=64, num_workers=workers, progress=False,
                            log=lambda s: None)
      else:
        pool_writer.write_shards(manifests, out, settings, shard_size=64, num_workers=workers)
      times[name].append(time.perf_counter() - t0)
      outs[name] = out
      print(f"  round {r} {name}: {times[name][-1]:.1f}s", flush=True)
  n, secs = audio_seconds(outs["beam"])
  same = _same_shards(outs["pool"], outs["beam"])
  print(f"demo manifests: {n} records, {secs:.0f} s of audio; {workers} workers each; {rounds} rounds; "
        f"shard files identical: {same}")
  med = {k: statistics.median(v) for k, v in times.items()}
  for k in ("pool", "beam"):
    print(f"  {k:4s}: median {med[k]:.1f}s (runs {', '.join(f'{t:.1f}' for t in times[k])})  "
          f"{n / med[k] / workers:.2f} records/s per core  {secs / med[k] / workers:.2f} audio-s/s per core")
  print(f"beam / pool: {med['pool'] / med['beam']:.2f}x records/s and audio-s/s (same work, same run)")


def _clips(d: str, n: int, fmt: str, seconds: float = 10.0) -> str:
  rng = np.random.default_rng(0)
  rows = []
  os.makedirs(d, exist_ok=True)
  for i in range(n):
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.shape)
    name = f"c{i}.{fmt}"
    sf.write(os.path.join(d, name), x.astype(np.float32), 16000,
             **(dict(format="OGG", subtype="OPUS") if fmt == "opus" else dict(subtype="PCM_16")))
    rows.append({"audio": name, "rich_caption": "A tone over noise.", "direction": "und,gen",
                 "category": "sound", "dataset": "bench"})
  m = os.path.join(d, "m.jsonl")
  with open(m, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return m


def kinds(root: str, n: int, device: str, batch_sizes: list[int], fmt: str) -> None:
  from transformers import XcodecConfig, XcodecModel  # pylint: disable=g-import-not-at-top  (optional peer)
  m = _clips(os.path.join(root, f"clips_{fmt}"), n, fmt)
  items, _ = manifest_lib.read_manifests([m])
  und = [it for it in items if it.task == "audio_to_text"]
  gen = [it for it in items if it.task == "text_to_audio"]
  tok = tokenizer_train.train_sentencepiece(["A tone over noise."] * 4, os.path.join(root, "spm"), 300)
  full = os.path.join(root, "xcodec_full")
  if not os.path.isfile(os.path.join(full, "config.json")):
    model = XcodecModel(XcodecConfig())  # random weights, the real architecture
    model.save_pretrained(full)
    del model
  secs = n * 10.0
  with threadpoolctl.threadpool_limits(1):
    b = build.Builder(build.BuildSettings(tokenizer=tok))
    b.build(und[0])  # warm-up (mel filters)
    t0 = time.perf_counter()
    res = b.build_many(und)
    dt = time.perf_counter() - t0
    assert all(r.error is None for r in res), [r.error for r in res]
    print(f"mel (understanding records): {secs / dt:.1f} audio-s/s per core ({n} x 10 s {fmt} clips, "
          f"{dt / n * 1e3:.0f} ms per clip)")
    for bs in batch_sizes:
      b = build.Builder(build.BuildSettings(tokenizer=tok, codec=f"xcodec:{full}"), codec_device=device,
                        codec_batch_size=bs)
      b.build(gen[0])  # warm-up
      t0 = time.perf_counter()
      res = b.build_many(gen)
      if device == "cuda":
        import torch  # pylint: disable=g-import-not-at-top  (optional peer)
        torch.cuda.synchronize()
      dt = time.perf_counter() - t0
      assert all(r.error is None for r in res), [r.error for r in res]
      where = "per core" if device == "cpu" else "per GPU (1 CPU thread feeding it)"
      print(f"codec (generation records), full-size X-Codec on {device}, batch {bs}: {secs / dt:.2f} "
            f"audio-s/s {where} ({dt / n * 1e3:.0f} ms per 10 s clip)")


def main(argv):
  del argv
  backends.skip_tpu_probe_without_tpu()
  root = paths.resolve(_DATA_DIR.value) or tempfile.mkdtemp(prefix="bagpiper_write_bench_")
  os.makedirs(root, exist_ok=True)
  print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} data={root}")
  if _PART.value in ("all", "engines"):
    engines(root, _WORKERS.value, _ROUNDS.value)
  if _PART.value in ("all", "kinds"):
    kinds(root, _CLIPS.value, _CODEC_DEVICE.value, [int(b) for b in _BATCHES.value], _FORMAT.value)


if __name__ == "__main__":
  app.run(main)
