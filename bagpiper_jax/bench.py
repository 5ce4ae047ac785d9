r"""Train-step throughput on this machine's CPU, against two yardsticks, in one run.

  python -m bagpiper_jax.bench                      # 'small' decoder, 4 x 512 tokens per step
  python -m bagpiper_jax.bench --preset=tiny --steps=5
  python -m bagpiper_jax.bench --generate           # decoding instead (bench_generate, below)

Measures, with the same decoder sizes and the same [B, L] token batch:
  jax     bagpiper_jax's jitted train step (trainer.Setup: loss, grads, clip, AdamW; no audio in
          the batch, so the work is the decoder + lm_head like the torch side; remat off by default)
  torch   transformers' Qwen3ForCausalLM (sdpa attention) + torch.optim.AdamW + grad clipping,
          same vocabulary / hidden / layers / heads, fp32, labels = the stream-0 ids
  peak    the best FLOP/s of a large f32 matmul (jax and torch each; the larger is the peak)
and prints tokens/s, achieved model FLOP/s (metrics.train_flops_per_step, the same FLOPs model
for both sides) and the ratios jax/peak and jax/torch.

Caveats, stated rather than hidden: the Bagpiper step does more than a plain LM step (8-stream
input embedding sum, 8 output softmaxes, 7 of them over the codec range), which the FLOPs model
counts only as its one shared lm_head matmul; CPU timings on a shared machine are noisy, so the
best of `--steps` timed steps is reported as well as the median.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from bagpiper_jax import config_lib, metrics, sharding, trainer
from bagpiper_jax.model import ModelConfig
from bagpiper_jax.synthetic import SyntheticIterator

PRESETS = {
    # name: (text_vocab, hidden, mlp, layers, heads, kv_heads, head_dim, rows, seq_len)
    "tiny": (1024, 64, 192, 2, 4, 2, 16, 4, 256),
    "small": (4096, 512, 1536, 4, 8, 4, 64, 4, 512),
}

_PRESET = flags.DEFINE_enum("preset", "small", list(PRESETS), "Model/batch size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per side (after 2 warm-up steps).")
_REMAT = flags.DEFINE_string("remat", "none", "model.remat_policy for the jax side.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 4096, "Size of the square f32 matmul for the peak.")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Only the jax side and the matmul peak.")
_GENERATE = flags.DEFINE_bool("generate", False, "Benchmark decoding (bench_generate) instead of training.")
_GEN_TOKENS = flags.DEFINE_integer("gen_tokens", 128, "--generate: new tokens per request.")
_GEN_PROMPT = flags.DEFINE_integer("gen_prompt", 64, "--generate: prompt tokens per request.")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", 4, "--generate: requests decoded together.")


def bench_config(preset: str, remat: str = "none"):
  """A pretrain config with the preset's decoder, fp32, no audio in the batch, one device."""
  v, e, f, n, h, k, d, rows, seq = PRESETS[preset]
  c = config_lib.base_config("pretrain")
  c.model = config_lib.model_config(
      text_vocab_size=v, hidden_size=e, intermediate_size=f, num_layers=n, num_heads=h, num_kv_heads=k,
      head_dim=d, dtype="float32", remat_policy=remat, loss_chunk_size=min(512, seq))
  c.data.synthetic = True
  c.data.seq_len = seq
  c.data.max_audio_windows = 0
  c.data.per_device_batch = rows
  c.mesh.ici = dict(data=1, fsdp=1, tensor=1, sequence=1)
  return c


def _timed(fn, steps: int) -> list[float]:
  for _ in range(2):
    fn()
  out = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def bench_jax(config, steps: int) -> dict:
  mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
  s = trainer.Setup(config, mesh)
  box = {"state": s.layout.fresh_state()}
  it = SyntheticIterator(s.cfg, rows=int(config.data.per_device_batch), seq_len=int(config.data.seq_len),
                         audio_windows=0)
  batch = s.host_to_device([next(it)])

  def step():
    box["state"], m = s.train_step(box["state"], batch)
    jax.block_until_ready(m)
    box["loss"] = float(m["loss"])
  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  times = _timed(step, steps)
  ids = jax.device_get(batch["input_ids"])[0, :, :, 0]
  return {"times": times, "compile_s": compile_s, "loss": box["loss"], "ids": ids}


def bench_torch(config, ids, steps: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen3Config, Qwen3ForCausalLM  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_dict(config.model)
  hf = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                   head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                   tie_word_embeddings=False, attention_bias=False,
                   max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
  torch.manual_seed(0)
  model = Qwen3ForCausalLM(hf).to(torch.float32).train()
  o = config.optim
  opt = torch.optim.AdamW(model.parameters(), lr=float(o.lr), betas=(float(o.b1), float(o.b2)),
                          eps=float(o.eps), weight_decay=float(o.weight_decay))
  x = torch.as_tensor(np.array(ids), dtype=torch.long)
  box = {}

  def step():
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(o.clip_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    box["loss"] = float(loss.detach())
  times = _timed(step, steps)
  return {"times": times, "loss": box["loss"], "threads": torch.get_num_threads()}


def matmul_peaks(n: int) -> dict:
  out = {"jax": metrics.measure_matmul_peak(n, repeats=3)}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    a = torch.ones((n, n), dtype=torch.float32)
    torch.mm(a, a)
    best = min(_timed(lambda: torch.mm(a, a), 3))
    out["torch"] = 2.0 * n ** 3 / best
  except ImportError:
    pass
  return out


def _g(x: float) -> str:
  return f"{x / 1e9:8.2f} GFLOP/s"


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
  import tempfile  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top  (optional PyTorch peer)
  from transformers import Qwen3Config, Qwen3ForCausalLM  # pylint: disable=g-import-not-at-top  (optional)
  from bagpiper_jax.convert import params_io, release, safetensors_io  # pylint: disable=g-import-not-at-top
  from bagpiper_jax.data import template  # pylint: disable=g-import-not-at-top
  from bagpiper_jax.generate import engine, loading  # pylint: disable=g-import-not-at-top
  from bagpiper_jax.model import config as mc  # pylint: disable=g-import-not-at-top
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
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa"))
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
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark, whatever else the host has
  if _GENERATE.value:
    bench_generate(_PRESET.value, batch=_GEN_BATCH.value, prompt_len=_GEN_PROMPT.value,
                   new_tokens=_GEN_TOKENS.value, repeats=_STEPS.value)
    return
  config = bench_config(_PRESET.value, _REMAT.value)
  cfg = ModelConfig.from_dict(config.model)
  rows, seq = int(config.data.per_device_batch), int(config.data.seq_len)
  tokens = rows * seq
  flops = metrics.train_flops_per_step(cfg, rows=rows, seq_len=seq, audio_windows=0)
  print(f"preset {_PRESET.value}: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, mlp "
        f"{cfg.intermediate_size}, layers {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads}x"
        f"{cfg.head_dim}; batch {rows} x {seq} = {tokens} tokens; model FLOPs/step {flops / 1e9:.1f} G; "
        f"device {jax.devices()[0].device_kind}, {os.cpu_count()} cpus", flush=True)
  peaks = matmul_peaks(_MATMUL_N.value)
  peak = max(peaks.values())
  for k, v in peaks.items():
    print(f"matmul peak ({k}, {_MATMUL_N.value}^2 f32): {_g(v)}", flush=True)
  j = bench_jax(config, _STEPS.value)
  rows_out = [("bagpiper_jax train step", j)]
  if not _SKIP_TORCH.value:
    t = bench_torch(config, j["ids"], _STEPS.value)
    rows_out.append((f"torch Qwen3ForCausalLM + AdamW ({t['threads']} threads)", t))
  res = {}
  for name, r in rows_out:
    best, med = min(r["times"]), statistics.median(r["times"])
    res[name] = flops / med
    print(f"{name:45s} median {med:7.3f} s/step (best {best:.3f}) | {tokens / med:9.1f} tok/s | "
          f"{_g(flops / med)} | {100 * flops / med / peak:5.1f}% of matmul peak | loss {r['loss']:.3f}",
          flush=True)
  print(f"jax compile (first step): {j['compile_s']:.1f} s")
  jax_rate = res["bagpiper_jax train step"]
  print(f"RATIO jax / matmul peak : {jax_rate / peak:.3f}")
  if len(rows_out) > 1:
    print(f"RATIO jax / torch       : {jax_rate / res[rows_out[1][0]]:.3f}  (tokens/s, same batch and sizes)")


if __name__ == "__main__":
  app.run(main)
