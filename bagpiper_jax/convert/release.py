"""Release directory <-> Orbax params, streaming (one tensor or layer slice in memory at a time).

A release directory (docs/release.md has the full table and which consumer reads which file):

    model-0000i-of-0000n.safetensors   ESPnet tensor names, shards <= --max_shard_size (5 GB): the
                                       decoder, stream_emb, adaptor, audio tower, and the X-Codec
                                       (`multimodal_io_dict.discrete_audio.codec_model.*`)
    model.safetensors.index.json       {"metadata": {"total_size"}, "weight_map": {name: shard}}
    espnet_buffers.safetensors         `vocab_weight` (float32 [vocab]); deliberately NOT in the index:
                                       the vLLM fork has no slot for it (its loader would reject it),
                                       while ESPnet's strict load needs it. Shards + this file = the
                                       reference model's full state_dict.
    config.json                        the vLLM fork's BagpiperConfig schema + bagpiper_jax block
                                       (vllm_config.py)
    codec_config.json                  the X-Codec's own config.json (XcodecModel(config) + the codec
                                       tensors rebuild it)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
    generation_config.json             release_assets.py
    release.json                       what was exported from where (step, files, tokenizer, codec,
                                       data indexes); written last: a release is complete iff it exists
    [--espnet_pt]                      ESPnet checkpoint {"module": state_dict}, every key of the
                                       reference model (what its bin/inference.py loads strictly)

The tokenizer and the codec are the ones the data was made with, found through the run's data
indexes (release_assets.resolve_assets), unless given; an export without them fails with one line
unless --no_tokenizer / --no_codec ask for a weights-only release.

    python -m bagpiper_jax.convert.release export --ckpt=<workdir | checkpoints/ | step dir | params dir> \
        --out=<release dir> [--step=N] [--dtype=bfloat16|float32|keep] [--max_shard_size=5GB] \
        [--espnet_pt=<file.pt>] [--codec=<XcodecModel dir> | --no_codec] [--tokenizer=<tokenizer.json> | \
        --no_tokenizer]
    python -m bagpiper_jax.convert.release import --src=<release dir | .safetensors | ESPnet .pt> \
        --out=<orbax dir> [--config=configs/bagpiper_8b.py] [--dtype=config|float32|bfloat16] \
        [--skip_prefixes=a.,b.]

The result of `import` is what `config.init_from` takes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from bagpiper_jax import backends, codec as codec_lib, paths
from bagpiper_jax.convert import cli_util, params_io, release_assets, rules as rules_lib, safetensors_io
from bagpiper_jax.convert import streaming, torch_pt, vllm_config
from bagpiper_jax.model.config import ModelConfig

CODEC_PREFIX = "multimodal_io_dict.discrete_audio.codec_model."
VOCAB_WEIGHT = "vocab_weight"
ESPNET_BUFFERS = "espnet_buffers.safetensors"
CONFIG_NAME = "config.json"
RELEASE_JSON = "release.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


# ---------------------------------------------------------------------------------------------
# vocab_weight: the reference's persistent buffer, derived from the config.


def vocab_weight(cfg: ModelConfig) -> np.ndarray:
  """float32 [vocab]: 1.0 on special and text ids, cfg.codec_loss_weight (1/8) on every codec id."""
  w = np.ones((cfg.vocab_size,), np.float32)
  w[cfg.codec_start:] = cfg.codec_loss_weight
  return w


def check_vocab_weight(x: np.ndarray, cfg: ModelConfig, where: str) -> None:
  """A vocab_weight from a checkpoint must be the one the config implies (the loss's weights)."""
  want = vocab_weight(cfg)
  x = np.asarray(x)
  if x.shape != want.shape:
    raise ValueError(f"{where}: vocab_weight has shape {x.shape}, the model config implies {want.shape}")
  bad = np.flatnonzero(x.astype(np.float32) != want)
  if bad.size:
    ids = bad[:8].tolist()
    raise ValueError(f"{where}: vocab_weight differs from the config's (1.0 on ids < {cfg.codec_start}, "
                     f"{cfg.codec_loss_weight} on codec ids) at {bad.size} ids, first {ids}: got "
                     f"{x[bad[:8]].astype(np.float32).tolist()}, expected {want[bad[:8]].tolist()}")


# ---------------------------------------------------------------------------------------------
# Checks on torch-side sources.


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

  `vocab_weight` is not a parameter and is checked separately (check_vocab_weight). Returns the number
  of tensors under `ignore_prefixes` (counted, reported by the caller).
  """
  problems = []
  try:
    rules_lib.check_tensors(shapes, tensor_rules)
  except ValueError as e:
    problems.append(str(e).split("\n", 1)[1])
  known = {r.torch_key for r in tensor_rules} | {VOCAB_WEIGHT}
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
  extra = [os.path.join(path, ESPNET_BUFFERS)] if os.path.isfile(os.path.join(path, ESPNET_BUFFERS)) else []
  return safetensors_io.SafetensorsReader(path, extra_files=extra)


def _codec_stream(codec_dir: str, taken: set[str]):
  """(planned tensors, generator of (name, array)) of the X-Codec weights under CODEC_PREFIX."""
  src = safetensors_io.SafetensorsReader(codec_dir)
  renamed = [(n, n if n.startswith(CODEC_PREFIX) else CODEC_PREFIX + n) for n in src.keys()]
  if not renamed:
    raise release_assets.AssetError(f"codec {codec_dir}: no tensors")
  clash = sorted(new for _, new in renamed if new in taken)
  if clash:
    raise ValueError(f"codec {codec_dir}: tensors clash with model tensors: {clash[:10]}")
  plan = [safetensors_io.PlannedTensor(new, tuple(src.tensors[old].shape), np.dtype(src.tensors[old].dtype))
          for old, new in renamed]
  return plan, ((new, src.get(old)) for old, new in renamed)


def write_release(source, cfg: ModelConfig, out_dir: str, assets: release_assets.Assets, *,
                  dtype: str = "bfloat16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  espnet_pt: str | None = None,
                  xcodec_hf_model_tag: str = vllm_config.DEFAULT_XCODEC_TAG, writer: bool = True,
                  provenance: Mapping[str, Any] | None = None) -> dict:
  """Writes a release from `source` (a params_io.ParamsReader, or anything with its info/read API).

  Multi-process (release_action): every process calls this with writer=False except one; all read the
  same tensors in the same order (the reads may be collectives), only the writer touches files.
  `out_dir` must be local; see export_release for URLs.
  """
  expected = streaming.expected_params(cfg)
  tensor_rules = streaming.leaf_major(rules_lib.bagpiper_rules(cfg))
  streaming.check_rules_cover(tensor_rules, expected)
  streaming.check_leaves({p: i.shape for p, i in source.infos().items()}, expected,
                         where=f"params {source.item}")
  # Layers of leaves chunked across layers are read in bands no bigger than the largest tensor.
  source.band_bytes = max(64 * 2**20, max(int(np.prod(r.torch_shape)) * source.info(r.flax_path).dtype.itemsize
                                          for r in tensor_rules))
  out_dtype = None if dtype == "keep" else np.dtype(dtype)
  plan = streaming.export_plan(tensor_rules, source, out_dtype)
  model_stream = streaming.export_tensors(tensor_rules, source, out_dtype)
  if not writer:
    for _ in model_stream:  # same reads (collectives) as the writer, nothing written
      pass
    return {}

  # Everything that can fail on bad input is built before the first byte is written.
  tok_files = (release_assets.tokenizer_files(assets.tokenizer, cfg, text_id0_as_pad=assets.text_id0_as_pad)
               if assets.tokenizer else {})
  streams = [model_stream]
  n_codec = 0
  if assets.codec_dir:
    codec_plan, codec_stream = _codec_stream(assets.codec_dir, {t.name for t in plan})
    plan += codec_plan
    streams.append(codec_stream)
    n_codec = len(codec_plan)
  if os.path.isdir(out_dir) and any(n.endswith(".safetensors") or n == safetensors_io.INDEX_NAME
                                    for n in os.listdir(out_dir)):
    raise ValueError(f"--out {out_dir} already holds safetensors files; refusing to mix two exports")
  os.makedirs(out_dir, exist_ok=True)
  index = safetensors_io.write_sharded(out_dir, plan, itertools.chain(*streams), max_shard_bytes=max_shard_bytes)
  buffers = [(VOCAB_WEIGHT, vocab_weight(cfg))]
  safetensors_io.write_file(os.path.join(out_dir, ESPNET_BUFFERS), buffers)
  files = sorted(set(index["weight_map"].values())) + [safetensors_io.INDEX_NAME, ESPNET_BUFFERS]

  # torch_dtype: the export dtype; with "keep", the stored dtype (the embedding's if they differ).
  dtype_name = str(out_dtype) if out_dtype is not None else str(plan[0].dtype)
  data = {"text_id0_as_pad": assets.text_id0_as_pad, **assets.describe()}  # what made the data (not the step)
  with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
    json.dump(vllm_config.release_config(cfg, torch_dtype=dtype_name, xcodec_hf_model_tag=xcodec_hf_model_tag,
                                         data=data), f, indent=2)
    f.write("\n")
  files.append(CONFIG_NAME)
  if assets.codec_dir:
    shutil.copyfile(os.path.join(assets.codec_dir, "config.json"),
                    os.path.join(out_dir, release_assets.CODEC_CONFIG))
    files.append(release_assets.CODEC_CONFIG)
  files += release_assets.write_files(out_dir, tok_files)
  files.append(release_assets.write_generation_config(out_dir))

  if espnet_pt:
    # Second pass over the files just written: same bytes, no conversion work.
    written = _open_tensor_source(out_dir)
    full = plan + [safetensors_io.PlannedTensor(n, tuple(x.shape), x.dtype) for n, x in buffers]
    torch_pt.write_module_pt(espnet_pt, full, ((t.name, written.get(t.name)) for t in full))
  summary = {"format_version": vllm_config.FORMAT_VERSION, "tensors": len(plan) + len(buffers),
             "model_tensors": len(plan) - n_codec, "codec_tensors": n_codec,
             "shards": sorted(set(index["weight_map"].values())),
             "total_bytes": index["metadata"]["total_size"], "dtype": dtype_name,
             "assets": assets.describe(), **dict(provenance or {}), "files": sorted(files + [RELEASE_JSON])}
  with open(os.path.join(out_dir, RELEASE_JSON), "w") as f:  # last: marks the release complete
    json.dump(summary, f, indent=2)
    f.write("\n")
  return summary


def publish(local_dir: str, out_dir: str) -> None:
  """Copies a finished local release to `out_dir` (a URL, e.g. gs://), release.json last."""
  names = sorted(os.listdir(local_dir), key=lambda n: n == RELEASE_JSON)
  dst = epath.Path(out_dir)
  dst.mkdir(parents=True, exist_ok=True)
  for n in names:
    epath.Path(os.path.join(local_dir, n)).copy(dst / n, overwrite=True)


def release_settings(run_config: Mapping[str, Any] | None) -> dict:
  """The run's `release` config section (config_lib.base_config) as a dict, {} when absent."""
  return dict((run_config or {}).get("release") or {})


def export_release(ckpt: str, out_dir: str, *, step: int | None = None, cfg: ModelConfig | None = None,
                   dtype: str | None = None, max_shard_bytes: int | None = None,
                   espnet_pt: str | None = None, codec: str | None = None, tokenizer: str | None = None,
                   with_codec: bool = True, with_tokenizer: bool = True,
                   xcodec_hf_model_tag: str | None = None) -> dict:
  """Orbax params (a workdir, its checkpoints/, one step, or a params dir) -> release directory.

  Tokenizer, codec, dtype, shard size, xcodec tag: the arguments, else the run's `release` config
  section (what its own releases use), else the run's data indexes (tokenizer, codec) and the
  defaults (bfloat16, 5 GB). Returns a summary dict (also written as release.json).
  """
  ref = paths.find_checkpoint(ckpt, step)
  reader = params_io.ParamsReader(ref.params_dir)
  stored_cfg = params_io.read_model_config(ref.params_dir)
  if cfg is None:
    if stored_cfg is None:
      raise ValueError(f"{ref.step_dir}: no model_config.json or config item next to the params; pass --config")
    cfg = stored_cfg
  elif stored_cfg is not None and stored_cfg != cfg:
    logging.warning("export: --config differs from the model config stored with %s; using --config", ref.step_dir)
  run_config = params_io.read_run_config(ref.params_dir)
  settings = release_settings(run_config)
  assets = release_assets.resolve_assets(
      run_config, tokenizer=tokenizer or settings.get("tokenizer") or None,
      codec=codec or settings.get("codec") or None, with_tokenizer=with_tokenizer, with_codec=with_codec)
  tag = xcodec_hf_model_tag or settings.get("xcodec_hf_model_tag") or vllm_config.DEFAULT_XCODEC_TAG
  dtype = dtype or settings.get("dtype") or "bfloat16"
  if max_shard_bytes is None:
    max_shard_bytes = (cli_util.parse_size(settings["max_shard_size"]) if settings.get("max_shard_size")
                       else DEFAULT_MAX_SHARD_BYTES)
  provenance = {"step": ref.step, "checkpoint": ref.step_dir}
  kw = dict(dtype=dtype, max_shard_bytes=max_shard_bytes, espnet_pt=espnet_pt, xcodec_hf_model_tag=tag,
            provenance=provenance)
  try:
    if paths.is_url(out_dir):
      with tempfile.TemporaryDirectory(prefix="bagpiper_release_") as tmp:
        summary = write_release(reader, cfg, tmp, assets, **kw)
        publish(tmp, out_dir)
    else:
      summary = write_release(reader, cfg, out_dir, assets, **kw)
  finally:
    reader.close()
  return summary


# ---------------------------------------------------------------------------------------------
# Import.


def _legacy_window_note(d: Mapping[str, Any]) -> None:
  audio = d.get("audio_config") or {}
  if "bagpiper_jax" not in d and (audio.get("n_window"), audio.get("n_window_infer")) == (100, 400):
    logging.warning("config.json has audio_config n_window 100 / n_window_infer 400 (the vLLM fork's "
                    "bootstrap defaults); the reference trained with Qwen3-Omni's 50 / 800. Pass --config "
                    "to import with the model's own values (docs/release.md)")


def import_release(src: str, out_dir: str, *, cfg: ModelConfig | None = None, dtype: str | None = None,
                   skip_prefixes: tuple[str, ...] = ()) -> dict:
  """Release directory / safetensors file / ESPnet .pt -> Orbax params (save_params layout).

  Tensors under CODEC_PREFIX and `skip_prefixes` are not part of the JAX model: they are counted and
  reported; `vocab_weight`, when present, must equal what the config implies; any other unknown
  tensor is an error.
  """
  source = _open_tensor_source(src)
  if cfg is None:
    cfg_path = os.path.join(src if os.path.isdir(src) else os.path.dirname(src), CONFIG_NAME)
    if not os.path.isfile(cfg_path):
      raise ValueError(f"{src}: no {CONFIG_NAME} to take the model config from; pass --config")
    with open(cfg_path) as f:
      d = json.load(f)
    _legacy_window_note(d)
    cfg = vllm_config.model_config_from_release(d)
  expected = streaming.expected_params(cfg)
  tensor_rules = rules_lib.bagpiper_rules(cfg)
  streaming.check_rules_cover(tensor_rules, expected)
  ignore = (CODEC_PREFIX,) + tuple(skip_prefixes)
  n_skipped = check_source(source.shapes(), tensor_rules, cfg, where=src, ignore_prefixes=ignore)
  has_vw = VOCAB_WEIGHT in source
  if has_vw:
    check_vocab_weight(source.get(VOCAB_WEIGHT), cfg, where=src)
  if n_skipped:
    print(f"[release import] skipped {n_skipped} tensors under {list(ignore)} (X-Codec etc.; not part of "
          "the JAX model)", flush=True)
  tree = streaming.lazy_tree(source.get, tensor_rules, expected, None if dtype in (None, "config") else dtype)
  item = params_io.save_params(out_dir, tree, cfg)
  return {"tensors": len(tensor_rules), "skipped_tensors": n_skipped, "vocab_weight_checked": has_vw,
          "params": item}


def codec_from_release(release_dir: str, *, device: str = "cpu") -> codec_lib.XCodec:
  """The release's X-Codec (codec_config.json + its `codec_model.*` tensors) as a codec.XCodec, e.g. to
  decode generated codes with exactly the codec the model was trained with."""
  import torch  # pylint: disable=g-import-not-at-top  (optional PyTorch peer: only to build the codec)
  from transformers import XcodecConfig, XcodecModel  # pylint: disable=g-import-not-at-top  (same)
  cfg_path = os.path.join(release_dir, release_assets.CODEC_CONFIG)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{release_dir}: no {release_assets.CODEC_CONFIG} (a release exported with --no_codec?)")
  model = XcodecModel(XcodecConfig.from_json_file(cfg_path))
  src = _open_tensor_source(release_dir)

  def to_torch(x):
    if x.dtype == np.dtype(ml_dtypes.bfloat16):  # numpy has no bfloat16 torch.from_numpy understands
      return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)
  state = {k[len(CODEC_PREFIX):]: to_torch(src.get(k)) for k in src.keys() if k.startswith(CODEC_PREFIX)}
  model.load_state_dict(state, strict=True)
  return codec_lib.XCodec.from_model(model, where=release_dir, device=device)


# ---------------------------------------------------------------------------------------------
# CLI.


def _define_flags():
  flags.DEFINE_string("ckpt", None, "export: a workdir, its checkpoints/ folder, one step folder, or a "
                      "params directory (latest finished step unless --step)")
  flags.DEFINE_integer("step", None, "export: which checkpoint step (default: the latest finished one)")
  flags.DEFINE_string("src", None, "import: release directory, .safetensors file, or ESPnet .pt")
  flags.DEFINE_string("out", None, "export: release directory (local or gs://); import: Orbax output directory")
  flags.DEFINE_string("dtype", None, "export: bfloat16 (default, or the run's config.release.dtype) | float32 | "
                      "keep; import: config (default, the model's param_dtype) | float32 | bfloat16")
  flags.DEFINE_string("max_shard_size", None, "export: largest safetensors shard (default 5GB, or the run's "
                      "config.release.max_shard_size)")
  flags.DEFINE_string("espnet_pt", None, "export: also write an ESPnet {'module': state_dict} .pt here")
  flags.DEFINE_list("skip_prefixes", [], "import: tensor name prefixes to skip (counted) besides X-Codec")
  flags.DEFINE_string("codec", None, "export: XcodecModel directory to ship (default: the codec recorded in "
                      "the run's data index.json)")
  flags.DEFINE_bool("no_codec", False, "export: a release without codec tensors (weights only)")
  flags.DEFINE_string("tokenizer", None, "export: tokenizer.json to ship (default: the tokenizer recorded in the "
                      "run's data index.json)")
  flags.DEFINE_bool("no_tokenizer", False, "export: a release without tokenizer files")
  flags.DEFINE_string("xcodec_hf_model_tag", None, "export: config.json xcodec_hf_model_tag (what the vLLM fork "
                      f"loads to decode audio; default {vllm_config.DEFAULT_XCODEC_TAG})")
  config_flags.DEFINE_config_file("config", None, "model config file (configs/*.py); export/import read "
                                  "the stored one when omitted")


def main(argv):
  backends.skip_tpu_probe_without_tpu()
  cli_util.tune_malloc()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) != 2 or argv[1] not in ("export", "import"):
    raise app.UsageError("usage: python -m bagpiper_jax.convert.release export|import --flags ...")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  with cli_util.one_line_errors(f"release {argv[1]}"):
    cfg = cli_util.model_config_from_flag(FLAGS.config)
    out = paths.resolve(FLAGS.out)
    if argv[1] == "export":
      if not FLAGS.ckpt:
        raise app.UsageError("export needs --ckpt")
      ref = paths.find_checkpoint(paths.resolve(FLAGS.ckpt), FLAGS.step)
      print(f"[release export] {'step ' + str(ref.step) + ' of ' if ref.step is not None else ''}{ref.step_dir}",
            flush=True)
      summary = export_release(ref.step_dir, out, cfg=cfg, dtype=FLAGS.dtype,
                               max_shard_bytes=cli_util.parse_size(FLAGS.max_shard_size) if FLAGS.max_shard_size
                               else None,
                               espnet_pt=paths.resolve(FLAGS.espnet_pt), codec=paths.resolve(FLAGS.codec),
                               tokenizer=paths.resolve(FLAGS.tokenizer), with_codec=not FLAGS.no_codec,
                               with_tokenizer=not FLAGS.no_tokenizer,
                               xcodec_hf_model_tag=FLAGS.xcodec_hf_model_tag)
    else:
      if not FLAGS.src:
        raise app.UsageError("import needs --src")
      summary = import_release(paths.resolve(FLAGS.src), out, cfg=cfg, dtype=FLAGS.dtype or "config",
                               skip_prefixes=tuple(p for p in FLAGS.skip_prefixes if p))
  print(f"[release {argv[1]}] {json.dumps(summary)}", flush=True)
  cli_util.report_peak_rss(f"release {argv[1]}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
