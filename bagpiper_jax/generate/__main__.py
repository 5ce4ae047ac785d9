r"""Command line of generation.

  python -m bagpiper_jax.generate --ckpt=workdirs/tiny --audio=clip.wav                 # caption it
  python -m bagpiper_jax.generate --ckpt=<release dir> --audio=clip.wav --prompt="How many clicks?"
  python -m bagpiper_jax.generate --ckpt=workdirs/tiny --caption="A loud 440 Hz sine tone." --out=out.wav
  python -m bagpiper_jax.generate --ckpt=<sft run> --prompt="Rain on a tin roof" --out=rain.wav
  python -m bagpiper_jax.generate --ckpt=... --requests=requests.jsonl --out_dir=results/

`--ckpt` is a workdir, a checkpoints/ folder, a step folder, a params directory or a release
directory (loading.py). Requests (requests.py): `--audio` alone captions (pretraining audio ->
caption), `--audio --prompt` asks about the audio (SFT understanding), `--caption` renders a rich
caption as audio (pretraining caption -> audio), `--prompt` alone is SFT generation (the model
thinks, writes the caption, then the audio). A requests file holds one JSON object per line with
the same fields (id, task, audio, prompt, caption, system, messages, enforce, seed, out); the batch
writes <out_dir>/results.jsonl (one line per request, failures with their reason) and
<out_dir>/<id>.wav.

Decoding defaults are the reference's inference settings (text: temperature 0.6, top-k 20, at most
2,048 rows; audio: temperature 0.8, top-k 20, CFG 3.0, at most 2,048 rows, <|eos|> from row 50);
docs/generation.md lists every flag and where we deliberately differ.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh
from ml_collections import config_flags

from bagpiper_jax import backends, paths, sharding
from bagpiper_jax import tokenizer as tokenizer_lib
from bagpiper_jax.generate import engine, loading, outputs, requests as req_lib
from bagpiper_jax.model import ModelConfig

_CKPT = flags.DEFINE_string("ckpt", None, "Workdir, checkpoint, params dir or release dir.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional model config the checkpoint must match.")
_AUDIO = flags.DEFINE_string("audio", None, "Input audio (WAV/FLAC/OGG; resampled to 16 kHz, downmixed).")
_PROMPT = flags.DEFINE_string("prompt", None, "A question about --audio, or a generation request.")
_CAPTION = flags.DEFINE_string("caption", None, "A rich caption to render as audio.")
_SYSTEM = flags.DEFINE_string("system", None, "System prompt for SFT tasks (default: the reference's).")
_TASK = flags.DEFINE_enum("task", "", ["", *req_lib.TASKS], "Override the task inferred from the inputs.")
_OUT = flags.DEFINE_string("out", None, "WAV path for generated audio (default ./generated.wav).")
_REQUESTS = flags.DEFINE_string("requests", None, "JSONL file of requests (batch mode).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Batch mode: where results.jsonl and WAVs go.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer file (default: the run's / release's).")
_CODEC = flags.DEFINE_string("codec", None, "Local X-Codec directory for WAV output (default: the run's).")
_SEED = flags.DEFINE_integer("seed", 42, "Sampling seed of a single request (the reference uses 42).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Requests decoded together.")
_CACHE = flags.DEFINE_integer("max_cache_len", 8192, "KV-cache rows per request (prompt + decoded rows).")
_WINDOWS = flags.DEFINE_integer("max_audio_windows", 0, "Encoder windows (8 s each) an input may use; "
                                "0 = the run's data.max_audio_windows, else 32.")
_AUDIO_END = flags.DEFINE_enum("audio_end", "complete", list(engine.AUDIO_ENDS),
                               "How an audio segment ends (docs/generation.md#audio-segment-end).")
_EXTRA = flags.DEFINE_integer("extra_segments", 0,
                              "Free-modality segments after the enforced ones (after <|eot|>).")
for _mode, _d in (("text", engine.TEXT_DEFAULTS), ("audio", engine.AUDIO_DEFAULTS)):
  flags.DEFINE_float(f"{_mode}_temperature", _d.temperature, f"{_mode}: sampling temperature (0 = greedy).")
  flags.DEFINE_integer(f"{_mode}_top_k", _d.top_k, f"{_mode}: top-k (0 = all).")
  flags.DEFINE_float(f"{_mode}_top_p", _d.top_p, f"{_mode}: top-p (1.0 = off, the reference).")
  flags.DEFINE_float(f"{_mode}_cfg", _d.cfg, f"{_mode}: classifier-free guidance scale (1.0 = off).")
  flags.DEFINE_integer(f"{_mode}_min_steps", _d.min_steps,
                       f"{_mode}: rows before <|eos|>/<|eot|> are allowed.")
  flags.DEFINE_integer(f"{_mode}_max_steps", _d.max_steps, f"{_mode}: most rows of a segment.")

FLAGS = flags.FLAGS
DEFAULT_AUDIO_WINDOWS = 32  # the 8B config's data.max_audio_windows (256 s)


def settings_from_flags() -> engine.DecodeSettings:
  seg = lambda m: engine.SegmentSettings(
      temperature=FLAGS[f"{m}_temperature"].value, top_k=FLAGS[f"{m}_top_k"].value,
      top_p=FLAGS[f"{m}_top_p"].value, cfg=FLAGS[f"{m}_cfg"].value, min_steps=FLAGS[f"{m}_min_steps"].value,
      max_steps=FLAGS[f"{m}_max_steps"].value)
  return engine.DecodeSettings(text=seg("text"), audio=seg("audio"), audio_end=_AUDIO_END.value,
                               extra_segments=_EXTRA.value)


def decode_mesh() -> Mesh:
  """All local devices on the `tensor` axis: weights and the KV cache split by heads, no all-gathers."""
  devs = np.asarray(jax.devices())
  return Mesh(devs.reshape(1, 1, devs.size, 1), sharding.MESH_AXES)


def _safe_name(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:100] or "request"


class Session:
  """Loaded model + builder + writer, shared by single and batch mode."""

  def __init__(self):
    ckpt = paths.resolve(_CKPT.value)
    expect = ModelConfig.from_dict(_CONFIG.value.model) if _CONFIG.value is not None else None
    mesh = decode_mesh()
    self.loaded = loading.load(ckpt, mesh, expect=expect)
    cfg = self.loaded.cfg
    print(f"model: {self.loaded.describe} (hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab "
          f"{cfg.vocab_size}, {cfg.dtype}) on {mesh.size} {jax.devices()[0].platform} device(s)", flush=True)
    tok_path = paths.resolve(_TOKENIZER.value) or self.loaded.tokenizer
    self.tokenizer = tokenizer_lib.load_tokenizer(tok_path) if tok_path else None
    if self.tokenizer is None:
      print("note: no tokenizer (--tokenizer): text inputs are refused and text outputs printed as ids",
            flush=True)
    codec = paths.resolve(_CODEC.value) or self.loaded.codec
    self.writer = outputs.WavWriter(codec) if codec else None
    run = self.loaded.run_config or {}
    windows = _WINDOWS.value or int(run.get("data", {}).get("max_audio_windows", 0) or DEFAULT_AUDIO_WINDOWS)
    self.builder = req_lib.PromptBuilder(cfg, self.tokenizer, max_audio_windows=windows)
    self.gen = engine.Generator(cfg, self.loaded.params, settings=settings_from_flags(), mesh=mesh,
                                max_cache_len=_CACHE.value, max_batch=_BATCH.value)

  def finish(self, req: req_lib.Request, out: engine.Output, wav_path: str) -> dict:
    ans = outputs.interpret(out, self.loaded.cfg, self.tokenizer)
    res = {"id": req.id, "text": ans.text, "thinking": ans.thinking, "answer": ans.answer,
           "segments": ans.segments, "audio": None, "frames": 0, "seconds": 0.0, "notes": [], "error": None}
    if ans.unknown_ids:
      res["notes"].append(f"{ans.unknown_ids} text ids beyond the tokenizer's vocabulary were dropped")
    if ans.invalid_cells:
      res["notes"].append(f"{ans.invalid_cells} codec cells were pads inside frames (decoded as code 0)")
    if ans.codes is not None:
      res["frames"] = int(ans.codes.shape[0])
      if self.writer is None:
        npy = os.path.splitext(wav_path)[0] + ".codes.npy"
        np.save(npy, ans.codes)
        res["audio"] = npy
        res["notes"].append(f"no --codec: wrote the codes [T, 8] to {npy} instead of a WAV")
      else:
        res["seconds"] = self.writer.write(ans.codes, wav_path)
        res["audio"] = wav_path
    elif any(s["modality"] == "audio" for s in ans.segments):
      res["notes"].append("the audio segment has no frames")
    return res


def run_single(sess: Session) -> None:
  req = req_lib.Request(id="request", task=_TASK.value, audio=paths.resolve(_AUDIO.value),
                        prompt=_PROMPT.value, caption=_CAPTION.value, system=_SYSTEM.value, seed=_SEED.value)
  built = sess.builder.build(req)
  for n in built.notes:
    print(f"note: {n}", flush=True)
  t0 = time.perf_counter()
  out = sess.gen.generate([built.prompt])[0]
  wav = paths.resolve(_OUT.value or "generated.wav")
  res = sess.finish(req, out, wav)
  took = time.perf_counter() - t0
  if res["thinking"]:
    print(f"thinking: {res['thinking']}")
  if res["text"]:
    print(res["answer"] if res["thinking"] else res["text"])
  for n in res["notes"]:
    print(f"note: {n}")
  if res["audio"]:
    secs = f" ({res['seconds']:.2f} s)" if res["seconds"] else ""
    print(f"audio: {res['frames']} frames -> {res['audio']}{secs}")
  ends = ", ".join(f"{s['modality']}:{s['end']}({s['rows']} rows)" for s in res["segments"])
  print(f"[{built.task}] segments {ends}; {out.decode_rows} rows decoded in {took:.1f} s", flush=True)


def run_batch(sess: Session) -> None:
  src = paths.resolve(_REQUESTS.value)
  out_dir = paths.resolve(_OUT_DIR.value or os.path.splitext(src)[0] + "_results")
  os.makedirs(out_dir, exist_ok=True)
  results: list[dict] = []
  todo: list[tuple[int, req_lib.Request, req_lib.Built]] = []
  with open(src) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{src}:{i}"
    res = {"id": where, "line": i}
    try:
      req = req_lib.Request.from_json(json.loads(line), where, os.path.dirname(src))
      res["id"] = req.id
      built = sess.builder.build(req)
      sess.gen.check_prompt(built.prompt, f"request {req.id!r}")
      res.update(task=built.task, notes=built.notes)
      todo.append((len(results), req, built))
    except (json.JSONDecodeError, req_lib.RequestError, engine.GenerateError) as e:
      res["error"] = f"{where}: {e}"
    results.append(res)
  failed = sum(1 for r in results if "error" in r)
  print(f"{len(results)} requests in {src}: {len(todo)} to decode, {failed} refused", flush=True)
  t0 = time.perf_counter()
  done = 0
  for lo in range(0, len(todo), sess.gen.max_batch):
    chunk = todo[lo:lo + sess.gen.max_batch]
    try:
      outs = sess.gen.generate([b.prompt for _, _, b in chunk])
    except Exception as e:  # pylint: disable=broad-except  (record the batch's failure, go on)
      logging.exception("batch failed")
      outs = [e] * len(chunk)
    for (idx, req, built), out in zip(chunk, outs):
      if isinstance(out, Exception):
        results[idx]["error"] = f"decoding failed: {type(out).__name__}: {out}"
        continue
      try:
        wav = paths.resolve(req.out) if req.out else os.path.join(out_dir, _safe_name(req.id) + ".wav")
        notes = results[idx].get("notes", [])
        results[idx].update(sess.finish(req, out, wav))
        results[idx]["notes"] = notes + results[idx]["notes"]
      except Exception as e:  # pylint: disable=broad-except  (e.g. the codec refused the codes)
        results[idx]["error"] = f"writing the result failed: {type(e).__name__}: {e}"
    done += len(chunk)
    el = time.perf_counter() - t0
    eta = el / done * (len(todo) - done)
    print(f"[{done}/{len(todo)}] {el:.1f} s, {el / done:.2f} s/request, ETA {eta:.0f} s", flush=True)
  path = os.path.join(out_dir, "results.jsonl")
  with open(path, "w") as f:
    for r in results:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  failed = sum(1 for r in results if r.get("error"))
  print(f"wrote {path}: {len(results) - failed} ok, {failed} failed", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  backends.skip_tpu_probe_without_tpu()
  if not _CKPT.value:
    raise app.UsageError("--ckpt is required")
  try:
    sess = Session()
    if _REQUESTS.value:
      run_batch(sess)
    else:
      run_single(sess)
  except (engine.GenerateError, req_lib.RequestError, paths.CheckpointNotFound, FileNotFoundError) as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
