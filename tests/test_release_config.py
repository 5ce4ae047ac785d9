"""config.json read the way the ESPnet vLLM fork reads it: every value equals the model's.

`fork_reader` below re-implements, from the fork's source (`espnet/vllm`,
vllm/transformers_utils/configs/bagpiper.py), how `BagpiperConfig(**config_json)` resolves each field:
its parameter names and its defaults (the 8B model's), nested `text_config` / `audio_config` dicts
through `BagpiperTextConfig` / `BagpiperAudioEncoderConfig`, and `num_key_value_heads=None` ->
`num_attention_heads`. No vllm install is needed. A field the export forgot would silently read the
fork's 8B default and fail the comparison (on the tiny config, and on the 8B one where the defaults
differ, e.g. max_position_embeddings 40,960 vs the Base model's 32,768).

It also re-implements the two places where the fork's loader turns audio_config into arithmetic
(models/bagpiper.py `_get_feat_extract_output_lengths(L, n_window)` for the prompt placeholders, and the
vLLM audio tower's chunk / attention-window sizes) and checks them against the model's own.
"""

from __future__ import annotations


import pytest

from bagpiper_jax.convert import vllm_config
from bagpiper_jax.model import config as mc
from bagpiper_jax.model.config import ModelConfig
from conftest import tiny_model_config

# --- the fork's defaults, verbatim from its __init__ signatures -------------------------------------
FORK_AUDIO_DEFAULTS = dict(
    num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280,
    dropout=0, attention_dropout=0, activation_function="gelu", activation_dropout=0, scale_embedding=False,
    initializer_range=0.02, max_source_positions=1500, n_window=100, output_dim=2048, n_window_infer=400,
    conv_chunksize=500, downsample_hidden_size=480)
FORK_TEXT_DEFAULTS = dict(
    vocab_size=160392, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, initializer_range=0.02,
    rms_norm_eps=1e-6, use_cache=True, tie_word_embeddings=False, rope_theta=1000000.0, rope_scaling=None,
    attention_bias=False, attention_dropout=0.0)
FORK_TOP_DEFAULTS = dict(
    num_stream=8, adaptor_input_dim=2048, vocab_size=160392, hidden_size=4096, codec_base_offset=152192,
    codec_layer_size=1025, text_token_offset=256, text_token_end=152192, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, eot_token_id=3, system_token_id=4, user_token_id=5, assistant_token_id=6, text_token_id=7,
    audio_token_id=8, audio_placeholder_token_id=8, initializer_range=0.02, audio_temperature=0.8, audio_topk=20,
    text_temperature=0.6, text_topk=20, xcodec_hf_model_tag="hf-audio/xcodec-hubert-general",
    xcodec_sample_rate=16000)


def fork_reader(d: dict) -> dict:
  """What BagpiperConfig(**d) holds: {'top': {...}, 'text': {...}, 'audio': {...}}."""
  def resolve(defaults, given):
    return {k: given.get(k, v) for k, v in defaults.items()}
  text = resolve(FORK_TEXT_DEFAULTS, d.get("text_config") or {})
  if text["num_key_value_heads"] is None:
    text["num_key_value_heads"] = text["num_attention_heads"]
  audio = resolve(FORK_AUDIO_DEFAULTS, d.get("audio_config") or {})
  return {"top": resolve(FORK_TOP_DEFAULTS, d), "text": text, "audio": audio,
          "model_type": d.get("model_type"), "architectures": d.get("architectures")}


def fork_audio_output_lengths(n: int, n_window: int) -> int:
  """models/bagpiper.py `_get_feat_extract_output_lengths` (the prompt's audio placeholders)."""
  chunk = n_window * 2
  full_cnn = chunk
  for _ in range(3):
    full_cnn = (full_cnn - 1) // 2 + 1
  rem = n % chunk
  for _ in range(3):
    rem = (rem - 1) // 2 + 1
  return (n // chunk) * full_cnn + rem


def fork_attention_window(n_window: int, n_window_infer: int) -> int:
  """vLLM Qwen3OmniMoeAudioEncoder: window_aftercnn = cnn frames of a full chunk * chunks per window."""
  full_cnn = n_window * 2
  for _ in range(3):
    full_cnn = (full_cnn - 1) // 2 + 1
  return full_cnn * (n_window_infer // (n_window * 2))


def expected_values(cfg: ModelConfig) -> dict:
  """What each fork field must be for this model, from ModelConfig (independently of vllm_config)."""
  enc = cfg.audio_encoder
  return {
      "top": dict(num_stream=cfg.num_streams, adaptor_input_dim=enc.output_dim, vocab_size=cfg.vocab_size,
                  hidden_size=cfg.hidden_size, codec_base_offset=cfg.codec_start,
                  codec_layer_size=cfg.codebook_size + 1, text_token_offset=cfg.num_specials,
                  text_token_end=cfg.num_specials + cfg.text_vocab_size, pad_token_id=mc.PAD, bos_token_id=mc.BOS,
                  eos_token_id=mc.EOS, eot_token_id=mc.EOT, system_token_id=mc.SYSTEM, user_token_id=mc.USER,
                  assistant_token_id=mc.ASSISTANT, text_token_id=mc.TEXT, audio_token_id=mc.AUDIO,
                  audio_placeholder_token_id=mc.AUDIO, initializer_range=cfg.init_std, audio_temperature=0.8,
                  audio_topk=20, text_temperature=0.6, text_topk=20,
                  xcodec_hf_model_tag="hf-audio/xcodec-hubert-general", xcodec_sample_rate=16000),
      "text": dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                   num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                   num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                   max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.init_std,
                   rms_norm_eps=cfg.rms_norm_eps, use_cache=True, tie_word_embeddings=False,
                   rope_theta=cfg.rope_theta, rope_scaling=None, attention_bias=False, attention_dropout=0.0),
      "audio": dict(num_mel_bins=enc.num_mel_bins, encoder_layers=enc.num_layers,
                    encoder_attention_heads=enc.num_heads, encoder_ffn_dim=enc.ffn_dim, d_model=enc.d_model,
                    dropout=0, attention_dropout=0, activation_function=enc.activation, activation_dropout=0,
                    scale_embedding=False, initializer_range=0.02, max_source_positions=enc.max_source_positions,
                    n_window=enc.n_window, output_dim=enc.output_dim, n_window_infer=enc.n_window_infer,
                    conv_chunksize=500, downsample_hidden_size=enc.downsample_hidden_size),
  }


CONFIGS = {"tiny": tiny_model_config(), "8b": ModelConfig()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fork_reads_every_value_of_the_model(name):
  cfg = CONFIGS[name]
  d = vllm_config.release_config(cfg, torch_dtype="bfloat16")
  got = fork_reader(d)
  want = expected_values(cfg)
  assert got["model_type"] == "bagpiper" and got["architectures"] == ["BagpiperForConditionalGeneration"]
  wrong = [f"{part}.{k}: fork reads {got[part][k]!r}, model has {v!r}"
           for part in ("top", "text", "audio") for k, v in want[part].items() if got[part][k] != v]
  assert not wrong, "\n".join(wrong)
  # Every field the fork has a default for is written explicitly (none left to its 8B defaults).
  assert set(FORK_TOP_DEFAULTS) <= set(d)
  assert set(FORK_TEXT_DEFAULTS) <= set(d["text_config"]) and set(FORK_AUDIO_DEFAULTS) <= set(d["audio_config"])
  # And we re-import exactly.
  assert vllm_config.model_config_from_release(d) == cfg
  stripped = {k: v for k, v in d.items() if k != "bagpiper_jax"}  # the fork's fields alone suffice too
  back = vllm_config.model_config_from_release(stripped)
  arch = ("text_vocab_size", "num_specials", "num_streams", "codebook_size", "hidden_size", "intermediate_size",
          "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps",
          "max_position_embeddings", "audio_encoder")
  assert {k: getattr(back, k) for k in arch} == {k: getattr(cfg, k) for k in arch}


def test_the_forks_default_config_would_be_wrong_on_a_tiny_model():
  """Why every field is written: with the fork's defaults the tiny model reads many wrong values."""
  cfg = CONFIGS["tiny"]
  got = fork_reader({})
  want = expected_values(cfg)
  wrong = [k for part in ("top", "text", "audio") for k, v in want[part].items() if got[part][k] != v]
  assert len(wrong) > 11, wrong


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fork_audio_arithmetic_equals_the_models(name):
  """With n_window / n_window_infer as written, the fork's loader computes this model's placeholder
  counts, chunk size and attention window; with its bootstrap's legacy 100 / 400 it would not."""
  enc = CONFIGS[name].audio_encoder
  a = vllm_config.release_config(CONFIGS[name], torch_dtype="float32")["audio_config"]
  for n in range(1, 2500):
    assert fork_audio_output_lengths(n, a["n_window"]) == mc.encoder_output_length(n, enc.n_window), n
  assert 2 * a["n_window"] == enc.chunk_frames
  assert fork_attention_window(a["n_window"], a["n_window_infer"]) == enc.frames_per_window_out
  # The fork bootstrap's LEGACY_OVERRIDES (n_window 100, n_window_infer 400) describe another encoder.
  assert fork_audio_output_lengths(1000, 100) == 125 != mc.encoder_output_length(1000, enc.n_window) == 130
  assert fork_attention_window(100, 400) != enc.frames_per_window_out
