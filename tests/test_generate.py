"""Generation (bagpiper_jax/generate) against executable references.

  * greedy text from an exported tiny release == transformers Qwen3ForCausalLM.generate, token for
    token, on a left-padded batch of two text-only prompts (issue 11 test b);
  * the jitted KV-cache loop == a literal re-implementation of the reference's `inference()`
    (ESPnet parallel.py: full forwards, no cache, the all-pad CFG context built by concatenation),
    greedy, CFG 3, text then audio segments, a batch with a continuous-audio prompt;
  * cfg = 1 through the unconditional branch == plain conditional decoding (test d);
  * sampled rows never leave their stream's interval; "complete" audio ends de-interleave with no
    invalid cell (test e); a request's draws do not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from bagpiper_jax.convert import params_io, release, safetensors_io
from bagpiper_jax.data import template
from bagpiper_jax.generate import engine, loading, sampling
from bagpiper_jax.model import Bagpiper
from bagpiper_jax.model import config as mc
from conftest import hf_qwen3, tiny_model_config, xla_flags
from test_decode_cache import random_params


@pytest.fixture(scope="module")
def model():
  cfg = tiny_model_config()
  return cfg, random_params(cfg, seed=3)


def text_prompt(cfg, n, seed):
  ids = np.random.default_rng(seed).integers(cfg.num_specials, cfg.codec_start, n)
  arrays, _ = template.template_prompt({"messages": template.task_messages(
      "text_to_audio", [{"text_ids": ids}, {"codes": np.zeros((1, 8), np.int16)}])}, cfg)
  return arrays


def audio_prompt(cfg, frames, seed):
  mel = np.random.default_rng(seed).normal(size=(cfg.audio_encoder.num_mel_bins, frames)).astype(np.float32)
  arrays, _ = template.template_prompt({"messages": template.task_messages(
      "audio_to_text", [{"mel": mel}, {"text_ids": np.array([300])}])}, cfg)
  return arrays


def settings(**kw):
  text = dict(temperature=0.0, top_k=20, max_steps=6, min_steps=1)
  audio = dict(temperature=0.0, top_k=20, max_steps=14, min_steps=3, cfg=3.0)
  text.update(kw.pop("text", {}))
  audio.update(kw.pop("audio", {}))
  return engine.DecodeSettings(text=engine.SegmentSettings(**text), audio=engine.SegmentSettings(**audio),
                               **kw)


# ---------------------------------------------------------------------------------------------
# (b) transformers generate on the exported checkpoint.


def test_greedy_text_equals_transformers_generate_on_exported_release(model, tmp_path):
  cfg, params = model
  ckpt = params_io.save_params(str(tmp_path / "ckpt"), jax.device_get(params), cfg)
  rel = str(tmp_path / "release")
  release.export_release(os.path.dirname(ckpt), rel, dtype="float32", with_codec=False, with_tokenizer=False)
  loaded = loading.load(rel, engine.Generator(cfg, params).mesh)
  assert loaded.kind == "release" and loaded.cfg == cfg
  steps = 12
  gen = engine.Generator(cfg, loaded.params, settings=settings(text=dict(max_steps=steps)), max_cache_len=256)
  prompts = [text_prompt(cfg, 5, 1), text_prompt(cfg, 11, 2)]
  outs = gen.generate([engine.Prompt.from_template(a, ("text",)) for a in prompts])

  hf = hf_qwen3(cfg)
  src = safetensors_io.SafetensorsReader(rel)
  sd = {k: torch.from_numpy(np.asarray(src.get(k), np.float32)) for k in hf.state_dict()}
  hf.load_state_dict(sd, strict=True)
  rows = [list(a["input_ids"][:, 0]) + [mc.ASSISTANT, mc.TEXT] for a in prompts]
  width = max(map(len, rows))
  ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
  mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
  allowed = set(range(cfg.num_specials, cfg.codec_start)) | {mc.EOS, mc.EOT}
  with torch.no_grad():
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=steps, min_new_tokens=1,
                      eos_token_id=[mc.EOS, mc.EOT], pad_token_id=0,
                      suppress_tokens=[i for i in range(cfg.vocab_size) if i not in allowed])
  for i, out in enumerate(outs):
    seg = out.segments[0]
    ours = list(seg.rows[:, 0]) + ([seg.closer] if seg.closer is not None else [])
    theirs = [int(t) for t in ref[i, width:]]
    theirs = theirs[:next((j + 1 for j, t in enumerate(theirs) if t in (mc.EOS, mc.EOT)), len(theirs))]
    assert ours == theirs, (i, ours, theirs)
    assert len(ours) >= 2 and (seg.rows[:, 1:] == 0).all()


# ---------------------------------------------------------------------------------------------
# The reference's inference() loop, literally, with full forwards.


class ReferenceLoop:
  """ESPnet parallel.py `inference` / `inference_segment` (greedy), one request, no KV cache."""

  def __init__(self, cfg, params, st: engine.DecodeSettings, width=128):
    self.cfg, self.st, self.width = cfg, st, width
    self.masks = sampling.reference_masks(cfg)
    self.fwd = jax.jit(lambda b: Bagpiper(cfg).apply({"params": params}, b, method=Bagpiper.logits))

  def logits(self, rows, audio=None):
    """Logits [S, V] at the last of `rows` (one document, right-padded to a fixed width)."""
    n = len(rows)
    ids = np.zeros((1, self.width, 8), np.int32)
    ids[0, :n] = rows
    b = {"input_ids": ids, "loss_weights": np.zeros(ids.shape, np.float32),
         "segment_ids": (np.arange(self.width) < n).astype(np.int32)[None],
         "positions": np.arange(self.width, dtype=np.int32)[None]}
    if audio is not None:
      ar = np.full((1, self.width), -1, np.int32)
      ar[0, :len(audio["audio_rows"])] = audio["audio_rows"]
      b.update(audio_mel=audio["audio_mel"][None].astype(np.float32),
               audio_chunk_lens=audio["audio_chunk_lens"][None], audio_rows=ar)
    return np.asarray(self.fwd(b))[0, n - 1]

  def run(self, arrays, enforce):
    audio = arrays if len(arrays["audio_mel"]) else None
    seq = [list(r) for r in arrays["input_ids"]]
    row = lambda i: [i] + [0] * 7
    out, num_msg = [], 0
    while True:
      seq.append(row(mc.ASSISTANT))
      lg = np.where(self.masks["modality"], self.logits(seq, audio), -np.inf)
      # Free choice: the reference's argmax, over <|text|>/<|audio|> only (ours; it crashes on others).
      free = "audio" if lg[0, mc.AUDIO] > lg[0, mc.TEXT] else "text"
      modality = enforce[num_msg] if num_msg < len(enforce) else free
      conf = self.st.text if modality == "text" else self.st.audio
      mask = self.masks[modality]
      uncond = [row(0)] * len(seq) if conf.cfg > 1 else None  # _prepare_cfg_cache: all-pad, same length
      prev = row(mc.TEXT if modality == "text" else mc.AUDIO)
      hyp = []
      for step in range(conf.max_steps):
        seq.append(list(prev))
        this = sampling.open_closers(mask) if step >= conf.min_steps else mask
        lg = self.logits(seq, audio)
        if uncond is not None:
          uncond.append(list(prev))
          lg = lg * conf.cfg + self.logits(uncond) * (1 - conf.cfg)
        lg = np.where(this, lg, -np.inf)
        prev = [int(x) for x in lg.argmax(-1)]
        hyp.append(prev)
        if prev[0] in (mc.EOS, mc.EOT):
          break
      seq.append([prev[0]] + [0] * 7)  # "prefill the last token", streams 1..7 zeroed
      closer = hyp[-1][0] if hyp[-1][0] in (mc.EOS, mc.EOT) else None
      out.append((modality, np.asarray(hyp[:-1] if closer is not None else hyp), closer))
      if hyp[-1][0] != mc.EOT and num_msg >= len(enforce) - 1:
        return out
      num_msg += 1
      if num_msg >= len(enforce) + self.st.extra_segments:  # ours: the reference has no bound
        return out


def test_kv_cache_loop_equals_the_reference_loop_with_cfg(model):
  cfg, params = model
  st = settings(audio_end="reference", extra_segments=2)
  reqs = [(audio_prompt(cfg, 140, 5), ("text", "audio")), (text_prompt(cfg, 9, 6), ("audio",)),
          (text_prompt(cfg, 4, 7), ("text",))]
  gen = engine.Generator(cfg, params, settings=st, max_cache_len=256)
  outs = gen.generate([engine.Prompt.from_template(a, e) for a, e in reqs])
  ref = ReferenceLoop(cfg, params, st)
  for (arrays, enforce), out in zip(reqs, outs):
    want = ref.run(arrays, list(enforce))
    assert [s.modality for s in out.segments] == [m for m, _, _ in want]
    for seg, (_, rows, closer) in zip(out.segments, want):
      np.testing.assert_array_equal(seg.rows, rows)
      assert seg.closer == closer
  assert any(s.modality == "audio" and (s.rows[:, 1:] != 0).any() for o in outs for s in o.segments)


# ---------------------------------------------------------------------------------------------
# (d) cfg = 1, (e) masks, seeds.


def test_cfg_one_through_the_unconditional_branch_equals_conditional(model):
  cfg, params = model
  sampled = dict(text=dict(temperature=0.9, top_k=0),
                 audio=dict(temperature=0.9, top_k=50, cfg=1.0, max_steps=30))
  prompts = [engine.Prompt.from_template(text_prompt(cfg, 6, 8), ("audio",), seed=1),
             engine.Prompt.from_template(audio_prompt(cfg, 90, 9), ("text", "audio"), seed=2)]
  plain = engine.Generator(cfg, params, settings=settings(**sampled), max_cache_len=256)
  branch = engine.Generator(cfg, params, settings=settings(always_cfg_branch=True, **sampled),
                            max_cache_len=256)
  assert not plain._shape(prompts).use_cfg  # pylint: disable=protected-access
  assert branch._shape(prompts).use_cfg  # pylint: disable=protected-access
  ends = lambda o: [(s.modality, s.end, s.closer) for s in o.segments]
  for a, b in zip(plain.generate(prompts), branch.generate(prompts)):
    assert ends(a) == ends(b)
    for x, y in zip(a.segments, b.segments):
      np.testing.assert_array_equal(x.rows, y.rows)


@pytest.mark.parametrize("audio_end", ["complete", "reference"])
def test_sampled_rows_stay_in_their_intervals(model, audio_end):
  cfg, params = model
  st = settings(audio_end=audio_end, text=dict(temperature=1.5, top_k=0, top_p=0.95, max_steps=8),
                audio=dict(temperature=1.5, top_k=0, min_steps=2, max_steps=24, cfg=2.0))
  gen = engine.Generator(cfg, params, settings=st, max_cache_len=256)
  prompts = [engine.Prompt.from_template(text_prompt(cfg, 3 + i, 10 + i), ("text", "audio"), seed=i)
             for i in range(4)]
  blk, s = cfg.codec_block, cfg.num_streams
  lo = np.array([cfg.codec_pad_id(n) for n in range(s)])
  audio_segments = 0
  for out in gen.generate(prompts):
    assert [x.modality for x in out.segments] == ["text", "audio"]
    for seg in out.segments:
      r = seg.rows
      if seg.modality == "text":
        assert ((r[:, 0] >= cfg.num_specials) & (r[:, 0] < cfg.codec_start)).all() and (r[:, 1:] == 0).all()
        continue
      audio_segments += 1
      assert ((r >= lo) & (r < lo + blk)).all(), r  # stream n inside its own 1,025 ids, always
      if audio_end == "complete":
        assert seg.closer in (mc.EOS, mc.EOT)
        t = len(r) - (s - 1)
        for n in range(s):
          assert (r[:n, n] == lo[n]).all() and (r[n + t:, n] == lo[n]).all()  # delay pads exactly
          assert (r[n:n + t, n] != lo[n]).all()  # and codes in between
        codes, invalid = template.deinterleave_rows(r, cfg)
        assert invalid == 0 and codes.shape == (t, s)
        np.testing.assert_array_equal(template.interleave_codes(codes, cfg), r)
  assert audio_segments == 4


def test_a_request_draws_the_same_alone_and_in_a_batch(model):
  cfg, params = model
  st = settings(text=dict(temperature=1.0, top_k=0), audio=dict(temperature=1.0, top_k=0, cfg=1.0))
  gen = engine.Generator(cfg, params, settings=st, max_cache_len=256)
  p = engine.Prompt.from_template(text_prompt(cfg, 7, 20), ("text", "audio"), seed=123)
  others = [engine.Prompt.from_template(text_prompt(cfg, 3, 21), ("audio",), seed=5),
            engine.Prompt.from_template(audio_prompt(cfg, 60, 22), ("text",), seed=6)]
  alone = gen.generate([p])[0]
  batched = gen.generate(others + [p])[2]
  for a, b in zip(alone.segments, batched.segments):
    np.testing.assert_array_equal(a.rows, b.rows)
  again = gen.generate([dataclasses.replace(p, seed=124)])[0]
  assert any(not np.array_equal(a.rows, b.rows) for a, b in zip(alone.segments, again.segments))


SHARDED = r"""
import json, os, sys
import numpy as np, jax
from jax.sharding import Mesh
from bagpiper_jax import sharding
from bagpiper_jax.generate import engine
from conftest import tiny_model_config
from test_decode_cache import random_params
from test_generate import audio_prompt, settings, text_prompt
cfg = tiny_model_config()
params = random_params(cfg, seed=3)
prompts = [engine.Prompt.from_template(audio_prompt(cfg, 140, 5), ("text", "audio")),
           engine.Prompt.from_template(text_prompt(cfg, 9, 6), ("audio",))]
out = {}
for name, shape in (("one", (1, 1, 1, 1)), ("eight", (1, 2, 2, 2))):
  mesh = Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape), sharding.MESH_AXES)
  gen = engine.Generator(cfg, params, settings=settings(), mesh=mesh, max_cache_len=256)
  kernel_sharding = str(gen.params["layers"]["self_attn"]["k_proj"]["kernel"].sharding.spec)
  out[name] = [[s.rows.tolist() for s in o.segments] for o in gen.generate(prompts)] + [kernel_sharding]
print(json.dumps(out))
"""


def test_sharded_decode_equals_single_device(tmp_path):
  """8 CPU devices (fsdp 2 x tensor 2 x sequence 2: weights, batch, KV heads and cache length split by
  the training rules) decode the same greedy rows (CFG 3, text then audio) as one device."""
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
  p = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["one"][:-1] == out["eight"][:-1]
  assert "tensor" in out["eight"][-1] and "fsdp" in out["eight"][-1]
