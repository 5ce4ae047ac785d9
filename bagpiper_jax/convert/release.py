"""Release format <-> Orbax params, streaming (one tensor or layer slice in memory at a time).

Release layout (docs/release.md; what ESPnet's vLLM fork loads):

    <out>/model-0000i-of-0000n.safetensors   shards of at most --max_shard_size (5 GB), ESPnet names
    <out>/model.safetensors.index.json       {"metadata": {"total_size"}, "weight_map": {name: shard}}
    <out>/config.json                        model_type "bagpiper", architectures
                                             ["BagpiperForConditionalGeneration"], Qwen3-style decoder
                                             fields, audio_config, and bagpiper_jax.model_config
                                             (the exact ModelConfig, so import needs no --config)
    [--espnet_pt]                            optional ESPnet checkpoint {"module": state_dict}

Tensor names come only from rules.bagpiper_rules (decoder, stream_emb, adaptor, audio tower);
X-Codec tensors (`multimodal_io_dict.discrete_audio.codec_model.*`) are passed through from --codec
when given (the JAX model has no codec), and on import they are skipped with a count.

    python -m bagpiper_jax.convert.release export --ckpt=<orbax dir> --out=<release dir> \
        [--dtype=bfloat16|float32|keep] [--max_shard_size=5GB] [--espnet_pt=<file.pt>] [--codec=<dir>]
    python -m bagpiper_jax.convert.release import --src=<release dir | base.pt> --out=<orbax dir> \
        [--config=configs/bagpiper_8b.py] [--dtype=config|float32|bfloat16] [--skip_prefixes=a.,b.]

`--ckpt` may be a save_params directory, a training checkpoint step, or a training checkpoints
directory (latest step). The result of `import` is what `config.init_from` takes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os

import numpy as np

from bagpiper_jax.convert import params_io, rules as rules_lib, safetensors_io, streaming, torch_pt
from bagpiper_jax.model.config import AudioEncoderConfig, ModelConfig

CODEC_PREFIX = "multimodal_io_dict.discrete_audio.codec_model."
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
CONFIG_NAME = "config.json"

# transformers Qwen3OmniMoeAudioEncoderConfig field <- AudioEncoderConfig field.
_HF_AUDIO_FIELDS = {
    "num_mel_bins": "num_mel_bins", "encoder_layers": "num_layers", "encoder_attention_heads": "num_heads",
    "encoder_ffn_dim": "ffn_dim", "d_model": "d_model", "output_dim": "output_dim",
    "downsample_hidden_size": "downsample_hidden_size", "n_window": "n_window",
    "n_window_infer": "n_window_infer", "max_source_positions": "max_source_positions",
    "activation_function": "activation",
}
# Qwen3Config field <- ModelConfig field.
_HF_TEXT_FIELDS = {
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
    "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
}


def release_config(cfg: ModelConfig, dtype_name: str) -> dict:
  """config.json of the release: vLLM/HF-style fields plus the exact bagpiper_jax ModelConfig."""
  enc = cfg.audio_encoder
  d = {
      "model_type": "bagpiper",
      "architectures": ["BagpiperForConditionalGeneration"],
      "torch_dtype": dtype_name,
      "vocab_size": cfg.vocab_size,
      **{hf: getattr(cfg, ours) for hf, ours in _HF_TEXT_FIELDS.items()},
      "hidden_act": "silu",
      "attention_bias": False,
      "tie_word_embeddings": False,
      "text_vocab_size": cfg.text_vocab_size,
      "text_token_offset": cfg.num_specials,
      "num_special_tokens": cfg.num_specials,
      "codec_start": cfg.codec_start,
      "num_streams": cfg.num_streams,
      "codebook_size": cfg.codebook_size,
      "codec_pad_ids": [cfg.codec_pad_id(n) for n in range(cfg.num_streams)],
      "audio_config": {hf: getattr(enc, ours) for hf, ours in _HF_AUDIO_FIELDS.items()},
      "adaptor_config": {"input_dim": enc.output_dim, "output_dim": cfg.hidden_size, "bias": True},
      "bagpiper_jax": {"format_version": 1, "model_config": cfg.to_dict()},
  }
  return d


def model_config_from_release(d: dict) -> ModelConfig:
  """ModelConfig from a release config.json (exact when written by us, else from the HF fields)."""
  if "bagpiper_jax" in d and "model_config" in d["bagpiper_jax"]:
    return ModelConfig.from_dict(d["bagpiper_jax"]["model_config"])
  kw = {ours: d[hf] for hf, ours in _HF_TEXT_FIELDS.items() if hf in d}
  for ours in ("text_vocab_size", "num_streams", "codebook_size"):
    if ours in d:
      kw[ours] = d[ours]
  if "num_special_tokens" in d:
    kw["num_specials"] = d["num_special_tokens"]
  if "audio_config" in d:
    kw["audio_encoder"] = AudioEncoderConfig(**{ours: d["audio_config"][hf] for hf, ours in _HF_AUDIO_FIELDS.items()
                                                if hf in d["audio_config"]})
  cfg = ModelConfig(**kw)
  if "vocab_size" in d and d["vocab_size"] != cfg.vocab_size:
    raise ValueError(f"config.json vocab_size {d['vocab_size']} != {cfg.vocab_size} derived from its "
                     "text_vocab_size/num_special_tokens/num_streams/codebook_size")
  return cfg


def vocab_note(shapes, cfg: ModelConfig, prefix: str = "") -> list[str]:
  """A plain-words line when embed/lm_head rows disagree with the configured vocabulary."""
  notes = []
  for key in (f"{prefix}model.embed_tokens.weight", f"{prefix}lm_head.weight"):
    if key in shapes and len(shapes[key]) == 2 and shapes[key][0] != cfg.vocab_size:
      notes.append(f"vocab size: {key} has {shapes[key][0]} rows but the model config has vocab_size "
                   f"{cfg.vocab_size} (= {cfg.num_specials} specials + {cfg.text_vocab_size} text + "
                   f"{cfg.num_streams} x {cfg.codec_block} codec); wrong --config?")
  return notes


def check_source(shapes, tensor_rules, cfg: ModelConfig, where: str,
                 ignore_prefixes: tuple[str, ...] = (CODEC_PREFIX,)) -> int:
  """One ValueError naming every missing / wrongly shaped / unknown tensor of a torch-side source.

  Returns the number of tensors under `ignore_prefixes` (counted, reported by the caller).
  """
  problems = []
  try:
    rules_lib.check_tensors(shapes, tensor_rules)
  except ValueError as e:
    problems.append(str(e).split("\n", 1)[1])
  known = {r.torch_key for r in tensor_rules}
  ignored = [k for k in shapes if k not in known and k.startswith(ignore_prefixes)]
  unknown = sorted(k for k in shapes if k not in known and not k.startswith(ignore_prefixes))
  if unknown:
    problems.append(f"{len(unknown)} tensors the model does not have: " + ", ".join(unknown[:20])
                    + (" ..." if len(unknown) > 20 else ""))
  if problems:
    raise ValueError(f"{where} does not match the model config:\n" + "\n".join(vocab_note(shapes, cfg) + problems))
  return len(ignored)


# ---------------------------------------------------------------------------------------------
# Export.


def _open_tensor_source(path: str):
  if os.path.isfile(path) and not path.endswith(".safetensors"):
    return torch_pt.PtReader(path)
  return safetensors_io.SafetensorsReader(path)


def export_release(ckpt: str, out_dir: str, *, cfg: ModelConfig | None = None, dtype: str = "bfloat16",
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, espnet_pt: str | None = None,
                   codec: str | None = None) -> dict:
  """Orbax params -> release directory (and optionally an ESPnet .pt). Returns a summary dict."""
  reader = params_io.ParamsReader(ckpt)
  stored_cfg = params_io.read_model_config(ckpt)
  if cfg is None:
    if stored_cfg is None:
      raise ValueError(f"{ckpt}: no model_config.json or config item next to the params; pass --config")
    cfg = stored_cfg
  elif stored_cfg is not None and stored_cfg != cfg:
    logging.warning("export: --config differs from the model config stored with %s; using --config", ckpt)
  expected = streaming.expected_params(cfg)
  tensor_rules = streaming.leaf_major(rules_lib.bagpiper_rules(cfg))
  streaming.check_rules_cover(tensor_rules, expected)
  streaming.check_leaves({p: i.shape for p, i in reader.infos().items()}, expected,
                         where=f"Orbax checkpoint {reader.item}")
  # Layers of leaves chunked across layers are read in bands no bigger than the largest tensor.
  reader.band_bytes = max(64 * 2**20, max(int(np.prod(r.torch_shape)) * reader.info(r.flax_path).dtype.itemsize
                                          for r in tensor_rules))
  out_dtype = None if dtype == "keep" else np.dtype(dtype)
  plan = streaming.export_plan(tensor_rules, reader, out_dtype)
  streams = [streaming.export_tensors(tensor_rules, reader, out_dtype)]

  codec_src, n_codec = None, 0
  if codec:
    codec_src = _open_tensor_source(codec)
    names = codec_src.keys()
    renamed = [(n, n if n.startswith(CODEC_PREFIX) else CODEC_PREFIX + n) for n in names]
    clash = sorted(new for _, new in renamed if new in {t.name for t in plan})
    if clash:
      raise ValueError(f"--codec {codec}: tensors clash with model tensors: {clash[:10]}")
    for old, new in renamed:
      info = codec_src.tensors[old]
      plan.append(safetensors_io.PlannedTensor(new, tuple(info.shape), np.dtype(info.dtype)))
    streams.append((new, codec_src.get(old)) for old, new in renamed)
    n_codec = len(renamed)

  if os.path.isdir(out_dir) and any(n.endswith(".safetensors") or n == safetensors_io.INDEX_NAME
                                    for n in os.listdir(out_dir)):
    raise ValueError(f"--out {out_dir} already holds safetensors files; refusing to mix two exports")
  os.makedirs(out_dir, exist_ok=True)
  index = safetensors_io.write_sharded(out_dir, plan, itertools.chain(*streams), max_shard_bytes=max_shard_bytes)
  dtype_name = str(out_dtype) if out_dtype is not None else "mixed"
  with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
    json.dump(release_config(cfg, dtype_name), f, indent=2)
  reader.close()

  if espnet_pt:
    # Second pass from the release just written: same bytes, no conversion work.
    written = safetensors_io.SafetensorsReader(out_dir)
    torch_pt.write_module_pt(espnet_pt, plan, ((t.name, written.get(t.name)) for t in plan))
  shards = sorted(set(index["weight_map"].values()))
  return {"tensors": len(plan), "codec_tensors": n_codec, "shards": shards,
          "total_bytes": index["metadata"]["total_size"], "dtype": dtype_name}


# ---------------------------------------------------------------------------------------------
# Import.


def import_release(src: str, out_dir: str, *, cfg: ModelConfig | None = None, dtype: str | None = None,
                   skip_prefixes: tuple[str, ...] = ()) -> dict:
  """Release directory / safetensors file / ESPnet .pt -> Orbax params (save_params layout).

  Tensors under CODEC_PREFIX and `skip_prefixes` are not part of the JAX model: they are counted and
  reported, any other unknown tensor is an error.
  """
  source = _open_tensor_source(src)
  if cfg is None:
    cfg_path = os.path.join(src if os.path.isdir(src) else os.path.dirname(src), CONFIG_NAME)
    if not os.path.isfile(cfg_path):
      raise ValueError(f"{src}: no {CONFIG_NAME} to take the model config from; pass --config")
    with open(cfg_path) as f:
      cfg = model_config_from_release(json.load(f))
  expected = streaming.expected_params(cfg)
  tensor_rules = rules_lib.bagpiper_rules(cfg)
  streaming.check_rules_cover(tensor_rules, expected)
  ignore = (CODEC_PREFIX,) + tuple(skip_prefixes)
  n_skipped = check_source(source.shapes(), tensor_rules, cfg, where=src, ignore_prefixes=ignore)
  if n_skipped:
    print(f"[release import] skipped {n_skipped} tensors under {list(ignore)} (X-Codec etc.; not part of "
          "the JAX model)", flush=True)
  tree = streaming.lazy_tree(source.get, tensor_rules, expected, None if dtype in (None, "config") else dtype)
  item = params_io.save_params(out_dir, tree, cfg)
  return {"tensors": len(tensor_rules), "skipped_tensors": n_skipped, "params": item}


# ---------------------------------------------------------------------------------------------
# CLI.


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("ckpt", None, "export: Orbax params (save_params dir, checkpoint step, or checkpoints dir)")
  flags.DEFINE_string("src", None, "import: release directory, .safetensors file, or ESPnet .pt")
  flags.DEFINE_string("out", None, "export: release directory; import: Orbax output directory")
  flags.DEFINE_string("dtype", None, "export: bfloat16 (default) | float32 | keep; import: config (default, "
                      "the model's param_dtype) | float32 | bfloat16")
  flags.DEFINE_string("max_shard_size", "5GB", "export: largest safetensors shard")
  flags.DEFINE_string("espnet_pt", None, "export: also write an ESPnet {'module': state_dict} .pt here")
  flags.DEFINE_list("skip_prefixes", [], "import: tensor name prefixes to skip (counted) besides X-Codec")
  flags.DEFINE_string("codec", None, "export: X-Codec tensors to pass through (safetensors or .pt)")
  config_flags.DEFINE_config_file("config", None, "model config file (configs/*.py); export/import read "
                                  "the stored one when omitted", lock_config=False)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from bagpiper_jax.convert import cli_util  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  cli_util.tune_malloc()
  if len(argv) != 2 or argv[1] not in ("export", "import"):
    raise SystemExit("usage: python -m bagpiper_jax.convert.release export|import --flags ...")
  cfg = cli_util.model_config_from_flag(FLAGS.config)
  if not FLAGS.out:
    raise SystemExit("--out is required")
  if argv[1] == "export":
    if not FLAGS.ckpt:
      raise SystemExit("export needs --ckpt")
    summary = export_release(FLAGS.ckpt, FLAGS.out, cfg=cfg, dtype=FLAGS.dtype or "bfloat16",
                             max_shard_bytes=cli_util.parse_size(FLAGS.max_shard_size),
                             espnet_pt=FLAGS.espnet_pt, codec=FLAGS.codec)
  else:
    if not FLAGS.src:
      raise SystemExit("import needs --src")
    summary = import_release(FLAGS.src, FLAGS.out, cfg=cfg, dtype=FLAGS.dtype or "config",
                             skip_prefixes=tuple(p for p in FLAGS.skip_prefixes if p))
  print(f"[release {argv[1]}] {json.dumps(summary)}", flush=True)
  cli_util.report_peak_rss(f"release {argv[1]}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
