"""hf_init: a saved tiny Qwen3 + a saved tiny Qwen3-Omni audio tower -> Orbax params that compute
what transformers computes (text ids shifted by 256), new rows seeded N(0, init_std), clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as omni_cfg  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as omni  # noqa: E402

from bagpiper_jax.convert import audio_tower, hf_init, params_io, rules  # noqa: E402
from bagpiper_jax.model import Bagpiper  # noqa: E402
from conftest import randomize_torch_, tiny_model_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qwen3(cfg, tie=False, seed=0):
  hc = transformers.Qwen3Config(
      vocab_size=cfg.text_vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=tie, attn_implementation="eager")
  torch.manual_seed(seed)
  m = transformers.Qwen3ForCausalLM(hc).eval()
  randomize_torch_(m, seed)
  return m


def _tower(cfg, seed=0):
  enc = cfg.audio_encoder
  hc = omni_cfg.Qwen3OmniMoeAudioEncoderConfig(
      num_mel_bins=enc.num_mel_bins, encoder_layers=enc.num_layers, encoder_attention_heads=enc.num_heads,
      encoder_ffn_dim=enc.ffn_dim, d_model=enc.d_model, output_dim=enc.output_dim,
      downsample_hidden_size=enc.downsample_hidden_size, n_window=enc.n_window, n_window_infer=enc.n_window_infer,
      max_source_positions=enc.max_source_positions, activation_function=enc.activation,
      attn_implementation="eager")
  torch.manual_seed(seed)
  m = omni.Qwen3OmniMoeAudioEncoder(hc).eval()
  randomize_torch_(m, seed)
  return m, hc


def _save_omni_like(tower, hc, path, extra=True):
  """A Qwen3-Omni-style checkpoint: thinker.audio_tower.* among other thinker/talker tensors."""
  os.makedirs(path, exist_ok=True)
  sd = {f"thinker.audio_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()}
  if extra:
    sd["thinker.model.embed_tokens.weight"] = torch.zeros(3, 2)
    sd["talker.model.norm.weight"] = torch.zeros(2)
  save_file(sd, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "qwen3_omni_moe", "thinker_config": {"audio_config": hc.to_dict()}}, f)
  return path


def _text_batch(ids):
  b, l = ids.shape
  x = np.zeros((b, l, 8), np.int32)
  x[..., 0] = ids
  return {"input_ids": x, "loss_weights": np.zeros((b, l, 8), np.float32), "segment_ids": np.ones((b, l), np.int32),
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg = tiny_model_config()
  d = tmp_path_factory.mktemp("hf")
  qwen = _qwen3(cfg, seed=1)
  qwen.save_pretrained(d / "qwen3")  # safetensors + config.json
  tower, hc = _tower(cfg, seed=2)
  _save_omni_like(tower, hc, str(d / "omni"))
  out = hf_init.hf_init(cfg, str(d / "qwen3"), str(d / "init"), audio_tower_path=str(d / "omni"), seed=7)
  return cfg, d, qwen, tower, params_io.load_params(os.path.dirname(out))


def test_text_logits_equal_transformers_at_shifted_ids(saved):
  cfg, _, qwen, _, params = saved
  ids = np.random.default_rng(0).integers(0, cfg.text_vocab_size, size=(2, 11))
  ours = np.asarray(Bagpiper(cfg).apply({"params": params}, _text_batch((ids + cfg.num_specials).astype(np.int32)),
                                        method=Bagpiper.logits))
  with torch.no_grad():
    ref = qwen(torch.from_numpy(ids)).logits.numpy()
  text = ours[:, :, 0, cfg.num_specials:cfg.codec_start]
  assert np.abs(ref).max() > 1.0
  assert np.abs(text - ref).max() < 1e-4, np.abs(text - ref).max()


def test_rows_and_new_params(saved):
  cfg, d, qwen, tower, params = saved
  emb, lm = params["embed_tokens"]["embedding"], params["lm_head"]["kernel"]
  sd = {k: v.numpy() for k, v in qwen.state_dict().items()}
  s, c = cfg.num_specials, cfg.codec_start
  np.testing.assert_array_equal(emb[s:c], sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(lm[:, s:c], sd["lm_head.weight"].T)
  for new in (emb[:s], emb[c:], lm[:, :s].T, lm[:, c:].T, params["adapter"]["kernel"]):
    assert abs(float(new.std()) - cfg.init_std) < 0.1 * cfg.init_std and abs(float(new.mean())) < 0.002
  assert not np.array_equal(emb[:s], lm[:, :s].T)  # independent draws per tensor
  assert not params["stream_emb"]["embedding"].any() and not params["adapter"]["bias"].any()
  assert emb.dtype == np.float32
  # Encoder params are the Omni tower's, through the audio tower rules.
  want = rules.from_torch_tensors(lambda k: tower.state_dict()[k].numpy(),
                                  audio_tower.audio_tower_rules(cfg.audio_encoder, flax_root=()))
  got = jax.tree_util.tree_flatten_with_path(params["audio_encoder"])[0]
  want = jax.tree_util.tree_flatten_with_path(want)[0]
  assert [kp for kp, _ in want] == [kp for kp, _ in got]  # the same leaves, none missing or extra
  for (kp, a), (_, b) in zip(want, got):
    np.testing.assert_array_equal(a, b, err_msg=str(kp))


def test_seeded_and_deterministic(saved, tmp_path):
  cfg, d, _, _, params = saved
  again = params_io.load_params(os.path.dirname(hf_init.hf_init(
      cfg, str(d / "qwen3"), str(tmp_path / "a"), audio_tower_path=str(d / "omni"), seed=7)))
  other = params_io.load_params(os.path.dirname(hf_init.hf_init(
      cfg, str(d / "qwen3"), str(tmp_path / "b"), audio_tower_path=str(d / "omni"), seed=8)))
  np.testing.assert_array_equal(again["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(again["adapter"]["kernel"], params["adapter"]["kernel"])
  assert not np.array_equal(other["embed_tokens"]["embedding"][:cfg.num_specials],
                            params["embed_tokens"]["embedding"][:cfg.num_specials])
  np.testing.assert_array_equal(other["embed_tokens"]["embedding"][cfg.num_specials:cfg.codec_start],
                                params["embed_tokens"]["embedding"][cfg.num_specials:cfg.codec_start])


def test_tied_qwen3_and_standalone_tower(tmp_path):
  cfg = tiny_model_config()
  qwen = _qwen3(cfg, tie=True, seed=3)
  qwen.save_pretrained(tmp_path / "q")
  tower, _ = _tower(cfg, seed=4)
  tower.save_pretrained(tmp_path / "t")  # bare names, top-level audio config
  out = hf_init.hf_init(cfg, str(tmp_path / "q"), str(tmp_path / "o"), audio_tower_path=str(tmp_path / "t"))
  p = params_io.load_params(os.path.dirname(out))
  s, c = cfg.num_specials, cfg.codec_start
  np.testing.assert_array_equal(p["lm_head"]["kernel"][:, s:c], p["embed_tokens"]["embedding"][s:c].T)
  np.testing.assert_array_equal(p["audio_encoder"]["proj2"]["bias"], tower.state_dict()["proj2.bias"].numpy())


def test_bad_inputs_raise_clear_errors(saved, tmp_path):
  cfg, d, qwen, tower, _ = saved
  # Config mismatches are listed together (before any tensor is read).
  other = dataclasses.replace(cfg, text_vocab_size=300, rope_theta=1e4)
  with pytest.raises(ValueError) as e:
    hf_init.hf_init(other, str(d / "qwen3"), str(tmp_path / "o"), audio_tower_path=str(d / "omni"))
  assert "vocab_size: " in str(e.value) and "has 200, model config text_vocab_size is 300" in str(e.value)
  assert "rope_theta" in str(e.value)
  bad_enc = dataclasses.replace(cfg, audio_encoder=dataclasses.replace(cfg.audio_encoder, ffn_dim=48))
  with pytest.raises(ValueError, match=r"encoder_ffn_dim: .* has 32, model config audio_encoder.ffn_dim is 48"):
    hf_init.hf_init(bad_enc, str(d / "qwen3"), str(tmp_path / "o"), audio_tower_path=str(d / "omni"))

  # Tensor problems, without a config.json to catch them first: missing, wrong shapes, wrong vocab.
  sd = {k: v.contiguous() for k, v in qwen.state_dict().items()}
  del sd["model.layers.1.mlp.down_proj.weight"]
  sd["model.norm.weight"] = torch.zeros(5)
  sd["model.embed_tokens.weight"] = torch.zeros(199, cfg.hidden_size)
  (tmp_path / "q").mkdir()
  save_file(sd, str(tmp_path / "q" / "model.safetensors"))
  with pytest.raises(ValueError) as e:
    hf_init.hf_init(cfg, str(tmp_path / "q"), str(tmp_path / "o"), audio_tower_path=str(d / "omni"))
  msg = str(e.value)
  assert "vocab size: model.embed_tokens.weight has 199 rows but the model config has text_vocab_size 200" in msg
  assert "model.layers.1.mlp.down_proj.weight" in msg and "model.norm.weight: got (5,), expected (32,)" in msg

  # Audio tower missing a tensor.
  sd_t = {f"thinker.audio_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()
          if k != "layers.1.fc2.bias"}
  (tmp_path / "t").mkdir()
  save_file(sd_t, str(tmp_path / "t" / "model.safetensors"))
  with pytest.raises(ValueError, match=r"1 missing tensors: thinker.audio_tower.layers.1.fc2.bias"):
    hf_init.hf_init(cfg, str(d / "qwen3"), str(tmp_path / "o"), audio_tower_path=str(tmp_path / "t"))
  assert not (tmp_path / "o" / "params").exists()


def test_cli(saved, tmp_path):
  cfg, d, _, _, params = saved
  conf = tmp_path / "tiny_cfg.py"
  conf.write_text(
      "from bagpiper_jax import config_lib\n"
      "def get_config(stage='pretrain'):\n"
      "  c = config_lib.base_config(stage)\n"
      f"  c.model = config_lib.model_config(**{cfg.to_dict()!r})\n"
      "  return c\n")
  r = subprocess.run([sys.executable, "-m", "bagpiper_jax.convert.hf_init", f"--config={conf}",
                      f"--qwen3={d / 'qwen3'}", f"--audio_tower={d / 'omni'}", f"--out={tmp_path / 'o'}", "--seed=7"],
                     capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[hf_init] peak RSS:" in r.stdout
  assert "2 other tensors of that checkpoint not used" in r.stdout
  np.testing.assert_array_equal(params_io.load_params(tmp_path / "o")["embed_tokens"]["embedding"],
                                params["embed_tokens"]["embedding"])
