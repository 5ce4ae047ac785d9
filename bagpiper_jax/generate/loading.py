"""`--ckpt` (a workdir, a checkpoint or a release) -> model config, parameters on the mesh, run settings.

  <workdir> | <workdir>/checkpoints | <step dir> | <params dir>   through paths.find_checkpoint (it
        says which step it picked); the model config and the run config (tokenizer, codec, audio
        windows of the run's data) come from the checkpoint's `config` item / model_config.json;
        params are restored by Orbax straight onto the mesh, cast to the model's compute dtype.
  <release dir>   (config.json + *.safetensors, bagpiper_jax/convert/release.py): the model config
        from config.json, tensors read one at a time by the conversion table (rules.py); its
        tokenizer.json / *.model is used when present.

A `--config` given next to `--ckpt` must describe the same model: a checkpoint of another size is
one error listing the fields that differ.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from bagpiper_jax import paths, sharding, train_state
from bagpiper_jax.convert import params_io, release, rules as rules_lib, safetensors_io, vllm_config
from bagpiper_jax.generate.engine import GenerateError
from bagpiper_jax.model.config import ModelConfig


@dataclasses.dataclass
class Loaded:
  cfg: ModelConfig
  params: Any
  kind: str  # checkpoint | params | release
  describe: str  # what was loaded, for the console
  run_config: Optional[dict]  # the training run's config (checkpoints of train.py), else None
  tokenizer: Optional[str]  # a tokenizer file the checkpoint names or ships
  codec: Optional[str]  # an X-Codec directory the run config names


def is_release_dir(path: str) -> bool:
  return (os.path.isdir(path) and os.path.isfile(os.path.join(path, release.CONFIG_NAME))
          and bool(glob.glob(os.path.join(path, "*.safetensors"))))


def config_mismatch(have: ModelConfig, want: ModelConfig) -> list[str]:
  """Fields (audio encoder ones prefixed) whose values differ, as 'name: checkpoint X vs config Y'."""
  a, b = have.to_dict(), want.to_dict()
  out = []
  for k in sorted(a):
    if k == "audio_encoder":
      out += [f"audio_encoder.{j}: checkpoint {a[k][j]!r} vs --config {b[k][j]!r}" for j in sorted(a[k])
              if a[k][j] != b[k][j]]
    elif a[k] != b[k] and k not in ("dtype", "param_dtype", "remat_policy", "attention_impl",
                                    "attention_q_chunk", "loss_chunk_size", "remat_save", "remat_offload",
                                    "attention_fused_bwd"):
      out.append(f"{k}: checkpoint {a[k]!r} vs --config {b[k]!r}")
  return out


def _check_expected(cfg: ModelConfig, expect: Optional[ModelConfig], where: str) -> ModelConfig:
  if expect is None:
    return cfg
  diff = config_mismatch(cfg, expect)
  if diff:
    raise GenerateError(f"{where} holds another model than --config describes:\n  " + "\n  ".join(diff))
  return dataclasses.replace(cfg, dtype=expect.dtype, attention_impl=expect.attention_impl)


def _shardings(cfg: ModelConfig, mesh: Mesh, dtype):
  abstract, logical = train_state.param_specs(cfg)
  sh = sharding.logical_to_sharding(logical, abstract, mesh, log=False)
  dt = np.dtype(dtype)
  cast = lambda a: dt if np.issubdtype(a.dtype, np.floating) else a.dtype
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, cast(a), sharding=s), abstract, sh)


def _run_config(step_dir: str) -> Optional[dict]:
  fn = os.path.join(step_dir, "config", "metadata")
  if os.path.isfile(fn):
    with open(fn) as f:
      return json.load(f)
  return None


def load(path: str, mesh: Mesh, *, expect: Optional[ModelConfig] = None) -> Loaded:
  """Loads `path` (resolved) onto `mesh`. Raises GenerateError / paths.CheckpointNotFound with one line."""
  if is_release_dir(path):
    return _load_release(path, mesh, expect)
  ref = paths.find_checkpoint(path)
  cfg = params_io.read_model_config(ref.step_dir)
  if cfg is None:
    raise GenerateError(f"{ref.step_dir}: no model config stored with the params (model_config.json or a "
                        "checkpoint config item)")
  cfg = _check_expected(cfg, expect, ref.describe())
  abstract = _shardings(cfg, mesh, cfg.dtype)
  try:
    params = params_io.load_params(ref.step_dir, abstract)
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types for a bad tree)
    raise GenerateError(f"{ref.describe()}: the params do not load into the model its config describes "
                        f"({type(e).__name__}: {str(e)[:300]})") from e
  run = _run_config(ref.step_dir)
  sample = (run or {}).get("sample", {})
  return Loaded(cfg, params, "checkpoint" if ref.step is not None else "params", ref.describe(), run,
                sample.get("tokenizer") or None, sample.get("codec") or None)


def _load_release(path: str, mesh: Mesh, expect: Optional[ModelConfig]) -> Loaded:
  with open(os.path.join(path, release.CONFIG_NAME)) as f:
    cfg = vllm_config.model_config_from_release(json.load(f))
  cfg = _check_expected(cfg, expect, path)
  source = safetensors_io.SafetensorsReader(path)
  tensor_rules = rules_lib.bagpiper_rules(cfg)
  try:
    release.check_source(source.shapes(), tensor_rules, cfg, where=path)
  except ValueError as e:
    raise GenerateError(str(e)) from e
  abstract = _shardings(cfg, mesh, cfg.dtype)
  host = rules_lib.from_torch_tensors(source.get, tensor_rules, dtype=np.dtype(cfg.dtype))
  params = jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding), host, abstract)
  tok = next((p for name in ("tokenizer.json", "tokenizer.model", "spm.model")
              for p in [os.path.join(path, name)] if os.path.isfile(p)), None)
  return Loaded(cfg, params, "release", f"release {path}", None, tok, None)
