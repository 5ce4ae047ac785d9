"""The non-weight files of a release (tokenizer, chat template, generation config) and where the
tokenizer and the codec of a run come from.

Tokenizer (docs/release.md#tokenizer). The release tokenizer is the tokenizer the data was made with
(a Hugging Face `tokenizers` JSON, e.g. Qwen3's), lifted to the unified vocabulary
(docs/model.md#vocabulary):

  ids 0..255         the 256 reserved specials <|pad|> <|bos|> ... <|toolcall|> <|unused_12|> ...,
                     special added tokens
  ids 256 + q        the base vocabulary (model.vocab) and the base's own added tokens (e.g. Qwen's
                     <|endoftext|>, <think>), shifted by 256 with their flags kept, so encoding any text
                     gives exactly `tokenizer.to_unified(base.encode(text), id0_as_pad=False)`
  ids codec_start..  <codec_layer{s}_pad>, <codec_layer{s}_code{c}>, special added tokens

The names are the ESPnet vLLM fork's (its bootstrap_assets.py), so prompts and outputs read the same
there. One difference from the reference's *training* ids remains by construction: a tokenizer maps a
string to one id, so raw id 0 (Qwen3's `!`) is 256 here, while the reference's data (and ours, with
`text_id0_as_pad`, recorded in config.json) turned it into <|pad|>. bagpiper_jax's own generation
applies `tokenizer.to_unified` and so matches the training data exactly.

The chat template renders the message format of docs/data.md#sequence-format: `<|bos|>`, then per
message `<|role|>`, `<|text|>` + text (or the content as is when it carries `<|audio|>`, the
placeholder the vLLM fork expands), closed by `<|eot|>` when the next message has the same role, else
`<|eos|>`; `add_generation_prompt` appends `<|assistant|>`.

Run assets. The data tool records in each index.json what made the data (data_pipeline/build.py
`provenance`: tokenizer and codec as absolute paths with content hashes, and the text-id-0 mapping).
`resolve_assets` finds the indexes of a run's `data.train_sources` / `eval_sources`, checks that they
agree, and returns the tokenizer and codec to ship; explicit paths override, and a missing or
unusable one is one clear error naming the flag that fixes it.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

from etils import epath

from bagpiper_jax import paths
from bagpiper_jax.convert import vllm_config
from bagpiper_jax.model import config as mc
from bagpiper_jax.model.config import ModelConfig

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
CODEC_CONFIG = "codec_config.json"
INDEX_FILE = "index.json"  # data_pipeline/writer.py's summary file

NAMED_SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|eot|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|text|>", "<|audio|>", "<|image|>", "<|video|>", "<|toolcall|>")

CHAT_TEMPLATE_TEXT = """\
{#- Bagpiper message format (docs/data.md#sequence-format of bagpiper_jax):
    <|bos|> then per message <|role|> (<|text|> text | content holding <|audio|>) and
    <|eot|> if the next message has the same role, else <|eos|>. -#}
{%- for message in messages %}
{%- if loop.first %}{{ '<|bos|>' }}{% endif %}
{%- if message['role'] not in ['system', 'user', 'assistant'] %}
{{- raise_exception('Bagpiper roles are system, user and assistant, got ' + message['role']) }}
{%- endif %}
{%- if message['content'] is not string %}
{{- raise_exception('Bagpiper message content must be a string (<|audio|> marks audio)') }}
{%- endif %}
{{- '<|' + message['role'] + '|>' }}
{%- if '<|audio|>' in message['content'] %}{{ message['content'] }}
{%- else %}{{ '<|text|>' + message['content'] }}{% endif %}
{%- if not loop.last and messages[loop.index0 + 1]['role'] == message['role'] %}{{ '<|eot|>' }}
{%- else %}{{ '<|eos|>' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}
"""


class AssetError(ValueError):
  """A tokenizer or codec that cannot be found or used; the message names the path and the flag."""


def reserved_names(num_specials: int) -> list[str]:
  if num_specials < len(NAMED_SPECIALS):
    raise AssetError(f"num_specials {num_specials} < {len(NAMED_SPECIALS)} named specials")
  return list(NAMED_SPECIALS) + [f"<|unused_{i}|>" for i in range(len(NAMED_SPECIALS), num_specials)]


def codec_names(cfg: ModelConfig) -> list[str]:
  names = []
  for s in range(cfg.num_streams):
    names.append(f"<codec_layer{s}_pad>")
    names += [f"<codec_layer{s}_code{c}>" for c in range(cfg.codebook_size)]
  return names


def _added(content: str, idx: int, special: bool = True, **flags) -> dict:
  entry = {"id": idx, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": special}
  entry.update(flags)
  return entry


def _shift_post_processor(node: Any, offset: int) -> Any:
  """TemplateProcessing carries special-token ids ({"special_tokens": {name: {"ids": [...]}}}): shift them."""
  if isinstance(node, dict):
    out = {}
    for k, v in node.items():
      if k == "special_tokens" and isinstance(v, dict):
        out[k] = {name: dict(t, ids=[i + offset for i in t.get("ids", [])]) for name, t in v.items()}
      else:
        out[k] = _shift_post_processor(v, offset)
    return out
  if isinstance(node, list):
    return [_shift_post_processor(v, offset) for v in node]
  return node


def unified_tokenizer_json(base: Mapping[str, Any], cfg: ModelConfig, where: str) -> dict:
  """The base `tokenizers` JSON lifted to the unified vocabulary (see the module docstring)."""
  model = base.get("model", {})
  if not isinstance(model.get("vocab"), dict):
    raise AssetError(f"{where}: tokenizer model {model.get('type')!r} has no vocab map (BPE, WordPiece and "
                     "WordLevel tokenizers are supported, e.g. Qwen3's tokenizer.json)")
  off = cfg.num_specials
  base_added = list(base.get("added_tokens") or [])
  raw_max = max([int(i) for i in model["vocab"].values()] + [int(t["id"]) for t in base_added])
  if raw_max >= cfg.text_vocab_size:
    raise AssetError(f"{where}: raw id {raw_max} does not fit the model's text_vocab_size {cfg.text_vocab_size}")
  reserved = reserved_names(cfg.num_specials)
  codec = codec_names(cfg)
  ours = set(reserved) | set(codec)
  clash = sorted(ours & (set(model["vocab"]) | {t["content"] for t in base_added}))
  if clash:
    raise AssetError(f"{where}: the base tokenizer already has tokens named like Bagpiper's reserved/codec "
                     f"tokens: {clash[:5]}")
  # Every added token is in model.vocab too, at its id: `tokenizers` resolves an added token's id
  # through the model vocabulary (one absent from it would be given a fresh id past the vocabulary).
  vocab = {name: i for i, name in enumerate(reserved)}
  vocab.update({tok: int(i) + off for tok, i in model["vocab"].items()})
  vocab.update({t["content"]: int(t["id"]) + off for t in base_added})
  vocab.update({name: cfg.codec_start + i for i, name in enumerate(codec)})
  out = dict(base)
  out["model"] = dict(model, vocab=vocab)
  added = [_added(name, i) for i, name in enumerate(reserved)]
  added += [dict(t, id=int(t["id"]) + off) for t in base_added]
  added += [_added(name, cfg.codec_start + i) for i, name in enumerate(codec)]
  out["added_tokens"] = added
  out["post_processor"] = _shift_post_processor(base.get("post_processor"), off)
  out["truncation"] = None
  out["padding"] = None
  return out


def tokenizer_config(cfg: ModelConfig, tok: Mapping[str, Any], *, base_name: str,
                     text_id0_as_pad: bool | None) -> dict:
  return {
      "model_type": vllm_config.MODEL_TYPE,
      "tokenizer_class": "PreTrainedTokenizerFast",
      "base_tokenizer": base_name,
      "text_offset": cfg.num_specials,
      "codec_base_offset": cfg.codec_start,
      "codec_layer_size": cfg.codec_block,
      "num_streams": cfg.num_streams,
      "vocab_size": cfg.vocab_size,
      "text_id0_as_pad": text_id0_as_pad,
      "bos_token": "<|bos|>",
      "eos_token": "<|eos|>",
      "pad_token": "<|pad|>",
      "unk_token": None,
      "clean_up_tokenization_spaces": False,
      "model_max_length": cfg.max_position_embeddings,
      "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                               for t in tok["added_tokens"]},
      "chat_template": CHAT_TEMPLATE_TEXT,
  }


def generation_config() -> dict:
  """generation_config.json: the HF/vLLM defaults are the text ones; `bagpiper` holds both modalities."""
  dec = vllm_config.REFERENCE_DECODING
  return {
      "bos_token_id": mc.BOS, "eos_token_id": mc.EOS, "pad_token_id": mc.PAD, "eot_token_id": mc.EOT,
      "do_sample": True, "temperature": dec["text"]["temperature"], "top_k": dec["text"]["top_k"], "top_p": 1.0,
      "max_new_tokens": dec["text"]["max_steps"],
      "bagpiper": {k: dict(v) for k, v in dec.items()},
  }


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")


def tokenizer_files(base_tokenizer: str, cfg: ModelConfig, *, text_id0_as_pad: bool | None) -> dict[str, Any]:
  """{file name: JSON object or text} of tokenizer.json, tokenizer_config.json, special_tokens_map.json
  and chat_template.jinja, built (and checked against the model) before anything is written."""
  with open(base_tokenizer, encoding="utf-8") as f:
    base = json.load(f)
  tok = unified_tokenizer_json(base, cfg, base_tokenizer)
  special = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
  return {
      TOKENIZER_JSON: tok,
      TOKENIZER_CONFIG: tokenizer_config(cfg, tok, base_name=base_tokenizer, text_id0_as_pad=text_id0_as_pad),
      SPECIAL_TOKENS_MAP: {"bos_token": special("<|bos|>"), "eos_token": special("<|eos|>"),
                           "pad_token": special("<|pad|>")},
      CHAT_TEMPLATE: CHAT_TEMPLATE_TEXT,
  }


def write_files(out_dir: str, files: Mapping[str, Any]) -> list[str]:
  """Writes {name: JSON object or text} into out_dir; returns the names."""
  for name, content in files.items():
    if isinstance(content, str):
      with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        f.write(content)
    else:
      _write_json(os.path.join(out_dir, name), content)
  return list(files)


def write_tokenizer_files(out_dir: str, base_tokenizer: str, cfg: ModelConfig, *,
                          text_id0_as_pad: bool | None) -> list[str]:
  """tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja. Returns names."""
  return write_files(out_dir, tokenizer_files(base_tokenizer, cfg, text_id0_as_pad=text_id0_as_pad))


def write_generation_config(out_dir: str) -> str:
  _write_json(os.path.join(out_dir, GENERATION_CONFIG), generation_config())
  return GENERATION_CONFIG


# ---------------------------------------------------------------------------------------------
# Which tokenizer and codec a run's data was made with.


@dataclasses.dataclass(frozen=True)
class Assets:
  tokenizer: str | None  # a tokenizers JSON file, or None (weights-only by request)
  codec_dir: str | None  # an XcodecModel directory (config.json + *.safetensors), or None
  text_id0_as_pad: bool | None  # how the data mapped raw text id 0 (None: unknown)
  indexes: tuple[str, ...] = ()  # the data index.json files consulted

  def describe(self) -> dict:
    return {"tokenizer": self.tokenizer, "codec": self.codec_dir, "text_id0_as_pad": self.text_id0_as_pad,
            "data_indexes": list(self.indexes)}


def _source_paths(run_config: Mapping[str, Any]) -> list[str]:
  data = run_config.get("data") or {}
  out = []
  for key in ("train_sources", "eval_sources"):
    for src in (data.get(key) or {}).values():
      p = src.get("path") if isinstance(src, Mapping) else src
      if p:
        out.append(str(p))
  return out


def find_data_indexes(run_config: Mapping[str, Any] | None) -> list[str]:
  """index.json files of the run's data sources (the nearest one at or above each source path)."""
  found: list[str] = []
  for p in _source_paths(run_config or {}):
    stem = p
    for i, ch in enumerate(p):
      if ch in "*?[":  # a glob: its directory part
        stem = p[:i]
        break
    d = epath.Path(stem)
    if not d.is_dir():
      d = d.parent
    for _ in range(3):
      idx = d / INDEX_FILE
      if idx.exists():
        if str(idx) not in found:
          found.append(str(idx))
        break
      d = d.parent
  return found


def _provenance(index_path: str) -> dict:
  """(tokenizer path, tokenizer sha, codec kind, codec dir, codec sha, text_id0_as_pad) of one index."""
  d = json.loads(epath.Path(index_path).read_text())
  prov = d.get("provenance")
  if prov is not None:
    codec = prov.get("codec") or {}
    return {"tokenizer": prov["tokenizer"]["path"], "tokenizer_sha256": prov["tokenizer"].get("sha256"),
            "codec_kind": codec.get("kind", ""), "codec_dir": codec.get("dir") or None,
            "codec_sha256": codec.get("sha256"), "text_id0_as_pad": prov.get("text_id0_as_pad")}
  # Indexes written before provenance was recorded: the settings as given to the writer.
  s = d.get("settings") or {}
  kind, _, arg = str(s.get("codec", "")).partition(":")
  return {"tokenizer": s.get("tokenizer"), "tokenizer_sha256": None, "codec_kind": kind,
          "codec_dir": arg or None, "codec_sha256": None,
          "text_id0_as_pad": s.get("text_id0_as_pad", False)}  # the old writer mapped raw 0 -> 256


def _agree(values: Sequence[tuple[str, Any]], what: str, flag: str) -> Any:
  distinct = {json.dumps(v, sort_keys=True) for _, v in values}
  if len(distinct) > 1:
    lines = "; ".join(f"{idx}: {v}" for idx, v in values)
    raise AssetError(f"the run's data was made with different {what}s ({lines}); pass {flag} to choose")
  return values[0][1] if values else None


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _check_unchanged(path: str, want: str | None, what: str, index: str) -> None:
  if want and _sha256(path) != want:
    raise AssetError(f"{path}: the {what} changed since the data was made (sha256 differs from {index}); "
                     "pass it explicitly if this is intended")


def _tokenizer_json(path: str, flag: str) -> str:
  p = paths.resolve(path)
  if os.path.isdir(p):
    p = os.path.join(p, TOKENIZER_JSON)
  if p.endswith(".model"):
    raise AssetError(f"{flag} {p}: a SentencePiece model; a release ships a Hugging Face tokenizers JSON "
                     "(tokenizer.json, as vLLM and transformers read it). Pass --tokenizer=<tokenizer.json> "
                     "or --no_tokenizer for a weights-only release")
  if not os.path.isfile(p):
    raise AssetError(f"{flag} {p}: no such tokenizer file")
  return p


def _codec_dir(path: str, flag: str) -> str:
  d = paths.resolve(path)
  if not os.path.isfile(os.path.join(d, "config.json")) or not glob_lib.glob(os.path.join(d, "*.safetensors")):
    raise AssetError(f"{flag} {d}: not an XcodecModel directory (config.json + *.safetensors, as "
                     "save_pretrained writes it)")
  return d


def resolve_assets(run_config: Mapping[str, Any] | None, *, tokenizer: str | None = None,
                   codec: str | None = None, with_tokenizer: bool = True, with_codec: bool = True) -> Assets:
  """The tokenizer and codec to ship: explicit paths, else what the run's data indexes record."""
  indexes = find_data_indexes(run_config)
  provs = [(i, _provenance(i)) for i in indexes]
  where = f"data indexes {indexes}" if indexes else "no data index.json found for the run's data sources"
  id0 = _agree([(i, p["text_id0_as_pad"]) for i, p in provs], "text id 0 mapping", "--tokenizer") if provs else None

  tok = None
  if with_tokenizer:
    if tokenizer:
      tok = _tokenizer_json(tokenizer, "--tokenizer")
    else:
      recorded = _agree([(i, (p["tokenizer"], p["tokenizer_sha256"])) for i, p in provs], "tokenizer", "--tokenizer")
      if not recorded or not recorded[0]:
        raise AssetError(f"cannot tell which tokenizer made the data ({where}); pass --tokenizer=<tokenizer.json> "
                         "or --no_tokenizer for a weights-only release")
      tok = _tokenizer_json(recorded[0], f"the tokenizer recorded in {indexes[0]}")
      _check_unchanged(tok, recorded[1], "tokenizer", indexes[0])

  codec_dir = None
  if with_codec:
    if codec:
      codec_dir = _codec_dir(codec, "--codec")
    else:
      kinds = _agree([(i, (p["codec_kind"], p["codec_dir"], p["codec_sha256"])) for i, p in provs], "codec",
                     "--codec")
      if not kinds or kinds[0] != "xcodec":
        detail = (f"its codes were precomputed ({kinds[0]!r} in {indexes[0]}), so the codec is not recorded"
                  if kinds and kinds[0] else where)
        raise AssetError(f"cannot tell which X-Codec made the data: {detail}. Pass --codec=<XcodecModel dir> "
                         "or --no_codec for a release without codec tensors")
      codec_dir = _codec_dir(kinds[1], f"the codec recorded in {indexes[0]}")
      for name, sha in (kinds[2] or {}).items():
        _check_unchanged(os.path.join(codec_dir, name), sha, "codec", indexes[0])
  return Assets(tok, codec_dir, id0, tuple(indexes))
