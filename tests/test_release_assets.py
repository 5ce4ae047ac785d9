"""Release tokenizer, chat template and generation config, read by transformers (what vLLM uses); and
the run's tokenizer / codec found through the data tool's index.json provenance.

References: `transformers.AutoTokenizer.from_pretrained(release)` must encode any text to exactly the
base tokenizer's ids + 256 and map every special / codec name to its id; its `apply_chat_template`
must produce the ids `bagpiper_jax.data.template` gives the same dialogue (the training format);
`transformers.GenerationConfig.from_pretrained` must read the reference decoding defaults.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import soundfile as sf
from array_record.python import array_record_module

from bagpiper_jax import codec as codec_lib
from bagpiper_jax import tokenizer as tokenizer_lib
from bagpiper_jax.convert import release_assets
from bagpiper_jax.data import records, template
from bagpiper_jax.model import config as mc
from conftest import tiny_model_config
from data_pipeline import build, manifest, writer

transformers = pytest.importorskip("transformers")
tk = pytest.importorskip("tokenizers")

TEXTS = [f"A steady {f} Hz sine tone, {lvl}, lasting {d:.1f} seconds! with a soft fade-in."
         for f in range(100, 2000, 37) for lvl in ("quiet", "loud") for d in (1.5, 2.5)]
CFG = tiny_model_config(text_vocab_size=320)


def base_tokenizer(path) -> str:
  """A byte-level BPE like Qwen3's: raw id 0 is '!', plus added tokens after the BPE vocabulary
  (<|endoftext|> special, <think> / </think> not special, as in Qwen3)."""
  hf = tk.Tokenizer(tk.models.BPE())
  hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  hf.train_from_iterator(TEXTS, trainer)
  hf.add_special_tokens(["<|endoftext|>"])
  hf.add_tokens(["<think>", "</think>"])
  assert hf.id_to_token(0) == "!" and hf.get_vocab_size() <= CFG.text_vocab_size
  os.makedirs(path, exist_ok=True)
  fn = os.path.join(path, "tokenizer.json")
  hf.save(fn)
  return fn


@pytest.fixture(scope="module")
def release_tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("rel")
  base = base_tokenizer(str(d / "base"))
  out = str(d / "release")
  os.makedirs(out)
  names = release_assets.write_tokenizer_files(out, base, CFG, text_id0_as_pad=True)
  release_assets.write_generation_config(out)
  return base, out, names


def test_transformers_reads_the_unified_tokenizer(release_tok):
  base_path, out, names = release_tok
  assert set(names) | {"generation_config.json"} == set(os.listdir(out))
  base = tokenizer_lib.HFTokenizer(base_path)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  for text in TEXTS[:5] + ["<think>\nlouder!\n</think>\n\nA tone.", "ünïcode <|endoftext|> tail", "!!"]:
    want = tokenizer_lib.to_unified(base.encode(text), id0_as_pad=False).tolist()
    assert tok.encode(text, add_special_tokens=False) == want, text
    assert tok.decode(want) == base.decode(base.encode(text))
  assert tok.encode("!", add_special_tokens=False) == [256]  # raw id 0 is 256 in a tokenizer (docs/release.md)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  ids = tok.convert_tokens_to_ids(["<|eot|>", "<|audio|>", "<|toolcall|>", "<|unused_12|>", "<|unused_255|>",
                                   "<codec_layer0_pad>", "<codec_layer3_code5>", "<codec_layer7_code15>"])
  assert ids == [3, 8, 11, 12, 255, CFG.codec_pad_id(0), CFG.codec_id(3, 5), CFG.vocab_size - 1]
  # Specials are single tokens inside text, and skipped when decoding with skip_special_tokens.
  text_ids = tok.encode("<|user|><|text|>A tone<|eos|>", add_special_tokens=False)
  assert text_ids[:2] == [mc.USER, mc.TEXT] and text_ids[-1] == mc.EOS
  assert tok.decode(text_ids, skip_special_tokens=True) == "A tone"
  assert len(tok) == CFG.vocab_size - (CFG.text_vocab_size - base.vocab_size)


def _record_ids(base, messages, id0_as_pad=False):
  """The training ids of a text dialogue: data.template on a record (stream 0)."""
  rec = {"id": "x", "messages": [
      {"role": r, "modality": "text", "text_ids": tokenizer_lib.to_unified(base.encode(t), id0_as_pad=id0_as_pad)}
      for r, t in messages]}
  return template.template_example(rec, CFG)["input_ids"][:, 0].tolist()


def test_chat_template_renders_the_training_format(release_tok):
  base_path, out, _ = release_tok
  base = tokenizer_lib.HFTokenizer(base_path)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  dialogue = [("system", "You generate audio."), ("user", "A tone, please."), ("user", "Make it quiet."),
              ("assistant", "<think>\nquiet\n</think>\n\nA quiet 440 Hz sine tone."), ("assistant", "Done.")]
  msgs = [{"role": r, "content": c} for r, c in dialogue]
  full = tok.apply_chat_template(msgs, tokenize=False)
  assert tok(full, add_special_tokens=False)["input_ids"] == _record_ids(base, dialogue)  # eot between same roles
  # The prompt: everything before the first assistant message, then <|assistant|> (the reference's cut).
  prompt = tok.apply_chat_template(msgs[:3], tokenize=False, add_generation_prompt=True)
  want = _record_ids(base, dialogue[:3]) + [mc.ASSISTANT]
  assert tok(prompt, add_special_tokens=False)["input_ids"] == want
  # Audio content is passed through (the vLLM fork expands <|audio|> into the encoder rows).
  audio = tok.apply_chat_template([{"role": "user", "content": "<|audio|>"}, {"role": "user", "content": "What?"}],
                                  tokenize=False, add_generation_prompt=True)
  assert audio == "<|bos|><|user|><|audio|><|eot|><|user|><|text|>What?<|eos|><|assistant|>"
  with pytest.raises(Exception, match="roles are system, user and assistant"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_generation_config_has_the_reference_defaults(release_tok):
  _, out, _ = release_tok
  g = transformers.GenerationConfig.from_pretrained(out)
  assert (g.eos_token_id, g.bos_token_id, g.pad_token_id) == (2, 1, 0)
  assert g.do_sample and g.temperature == 0.6 and g.top_k == 20 and g.max_new_tokens == 8192
  assert g.eot_token_id == 3
  assert g.bagpiper["audio"] == {"temperature": 0.8, "top_k": 20, "cfg": 3.0, "max_steps": 2048, "min_steps": 50}
  assert g.bagpiper["text"]["temperature"] == 0.6 and g.bagpiper["text"]["top_k"] == 20


def test_tokenizer_that_does_not_fit_is_refused(tmp_path):
  base = base_tokenizer(str(tmp_path / "base"))
  small = tiny_model_config(text_vocab_size=100)
  with pytest.raises(release_assets.AssetError, match="does not fit the model's text_vocab_size 100"):
    release_assets.write_tokenizer_files(str(tmp_path), base, small, text_id0_as_pad=True)


# ---------------------------------------------------------------------------------------------
# Provenance: the data tool records what made the data; the export finds it from the run config.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Shards written by the real data tool with a tiny HF tokenizer and the tiny X-Codec."""
  d = tmp_path_factory.mktemp("data")
  tok = base_tokenizer(str(d / "tok"))
  xc = codec_lib.build_tiny_xcodec(str(d / "xcodec"), seed=0)
  sf.write(d / "a.wav", (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
  with open(d / "m.jsonl", "w") as f:
    f.write(json.dumps(dict(audio=str(d / "a.wav"), rich_caption="A tone!", direction="und,gen", category="sound",
                            dataset="t")) + "\n")
  settings = build.BuildSettings(tokenizer=tok, codec=f"xcodec:{xc}")
  writer.write_shards([str(d / "m.jsonl")], str(d / "shards"), settings, num_workers=1, progress=False,
                      log=lambda s: None)
  return d, tok, xc, settings


def test_index_records_provenance_and_assets_resolve(data_dir):
  d, tok, xc, settings = data_dir
  index = json.loads((d / "shards" / "index.json").read_text())
  prov = index["provenance"]
  assert prov["tokenizer"]["path"] == tok and prov["codec"] == {
      "kind": "xcodec", "dir": xc,
      "sha256": {n: prov["codec"]["sha256"][n] for n in ("config.json", "model.safetensors")}}
  assert prov["text_id0_as_pad"] is True and index["settings"]["text_id0_as_pad"] is True
  # The records carry the reference's mapping: the caption's '!' (raw id 0) is <|pad|>, the rest + 256.
  shard = glob.glob(str(d / "shards" / "sound_gen" / "*.array_record"))[0]
  reader = array_record_module.ArrayRecordReader(shard)
  rec = records.decode(reader.read_all()[0])
  reader.close()
  raw = tokenizer_lib.HFTokenizer(tok).encode("A tone!")
  assert raw[-1] == 0
  np.testing.assert_array_equal(rec["messages"][0]["text_ids"], tokenizer_lib.to_unified(raw))
  assert rec["messages"][0]["text_ids"][-1] == 0
  # The switch is part of every shard's fingerprint (a changed mapping rebuilds the shards).
  items, _ = manifest.read_manifests([str(d / "m.jsonl")])
  fp = lambda flag: writer.shard_fingerprint(
      writer.base_fingerprint(dataclasses.replace(settings, text_id0_as_pad=flag), "tokenizer-sha"), items)
  assert fp(True) != fp(False) and fp(True) == fp(True)
  run = {"data": {"train_sources": {"sound_und": {"path": str(d / "shards" / "sound_und" / "*.array_record"),
                                                  "weight": 1.0}},
                  "eval_sources": {"sound_gen": {"path": str(d / "shards" / "sound_gen"), "weight": 1.0}}}}
  assets = release_assets.resolve_assets(run)
  assert assets.tokenizer == tok and assets.codec_dir == xc and assets.text_id0_as_pad is True
  assert assets.indexes == (str(d / "shards" / "index.json"),)
  # Explicit paths win; weights-only on request.
  assert release_assets.resolve_assets(run, with_codec=False, with_tokenizer=False).codec_dir is None
  # Nothing recorded -> one error naming the flags.
  with pytest.raises(release_assets.AssetError, match="pass --tokenizer=<tokenizer.json> or --no_tokenizer"):
    release_assets.resolve_assets({"data": {"train_sources": {}}}, with_codec=False)
  with pytest.raises(release_assets.AssetError, match="--codec=<XcodecModel dir> or --no_codec"):
    release_assets.resolve_assets({}, with_tokenizer=False)


def test_assets_refuse_npy_codes_sentencepiece_disagreement_and_changed_codec(data_dir, tmp_path):
  d, tok, xc, _ = data_dir
  index = json.loads((d / "shards" / "index.json").read_text())

  def run_with(prov, name):
    root = tmp_path / name
    (root / "src").mkdir(parents=True)
    (root / "index.json").write_text(json.dumps(dict(index, provenance=prov)))
    return {"data": {"train_sources": {"src": {"path": str(root / "src"), "weight": 1.0}}}}

  npy = run_with(dict(index["provenance"], codec={"kind": "npy", "dir": ""}), "npy")
  with pytest.raises(release_assets.AssetError, match="codes were precomputed .*--codec="):
    release_assets.resolve_assets(npy, with_tokenizer=False)
  spm = run_with(dict(index["provenance"], tokenizer={"path": str(tmp_path / "spm.model"), "sha256": None}), "spm")
  with pytest.raises(release_assets.AssetError, match="a SentencePiece model; a release ships a Hugging Face"):
    release_assets.resolve_assets(spm, with_codec=False)
  other = run_with(dict(index["provenance"], codec=dict(index["provenance"]["codec"], dir=str(tmp_path))), "other")
  same = run_with(index["provenance"], "same")["data"]["train_sources"]["src"]
  both = {"data": {"train_sources": {"a": same, "b": other["data"]["train_sources"]["src"]}}}
  with pytest.raises(release_assets.AssetError, match="different codecs"):
    release_assets.resolve_assets(both, with_tokenizer=False)
  changed = dict(index["provenance"]["codec"], sha256={"config.json": "0" * 64})
  with pytest.raises(release_assets.AssetError, match="the codec changed since the data was made"):
    release_assets.resolve_assets(run_with(dict(index["provenance"], codec=changed), "changed"),
                                  with_tokenizer=False)
