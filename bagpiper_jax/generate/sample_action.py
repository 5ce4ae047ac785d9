"""The training loop's samples: every `config.sample_every_steps`, the model at that step captions a
few held-out clips and renders a few held-out captions.

Held-out examples are the first `config.sample.num` audio_to_text and text_to_audio records of
config.data.eval_sources (sorted source names, record order: the same examples at every step).
Their prompts are the records templated and cut at the first assistant message
(template.template_prompt), decoded with the reference's settings (engine.DecodeSettings defaults,
lengths capped by config.sample.max_*_steps), on the training mesh with the training parameters.

Written by process 0: TensorBoard text (reference vs generated caption) and audio (generated and
reference clip, when config.sample.codec names an X-Codec directory), and
<workdir>/samples/step_<N>/samples.jsonl + gen_<i>.wav / ref_<i>.wav.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import logging

from bagpiper_jax import metrics as metrics_lib
from bagpiper_jax import tokenizer as tokenizer_lib
from bagpiper_jax.periodic import PeriodicAction
from bagpiper_jax.data import input_pipeline, records, template
from bagpiper_jax.generate import engine, outputs

DIRECTIONS = {"audio_to_text": "caption", "text_to_audio": "audio"}


def heldout_records(config, num: int) -> list[dict]:
  """The first `num` records of each direction in config.data.eval_sources (decoded)."""
  want = {task: num for task in DIRECTIONS}
  out = []
  for name in sorted(config.data.eval_sources or {}):
    spec = config.data.eval_sources[name]
    path = spec if isinstance(spec, str) else spec["path"]
    src = input_pipeline.ShardSource(name, input_pipeline.shard_paths(name, path))
    for i in range(len(src)):
      if not any(want.values()):
        return out
      data, key = src[i]
      rec = records.decode(data, where=src.describe(key))
      if want.get(rec["task"], 0) > 0:
        want[rec["task"]] -= 1
        out.append(rec)
  return out


class SampleAction(PeriodicAction):
  """Captions for held-out clips and clips for held-out captions (module docstring)."""

  def __init__(self, config, setup, writer: metrics_lib.MetricsWriter, workdir: str):
    on = int(config.sample_every_steps) > 0 and bool(config.data.eval_sources) and not config.data.synthetic
    super().__init__(int(config.sample_every_steps) if on else 0)
    self.config, self.setup, self.writer, self.workdir = config, setup, writer, workdir
    self.gen = None
    self.items: list[dict] = []
    self.tokenizer = None
    self.wavs = None

  def _prepare(self, params) -> None:
    c, cfg = self.config.sample, self.setup.cfg
    recs = heldout_records(self.config, int(c.num))
    if not recs:
      logging.warning("samples: no audio_to_text / text_to_audio records in config.data.eval_sources")
    for rec in recs:
      arrays, enforce = template.template_prompt(rec, cfg, where=f"eval record {rec['id']!r}")
      ref = next(m for m in rec["messages"] if m["role"] == "assistant")
      user = next(m for m in rec["messages"] if m["role"] != "assistant")
      self.items.append({"id": rec["id"], "direction": DIRECTIONS[rec["task"]],
                         "prompt": engine.Prompt.from_template(arrays, enforce),
                         "reference": ref.get("text_ids", ref.get("codes")), "input": user.get("text_ids")})
    if c.tokenizer:
      self.tokenizer = tokenizer_lib.load_tokenizer(c.tokenizer)
    if c.codec:
      self.wavs = outputs.WavWriter(c.codec)
    st = engine.DecodeSettings(
        text=dataclasses.replace(engine.TEXT_DEFAULTS, max_steps=int(c.max_text_steps)),
        audio=dataclasses.replace(engine.AUDIO_DEFAULTS, max_steps=int(c.max_audio_steps),
                                  min_steps=min(engine.AUDIO_DEFAULTS.min_steps, int(c.max_audio_steps) - 8)))
    self.gen = engine.Generator(cfg, params, settings=st, mesh=self.setup.mesh,
                                max_batch=max(1, len(self.items)),
                                max_cache_len=min(int(c.max_cache_len), cfg.max_position_embeddings))

  def _text(self, ids) -> str:
    return outputs.decode_text(self.tokenizer, ids)[0]

  def _waveform(self, codes):
    if self.wavs is None or codes is None or len(codes) == 0:
      return None
    try:
      return self.wavs.waveform(np.asarray(codes))
    except Exception as e:  # pylint: disable=broad-except  (no torch, a bad codec dir: say it once, go on)
      logging.warning("samples: X-Codec %s cannot decode (%s: %s); writing codes only", self.wavs.codec_dir,
                      type(e).__name__, e)
      self.wavs = None
      return None

  def run(self, step: int, state) -> dict:
    t0 = time.perf_counter()
    if self.gen is None:
      self._prepare(state.params)
    if not self.items:
      return {}
    outs = self.gen.generate([it["prompt"] for it in self.items], params=state.params)
    if jax.process_index() != 0:
      return {}
    out_dir = os.path.join(self.workdir, "samples", f"step_{step}")
    os.makedirs(out_dir, exist_ok=True)
    tb = self.writer.tb
    lines = []
    for i, (it, out) in enumerate(zip(self.items, outs)):
      ans = outputs.interpret(out, self.setup.cfg, self.tokenizer)
      rec = {"id": it["id"], "direction": it["direction"],
             "segments": ans.segments}
      if it["direction"] == "caption":
        rec.update(reference=self._text(it["reference"]), generated=ans.text)
        if tb is not None:
          tb.add_text(f"samples/caption_{i}", f"**{it['id']}**\n\nreference: {rec['reference']}\n\n"
                      f"generated: {rec['generated']}", step)
      else:
        rec.update(caption=self._text(it["input"]), frames=0 if ans.codes is None else int(len(ans.codes)))
        for tag, codes in (("gen", ans.codes), ("ref", it["reference"])):
          wav = self._waveform(codes)
          if wav is None:
            continue
          path = os.path.join(out_dir, f"{tag}_{i}.wav")
          outputs.write_wav(path, wav)
          rec[f"{tag}_wav"] = path
          if tb is not None:
            tb.add_audio(f"samples/{tag}_audio_{i}", np.clip(wav, -1.0, 1.0), step, sample_rate=16000)
        if ans.codes is not None and "gen_wav" not in rec:
          np.save(os.path.join(out_dir, f"gen_{i}.codes.npy"), ans.codes)
        if tb is not None:
          tb.add_text(f"samples/audio_{i}", f"**{it['id']}**\n\ncaption: {rec['caption']}\n\n"
                      f"{rec['frames']} frames generated", step)
      lines.append(rec)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
      for r in lines:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if tb is not None:
      tb.flush()
    took = time.perf_counter() - t0
    n_cap = sum(r["direction"] == "caption" for r in lines)
    print(f"samples step {step}: {n_cap} captions, {len(lines) - n_cap} clips in {took:.1f} s -> {out_dir}",
          flush=True)
    for r in lines:
      if r["direction"] == "caption":
        print(f"  {r['id']}: {r['generated'][:160]!r}", flush=True)
    return {"sample_time_s": took}
