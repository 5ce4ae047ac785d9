"""A full release (tiny model, tiny X-Codec, tokenizer) loads strictly where each consumer loads it.

* ESPnet (bin/inference.py: `model.load_state_dict(ckpt["module"], strict=True)`): a torch module with
  the reference model's full key set (Qwen3 decoder + lm_head, stream_emb, the persistent buffer
  vocab_weight, adaptor.continuous_audio, the Qwen3-Omni audio tower, the whole XcodecModel) loads the
  exported --espnet_pt strictly, and the release's safetensors (shards + espnet_buffers) too.
* The vLLM fork: its converter's validation (every key under one of its KNOWN_PREFIXES, vocab_weight
  dropped, no empty group; re-implemented from its source) accepts the .pt, and the directory's indexed
  shards hold exactly what its weight mapper knows (vocab_weight is not among them).
* The codec shipped is the data's codec: rebuilt from the release it decodes bit for bit like the
  original directory.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
omni_cfg = pytest.importorskip("transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe")
omni = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")

from bagpiper_jax import codec as codec_lib  # noqa: E402
from bagpiper_jax.convert import params_io, release, safetensors_io  # noqa: E402
from conftest import tiny_model_config  # noqa: E402
from test_convert_release import random_params  # noqa: E402
from test_release_assets import base_tokenizer  # noqa: E402

# The vLLM fork's converter (examples/espnet/convert/convert_bagpiper_ckpt.py) and model mapper.
FORK_KNOWN_PREFIXES = ("model.layers.", "model.norm.", "model.embed_tokens.", "lm_head.",
                       "multimodal_io_dict.continuous_audio.model.audio_tower.", "adaptor.continuous_audio.",
                       "stream_emb.", "multimodal_io_dict.discrete_audio.codec_model.")
FORK_DROP_KEYS = {"vocab_weight"}


def fork_validate(keys) -> dict:
  """The converter's validate_and_filter: SystemExit(2) on an unknown key or an empty group."""
  counts = {p: 0 for p in FORK_KNOWN_PREFIXES}
  unknown = []
  for k in keys:
    if k in FORK_DROP_KEYS:
      continue
    p = next((p for p in FORK_KNOWN_PREFIXES if k.startswith(p)), None)
    if p is None:
      unknown.append(k)
    else:
      counts[p] += 1
  if unknown or not all(counts.values()):
    raise SystemExit(2)
  return counts


class ReferenceBagpiper(torch.nn.Module):
  """The key set of ESPnet's ParallelLLM (a Qwen3ForCausalLM subclass) with its multimodal IOs."""

  def __init__(self, cfg, codec_config: dict):
    super().__init__()
    lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, tie_word_embeddings=False))
    self.model, self.lm_head = lm.model, lm.lm_head
    self.stream_emb = torch.nn.Embedding(cfg.num_streams, cfg.hidden_size)
    self.register_buffer("vocab_weight", torch.ones(cfg.vocab_size))  # persistent, as parallel.py:156
    enc = cfg.audio_encoder
    self.adaptor = torch.nn.ModuleDict({"continuous_audio": torch.nn.Linear(enc.output_dim, cfg.hidden_size)})
    cont, disc = torch.nn.Module(), torch.nn.Module()
    cont.model = torch.nn.Module()
    cont.model.audio_tower = omni.Qwen3OmniMoeAudioEncoder(omni_cfg.Qwen3OmniMoeAudioEncoderConfig(
        num_mel_bins=enc.num_mel_bins, encoder_layers=enc.num_layers, encoder_attention_heads=enc.num_heads,
        encoder_ffn_dim=enc.ffn_dim, d_model=enc.d_model, output_dim=enc.output_dim,
        downsample_hidden_size=enc.downsample_hidden_size, n_window=enc.n_window,
        n_window_infer=enc.n_window_infer))
    disc.codec_model = transformers.XcodecModel(transformers.XcodecConfig(**codec_config))
    self.multimodal_io_dict = torch.nn.ModuleDict({"continuous_audio": cont, "discrete_audio": disc})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  d = tmp_path_factory.mktemp("strict")
  cfg = tiny_model_config(text_vocab_size=320)
  params = random_params(cfg, seed=3)
  params_io.save_params(d / "params", params, cfg)
  xc = codec_lib.build_tiny_xcodec(str(d / "xcodec"), seed=0)
  tok = base_tokenizer(str(d / "tok"))
  summary = release.export_release(str(d / "params"), str(d / "rel"), dtype="float32", codec=xc, tokenizer=tok,
                                   espnet_pt=str(d / "model.pt"), max_shard_bytes=60_000)
  return d, cfg, params, xc, summary


def test_espnet_strict_load_of_pt_and_safetensors(exported):
  d, cfg, params, xc, summary = exported
  codec_config = json.loads((d / "rel" / "codec_config.json").read_text())
  ref = ReferenceBagpiper(cfg, codec_config)
  want_keys = set(ref.state_dict())
  n_codec = sum(k.startswith(release.CODEC_PREFIX) for k in want_keys)
  assert n_codec == summary["codec_tensors"] > 100  # the whole XcodecModel, buffers included
  pt = torch.load(d / "model.pt", weights_only=True)["module"]
  assert set(pt) == want_keys
  ref.load_state_dict(pt, strict=True)
  # The values are the Flax params (through the one rules table) and the derived vocab_weight.
  np.testing.assert_array_equal(ref.vocab_weight.numpy(), release.vocab_weight(cfg))
  adaptor = ref.adaptor["continuous_audio"].weight.detach().numpy()
  np.testing.assert_array_equal(adaptor, params["adapter"]["kernel"].T)
  assert float(ref.vocab_weight[cfg.codec_start]) == 0.125 and float(ref.vocab_weight[cfg.codec_start - 1]) == 1.0
  # The release's safetensors: indexed shards + espnet_buffers.safetensors = the same state dict.
  with open(d / "rel" / safetensors_io.INDEX_NAME) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  assert len(shards) > 1
  st = {}
  for s in shards + [release.ESPNET_BUFFERS]:
    st.update(safetensors_torch.load_file(str(d / "rel" / s)))
  ReferenceBagpiper(cfg, codec_config).load_state_dict(st, strict=True)
  for k, v in st.items():
    assert torch.equal(v, pt[k]), k


def test_vllm_fork_accepts_the_checkpoint_and_the_directory(exported):
  d, cfg, _, _, _ = exported
  pt_keys = list(torch.load(d / "model.pt", weights_only=True)["module"])
  counts = fork_validate(pt_keys)
  assert counts[release.CODEC_PREFIX] > 100 and counts["model.layers."] == 11 * cfg.num_layers
  with open(d / "rel" / safetensors_io.INDEX_NAME) as f:
    indexed = set(json.load(f)["weight_map"])
  assert "vocab_weight" not in indexed  # the fork's loader has no slot for it
  assert all(k.startswith(FORK_KNOWN_PREFIXES) for k in indexed)
  assert indexed == set(pt_keys) - FORK_DROP_KEYS
  with pytest.raises(SystemExit):  # the fork's check can fail: a weights-only key set has no codec group
    fork_validate([k for k in pt_keys if not k.startswith(release.CODEC_PREFIX)])
  files = set(os.listdir(d / "rel"))
  assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "special_tokens_map.json", "codec_config.json", "release.json", release.ESPNET_BUFFERS} <= files
  assert sorted(json.loads((d / "rel" / "release.json").read_text())["files"]) == sorted(files)


def test_release_codec_is_the_datas_codec(exported):
  d, _, _, xc, _ = exported
  codes = np.random.default_rng(0).integers(0, 1024, size=(6, 8))
  ours = release.codec_from_release(str(d / "rel")).decode(codes)
  orig = codec_lib.XCodec(xc).decode(codes)
  assert ours.shape == orig.shape == (6 * 320,)
  np.testing.assert_array_equal(ours, orig)
