"""Training metrics: a FLOPs model of the config, device peak, and the three sinks.

Sinks (process 0 only): one compact console line per log interval, TensorBoard event files in
`<workdir>/tensorboard` (tensorboardX), and `<workdir>/metrics.jsonl` with exact float values (every
step's loss in `step_losses`, so two runs can be compared bit for bit; a resumed run appends).

FLOPs model (`train_flops_per_step`): matmul FLOPs only, as MFU usually counts them (no remat
recompute, no softmax/norm elementwise work):
  decoder   forward 2 * (matmul params) per position + causal attention 2 * 2 * H * D * L / 2
            (dense causal, which is what a segment-masked kernel computes without block skipping);
  output    one [E, V] lm_head matmul per position (model/loss.py folds the 8 stream offsets into an
            [8, V] table, so streams 1..7 cost no extra matmul);
  encoder   forward only (it is frozen), per encoder window, convolutions + transformer + projection;
  backward  activation gradients always (embeddings train in every stage, so the backward pass runs
            through every layer) + weight gradients only for trainable decoder weights.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter

from bagpiper_jax.model.config import ModelConfig, conv_out_length

# Dense bf16 peak per chip, FLOP/s (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def decoder_flops_per_position(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per packed position, by part."""
  E, H, K, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  layer_params = E * H * D + 2 * E * K * D + H * D * E + 3 * E * F
  return {
      "layers": 2.0 * cfg.num_layers * layer_params,
      "attention": 2.0 * 2.0 * cfg.num_layers * H * D * seq_len / 2.0,
      "lm_head": 2.0 * E * cfg.vocab_size,
  }


def attention_pairs_within_documents(segment_ids) -> float:
  """The fraction of the FLOPs model's attention work that packed documents need: query-key pairs
  (causal) of the same segment id, over the full-row causal pairs `decoder_flops_per_position`
  counts. A kernel that skips the blocks between documents (attention_impl pallas_gpu_docs) does
  about this much of it; MFU here always counts the full rows (as MaxText's does)."""
  seg = np.asarray(segment_ids)
  l = seg.shape[-1]
  rows = seg.reshape(-1, l)
  within = 0
  for r in rows:
    _, counts = np.unique(r, return_counts=True)
    within += int(np.sum(counts * (counts + 1) // 2))
  return within / (rows.shape[0] * l * (l + 1) / 2)


def encoder_flops_per_window(cfg: ModelConfig) -> float:
  """Forward FLOPs of the audio encoder + adapter for one window of C chunks of 100 mel frames."""
  enc = cfg.audio_encoder
  c = enc.downsample_hidden_size
  f, t = enc.num_mel_bins, enc.chunk_frames
  conv = 0.0
  cin = 1
  for _ in range(3):
    f, t = conv_out_length(f, 1), conv_out_length(t, 1)
    conv += 2.0 * 9 * cin * c * f * t
    cin = c
  frames = enc.frames_per_chunk_out
  d = enc.d_model
  per_frame = 2.0 * (c * f * d + enc.num_layers * (4 * d * d + 2 * d * enc.ffn_dim) + d * d + d * enc.output_dim
                     + enc.output_dim * cfg.hidden_size)
  attn = 2.0 * 2.0 * enc.num_layers * d * enc.frames_per_window_out  # per frame, window attention
  return enc.chunks_per_window * (conv + frames * (per_frame + attn))


def train_flops_per_step(cfg: ModelConfig, *, rows: int, seq_len: int, audio_windows: int,
                         layers_trainable: bool = True) -> float:
  """Model FLOPs of one optimizer step over `rows` packed rows (all micro-batches together)."""
  p = decoder_flops_per_position(cfg, seq_len)
  fwd = sum(p.values())
  weight_grads = fwd if layers_trainable else p["lm_head"]
  per_pos = fwd + fwd + weight_grads  # forward, activation grads, weight grads
  return rows * (seq_len * per_pos + audio_windows * encoder_flops_per_window(cfg))


def compiled_device_bytes(compiled) -> int:
  """Device memory a compiled program holds while it runs: arguments + outputs - aliased (donated)
  + temporaries + code (`compiled.memory_analysis()`; 0 where the backend gives none)."""
  m = compiled.memory_analysis()
  return 0 if m is None else memory_stats_device_bytes(m)


def memory_stats_device_bytes(m) -> int:
  """`compiled_device_bytes` from a `compiled.memory_analysis()` already in hand."""
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)


_MEASURED_PEAK: dict[str, float] = {}


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype=np.float32) -> float:
  """Best achieved FLOP/s of one device for an n x n matmul of `dtype` under jit (one warm-up call)."""
  key = f"{n}/{np.dtype(dtype).name}"
  if key in _MEASURED_PEAK:
    return _MEASURED_PEAK[key]
  dev = jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), dev)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  _MEASURED_PEAK[key] = 2.0 * n ** 3 / best
  return _MEASURED_PEAK[key]


def device_peak_flops(config, device=None) -> tuple[float, str]:
  """(peak FLOP/s per device, where the number came from)."""
  if float(config.get("device_peak_flops", 0.0)) > 0:
    return float(config.device_peak_flops), "config.device_peak_flops"
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_FLOPS[name], f"table ({kind})"
  if device.platform == "cpu":
    return measure_matmul_peak(1024, 3), "measured 1024^2 f32 matmul"
  return 0.0, f"unknown device kind {kind!r}"


# ---------------------------------------------------------------------------------------------


def _fmt_num(x: float) -> str:
  for unit, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= unit:
      return f"{x / unit:.1f}{s}"
  return f"{x:.1f}"


def console_line(step: int, total: int, m: Mapping[str, float], eta_s: float | None) -> str:
  parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
  if "text_loss" in m:
    parts.append(f"text {m['text_loss']:.3f} audio {m.get('audio_loss', float('nan')):.3f}")
  parts.append(f"gnorm {m['grad_norm']:.3f}")
  parts.append(f"lr {m['lr']:.2e}")
  if m["step_time_s"] == m["step_time_s"]:  # not NaN (the compiling first step is untimed)
    parts.append(f"{_fmt_num(m['tokens_per_s'])} tok/s")
    parts.append(f"{m['step_time_s']:.3f} s/step")
  if m.get("mfu") is not None and m["mfu"] == m["mfu"]:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  if m.get("data_wait_frac") is not None and m["data_wait_frac"] == m["data_wait_frac"]:
    parts.append(f"data wait {100 * m['data_wait_frac']:.1f}%")  # of the interval's wall time
  if m.get("skipped_steps"):
    parts.append(f"skipped {int(m['skipped_steps'])}")
  if eta_s is not None:
    parts.append(f"ETA {datetime.timedelta(seconds=int(eta_s))}")
  return " | ".join(parts)


class MetricsWriter:
  """Console + TensorBoard + metrics.jsonl; no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.tb = None
    self.jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "train", extra: Mapping | None = None):
    if not self.enabled:
      return
    rec = {"step": int(step), "kind": prefix}
    for k, v in scalars.items():
      v = np.asarray(v)
      if v.ndim == 0:
        rec[k] = float(v)
        if self.tb is not None and np.isfinite(v):
          self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
      else:
        rec[k] = [float(x) for x in v.reshape(-1)]
        if self.tb is not None:
          for i, x in enumerate(v.reshape(-1)):
            if np.isfinite(x):
              self.tb.add_scalar(f"{prefix}/{k}_{i}", float(x), int(step))
    if extra:
      rec.update(extra)
    self.jsonl.write(json.dumps(rec) + "\n")
    self.jsonl.flush()

  def flush(self):
    if self.tb is not None:
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
