"""Release export/import: bit-exact round trips, transformers loads the exported tensors strictly and
computes what the Flax model computes, ESPnet .pt both ways, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bagpiper_jax import audio, checkpoint, config_lib  # noqa: E402
from bagpiper_jax.convert import params_io, release, rules, safetensors_io, streaming, vllm_config  # noqa: E402
from bagpiper_jax.model import Bagpiper  # noqa: E402
from bagpiper_jax.model import audio_encoder as ae  # noqa: E402
from conftest import tiny_model_config  # noqa: E402


def random_params(cfg, seed=0, std=0.2) -> dict:
  """Every leaf random (norm scales around 1), in the model's param dtype; no model init needed."""
  rng = np.random.default_rng(seed)
  out: dict = {}
  for path, s in streaming.expected_params(cfg).items():
    x = rng.standard_normal(s.shape).astype(np.float32) * std
    if path[-1] == "scale":
      x += 1.0
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = x.astype(s.dtype)
  return out


def _bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _assert_trees_bit_equal(a, b):
  fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert sorted(map(str, fa)) == sorted(map(str, fb))
  for k, x in fa.items():
    y = np.asarray(fb[k])
    assert np.asarray(x).dtype == y.dtype, (k, np.asarray(x).dtype, y.dtype)
    assert np.array_equal(_bits(x), _bits(y)), k


def _load_release(path, buffers: bool = True) -> dict:
  """The indexed shards (what vLLM loads) and, with buffers=True, espnet_buffers.safetensors."""
  out = {}
  with open(os.path.join(path, safetensors_io.INDEX_NAME)) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  for s in shards + ([release.ESPNET_BUFFERS] if buffers else []):
    out.update(safetensors_torch.load_file(os.path.join(path, s)))
  return out


WEIGHTS_ONLY = dict(with_codec=False, with_tokenizer=False)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_round_trip_orbax_release_orbax_is_bit_exact(tmp_path, param_dtype):
  cfg = tiny_model_config(param_dtype=param_dtype)
  params = random_params(cfg)
  params_io.save_params(tmp_path / "a", params, cfg)
  shard = 40_000
  summary = release.export_release(str(tmp_path / "a"), str(tmp_path / "rel"), dtype=param_dtype,
                                   max_shard_bytes=shard, espnet_pt=str(tmp_path / "base.pt"), **WEIGHTS_ONLY)
  assert summary["dtype"] == param_dtype and len(summary["shards"]) > 1

  # Layout: every rule's tensor exactly once, shards within the limit, config.json as specified.
  with open(tmp_path / "rel" / safetensors_io.INDEX_NAME) as f:
    index = json.load(f)
  names = sorted(r.torch_key for r in rules.bagpiper_rules(cfg))
  assert sorted(index["weight_map"]) == names
  for s in summary["shards"]:
    headers = safetensors_io.read_header(str(tmp_path / "rel" / s))
    size = sum(h.nbytes for h in headers.values())
    assert size <= shard or len(headers) == 1, (s, size)
  assert index["metadata"]["total_size"] == sum(int(np.prod(r.torch_shape)) for r in rules.bagpiper_rules(cfg)) * (
      4 if param_dtype == "float32" else 2)
  with open(tmp_path / "rel" / "config.json") as f:
    conf = json.load(f)
  assert conf["model_type"] == "bagpiper"
  assert conf["architectures"] == ["BagpiperForConditionalGeneration"]
  assert conf["vocab_size"] == cfg.vocab_size and conf["torch_dtype"] == param_dtype
  assert vllm_config.model_config_from_release(conf) == cfg
  # vocab_weight sits outside the index (vLLM's loader would reject it), float32, derived from the config.
  vw = safetensors_torch.load_file(str(tmp_path / "rel" / release.ESPNET_BUFFERS))
  assert list(vw) == ["vocab_weight"] and vw["vocab_weight"].dtype == torch.float32
  np.testing.assert_array_equal(vw["vocab_weight"].numpy(), release.vocab_weight(cfg))

  # Release -> Orbax (config from config.json) and ESPnet .pt -> Orbax: both bit-exact.
  release.import_release(str(tmp_path / "rel"), str(tmp_path / "b"))
  release.import_release(str(tmp_path / "base.pt"), str(tmp_path / "c"), cfg=cfg)
  _assert_trees_bit_equal(params, params_io.load_params(tmp_path / "b"))
  _assert_trees_bit_equal(params, params_io.load_params(tmp_path / "c"))
  assert params_io.read_model_config(str(tmp_path / "b")) == cfg

  # What the train loop does for config.init_from: restore into an abstract tree with shardings.
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), params)
  restored = params_io.load_params(str(tmp_path / "b"), abstract)
  assert isinstance(restored["layers"]["mlp"]["up_proj"]["kernel"], jax.Array)
  _assert_trees_bit_equal(params, restored)

  # The ESPnet .pt is a plain torch checkpoint {"module": state_dict}, equal to the safetensors.
  pt = torch.load(tmp_path / "base.pt", weights_only=True)
  assert list(pt) == ["module"]
  st = _load_release(tmp_path / "rel")
  assert sorted(pt["module"]) == sorted(st)
  for k, v in st.items():
    assert pt["module"][k].dtype == v.dtype and torch.equal(pt["module"][k], v), k


def test_fp32_checkpoint_exports_rounded_bf16_by_default(tmp_path):
  cfg = tiny_model_config()
  params = random_params(cfg, seed=1)
  params_io.save_params(tmp_path / "a", params, cfg)
  release.export_release(str(tmp_path / "a"), str(tmp_path / "rel"), **WEIGHTS_ONLY)  # default bfloat16
  st = _load_release(tmp_path / "rel", buffers=False)
  assert {v.dtype for v in st.values()} == {torch.bfloat16}
  release.import_release(str(tmp_path / "rel"), str(tmp_path / "b"))  # back to the fp32 param dtype
  back = params_io.load_params(tmp_path / "b")
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  _assert_trees_bit_equal(rounded, back)


def _torch_state(st: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in st.items() if k.startswith(prefix)}


def test_exported_tensors_run_in_transformers(tmp_path):
  from transformers import Qwen3Config, Qwen3ForCausalLM  # pylint: disable=g-import-not-at-top
  from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as omni_cfg  # pylint: disable=g-import-not-at-top
  from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as omni  # pylint: disable=g-import-not-at-top

  cfg = tiny_model_config()
  params = random_params(cfg, seed=2)
  params_io.save_params(tmp_path / "a", params, cfg)
  release.export_release(str(tmp_path / "a"), str(tmp_path / "rel"), dtype="float32", **WEIGHTS_ONLY)
  st = _load_release(tmp_path / "rel", buffers=False)

  # Decoder: model.* + lm_head.weight load strictly into Qwen3ForCausalLM with the unified vocab.
  hf = Qwen3ForCausalLM(Qwen3Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=False, attn_implementation="eager")).eval()
  dec = {k: v for k, v in st.items() if k.startswith("model.") or k == "lm_head.weight"}
  hf.load_state_dict(dec, strict=True)
  ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 13)).astype(np.int32)
  x = np.zeros((2, 13, 8), np.int32)
  x[..., 0] = ids
  batch = {"input_ids": x, "loss_weights": np.zeros((2, 13, 8), np.float32),
           "segment_ids": np.ones((2, 13), np.int32),
           "positions": np.tile(np.arange(13, dtype=np.int32), (2, 1))}
  ours = np.asarray(Bagpiper(cfg).apply({"params": params}, batch, method=Bagpiper.logits))[:, :, 0]
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  assert np.abs(ref).max() > 1.0  # not a comparison of near-zero numbers
  assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()

  # Audio tower: strip the release prefix, load strictly into Qwen3OmniMoeAudioEncoder.
  enc = cfg.audio_encoder
  tower = omni.Qwen3OmniMoeAudioEncoder(omni_cfg.Qwen3OmniMoeAudioEncoderConfig(
      num_mel_bins=enc.num_mel_bins, encoder_layers=enc.num_layers, encoder_attention_heads=enc.num_heads,
      encoder_ffn_dim=enc.ffn_dim, d_model=enc.d_model, output_dim=enc.output_dim,
      downsample_hidden_size=enc.downsample_hidden_size, n_window=enc.n_window,
      n_window_infer=enc.n_window_infer, max_source_positions=enc.max_source_positions,
      activation_function=enc.activation, attn_implementation="eager")).eval()
  tower.load_state_dict(_torch_state(st, rules.AUDIO_TOWER_PREFIX), strict=True)
  mel = np.random.default_rng(4).standard_normal((enc.num_mel_bins, 250)).astype(np.float32)
  windows, lens = audio.mel_to_windows(mel, enc)
  frames, valid = ae.AudioEncoder(enc, dtype=np.float32).apply({"params": params["audio_encoder"]}, windows, lens)
  got = np.asarray(frames)[np.asarray(valid)]
  with torch.no_grad():
    want = tower(torch.from_numpy(mel), torch.tensor([mel.shape[1]])).last_hidden_state.numpy()
  assert got.shape == want.shape and np.abs(want).max() > 0.1
  assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()

  # The remaining release tensors are exactly stream_emb and the adaptor.
  rest = sorted(k for k in st if k not in dec and not k.startswith(rules.AUDIO_TOWER_PREFIX))
  assert rest == ["adaptor.continuous_audio.bias", "adaptor.continuous_audio.weight", "stream_emb.weight"]
  np.testing.assert_array_equal(st["adaptor.continuous_audio.weight"].numpy(), params["adapter"]["kernel"].T)


def test_torch_saved_espnet_checkpoint_imports(tmp_path):
  """A .pt written by torch.save (as ESPnet does), with extra X-Codec tensors, imports exactly."""
  cfg = tiny_model_config()
  params = random_params(cfg, seed=5)
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rules.to_torch_tensors(params, rules.bagpiper_rules(cfg))}
  sd[release.CODEC_PREFIX + "quantizer.codebook"] = torch.zeros(4, 3)
  sd["vocab_weight"] = torch.from_numpy(release.vocab_weight(cfg))  # the reference's persistent buffer
  torch.save({"module": sd}, tmp_path / "base.pt")
  summary = release.import_release(str(tmp_path / "base.pt"), str(tmp_path / "o"), cfg=cfg)
  assert summary["skipped_tensors"] == 1 and summary["vocab_weight_checked"]
  _assert_trees_bit_equal(params, params_io.load_params(tmp_path / "o"))
  # A vocab_weight other than the config's (here: codec weight 1.0 from id 500 on) names the ids.
  bad_vw = release.vocab_weight(cfg)
  bad_vw[500:] = 1.0
  torch.save({"module": dict(sd, vocab_weight=torch.from_numpy(bad_vw))}, tmp_path / "badvw.pt")
  with pytest.raises(ValueError, match=r"vocab_weight differs .* at 92 ids, first \[500, 501"):
    release.import_release(str(tmp_path / "badvw.pt"), str(tmp_path / "o_vw"), cfg=cfg)
  # Other unknown entries are an error unless their prefix is skipped explicitly.
  sd["criterion.weight"] = torch.ones(2)
  torch.save({"module": sd}, tmp_path / "extra.pt")
  with pytest.raises(ValueError, match="1 tensors the model does not have: criterion.weight"):
    release.import_release(str(tmp_path / "extra.pt"), str(tmp_path / "o2"), cfg=cfg)
  s2 = release.import_release(str(tmp_path / "extra.pt"), str(tmp_path / "o2"), cfg=cfg, skip_prefixes=("criterion.",))
  assert s2["skipped_tensors"] == 2


def test_codec_tensors_pass_through_export(tmp_path):
  cfg = tiny_model_config()
  params_io.save_params(tmp_path / "a", random_params(cfg), cfg)
  codec = {"encoder.conv.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  (tmp_path / "codec").mkdir()
  save_file(codec, str(tmp_path / "codec" / "model.safetensors"))
  (tmp_path / "codec" / "config.json").write_text('{"model_type": "xcodec"}')
  s = release.export_release(str(tmp_path / "a"), str(tmp_path / "rel"), codec=str(tmp_path / "codec"),
                             with_tokenizer=False)
  assert s["codec_tensors"] == 1
  st = _load_release(tmp_path / "rel")
  np.testing.assert_array_equal(st[release.CODEC_PREFIX + "encoder.conv.weight"].numpy(),
                                codec["encoder.conv.weight"])
  assert json.loads((tmp_path / "rel" / "codec_config.json").read_text()) == {"model_type": "xcodec"}
  assert release.import_release(str(tmp_path / "rel"), str(tmp_path / "b"))["skipped_tensors"] == 1
  # No codec known and none given: one clear error naming the flags, nothing written.
  with pytest.raises(ValueError, match="cannot tell which X-Codec made the data.*--codec=.*--no_codec"):
    release.export_release(str(tmp_path / "a"), str(tmp_path / "rel2"), with_tokenizer=False)
  assert not (tmp_path / "rel2").exists()


def test_bad_release_input_lists_offending_keys(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config()
  params = random_params(cfg)
  good = dict(rules.to_torch_tensors(params, rules.bagpiper_rules(cfg)))

  def write(name, tensors):
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    return str(d)

  bad = dict(good)
  del bad["model.layers.1.mlp.up_proj.weight"], bad[rules.AUDIO_TOWER_PREFIX + "proj2.bias"]
  bad["model.layers.0.self_attn.q_norm.weight"] = np.zeros(5, np.float32)
  bad["model.layers.7.mlp.up_proj.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    release.import_release(write("bad", bad), str(tmp_path / "o1"), cfg=cfg)
  msg = str(e.value)
  for key in ("model.layers.1.mlp.up_proj.weight", rules.AUDIO_TOWER_PREFIX + "proj2.bias",
              "model.layers.0.self_attn.q_norm.weight: got (5,), expected (8,)", "model.layers.7.mlp.up_proj.weight"):
    assert key in msg, (key, msg)
  assert "2 missing tensors" in msg and "1 tensors the model does not have" in msg
  assert not (tmp_path / "o1" / "params").exists()  # nothing half-written

  # Wrong vocab size: a release for another vocabulary, imported with this config.
  other = dataclasses.replace(cfg, text_vocab_size=cfg.text_vocab_size + 10)
  wrong_vocab = dict(rules.to_torch_tensors(random_params(other), rules.bagpiper_rules(other)))
  with pytest.raises(ValueError, match=r"vocab size: model.embed_tokens.weight has 602 rows but the model config "
                                       r"has vocab_size 592") as e:
    release.import_release(write("vocab", wrong_vocab), str(tmp_path / "o2"), cfg=cfg)
  assert "lm_head.weight: got (602, 32), expected (592, 32)" in str(e.value)

  # Orbax side: a checkpoint missing a leaf and with a wrong shape -> export names both.
  broken = random_params(cfg)
  del broken["stream_emb"]
  broken["norm"]["scale"] = np.ones(7, np.float32)
  params_io.save_params(tmp_path / "ck", broken, cfg)
  with pytest.raises(ValueError) as e:
    release.export_release(str(tmp_path / "ck"), str(tmp_path / "rel"), **WEIGHTS_ONLY)
  assert "stream_emb/embedding" in str(e.value) and "norm/scale: got (7,), expected (32,)" in str(e.value)
  assert not (tmp_path / "rel").exists()
  params_io.save_params(tmp_path / "ok", params, cfg)
  release.export_release(str(tmp_path / "ok"), str(tmp_path / "rel"), **WEIGHTS_ONLY)
  with pytest.raises(ValueError, match="already holds safetensors files"):
    release.export_release(str(tmp_path / "ok"), str(tmp_path / "rel"), **WEIGHTS_ONLY)

  # No config anywhere -> ask for --config.
  write("noconf", good)
  with pytest.raises(ValueError, match="pass --config"):
    release.import_release(str(tmp_path / "noconf"), str(tmp_path / "o3"))
  with pytest.raises(params_io.ParamsIOError, match="already exists"):
    params_io.save_params(tmp_path / "ck", broken)


def test_training_checkpoint_exports_and_init_from_loads_the_import(tmp_path):
  """The train loop's checkpoints export (model config from their `config` item), and what import
  writes is what the train loop's `config.init_from` (bagpiper_jax.checkpoint.load_params) restores."""
  cfg = tiny_model_config()
  conf = config_lib.base_config("pretrain")
  conf.model = config_lib.model_config(**cfg.to_dict())
  params = random_params(cfg, seed=9)
  state = types.SimpleNamespace(params=params, step=np.int32(5), opt_state={"mu": np.zeros(3, np.float32)},
                                nonfinite={"count": np.int32(0)})
  ckptr = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), conf, async_save=False)
  assert ckptr.save(5, state, {}, {})  # no data-iterator state
  ckptr.close()
  release.export_release(str(tmp_path / "checkpoints"), str(tmp_path / "rel"), dtype="float32", **WEIGHTS_ONLY)
  release.import_release(str(tmp_path / "rel"), str(tmp_path / "init"))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), params)
  _assert_trees_bit_equal(params, checkpoint.load_params(str(tmp_path / "init"), abstract))


def _cli(*args):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=repo, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_names_the_step_and_bad_paths_in_one_line(tmp_path):
  cfg = tiny_model_config()
  conf = config_lib.base_config("pretrain")
  conf.model = config_lib.model_config(**cfg.to_dict())
  state = types.SimpleNamespace(params=random_params(cfg, seed=4), step=np.int32(7), opt_state={},
                                nonfinite={"count": np.int32(0)})
  ckptr = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), conf, async_save=False)
  assert ckptr.save(7, state, {}, {})  # no data-iterator state
  ckptr.close()
  # A workdir is enough: the latest finished step is found and named.
  r = _cli("bagpiper_jax.convert.release", "export", f"--ckpt={tmp_path / 'run'}", f"--out={tmp_path / 'rel'}",
           "--no_codec", "--no_tokenizer")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"[release export] step 7 of {tmp_path / 'run' / 'checkpoints' / '7'}" in r.stdout
  assert json.loads((tmp_path / "rel" / "release.json").read_text())["step"] == 7
  # Bad input: one line on stderr naming it, exit 1, no traceback.
  for args, what in [(("bagpiper_jax.convert.release", "export", f"--ckpt={tmp_path / 'nope'}",
                       f"--out={tmp_path / 'r2'}"), "nope: no such file or directory"),
                     (("bagpiper_jax.convert.release", "export", f"--ckpt={tmp_path / 'run'}", "--step=3",
                       f"--out={tmp_path / 'r3'}"), "no finished step 3 (finished: [7])"),
                     (("bagpiper_jax.convert.release", "export", f"--ckpt={tmp_path / 'run'}",
                       f"--out={tmp_path / 'r4'}"), "cannot tell which tokenizer made the data"),
                     (("bagpiper_jax.convert.hf_init", "--config=configs/tiny.py", f"--qwen3={tmp_path / 'q'}",
                       "--random_audio_tower", f"--out={tmp_path / 'i'}"), "--qwen3 " + str(tmp_path / "q"))]:
    r = _cli(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr[-3000:])
    err = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert len(err) == 1 and what in err[0], (what, r.stderr[-2000:])


def test_publish_copies_a_finished_release(tmp_path):
  """The staging copy used for gs:// outputs (epath), here onto a local path."""
  (tmp_path / "a").mkdir()
  for n, text in (("release.json", "{}"), ("config.json", "{}"), ("model.safetensors", "x")):
    (tmp_path / "a" / n).write_text(text)
  release.publish(str(tmp_path / "a"), str(tmp_path / "b" / "c"))
  assert sorted(os.listdir(tmp_path / "b" / "c")) == ["config.json", "model.safetensors", "release.json"]
