"""Bad input to generation gives one clear message naming the input and the limit (issue 11)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import soundfile as sf

from bagpiper_jax.convert import params_io
from bagpiper_jax.generate import engine, loading
from bagpiper_jax.generate import requests as req_lib
from conftest import tiny_model_config
from test_decode_cache import random_params


def _wav(path, seconds, sr=16000, channels=1):
  t = np.arange(int(seconds * sr)) / sr
  x = 0.3 * np.sin(2 * np.pi * 440 * t)
  sf.write(str(path), np.stack([x] * channels, 1) if channels > 1 else x, sr)
  return str(path)


def _build(tmp_path, req, windows=1):
  cfg = tiny_model_config()
  return req_lib.PromptBuilder(cfg, None, max_audio_windows=windows).build(req)


def test_audio_inputs(tmp_path):
  ok = _build(tmp_path, req_lib.Request(id="a", audio=_wav(tmp_path / "a.wav", 1.0)))
  assert ok.task == "caption" and ok.notes == [] and ok.prompt.enforce == ("text",)
  assert ok.prompt.windows == 1 and ok.prompt.input_ids[0, 0] == 1  # <|bos|>
  stereo = _build(tmp_path, req_lib.Request(id="b", audio=_wav(tmp_path / "b.wav", 1.0, sr=44100,
                                                               channels=2)))
  assert any("resampled 44100 Hz -> 16000 Hz" in n for n in stereo.notes), stereo.notes
  assert any("2 channels downmixed to mono" in n for n in stereo.notes), stereo.notes
  with pytest.raises(req_lib.RequestError,
                     match=r"lasts 9.0 s and needs 2 encoder windows of 8 s; the limit is 1"):
    _build(tmp_path, req_lib.Request(id="c", audio=_wav(tmp_path / "c.wav", 9.0)))
  empty = tmp_path / "empty.wav"
  sf.write(str(empty), np.zeros(0), 16000)
  with pytest.raises(req_lib.RequestError, match=r"empty.wav: empty audio file \(0 samples\)"):
    _build(tmp_path, req_lib.Request(id="d", audio=str(empty)))
  junk = tmp_path / "junk.wav"
  junk.write_bytes(b"RIFF not really a wav file at all" * 10)
  with pytest.raises(req_lib.RequestError, match=r"junk.wav: unreadable audio"):
    _build(tmp_path, req_lib.Request(id="e", audio=str(junk)))
  with pytest.raises(req_lib.RequestError, match=r"nope.wav: file not found"):
    _build(tmp_path, req_lib.Request(id="f", audio=str(tmp_path / "nope.wav")))
  with pytest.raises(req_lib.RequestError, match="needs a tokenizer"):
    _build(tmp_path, req_lib.Request(id="g", caption="A tone."))


def test_request_lines():
  r = req_lib.Request.from_json({"id": "x", "audio": "clip.wav", "prompt": "How long?"}, "f:1", "/data")
  assert r.audio == "/data/clip.wav" and r.resolved_task() == "understand"
  assert req_lib.Request.from_json({"caption": "A tone."}, "f:2").resolved_task() == "render"
  assert req_lib.Request.from_json({"prompt": "rain"}, "f:3").resolved_task() == "generate"
  with pytest.raises(req_lib.RequestError, match=r"f:4: unknown keys \['captoin'\]"):
    req_lib.Request.from_json({"captoin": "x"}, "f:4")
  with pytest.raises(req_lib.RequestError, match="nothing to do"):
    req_lib.Request.from_json({"id": "y"}, "f:5").resolved_task()


def test_prompt_longer_than_the_cache_and_checkpoint_of_another_size(tmp_path):
  cfg = tiny_model_config()
  params = random_params(cfg)
  gen = engine.Generator(cfg, params, max_cache_len=64)
  arrays = {"input_ids": np.zeros((70, 8), np.int32), "audio_rows": np.full(70, -1, np.int32),
            "audio_mel": np.zeros((0, 8, 128, 100), np.float32),
            "audio_chunk_lens": np.zeros((0, 8), np.int32)}
  with pytest.raises(engine.GenerateError,
                     match=r"request 0: the prompt has 70 rows, more than the cache of 64"):
    gen.generate([engine.Prompt.from_template(arrays, ("text",))])
  ckpt = params_io.save_params(str(tmp_path / "ckpt"), jax.device_get(params), cfg)
  bigger = dataclasses.replace(cfg, hidden_size=64, num_layers=3)
  with pytest.raises(engine.GenerateError, match=r"another model than --config.*\n.*hidden_size: checkpoint "
                     r"32 vs --config 64\n.*num_layers: checkpoint 2 vs --config 3"):
    loading.load(str(tmp_path / "ckpt"), gen.mesh, expect=bigger)
  assert ckpt.endswith("params")
  with pytest.raises(engine.GenerateError, match="parameters have another shape"):
    engine.Generator(bigger, params)
  with pytest.raises(engine.GenerateError, match="audio max_steps 5 leaves no frame"):
    engine.Generator(cfg, params, settings=engine.DecodeSettings(
        audio=dataclasses.replace(engine.AUDIO_DEFAULTS, max_steps=5)))
