"""Initial Bagpiper params from public weights: Qwen3 (decoder) + Qwen3-Omni audio tower -> Orbax.

    python -m bagpiper_jax.convert.hf_init --config=configs/bagpiper_8b.py \
        --qwen3=/ckpt/Qwen3-8B-Base --audio_tower=/ckpt/Qwen3-Omni-30B-A3B-Instruct --out=/ckpt/bagpiper-init

What each param becomes (docs/model.md#vocabulary; ids are unified-vocabulary rows):
  embed_tokens   rows [256, 256 + text_vocab) = Qwen3 embed_tokens rows [0, text_vocab);
                 the 256 special rows and the 8 x 1025 codec rows ~ N(0, init_std)
  lm_head        the same split over its vocab axis (Qwen3 lm_head.weight, or its embeddings when
                 the checkpoint ties them and has no lm_head tensor)
  layers, norm   Qwen3 tensors through rules.decoder_rules
  stream_emb     zeros (row 0 is held at zero by the model anyway)
  adapter        kernel ~ N(0, init_std), bias zeros (as Bagpiper.init)
  audio_encoder  `thinker.audio_tower.*` of the Qwen3-Omni checkpoint (or of a standalone
                 Qwen3OmniMoeAudioEncoder save) through audio_tower.audio_tower_rules

Random rows come from numpy's PCG64 seeded with (--seed, tensor id), so the result does not depend
on block sizes or machines. The Qwen3 / tower config.json (when present) is checked against the
model config first and every mismatch is listed; so are missing and wrongly shaped tensors.
Every tensor is read, converted and written on its own (embed/lm_head in row blocks), so the 8B
init runs in a few GB. The output is what `config.init_from` takes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import jax
import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from bagpiper_jax import backends, paths
from bagpiper_jax.convert import audio_tower, cli_util, params_io, rules as rules_lib, streaming, vllm_config
from bagpiper_jax.convert.safetensors_io import SafetensorsReader
from bagpiper_jax.model.audio_encoder import AudioEncoder
from bagpiper_jax.model.config import ModelConfig

OMNI_TOWER_PREFIXES = ("thinker.audio_tower.", "audio_tower.", "")
_SEED_IDS = {"embed_tokens": 1, "lm_head": 2, "adapter": 3}


# ---------------------------------------------------------------------------------------------
# Config checks.


def _rope_theta(d: Mapping):
  if "rope_theta" in d:
    return d["rope_theta"]
  rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
  return rp.get("rope_theta")


def check_qwen3_config(hf: Mapping, cfg: ModelConfig, where: str) -> None:
  """Lists every decoder hyper-parameter of the Qwen3 config.json that disagrees with `cfg`."""
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  pairs = [
      ("vocab_size", hf.get("vocab_size"), cfg.text_vocab_size, "text_vocab_size"),
      ("hidden_size", hf.get("hidden_size"), cfg.hidden_size, "hidden_size"),
      ("intermediate_size", hf.get("intermediate_size"), cfg.intermediate_size, "intermediate_size"),
      ("num_hidden_layers", hf.get("num_hidden_layers"), cfg.num_layers, "num_layers"),
      ("num_attention_heads", hf.get("num_attention_heads"), cfg.num_heads, "num_heads"),
      ("num_key_value_heads", hf.get("num_key_value_heads"), cfg.num_kv_heads, "num_kv_heads"),
      ("head_dim", head_dim, cfg.head_dim, "head_dim"),
      ("rope_theta", _rope_theta(hf), cfg.rope_theta, "rope_theta"),
      ("rms_norm_eps", hf.get("rms_norm_eps"), cfg.rms_norm_eps, "rms_norm_eps"),
      ("hidden_act", hf.get("hidden_act", "silu"), "silu", "(SwiGLU with silu)"),
      ("attention_bias", bool(hf.get("attention_bias", False)), False, "(no attention bias)"),
  ]
  bad = [f"{k}: {where} has {a!r}, model config {name} is {b!r}" for k, a, b, name in pairs if _differs(a, b)]
  if bad:
    raise ValueError(f"Qwen3 config {where} does not match the model config:\n  " + "\n  ".join(bad))


def _differs(a, b) -> bool:
  if a is None:
    return True
  if isinstance(a, float) or isinstance(b, float):
    return not np.isclose(float(a), float(b), rtol=1e-9, atol=0.0)
  return a != b


def _audio_config(d: Mapping) -> Mapping | None:
  if "thinker_config" in d:
    return d["thinker_config"].get("audio_config")
  if "audio_config" in d:
    return d["audio_config"]
  if "encoder_layers" in d and "d_model" in d:
    return d
  return None


def check_audio_config(hf: Mapping, cfg: ModelConfig, where: str) -> None:
  enc = cfg.audio_encoder
  bad = [f"{k}: {where} has {hf[k]!r}, model config audio_encoder.{ours} is {getattr(enc, ours)!r}"
         for k, ours in vllm_config.HF_AUDIO_FIELDS.items() if k in hf and hf[k] != getattr(enc, ours)]
  if bad:
    raise ValueError(f"audio tower config {where} does not match the model config:\n  " + "\n  ".join(bad))


def _read_json(path: str) -> dict | None:
  d = path if os.path.isdir(path) else os.path.dirname(path)
  fn = os.path.join(d, "config.json")
  if os.path.isfile(fn):
    with open(fn) as f:
      return json.load(f)
  return None


def detect_tower_prefix(keys, prefix: str = "auto") -> str:
  if prefix != "auto":
    return prefix
  keys = set(keys)
  for p in OMNI_TOWER_PREFIXES:
    if f"{p}conv2d1.weight" in keys and f"{p}proj2.weight" in keys:
      return p
  raise ValueError("cannot find the audio tower in the --audio_tower checkpoint: no "
                   f"'<prefix>conv2d1.weight' + '<prefix>proj2.weight' for prefixes {OMNI_TOWER_PREFIXES}")


# ---------------------------------------------------------------------------------------------
# Building the tree.


def _rng(seed: int, name: str) -> np.random.Generator:
  return np.random.default_rng([seed, _SEED_IDS[name]])


def _vocab_rows(cfg: ModelConfig, source_rows, random_rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
  """Unified-vocab rows lo:hi [hi-lo, E]: random (specials, codec) or source text rows."""
  s, c = cfg.num_specials, cfg.codec_start
  parts = []
  if lo < s:
    parts.append(random_rows[lo:min(hi, s)])
  if hi > s and lo < c:
    parts.append(source_rows(max(lo, s) - s, min(hi, c) - s))
  if hi > c:
    parts.append(random_rows[s + max(lo, c) - c: s + hi - c])
  return np.concatenate(parts) if len(parts) > 1 else parts[0]


def init_tree(cfg: ModelConfig, qwen3: SafetensorsReader, tower: SafetensorsReader | None, *, seed: int = 0,
              tower_prefix: str = "auto") -> dict:
  """Nested dict of params_io.LazyArray leaves (nothing is read until Orbax writes them)."""
  expected = streaming.expected_params(cfg)
  E, V, T = cfg.hidden_size, cfg.vocab_size, cfg.text_vocab_size
  dt = np.dtype(cfg.param_dtype)
  n_random = V - T  # specials + codec rows

  # Decoder tensors, with the text vocabulary (the unified rows are assembled below).
  text_rules = [dataclasses.replace(r, torch_shape=(T, E)) if r.flax_path in (("embed_tokens", "embedding"),
                                                                               ("lm_head", "kernel")) else r
                for r in rules_lib.decoder_rules(cfg)]
  shapes = qwen3.shapes()
  tied = "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes
  if tied:
    shapes = dict(shapes, **{"lm_head.weight": shapes["model.embed_tokens.weight"]})
  known = {r.torch_key for r in text_rules}
  problems = []
  try:
    rules_lib.check_tensors(shapes, text_rules)
  except ValueError as e:
    problems.append(str(e).split("\n", 1)[1])
  emb = shapes.get("model.embed_tokens.weight")
  if emb is not None and len(emb) == 2 and emb[0] != T:
    problems.insert(0, f"vocab size: model.embed_tokens.weight has {emb[0]} rows but the model config has "
                    f"text_vocab_size {T}")
  unknown = sorted(k for k in shapes if k not in known)
  if unknown:
    problems.append(f"{len(unknown)} tensors a Qwen3 decoder does not have: " + ", ".join(unknown[:20]))
  if problems:
    raise ValueError(f"Qwen3 checkpoint {qwen3.path} does not match the model config:\n" + "\n".join(problems))
  if tied:
    print("[hf_init] Qwen3 checkpoint has tied embeddings (no lm_head.weight): lm_head text rows are "
          "the embedding rows", flush=True)
  lm_key = "model.embed_tokens.weight" if tied else "lm_head.weight"

  tree: dict = {}
  decoder_rest = [r for r in text_rules if r.flax_path not in (("embed_tokens", "embedding"), ("lm_head", "kernel"))]
  streaming.lazy_tree(qwen3.get, decoder_rest, expected, tree=tree)

  def embed_rows(lo, hi):
    return _vocab_rows(cfg, lambda a, b: qwen3.get("model.embed_tokens.weight", rows=slice(a, b)).astype(dt),
                       embed_random[0], lo, hi)

  def lm_cols(lo, hi):
    rows = _vocab_rows(cfg, lambda a, b: qwen3.get(lm_key, rows=slice(a, b)).astype(dt), lm_random[0], lo, hi)
    return rows.T

  # Random rows: [specials; codec] per tensor, drawn once (n_random x E: 138 MB at 8B fp32).
  embed_random = [_rng(seed, "embed_tokens").normal(0.0, cfg.init_std, (n_random, E)).astype(dt)]
  lm_random = [_rng(seed, "lm_head").normal(0.0, cfg.init_std, (n_random, E)).astype(dt)]
  tree["embed_tokens"] = {"embedding": params_io.LazyArray.blocked((V, E), dt, embed_rows, axis=0)}
  tree["lm_head"] = {"kernel": params_io.LazyArray.blocked((E, V), dt, lm_cols, axis=1)}
  zeros = lambda shape: params_io.LazyArray.computed(shape, dt, lambda: np.zeros(shape, dt))
  tree["stream_emb"] = {"embedding": zeros(expected[("stream_emb", "embedding")].shape)}
  a_shape = expected[("adapter", "kernel")].shape
  tree["adapter"] = {
      "kernel": params_io.LazyArray.computed(a_shape, dt, lambda: _rng(seed, "adapter").normal(
          0.0, cfg.init_std, a_shape).astype(dt)),
      "bias": zeros(expected[("adapter", "bias")].shape),
  }

  if tower is not None:
    prefix = detect_tower_prefix(tower.keys(), tower_prefix)
    t_rules = audio_tower.audio_tower_rules(cfg.audio_encoder, prefix=prefix, flax_root=("audio_encoder",))
    _check_tower(tower, t_rules, prefix)
    streaming.lazy_tree(tower.get, t_rules, expected, tree=tree)
  else:
    print("[hf_init] WARNING: no --audio_tower; the audio encoder is randomly initialised (tests only: "
          "it is frozen in every stage)", flush=True)
    _random_encoder(cfg, expected, tree, seed)

  produced = {p for p, _ in _leaves(tree)}
  missing = sorted("/".join(p) for p in expected if p not in produced)
  if missing:
    raise AssertionError(f"hf_init does not produce params {missing}")
  return tree


def _check_tower(tower: SafetensorsReader, t_rules, prefix: str) -> None:
  shapes = tower.shapes()
  try:
    rules_lib.check_tensors(shapes, t_rules)
  except ValueError as e:
    raise ValueError(f"audio tower {tower.path} (prefix {prefix!r}): " + str(e)) from None
  known = {r.torch_key for r in t_rules}
  stray = sorted(k for k in shapes if k.startswith(prefix) and k not in known)
  if stray and prefix:
    raise ValueError(f"audio tower {tower.path}: {len(stray)} tensors under {prefix!r} that the model does "
                     f"not have: {stray[:20]}")
  others = len(shapes) - len(known) - len(stray)
  print(f"[hf_init] audio tower: {len(known)} tensors under {prefix!r}"
        + (f"; {others} other tensors of that checkpoint not used (thinker LLM, talker, ...)" if others else ""),
        flush=True)


def _random_encoder(cfg: ModelConfig, expected, tree: dict, seed: int) -> None:
  """Encoder leaves from Bagpiper's own initialisers (no public weights given)."""
  enc = cfg.audio_encoder
  pdt = np.dtype(cfg.param_dtype)
  mel = np.zeros((1, enc.chunks_per_window, enc.num_mel_bins, enc.chunk_frames), np.float32)
  init = jax.jit(lambda k: AudioEncoder(enc, param_dtype=pdt).init(k, mel, np.zeros(mel.shape[:2], np.int32)))
  params = nn.meta.unbox(init(jax.random.PRNGKey(seed))["params"])
  for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = ("audio_encoder",) + tuple(str(k.key) for k in kp)
    assert path in expected, path
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.asarray(v)


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def hf_init(cfg: ModelConfig, qwen3_path: str, out_dir: str, *, audio_tower_path: str | None = None,
            seed: int = 0, tower_prefix: str = "auto") -> str:
  """Checks configs and tensors, then writes `<out_dir>/params` + model_config.json."""
  hf = _read_json(qwen3_path)
  if hf is not None:
    check_qwen3_config(hf, cfg, os.path.join(qwen3_path if os.path.isdir(qwen3_path) else
                                             os.path.dirname(qwen3_path), "config.json"))
  else:
    print(f"[hf_init] {qwen3_path}: no config.json next to the weights; only tensor shapes are checked",
          flush=True)
  qwen3 = SafetensorsReader(qwen3_path)
  tower = None
  if audio_tower_path:
    tower = SafetensorsReader(audio_tower_path)
    audio_json = _read_json(audio_tower_path)
    audio_hf = _audio_config(audio_json) if audio_json else None
    if audio_hf is not None:
      check_audio_config(audio_hf, cfg, audio_tower_path)
  tree = init_tree(cfg, qwen3, tower, seed=seed, tower_prefix=tower_prefix)
  return params_io.save_params(out_dir, tree, cfg)


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "model config file, e.g. configs/bagpiper_8b.py")
  flags.DEFINE_string("qwen3", None, "Qwen3 checkpoint: directory of *.safetensors (+ config.json)")
  flags.DEFINE_string("audio_tower", None, "Qwen3-Omni checkpoint (dir or .safetensors) holding "
                      "thinker.audio_tower.*, or a standalone Qwen3OmniMoeAudioEncoder save")
  flags.DEFINE_string("audio_tower_prefix", "auto", "name prefix of the tower tensors ('auto' tries "
                      "thinker.audio_tower., audio_tower., '')")
  flags.DEFINE_bool("random_audio_tower", False, "allow a missing --audio_tower (random encoder; tests only)")
  flags.DEFINE_string("out", None, "output directory (gets params/ and model_config.json)")
  flags.DEFINE_integer("seed", 0, "seed of the new rows (specials, codec, adapter)")
  flags.mark_flags_as_required(["config", "qwen3", "out"])


def main(argv):
  del argv
  backends.skip_tpu_probe_without_tpu()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  cli_util.tune_malloc()
  if not FLAGS.audio_tower and not FLAGS.random_audio_tower:
    raise app.UsageError("--audio_tower is required (pass --random_audio_tower to initialise it randomly)")
  with cli_util.one_line_errors("hf_init"):
    cfg = cli_util.model_config_from_flag(FLAGS.config)
    qwen3, tower, out = (paths.resolve(p) for p in (FLAGS.qwen3, FLAGS.audio_tower, FLAGS.out))
    for flag, p in (("--qwen3", qwen3), ("--audio_tower", tower)):
      if p and not os.path.exists(p):
        raise FileNotFoundError(f"{flag} {p}: no such file or directory")
    item = hf_init(cfg, qwen3, out, audio_tower_path=tower, seed=FLAGS.seed, tower_prefix=FLAGS.audio_tower_prefix)
  print(f"[hf_init] wrote {item}", flush=True)
  cli_util.report_peak_rss("hf_init")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
