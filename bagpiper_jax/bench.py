r"""Train-step throughput against a PyTorch peer doing the same work, measured in one run.

  python -m bagpiper_jax.bench                           # CPU: 'small' decoder, 4 x 512 packed tokens
  python -m bagpiper_jax.bench --preset=tiny --steps=5
  python -m bagpiper_jax.bench --generate           # decoding instead (bench_generate, below)
  python -m bagpiper_jax.bench --preset=h100             # one NVIDIA GPU: ~2B decoder, bf16, 4 x 1 x 4096

Both sides train the same Bagpiper step on the same packed batch, starting from the same weights:
  jax     bagpiper_jax's jitted train step (trainer.Setup: loss, grads, clip, AdamW; no audio in the
          batch: decoder, 8-stream I/O and loss)
  torch   `TorchBagpiper`: transformers' Qwen3Model (sdpa attention, a block-diagonal causal mask for
          the packed documents) + lm_head + stream_emb, written as the reference computes it: input =
          sum of the 8 streams' embeddings (id 0 contributes nothing in streams 1..7); outputs
          lm_head(h + stream_emb[n]); stream 0 a full-vocabulary CE, streams 1..7 one softmax over the
          codec range [codec_start, vocab); loss = weighted sum / count of weighted stream-0 positions.
          Like ours it takes lm_head(h) once and adds the [8, V] stream offsets (the same FLOPs).
          AdamW with the same hyper-parameters + grad-norm clipping; fp32 on CPU, bf16 autocast over
          fp32 weights on GPU (as ours: bf16 compute, fp32 params).
  peak    CPU: the best f32 matmul FLOP/s measured here (jax and torch; the larger); GPU: the chip's
          dense bf16 peak (metrics.PEAK_FLOPS).
The first step's loss of both sides is printed: equal weights + equal batch must give the same loss
(the check that the peer does the same work). Then tokens/s, model FLOP/s (metrics.train_flops_per_step,
one FLOPs model for both), the fraction of peak (MFU on GPU) and the ratio jax / torch.

The packed batch (`packed_batch`): every row is full, several documents of 32..L/2 positions, each a
text part (stream 0, weight 1) then a codec part (8 streams, weight 0.125 each), positions restarting
per document. CPU timings on a shared machine are noisy: with both sides in one process their timed
steps alternate (jax, torch, jax, torch, ...) so both see the same load; the median of `--steps` timed
steps is the headline, the best is printed beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bagpiper_jax import backends, config_lib, metrics, profiling, sharding, trainer
from bagpiper_jax.convert import params_io, release, safetensors_io
from bagpiper_jax.convert import rules as rules_lib
from bagpiper_jax.data import template
from bagpiper_jax.generate import engine, loading
from bagpiper_jax.model import ModelConfig
from bagpiper_jax.model import config as mc

PRESETS = {
    # Model sizes, then the step: packed rows of seq_len per micro-batch, micro-batches per optimizer
    # step (accum), compute dtype, attention kernel, loss chunk.
    "tiny": dict(text_vocab_size=1024, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rows=4, seq_len=256, dtype="float32", attention="xla",
                 loss_chunk=256, accum=1),
    "small": dict(text_vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                  num_kv_heads=4, head_dim=64, rows=4, seq_len=512, dtype="float32", attention="xla",
                  loss_chunk=512, accum=1),
    # ~2.1B parameters (1.4B in the 28 layers; Qwen3-1.7B's decoder with our 160,392-id vocabulary).
    "h100": dict(text_vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                 num_kv_heads=8, head_dim=128, rows=1, seq_len=4096, dtype="bfloat16", attention="pallas_gpu",
                 loss_chunk=1024, accum=4),
}

_PRESET = flags.DEFINE_enum("preset", "small", list(PRESETS), "Model/batch size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per side (after 2 warm-up steps).")
_REMAT = flags.DEFINE_string("remat", "none", "model.remat_policy for the jax side.")
_ROWS = flags.DEFINE_integer("rows", 0, "Packed rows per step (0: the preset's).")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Tokens per row (0: the preset's).")
_ATTN = flags.DEFINE_string("attention", "", "model.attention_impl for the jax side ('': the preset's).")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 0, "model.loss_chunk_size (0: the preset's).")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "Size of the square matmul measured beside the step (0: 4,096 "
                                 "f32 on a CPU; 8,192 bf16 on an accelerator, where 4,096 is too small to reach "
                                 "the chip's rate: H200 4,096: 478 TFLOP/s; H100 8,192: 692).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Only the jax side (and the peak).")
_SKIP_JAX = flags.DEFINE_bool("skip_jax", False, "Only the torch side (and the peak).")
_ACCUM = flags.DEFINE_integer("accum", 0, "Micro-batches per optimizer step (0: the preset's).")
_SEPARATE = flags.DEFINE_bool("separate_processes", False, "Run each side in its own process (GPU: "
                              "each framework gets the whole memory); the sides start from different "
                              "random weights, so no first-step loss comparison.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "After the timed steps, trace 2 more jax steps into this "
                                   "directory (jax.profiler, with a perfetto trace) and print where the device "
                                   "time went (profiling.summarize_trace).")
_RESULT_JSON = flags.DEFINE_string("result_json", "", "Write this process's measurements as JSON.")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "FLOP/s to report against (0: this process's device); a "
                           "--separate_processes parent passes its device's peak to the sides it starts.")
_GENERATE = flags.DEFINE_bool("generate", False, "Benchmark decoding (bench_generate) instead of training.")
_GEN_TOKENS = flags.DEFINE_integer("gen_tokens", 128, "--generate: new tokens per request.")
_GEN_PROMPT = flags.DEFINE_integer("gen_prompt", 64, "--generate: prompt tokens per request.")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", 4, "--generate: requests decoded together.")


def bench_config(preset: str, *, remat: str = "none", rows: int = 0, seq_len: int = 0, attention: str = "",
                 loss_chunk: int = 0, accum: int = 0):
  """A pretrain config with the preset's decoder, no audio in the batch, one device."""
  p = dict(PRESETS[preset])
  run = {k: p.pop(k) for k in ("rows", "seq_len", "attention", "loss_chunk", "accum")}
  rows, seq_len = rows or run["rows"], seq_len or run["seq_len"]
  attention, loss_chunk = attention or run["attention"], loss_chunk or run["loss_chunk"]
  c = config_lib.base_config("pretrain")
  c.model = config_lib.model_config(**p, remat_policy=remat, attention_impl=attention,
                                    loss_chunk_size=min(loss_chunk, seq_len))
  c.data.synthetic = True
  c.data.seq_len = seq_len
  c.data.max_audio_windows = 0
  c.data.per_device_batch = rows
  c.optim.grad_accum_steps = accum or run["accum"]
  c.mesh.ici = dict(data=1, fsdp=1, tensor=1, sequence=1)
  return c


def step_shape(config) -> tuple[int, int, int, int, float]:
  """(rows per micro-batch, seq_len, micro-batches, tokens, model FLOPs) of one bench step: the FLOPs
  every MFU here is measured against (metrics.train_flops_per_step, no audio)."""
  cfg = ModelConfig.from_dict(config.model)
  rows, seq, accum = int(config.data.per_device_batch), int(config.data.seq_len), int(config.optim.grad_accum_steps)
  return rows, seq, accum, accum * rows * seq, metrics.train_flops_per_step(cfg, rows=accum * rows, seq_len=seq,
                                                                          audio_windows=0)


def _qwen3_fields(cfg: ModelConfig) -> dict:
  """transformers Qwen3Config arguments for the preset's decoder (both torch peers: training, decoding)."""
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
              rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, attention_bias=False,
              max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")


def packed_batch(cfg: ModelConfig, rows: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Full packed rows of text+codec documents (module docstring), in the batch contract's layout."""
  rng = np.random.default_rng(seed)
  s = cfg.num_streams
  ids = np.zeros((rows, seq_len, s), np.int32)
  w = np.zeros((rows, seq_len, s), np.float32)
  seg = np.zeros((rows, seq_len), np.int32)
  pos = np.zeros((rows, seq_len), np.int32)
  for r in range(rows):
    t, doc = 0, 1
    while t < seq_len:
      n = min(int(rng.integers(32, max(33, seq_len // 2))), seq_len - t)
      n_text = n // 3
      ids[r, t:t + n_text, 0] = rng.integers(cfg.num_specials, cfg.codec_start, size=n_text)
      w[r, t:t + n_text, 0] = 1.0
      codes = rng.integers(0, cfg.codebook_size, size=(n - n_text, s))
      for k in range(s):
        ids[r, t + n_text:t + n, k] = cfg.codec_id(k, codes[:, k])
      w[r, t + n_text:t + n] = 0.125
      seg[r, t:t + n] = doc
      pos[r, t:t + n] = np.arange(n)
      t, doc = t + n, doc + 1
  return {"input_ids": ids, "loss_weights": w, "segment_ids": seg, "positions": pos}


def _timed(fn, steps: int) -> list[float]:
  for _ in range(2):
    fn()
  out = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def _timed_interleaved(fns: list, steps: int) -> list[list[float]]:
  """Warm-up twice each, then alternate the steps: both sides see the same machine load (shared hosts)."""
  for _ in range(2):
    for fn in fns:
      fn()
  out = [[] for _ in fns]
  for _ in range(steps):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      fn()
      out[i].append(time.perf_counter() - t)
  return out


def bench_jax(config, micro_batches: list[dict], steps: int, keep_params: bool = True,
              profile_dir: str = "", profile_top: int = 12) -> dict:
  """Compiles our step ahead of time and runs it once; times `steps` more unless steps == 0 (then
  r['step'] is the step). With `profile_dir`, then traces 2 more steps there and prints
  profiling.summarize_trace. r['device_bytes']: the compiled program's device memory."""
  mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
  s = trainer.Setup(config, mesh)
  state = s.layout.fresh_state()
  params = jax.device_get(state.params) if keep_params else None
  box = {"state": state}
  dev_batch = s.host_to_device(micro_batches)
  t0 = time.perf_counter()
  compiled = s.train_step.lower(state, dev_batch).compile()
  compile_s = time.perf_counter() - t0

  def step():
    box["state"], m = compiled(box["state"], dev_batch)
    box["loss"] = float(m["loss"])  # waits for the step
  step()
  first_loss = box["loss"]
  times = _timed(step, steps) if steps else []
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(2):
        step()
    print(profiling.summarize_trace(profile_dir, steps=2, top=profile_top), flush=True)
  return {"times": times, "compile_s": compile_s, "first_loss": first_loss, "params": params, "step": step,
          "device_bytes": metrics.compiled_device_bytes(compiled)}


# ---------------------------------------------------------------------------------------------
# The PyTorch peer (torch / transformers imported lazily: optional heavy dependencies).


def torch_peer(cfg: ModelConfig, device: str):
  """TorchBagpiper(cfg) on `device`: transformers Qwen3Model + lm_head + stream_emb (module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional heavy dependency)
  from transformers import Qwen3Config, Qwen3Model  # pylint: disable=g-import-not-at-top  (optional heavy dependency)

  class TorchBagpiper(torch.nn.Module):

    def __init__(self):
      super().__init__()
      hf = Qwen3Config(**_qwen3_fields(cfg))
      self.model = Qwen3Model(hf)
      self.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
      self.stream_emb = torch.nn.Embedding(cfg.num_streams, cfg.hidden_size)

    def forward(self, ids, weights, seg, pos):
      s, cs = cfg.num_streams, cfg.codec_start
      emb = self.model.embed_tokens
      x = emb(ids[..., 0])
      for n in range(1, s):
        x = x + emb(ids[..., n]) * (ids[..., n] != 0).unsqueeze(-1).to(x.dtype)
      l = ids.shape[1]
      causal = torch.ones(l, l, dtype=torch.bool, device=ids.device).tril()
      mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # [B, 1, L, L], True = attend
      h = self.model(inputs_embeds=x, position_ids=pos, attention_mask=mask).last_hidden_state
      table = self.stream_emb.weight * (torch.arange(s, device=ids.device) > 0)[:, None].to(h.dtype)
      base = self.lm_head(h).float()  # [B, L, V]: one lm_head matmul serves all 8 streams
      off = self.lm_head(table).float()  # [S, V]
      # Targets: the next cell of the same document.
      same = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).float()
      tgt, w = ids[:, 1:].long(), weights[:, 1:] * same[..., None]
      base = base[:, :-1]
      logits0 = base + off[0]
      ce0 = torch.logsumexp(logits0, -1) - logits0.gather(-1, tgt[..., :1])[..., 0]
      logits_c = base[:, :, None, cs:] + off[1:, cs:]  # [B, L-1, S-1, Vc]
      idx = (tgt[..., 1:] - cs).clamp(0, logits_c.shape[-1] - 1)
      ce_c = torch.logsumexp(logits_c, -1) - logits_c.gather(-1, idx[..., None])[..., 0]
      total = (w[..., 0] * ce0).sum() + (w[..., 1:] * ce_c).sum()
      return total, (w[..., 0] > 0).float().sum()

  torch.manual_seed(0)
  return TorchBagpiper().to(device)


def _same_doc(seg: np.ndarray) -> np.ndarray:
  """[B, L-1]: position t+1 continues the document of position t (the shifted targets' mask)."""
  return (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)


def load_jax_params(model, params, cfg: ModelConfig) -> None:
  """Copies bagpiper_jax params into the peer through the conversion rules (same names as HF/ESPnet)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional heavy dependency)
  want = rules_lib.decoder_rules(cfg) + [r for r in rules_lib.bagpiper_io_rules(cfg) if r.flax_path[0] == "stream_emb"]
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in rules_lib.to_torch_tensors(params, want)}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
  if missing or unexpected:
    raise RuntimeError(f"torch peer state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


def bench_torch(config, micro_batches: list[dict], params, steps: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top  (optional heavy dependency)
  cfg = ModelConfig.from_dict(config.model)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = torch_peer(cfg, device)
  if params is not None:
    load_jax_params(model, params, cfg)
  model.train()
  o = config.optim
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(o.weight_decay)},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=float(o.lr), betas=(float(o.b1), float(o.b2)), eps=float(o.eps),
                          fused=device == "cuda")
  micro = [{k: torch.as_tensor(np.asarray(b[k])).to(device) for k in b} for b in micro_batches]
  autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and cfg.dtype == "bfloat16")
  box = {}

  def step():
    # As ours: the loss of the step is the weighted sum over all micro-batches / their total count.
    total, count = 0.0, 0.0
    for t in micro:
      with autocast:
        s, n = model(t["input_ids"], t["loss_weights"], t["segment_ids"], t["positions"])
      (s / n_all).backward()
      total, count = total + s.detach(), count + n
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(o.clip_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    box["loss"] = float(total / count)  # waits for the step
  n_all = sum(float(((b["loss_weights"][:, 1:, 0] > 0) & _same_doc(b["segment_ids"])).sum()) for b in micro_batches)
  step()
  first_loss = box["loss"]
  times = _timed(step, steps) if steps else []
  return {"times": times, "first_loss": first_loss, "device": device, "threads": torch.get_num_threads(),
          "step": step}


def matmul_peaks(n: int) -> dict:
  """Best f32 matmul FLOP/s on this host's CPU (jax, and torch when installed)."""
  out = {"jax": metrics.measure_matmul_peak(n, repeats=3)}
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional heavy dependency)
  except ImportError:
    return out
  a = torch.ones((n, n), dtype=torch.float32)
  best = min(_timed(lambda: torch.mm(a, a), 3))
  out["torch"] = 2.0 * n ** 3 / best
  return out


def _g(x: float) -> str:
  return f"{x / 1e12:8.3f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:8.2f} GFLOP/s"


def _run_separately(argv_flags: list[str], env: dict, peak: float) -> list[tuple[str, dict]]:
  """Each side in its own `python -m bagpiper_jax.bench` process; their JSON results. The torch process
  keeps JAX on the CPU, so only torch holds GPU memory there."""
  out = []
  for side, skip in (("jax", "--skip_torch"), ("torch", "--skip_jax")):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "r.json")
      cmd = [sys.executable, "-m", "bagpiper_jax.bench", *argv_flags, skip, "--noseparate_processes",
             f"--result_json={path}", f"--peak_flops={peak}"]
      p = subprocess.run(cmd, check=False, env=dict(env, JAX_PLATFORMS="cpu") if side == "torch" else env)
      if p.returncode != 0 or not os.path.exists(path):
        print(f"{side} side failed (exit {p.returncode})", flush=True)
        continue
      with open(path) as f:
        out += [tuple(x) for x in json.load(f)]
  return out


def bench_generate(preset: str, *, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
  """Greedy text decoding, bagpiper_jax vs transformers `generate` (KV cache), same weights and prompts.

  The preset's model (random weights) is saved and exported as a release (convert/release.py, fp32);
  bagpiper_jax loads the release (generate/loading.py) and transformers' Qwen3ForCausalLM loads the
  same safetensors. Both decode `batch` prompts of `prompt_len` text ids for exactly `new_tokens`
  tokens under the same mask (text ids only, <|eos|>/<|eot|> suppressed): the JAX side is the whole
  jitted Generator program (prefill + while loop with the 8-stream bookkeeping and samplers), the
  torch side `generate(do_sample=False, min_new_tokens=max_new_tokens=new_tokens)`. Tokens/s =
  batch x new_tokens / wall time (compilation and a warm-up call excluded, best of `repeats`); the
  token sequences are compared.
  """
  import torch  # pylint: disable=g-import-not-at-top  (optional PyTorch peer)
  from transformers import Qwen3Config, Qwen3ForCausalLM  # pylint: disable=g-import-not-at-top  (optional)
  config = bench_config(preset)
  cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
  s = trainer.Setup(config, mesh)
  with tempfile.TemporaryDirectory() as tmp:
    params_io.save_params(os.path.join(tmp, "ckpt"), jax.device_get(s.layout.init_params()), cfg)
    release.export_release(os.path.join(tmp, "ckpt"), os.path.join(tmp, "rel"), dtype="float32",
                           with_codec=False, with_tokenizer=False)
    loaded = loading.load(os.path.join(tmp, "rel"), mesh)
    src = safetensors_io.SafetensorsReader(os.path.join(tmp, "rel"))
    hf = Qwen3ForCausalLM(Qwen3Config(**_qwen3_fields(cfg)))
    hf.load_state_dict({k: torch.from_numpy(np.asarray(src.get(k), np.float32)) for k in hf.state_dict()})
    hf = hf.eval()
  rng = np.random.default_rng(0)
  prompts = []
  for _ in range(batch):
    arrays, _ = template.template_prompt({"messages": template.task_messages("text_to_audio", [
        {"text_ids": rng.integers(cfg.num_specials, cfg.codec_start, prompt_len)},
        {"codes": np.zeros((1, cfg.num_streams), np.int16)}])}, cfg)
    prompts.append(engine.Prompt.from_template(arrays, ("text",)))
  greedy = engine.SegmentSettings(temperature=0.0, top_k=1, min_steps=new_tokens, max_steps=new_tokens)
  gen = engine.Generator(cfg, loaded.params, settings=engine.DecodeSettings(text=greedy), mesh=mesh,
                         max_cache_len=prompt_len + new_tokens + 256, max_batch=batch)
  t0 = time.perf_counter()
  outs = gen.generate(prompts)
  compile_s = time.perf_counter() - t0
  jax_times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = gen.generate(prompts)
    jax_times.append(time.perf_counter() - t0)
  ours = np.stack([o.segments[0].rows[:, 0] for o in outs])

  ids = torch.tensor(np.stack([np.concatenate([p.input_ids[:, 0], [mc.ASSISTANT, mc.TEXT]])
                               for p in prompts]))
  allowed = np.zeros(cfg.vocab_size, bool)
  allowed[cfg.num_specials:cfg.codec_start] = True
  kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
            suppress_tokens=np.flatnonzero(~allowed).tolist(), attention_mask=torch.ones_like(ids))
  torch_times = []
  with torch.inference_mode():
    hf.generate(ids, **kw)
    for _ in range(repeats):
      t0 = time.perf_counter()
      ref = hf.generate(ids, **kw)
      torch_times.append(time.perf_counter() - t0)
  theirs = ref[:, ids.shape[1]:].numpy()
  tokens = batch * new_tokens
  j, t = tokens / min(jax_times), tokens / min(torch_times)
  print(f"preset {preset}: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads "
        f"{cfg.num_heads}/{cfg.num_kv_heads}x{cfg.head_dim}, fp32; {batch} prompts x {prompt_len + 6} rows, "
        f"{new_tokens} new tokens each, greedy; {os.cpu_count()} cpus, torch {torch.get_num_threads()} "
        "threads")
  print(f"bagpiper_jax Generator          best {min(jax_times):.3f} s | {j:8.1f} tok/s (compile + first call "
        f"{compile_s:.1f} s)")
  print(f"transformers generate (KV cache) best {min(torch_times):.3f} s | {t:8.1f} tok/s")
  print(f"same tokens: {bool((ours == theirs).all())} ({int((ours == theirs).sum())}/{ours.size})")
  print(f"RATIO jax / torch (tokens/s): {j / t:.3f}")


def main(argv):
  del argv
  if _GENERATE.value:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark
    bench_generate(_PRESET.value, batch=_GEN_BATCH.value, prompt_len=_GEN_PROMPT.value,
                   new_tokens=_GEN_TOKENS.value, repeats=_STEPS.value)
    return
  child_env = dict(os.environ)
  if _SEPARATE.value:  # this process only reports: JAX must not reserve the accelerator's memory here
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  backends.skip_tpu_probe_without_tpu()
  config = bench_config(_PRESET.value, remat=_REMAT.value, rows=_ROWS.value, seq_len=_SEQ.value,
                        attention=_ATTN.value, loss_chunk=_LOSS_CHUNK.value, accum=_ACCUM.value)
  cfg = ModelConfig.from_dict(config.model)
  rows, seq, accum, tokens, flops = step_shape(config)
  dev = jax.devices()[0]
  child = _PEAK.value > 0  # one side of a --separate_processes run (its JAX may be on the CPU: the torch side)
  if not child:
    print(f"preset {_PRESET.value}: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
          f"layers {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads}x{cfg.head_dim}, {cfg.dtype}, attention "
          f"{cfg.attention_impl}, remat {cfg.remat_policy}; step {accum} x {rows} x {seq} = {tokens} packed tokens; "
          f"model FLOPs/step {flops / 1e9:.1f} G; device {dev.device_kind} ({dev.platform}), {os.cpu_count()} cpus",
          flush=True)
    within = metrics.attention_pairs_within_documents([packed_batch(cfg, rows, seq, seed=i)["segment_ids"]
                                                       for i in range(accum)])
    print(f"attention pairs within documents: {100 * within:.1f}% of the full-row causal count (the FLOPs "
          "model, and so MFU, counts full rows; attention pallas_gpu_docs skips most of the rest)", flush=True)
  matmul_rate = 0.0
  if child:
    peak, peak_name = _PEAK.value, "of peak"
  elif dev.platform == "cpu":
    n = _MATMUL_N.value or 4096
    peaks = matmul_peaks(n)
    for k, v in peaks.items():
      print(f"matmul peak ({k}, {n}^2 f32): {_g(v)}", flush=True)
    peak, peak_name = max(peaks.values()), "of matmul peak"
  else:
    peak, src = metrics.device_peak_flops(config, dev)
    print(f"peak {_g(peak)} ({src})", flush=True)
    peak_name = "MFU"
    n = _MATMUL_N.value or 8192
    matmul_rate = metrics.measure_matmul_peak(n, repeats=10, dtype=jnp.bfloat16)
    print(f"matmul (jax, {n}^3 bf16, measured): {_g(matmul_rate)} = {matmul_rate / peak:.3f} of peak",
          flush=True)
  if _SEPARATE.value:
    passed = [a for a in sys.argv[1:] if not a.startswith(("--separate_processes", "--result_json"))]
    results = _run_separately(passed, child_env, peak)
  else:
    micro = [packed_batch(cfg, rows, seq, seed=i) for i in range(accum)]
    results, params = [], None
    both = not _SKIP_JAX.value and not _SKIP_TORCH.value
    steps = 0 if both else _STEPS.value  # both sides: timed interleaved below
    if not _SKIP_JAX.value:
      j = bench_jax(config, micro, steps, keep_params=not _SKIP_TORCH.value, profile_dir=_PROFILE_DIR.value)
      params = j.pop("params")
      results.append(("bagpiper_jax train step", j))
    if not _SKIP_TORCH.value:
      t = bench_torch(config, micro, params, steps)
      results.append((f"torch Qwen3Model+8 streams ({t['device']}, {t['threads']} threads)", t))
    if both:
      for (_, r), times in zip(results, _timed_interleaved([r["step"] for _, r in results], _STEPS.value)):
        r["times"] = times
    for _, r in results:
      r.pop("step")
  if _RESULT_JSON.value:
    with open(_RESULT_JSON.value, "w") as f:
      json.dump(results, f)
  if len(results) == 2 and not _SEPARATE.value:
    print(f"first-step loss (same weights, same batch): jax {results[0][1]['first_loss']:.5f}, "
          f"torch {results[1][1]['first_loss']:.5f}", flush=True)
  rate = {}
  for name, r in results:
    best, med = min(r["times"]), statistics.median(r["times"])
    rate[name] = flops / med
    print(f"{name:45s} median {med:8.4f} s/step (best {best:.4f}) | {tokens / med:10.1f} tok/s | "
          f"{_g(flops / med)} | {100 * flops / med / peak:5.1f}% {peak_name}", flush=True)
  jax_rows = [n for n, _ in results if n.startswith("bagpiper_jax")]
  torch_rows = [n for n, _ in results if n.startswith("torch")]
  if jax_rows:
    j = dict(results)[jax_rows[0]]
    print(f"jax compile: {j['compile_s']:.1f} s; the program's device memory {j['device_bytes'] / 2**30:.2f} GiB")
    print(f"RATIO jax / peak        : {rate[jax_rows[0]] / peak:.3f}" + ("  (MFU)" if dev.platform != "cpu" else ""))
  if jax_rows and matmul_rate:
    print(f"RATIO jax / measured bf16 matmul: {rate[jax_rows[0]] / matmul_rate:.3f}")
  if jax_rows and torch_rows:
    print(f"RATIO jax / torch       : {rate[jax_rows[0]] / rate[torch_rows[0]]:.3f}  (tokens/s, same batch and sizes)")


if __name__ == "__main__":
  app.run(main)
