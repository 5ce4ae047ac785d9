r"""Evaluation: held-out loss per source, caption attribute accuracy, the caption -> audio -> caption cycle.

  python -m bagpiper_jax.evaluate --ckpt=workdirs/tiny                 # all three, on the demo's eval split
  python -m bagpiper_jax.evaluate --ckpt=workdirs/tiny --skip_cycle --report=eval.json

Held-out loss (`evaluate`, `evaluate_sources`; also the train loop's EvalAction): every eval source
is read from its start by a fresh iterator (deterministic, comparable across steps, never touching
the training iterator), `config.eval_steps` batches each; losses are averaged over batches weighted
by their number of target positions (as if the source were one batch; an all-padding batch adds
nothing), per source and overall (the sums over all sources).

Caption attribute accuracy (`caption_scores`): the model captions held-out clips (pretraining
audio -> text, greedy); each caption is read back into the attributes the demo's true captions
state (sound kind, level, waveform, note, chord quality, pitch direction, noise colour, ...) by the
rules the demo ships in manifests/attributes.json, and compared with the clip's true attributes
(its manifest row). Chance is the accuracy of the best audio-blind constant answer: the majority
value of each attribute in the TRAIN manifest, scored on the same eval clips. `z` is the gap over
chance in binomial standard errors of chance.

Cycle score (`cycle_scores`, the paper's caption -> audio -> caption test): the model renders each
held-out caption as audio (the reference's audio settings, CFG 3), X-Codec decodes it, the model
captions that waveform, and the new caption's attributes are scored against the original clip's.
With the demo's tiny random X-Codec the codes carry no sound, so this measures the machinery only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import ml_collections
import numpy as np
from absl import app, flags

from bagpiper_jax import audio as audio_lib
from bagpiper_jax import backends, paths, sharding, trainer
from bagpiper_jax import tokenizer as tokenizer_lib
from bagpiper_jax.convert import params_io
from bagpiper_jax.data import input_pipeline, template
from bagpiper_jax.generate import engine, outputs, requests

# ---------------------------------------------------------------------------------------------
# Held-out loss.


def evaluate(setup, params, make_iterator: Callable[[], Iterator], num_steps: int) -> dict[str, float]:
  """Runs `num_steps` eval batches; returns {'loss', 'text_loss', 'audio_loss', 'stream_loss', ...}."""
  it = make_iterator()
  total = None
  t0 = time.perf_counter()
  steps = 0
  for _ in range(int(num_steps)):
    try:
      host = next(it)
    except StopIteration:
      break
    batch = setup.host_to_device_eval(host)
    out = setup.eval_step(params, batch)
    total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)  # stays on device
    steps += 1
  if total is None:
    raise ValueError("eval iterator yielded no batch; check config.data.eval_sources")
  total = jax.device_get(total)
  n = max(float(total["num_target_tokens"]), 1.0)
  res = {k: np.asarray(v) / n for k, v in total.items() if k != "num_target_tokens"}
  res["num_target_tokens"] = float(total["num_target_tokens"])
  res["eval_steps"] = steps
  res["eval_time_s"] = time.perf_counter() - t0
  return res


def evaluate_sources(setup, params, factories, num_steps: int) -> dict[str, Any]:
  """`evaluate` for each {source: iterator factory} (a lone factory counts as one source, 'eval').

  Returns the overall metrics (sums over every source's target positions) plus 'sources':
  {name: that source's metrics}.
  """
  if callable(factories):
    factories = {"eval": factories}
  per = {name: evaluate(setup, params, f, num_steps) for name, f in factories.items()}
  n = sum(r["num_target_tokens"] for r in per.values())
  out: dict[str, Any] = {}
  for k in ("loss", "text_loss", "audio_loss", "stream_loss"):
    out[k] = sum(np.asarray(r[k]) * r["num_target_tokens"] for r in per.values()) / max(n, 1.0)
  out["num_target_tokens"] = n
  out["eval_steps"] = sum(r["eval_steps"] for r in per.values())
  out["eval_time_s"] = sum(r["eval_time_s"] for r in per.values())
  out["sources"] = per
  return out


# ---------------------------------------------------------------------------------------------
# Caption attributes (the demo's manifests/attributes.json).


def read_attributes(caption: str, spec: Mapping[str, Any]) -> dict[str, Optional[str]]:
  """The value of every attribute of `spec` that `caption` states (None when it states none)."""
  out = {}
  for name, rule in spec["attributes"].items():
    if "capture" in rule:
      m = re.search(rule["capture"], caption, re.IGNORECASE)
      out[name] = m.group(1) if m else None
    else:
      out[name] = next((v for v in rule["order"] if re.search(rule["values"][v], caption, re.IGNORECASE)),
                       None)
  return out


def majority(rows: list[Mapping[str, Any]]) -> dict[str, str]:
  """Most common value of each attribute over manifest rows (ties: the smallest value)."""
  counts: dict[str, dict[str, int]] = {}
  for r in rows:
    for k, v in r.get("attributes", {}).items():
      counts.setdefault(k, {}).setdefault(v, 0)
      counts[k][v] += 1
  return {k: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for k, c in counts.items()}


def score_captions(truth: list[Mapping[str, str]], captions: list[str], spec: Mapping[str, Any],
                   prior: Mapping[str, str]) -> dict[str, Any]:
  """Accuracy of `captions` on the attributes in `truth` (one dict per clip), next to chance."""
  per: dict[str, dict[str, float]] = {}
  for attrs, cap in zip(truth, captions):
    got = read_attributes(cap, spec)
    for k, v in attrs.items():
      if k not in spec["attributes"]:
        continue
      a = per.setdefault(k, {"n": 0, "correct": 0, "chance_correct": 0, "unstated": 0})
      a["n"] += 1
      a["correct"] += int(got[k] == v)
      a["chance_correct"] += int(prior.get(k) == v)
      a["unstated"] += int(got[k] is None)
  for a in per.values():
    a["accuracy"], a["chance"] = a["correct"] / a["n"], a["chance_correct"] / a["n"]
  n = sum(a["n"] for a in per.values())
  acc = sum(a["correct"] for a in per.values()) / max(n, 1)
  chance = sum(a["chance_correct"] for a in per.values()) / max(n, 1)
  sd = math.sqrt(max(chance * (1 - chance), 1e-12) / max(n, 1))
  return {"items": n, "clips": len(captions), "accuracy": acc, "chance": chance, "z": (acc - chance) / sd,
          "attributes": per}


@dataclasses.dataclass
class DemoEvalSet:
  rows: list[dict]  # eval manifest rows that carry attributes (audio paths absolute)
  train_rows: list[dict]
  spec: dict

  @classmethod
  def load(cls, demo_dir: str, split: str = "eval") -> "DemoEvalSet":
    """The demo's clips of `split` (eval: held out; train: what the model saw, a memorisation check)."""
    man = os.path.join(demo_dir, "manifests")
    spec_path = os.path.join(man, "attributes.json")
    if not os.path.isfile(spec_path):
      raise FileNotFoundError(f"{spec_path} not found: the demo data predate attributes (regenerate them: "
                              "delete the demo directory and run the training command again)")
    with open(spec_path) as f:
      spec = json.load(f)
    def read(split):
      with open(os.path.join(man, f"pretrain.{split}.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]
    rows = [dict(r, audio=os.path.normpath(os.path.join(man, r["audio"])))
            for r in read(split) if "attributes" in r]
    return cls(rows, read("train"), spec)


# ---------------------------------------------------------------------------------------------
# Generation-based scores.


def caption_prompt(cfg, wav: np.ndarray):
  """The pretraining caption prompt of a 16 kHz waveform (template.TASKS['audio_to_text'])."""
  msgs, enforce = template.task_prompt("audio_to_text", [{"mel": audio_lib.mel_features(wav)}])
  arrays, _ = template.template_prompt({"messages": msgs}, cfg)
  return engine.Prompt.from_template(arrays, enforce)


def caption_texts(gen, cfg, tokenizer, wavs: list[np.ndarray], params=None) -> list[str]:
  outs = gen.generate([caption_prompt(cfg, w) for w in wavs], params=params)
  return [outputs.interpret(o, cfg, tokenizer).text for o in outs]


def caption_scores(gen, cfg, tokenizer, data: DemoEvalSet, params=None) -> tuple[dict, list[dict]]:
  """Captions for every eval clip, scored. Returns (scores, per-clip records)."""
  wavs = [audio_lib.load_audio(r["audio"], start=r.get("start"), end=r.get("end"))[0] for r in data.rows]
  caps = caption_texts(gen, cfg, tokenizer, wavs, params)
  scores = score_captions([r["attributes"] for r in data.rows], caps, data.spec, majority(data.train_rows))
  recs = [{"id": r["id"], "caption": r["rich_caption"], "generated": c, "read": read_attributes(c, data.spec),
           "attributes": r["attributes"]} for r, c in zip(data.rows, caps)]
  return scores, recs


def cycle_scores(gen, cfg, tokenizer, writer, data: DemoEvalSet, params=None) -> tuple[dict, list[dict]]:
  """caption -> audio (render) -> waveform (X-Codec) -> caption, scored against the clip's attributes."""
  prompts = []
  for r in data.rows:
    msgs, enforce = template.task_prompt("text_to_audio", [{"text_ids": requests.to_unified(
        tokenizer.encode(r["rich_caption"]))}])
    arrays, _ = template.template_prompt({"messages": msgs}, cfg)
    prompts.append(engine.Prompt.from_template(arrays, enforce))
  outs = gen.generate(prompts, params=params)
  wavs, recs, keep = [], [], []
  for r, o in zip(data.rows, outs):
    codes = outputs.interpret(o, cfg, tokenizer).codes
    if codes is None or len(codes) < 2:
      recs.append({"id": r["id"], "caption": r["rich_caption"], "frames": 0, "generated": ""})
      continue
    wavs.append(writer.waveform(codes))
    keep.append(len(recs))
    recs.append({"id": r["id"], "caption": r["rich_caption"], "frames": int(len(codes))})
  caps = caption_texts(gen, cfg, tokenizer, wavs, params) if wavs else []
  for i, c in zip(keep, caps):
    recs[i]["generated"] = c
  scores = score_captions([r["attributes"] for r in data.rows], [x.get("generated", "") for x in recs],
                          data.spec, majority(data.train_rows))
  scores["rendered"] = len(wavs)
  return scores, recs


def format_scores(name: str, s: Mapping[str, Any]) -> str:
  lines = [f"{name}: accuracy {s['accuracy']:.3f} vs chance {s['chance']:.3f} (z = {s['z']:+.1f}) over "
           f"{s['items']} attribute statements of {s['clips']} clips"]
  for k, a in sorted(s["attributes"].items()):
    lines.append(f"  {k:16s} n={a['n']:3d}  accuracy {a['accuracy']:.3f}  chance {a['chance']:.3f}  "
                 f"unstated {a['unstated']}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
  """Flags exist only when this file runs as the program (train_loop imports this module)."""
  flags.DEFINE_string("ckpt", None, "Workdir (or checkpoints/ or a step folder) of a train.py run.")
  flags.DEFINE_string("demo_dir", None, "Demo data directory (default: the run's data.demo_dir).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer file (default: the run's sample.tokenizer).")
  flags.DEFINE_string("codec", None, "X-Codec directory for the cycle (default: the run's sample.codec).")
  flags.DEFINE_bool("skip_loss", False, "Skip the per-source eval loss.")
  flags.DEFINE_bool("skip_captions", False, "Skip the caption attribute accuracy.")
  flags.DEFINE_bool("skip_cycle", False, "Skip the caption -> audio -> caption cycle.")
  flags.DEFINE_integer("max_clips", 0, "Score at most this many eval clips (0 = all).")
  flags.DEFINE_enum("split", "eval", ["eval", "train"], "Demo clips to score (train: a memorisation check).")
  flags.DEFINE_integer("text_max_steps", 256, "Caption length limit (rows).")
  flags.DEFINE_integer("audio_max_steps", 400, "Rendered audio limit (rows; 50 rows = 1 s).")
  flags.DEFINE_string("report", None, "Write the scores and every caption as JSON here.")


def main(argv):
  F = flags.FLAGS
  del argv
  backends.skip_tpu_probe_without_tpu()
  if not F.ckpt:
    raise SystemExit("--ckpt is required")
  try:
    ref = paths.find_checkpoint(paths.resolve(F.ckpt))
  except paths.CheckpointNotFound as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(1)
  meta = os.path.join(ref.step_dir, "config", "metadata")
  if not os.path.isfile(meta):
    print(f"ERROR: {ref.describe()} has no run config (config item): evaluate needs a train.py checkpoint",
          file=sys.stderr)
    sys.exit(1)
  with open(meta) as f:
    config = ml_collections.ConfigDict(json.load(f))
  print(f"checkpoint {ref.describe()}", flush=True)
  setup = trainer.Setup(config, sharding.make_mesh(config))
  params = params_io.load_params(ref.step_dir, setup.layout.abstract_state.params)
  report: dict[str, Any] = {"checkpoint": ref.step_dir, "step": ref.step}

  if not F.skip_loss and config.data.eval_sources:
    where = dict(rows=setup.host_rows, process_index=jax.process_index(), process_count=jax.process_count())
    factories = {name: (lambda one={name: config.data.eval_sources[name]}: input_pipeline.make_eval_iterator(
        config, setup.cfg, num_batches=int(config.eval_steps), sources=one, **where))
                 for name in sorted(config.data.eval_sources)}
    ev = evaluate_sources(setup, params, factories, int(config.eval_steps))
    report["loss"] = {"overall": float(ev["loss"]),
                      "sources": {k: float(r["loss"]) for k, r in ev["sources"].items()}}
    print(f"eval loss {float(ev['loss']):.4f} (text {float(ev['text_loss']):.3f}, audio "
          f"{float(ev['audio_loss']):.3f}); per source: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["loss"]["sources"].items()), flush=True)

  if not (F.skip_captions and F.skip_cycle):
    demo_dir = paths.resolve(F.demo_dir) or config.data.get("demo_dir") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(ref.step_dir))), "demo_data")
    data = DemoEvalSet.load(demo_dir, F.split)
    if F.max_clips:
      data.rows = data.rows[:F.max_clips]
    tok_path = paths.resolve(F.tokenizer) or config.sample.get("tokenizer")
    if not tok_path:
      raise SystemExit("no tokenizer: pass --tokenizer (the run's config has no sample.tokenizer)")
    tok = tokenizer_lib.load_tokenizer(tok_path)
    st = engine.DecodeSettings(
        text=dataclasses.replace(engine.TEXT_DEFAULTS, temperature=0.0, max_steps=F.text_max_steps),
        audio=dataclasses.replace(engine.AUDIO_DEFAULTS, max_steps=F.audio_max_steps))
    gen = engine.Generator(setup.cfg, params, settings=st, mesh=setup.mesh, max_batch=8,
                           max_cache_len=min(4096, setup.cfg.max_position_embeddings))
    if not F.skip_captions:
      scores, recs = caption_scores(gen, setup.cfg, tok, data)
      report["captions"] = {"scores": scores, "clips": recs}
      print(format_scores("caption attributes (greedy)", scores), flush=True)
      for r in recs[:3]:
        print(f"  e.g. {r['id']}: {r['generated']!r}\n        true: {r['caption']!r}")
    if not F.skip_cycle:
      codec = paths.resolve(F.codec) or config.sample.get("codec")
      if not codec:
        raise SystemExit("no codec: pass --codec (the run's config has no sample.codec)")
      scores, recs = cycle_scores(gen, setup.cfg, tok, outputs.WavWriter(codec), data)
      report["cycle"] = {"scores": scores, "clips": recs}
      print(format_scores(f"cycle caption -> audio -> caption ({scores['rendered']} rendered)", scores),
            flush=True)
  if F.report:
    with open(paths.resolve(F.report), "w") as f:
      json.dump(report, f, indent=1, default=float)
    print(f"report: {F.report}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
