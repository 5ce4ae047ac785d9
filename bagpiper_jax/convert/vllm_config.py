"""config.json of a release, in the schema of the ESPnet vLLM fork's `BagpiperConfig`.

The fork (`espnet/vllm`, `vllm/transformers_utils/configs/bagpiper.py`) reads:

  top level     num_stream, adaptor_input_dim, vocab_size, hidden_size, codec_base_offset,
                codec_layer_size, text_token_offset, text_token_end, the special ids
                (pad/bos/eos/eot/system/user/assistant/text/audio/audio_placeholder), decoding
                defaults (text/audio temperature and top-k), xcodec_hf_model_tag / _sample_rate
  text_config   BagpiperTextConfig: the Qwen3 decoder fields (vocab_size of the unified vocabulary)
  audio_config  BagpiperAudioEncoderConfig: the Qwen3-Omni audio tower fields

Every field it has a default for is written, so nothing falls back to the fork's 8B defaults (a tiny
release would otherwise read 11 wrong values). `bagpiper_jax` holds the exact ModelConfig for
re-import here, plus what the data was made with (text id 0 mapping, codec provenance).

Values chosen so that the fork's loader computes what this model computes (docs/release.md):
  * audio_config.n_window = 50, n_window_infer = 800 (= AudioEncoderConfig). The fork chunks the mel
    into 2 * n_window frames, counts prompt placeholders with `_get_feat_extract_output_lengths(L,
    n_window)` and attends within `13 * n_window_infer // (2 * n_window)` frames. 50 / 800 gives our
    100-frame chunks (13 frames each) and 8-chunk windows, which is also what the reference trained with
    (ESPnet loads Qwen3-Omni's config, 50 / 800). The fork's bootstrap writes 100 / 400 by default
    (its LEGACY_OVERRIDES, transformers' class defaults): 200-frame chunks and other placeholder
    counts (1,000 mel frames -> 125 rows instead of 130), i.e. not this model.
  * text_config.max_position_embeddings = the model's (32,768 for the 8B, the Qwen3-8B-Base value; the
    fork's bootstrap writes 40,960). RoPE has no scaling here, so the value changes no number the
    model computes; it is the longest context vLLM will accept by default.
"""

from __future__ import annotations

from typing import Any, Mapping

from bagpiper_jax.model import config as mc
from bagpiper_jax.model.config import AudioEncoderConfig, ModelConfig

FORMAT_VERSION = 2
MODEL_TYPE = "bagpiper"
ARCHITECTURE = "BagpiperForConditionalGeneration"
DEFAULT_XCODEC_TAG = "hf-audio/xcodec-hubert-general"
XCODEC_SAMPLE_RATE = 16_000

# The reference's decoding defaults (docs/model.md#decoding-rules-of-the-reference; the recipe's
# inference yamls): per modality temperature, top-k, classifier-free guidance, max / min steps.
REFERENCE_DECODING = {
    "text": {"temperature": 0.6, "top_k": 20, "cfg": 1.0, "max_steps": 8192, "min_steps": 1},
    "audio": {"temperature": 0.8, "top_k": 20, "cfg": 3.0, "max_steps": 2048, "min_steps": 50},
}

# transformers' Qwen3OmniMoeAudioEncoderConfig / the fork's BagpiperAudioEncoderConfig field <-
# AudioEncoderConfig field.
HF_AUDIO_FIELDS = {
    "num_mel_bins": "num_mel_bins", "encoder_layers": "num_layers", "encoder_attention_heads": "num_heads",
    "encoder_ffn_dim": "ffn_dim", "d_model": "d_model", "output_dim": "output_dim",
    "downsample_hidden_size": "downsample_hidden_size", "n_window": "n_window",
    "n_window_infer": "n_window_infer", "max_source_positions": "max_source_positions",
    "activation_function": "activation",
}
# The audio tower's fields with no counterpart in the model (inference-time constants of the tower).
_AUDIO_CONSTANTS = {"dropout": 0, "attention_dropout": 0, "activation_dropout": 0, "scale_embedding": False,
                    "initializer_range": 0.02, "conv_chunksize": 500}
# Qwen3Config / BagpiperTextConfig field <- ModelConfig field.
HF_TEXT_FIELDS = {
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
    "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
}
SPECIAL_IDS = {
    "pad_token_id": mc.PAD, "bos_token_id": mc.BOS, "eos_token_id": mc.EOS, "eot_token_id": mc.EOT,
    "system_token_id": mc.SYSTEM, "user_token_id": mc.USER, "assistant_token_id": mc.ASSISTANT,
    "text_token_id": mc.TEXT, "audio_token_id": mc.AUDIO, "audio_placeholder_token_id": mc.AUDIO,
}


def text_config(cfg: ModelConfig) -> dict:
  d = {"model_type": "bagpiper_text", "vocab_size": cfg.vocab_size}
  d.update({hf: getattr(cfg, ours) for hf, ours in HF_TEXT_FIELDS.items()})
  d.update(hidden_act="silu", initializer_range=cfg.init_std, use_cache=True, tie_word_embeddings=False,
           rope_scaling=None, attention_bias=False, attention_dropout=0.0)
  d["rope_theta"] = float(d["rope_theta"])
  return d


def audio_config(enc: AudioEncoderConfig) -> dict:
  d = {"model_type": "bagpiper_audio_encoder"}
  d.update({hf: getattr(enc, ours) for hf, ours in HF_AUDIO_FIELDS.items()})
  d.update(_AUDIO_CONSTANTS)
  return d


def release_config(cfg: ModelConfig, *, torch_dtype: str, xcodec_hf_model_tag: str = DEFAULT_XCODEC_TAG,
                   data: Mapping[str, Any] | None = None) -> dict:
  """The release's config.json: the fork's BagpiperConfig fields + the exact ModelConfig.

  `data`: what the data was made with (text_id0_as_pad, tokenizer / codec provenance), recorded in
  the bagpiper_jax block.
  """
  dec = REFERENCE_DECODING
  d = {
      "architectures": [ARCHITECTURE],
      "model_type": MODEL_TYPE,
      "torch_dtype": torch_dtype,
      "audio_config": audio_config(cfg.audio_encoder),
      "text_config": text_config(cfg),
      "num_stream": cfg.num_streams,
      "adaptor_input_dim": cfg.audio_encoder.output_dim,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "codec_base_offset": cfg.codec_start,
      "codec_layer_size": cfg.codec_block,
      "text_token_offset": cfg.num_specials,
      "text_token_end": cfg.codec_start,
      **SPECIAL_IDS,
      "initializer_range": cfg.init_std,
      "tie_word_embeddings": False,
      "audio_temperature": dec["audio"]["temperature"],
      "audio_topk": dec["audio"]["top_k"],
      "text_temperature": dec["text"]["temperature"],
      "text_topk": dec["text"]["top_k"],
      "xcodec_hf_model_tag": xcodec_hf_model_tag,
      "xcodec_sample_rate": XCODEC_SAMPLE_RATE,
      "bagpiper_jax": {"format_version": FORMAT_VERSION, "model_config": cfg.to_dict(), "data": dict(data or {})},
  }
  return d


def model_config_from_release(d: Mapping[str, Any]) -> ModelConfig:
  """ModelConfig from a release config.json: exact from our bagpiper_jax block, else from the fork's
  fields (e.g. a directory built by the fork's bootstrap for an ESPnet checkpoint)."""
  if "bagpiper_jax" in d and "model_config" in d["bagpiper_jax"]:
    return ModelConfig.from_dict(d["bagpiper_jax"]["model_config"])
  if "text_config" not in d or "audio_config" not in d:
    raise ValueError("config.json has neither a bagpiper_jax.model_config block nor the vLLM fork's "
                     "text_config / audio_config; pass --config")
  text, audio = d["text_config"], d["audio_config"]
  kw = {ours: text[hf] for hf, ours in HF_TEXT_FIELDS.items() if hf in text}
  if "num_stream" in d:
    kw["num_streams"] = d["num_stream"]
  if "codec_layer_size" in d:
    kw["codebook_size"] = d["codec_layer_size"] - 1
  if "text_token_offset" in d:
    kw["num_specials"] = d["text_token_offset"]
  if "text_token_end" in d and "text_token_offset" in d:
    kw["text_vocab_size"] = d["text_token_end"] - d["text_token_offset"]
  kw["audio_encoder"] = AudioEncoderConfig(**{ours: audio[hf] for hf, ours in HF_AUDIO_FIELDS.items()
                                              if hf in audio})
  cfg = ModelConfig(**kw)
  for key, want in (("vocab_size", cfg.vocab_size), ("codec_base_offset", cfg.codec_start)):
    if key in d and d[key] != want:
      raise ValueError(f"config.json {key} {d[key]} != {want} derived from its text_token_offset / "
                       "text_token_end / num_stream / codec_layer_size")
  return cfg
