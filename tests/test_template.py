"""Templating of one record into the sequence format (docs/data.md#sequence-format), checked against hand-built matrices."""

from __future__ import annotations

import numpy as np
import pytest

from bagpiper_jax.data import records
from bagpiper_jax.data import template
from bagpiper_jax.model import audio_encoder as ae
from bagpiper_jax.model import config as mc

CFG = mc.ModelConfig(text_vocab_size=1000)  # real stream/codec/encoder layout, small text range
S = CFG.num_streams
PAD = [CFG.codec_pad_id(n) for n in range(S)]


def _text_row(tok):
  return [tok] + [0] * (S - 1)


def test_hand_built_dialogue():
  """system text, user audio, user text, assistant text, assistant audio: every cell spelled out."""
  rng = np.random.default_rng(0)
  mel = rng.standard_normal((128, 250)).astype(np.float16)  # chunks of 100, 100, 50 frames
  codes = rng.integers(0, 1024, (3, S)).astype(np.int16)  # 3 frames -> 3 + 7 = 10 delay rows
  ex = {"id": "x", "source": "sft", "task": "dialogue", "messages": [
      {"role": "system", "modality": "text", "text_ids": np.array([300, 301], np.int32)},
      {"role": "user", "modality": "audio", "mel": mel},
      {"role": "user", "modality": "text", "text_ids": np.array([302], np.int32)},
      {"role": "assistant", "modality": "text", "text_ids": np.array([303, 304], np.int32)},
      {"role": "assistant", "modality": "audio", "codes": codes},
  ]}
  ex = records.decode(records.encode(ex))
  out = template.template_example(ex, CFG)

  l_enc = 13 + 13 + 7  # conv_out_length(100) = 13, conv_out_length(50) = 7
  assert mc.encoder_output_length(250) == l_enc
  rows, wts = [], []
  def add(tok, w=0.0):
    rows.append(_text_row(tok))
    wts.append([w] + [0.0] * (S - 1))
  add(mc.BOS)
  add(mc.SYSTEM); add(mc.TEXT); add(300); add(301); add(mc.EOS)          # next role differs -> eos
  add(mc.USER); add(mc.AUDIO)
  audio_start = len(rows)
  for _ in range(l_enc):
    add(0)
  add(mc.EOT)                                                            # next message is user -> eot
  add(mc.USER); add(mc.TEXT); add(302); add(mc.EOS)
  add(mc.ASSISTANT, 1.0); add(mc.TEXT, 1.0); add(303, 1.0); add(304, 1.0); add(mc.EOT, 1.0)
  add(mc.ASSISTANT, 1.0); add(mc.AUDIO, 1.0)
  for r in range(3 + S - 1):
    row = []
    for n in range(S):
      f = r - n  # stream n is delayed by n frames
      row.append(CFG.codec_id(n, int(codes[f, n])) if 0 <= f < 3 else PAD[n])
    rows.append(row)
    wts.append([0.125] * S)
  add(mc.EOS, 1.0)                                                       # last message -> eos

  np.testing.assert_array_equal(out["input_ids"], np.array(rows, np.int32))
  np.testing.assert_array_equal(out["loss_weights"], np.array(wts, np.float32))
  assert out["input_ids"].dtype == np.int32 and out["loss_weights"].dtype == np.float32
  assert len(rows) == template.num_rows(ex, CFG)

  # A few cells by hand, to make the delay pattern unmistakable.
  a0 = len(rows) - 1 - 10  # first codec row
  assert out["input_ids"][a0, 0] == CFG.codec_id(0, int(codes[0, 0]))
  assert out["input_ids"][a0, 1] == PAD[1] and out["input_ids"][a0 + 1, 1] == CFG.codec_id(1, int(codes[0, 1]))
  assert out["input_ids"][a0 + 3, 0] == PAD[0]  # stream 0 ran out after 3 frames
  assert out["input_ids"][a0 + 9, 7] == CFG.codec_id(7, int(codes[2, 7]))
  assert out["input_ids"][a0 + 6, 7] == PAD[7]

  # Audio: placeholder rows map to encoder frames 0..32 of window 0; everything else -1.
  want_rows = np.full(len(rows), -1)
  want_rows[audio_start:audio_start + l_enc] = np.arange(l_enc)
  np.testing.assert_array_equal(out["audio_rows"], want_rows)
  assert out["audio_mel"].shape == (1, 8, 128, 100)
  np.testing.assert_array_equal(out["audio_chunk_lens"], [[100, 100, 50, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["audio_mel"][0, 0], mel[:, 0:100])
  np.testing.assert_array_equal(out["audio_mel"][0, 1], mel[:, 100:200])
  np.testing.assert_array_equal(out["audio_mel"][0, 2, :, :50], mel[:, 200:250])
  assert not out["audio_mel"][0, 2, :, 50:].any() and not out["audio_mel"][0, 3:].any()


def test_two_audios_get_their_own_windows():
  """1700 frames = 17 chunks = 3 windows; the second audio starts at window 3 = frame 3*8*13."""
  rng = np.random.default_rng(1)
  mel_a = rng.standard_normal((128, 1700)).astype(np.float16)
  mel_b = rng.standard_normal((128, 120)).astype(np.float16)
  ex = {"id": "y", "source": "sft", "task": "dialogue", "messages": [
      {"role": "user", "modality": "audio", "mel": mel_a},
      {"role": "user", "modality": "audio", "mel": mel_b},
      {"role": "assistant", "modality": "text", "text_ids": np.array([400], np.int32)},
  ]}
  out = template.template_example(ex, CFG)
  la, lb = 17 * 13, 13 + 3  # conv_out_length(20) = 3
  rows = out["audio_rows"]
  start_a = 3  # bos, user, audio
  start_b = start_a + la + 1 + 2  # eot, user, audio
  np.testing.assert_array_equal(rows[start_a:start_a + la], np.arange(la))
  np.testing.assert_array_equal(rows[start_b:start_b + lb], 3 * 8 * 13 + np.arange(lb))
  assert (rows >= 0).sum() == la + lb
  assert out["input_ids"][start_a + la, 0] == mc.EOT and out["input_ids"][start_b + lb, 0] == mc.EOS
  assert not out["input_ids"][rows >= 0].any()  # placeholders are all-zero rows
  assert out["audio_mel"].shape == (4, 8, 128, 100)
  np.testing.assert_array_equal(out["audio_chunk_lens"][1], [100] * 8)
  np.testing.assert_array_equal(out["audio_chunk_lens"][2], [100, 0, 0, 0, 0, 0, 0, 0])  # chunk 16 alone
  np.testing.assert_array_equal(out["audio_chunk_lens"][3], [100, 20, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["audio_mel"][2, 0], mel_a[:, 1600:1700])
  np.testing.assert_array_equal(out["audio_mel"][3, 1, :, :20], mel_b[:, 100:120])
  # Only the assistant message is weighted: role, modality, 1 text token, closer.
  np.testing.assert_array_equal(np.nonzero(out["loss_weights"][:, 0])[0], np.arange(len(rows) - 4, len(rows)))
  assert not out["loss_weights"][:, 1:].any()


def test_windows_match_the_encoder_layout():
  """Mel frame t sits in window t // 800, chunk (t // 100) % 8, column t % 100 (checked frame by frame,
  independently of mel_to_windows); audio_rows hit exactly the encoder frames the model marks valid."""
  enc = CFG.audio_encoder
  c, f = enc.chunks_per_window, enc.chunk_frames
  rng = np.random.default_rng(2)
  for t in (1, 99, 100, 101, 799, 800, 801, 2345):
    mel = rng.standard_normal((128, t)).astype(np.float16)
    ex = {"id": "z", "source": "s", "task": "audio_to_text", "messages": [
        {"role": "user", "modality": "audio", "mel": mel},
        {"role": "assistant", "modality": "text", "text_ids": np.array([500], np.int32)}]}
    out = template.template_example(ex, CFG)
    win, lens = out["audio_mel"], out["audio_chunk_lens"]
    assert win.shape == (-(-t // (c * f)), c, 128, f)
    frames = np.arange(t)
    np.testing.assert_array_equal(win[frames // (c * f), (frames // f) % c, :, frames % f], mel.T)
    filled = np.zeros(win.shape[:2] + (f,), bool)
    filled[frames // (c * f), (frames // f) % c, frames % f] = True
    assert not win.transpose(0, 1, 3, 2)[~filled].any()  # everything else is zero padding
    np.testing.assert_array_equal(lens, filled.sum(-1))
    valid = np.asarray(ae.frame_valid_mask(lens, enc)).reshape(-1)
    used = out["audio_rows"][out["audio_rows"] >= 0]
    assert len(used) == mc.encoder_output_length(t, enc.n_window)
    np.testing.assert_array_equal(used, np.nonzero(valid)[0])


def test_text_only_assistant_weights_everything_but_bos():
  ex = {"id": "t", "source": "text_only", "task": "text_only", "messages": [
      {"role": "assistant", "modality": "text", "text_ids": np.array([256, 257, 258], np.int32)}]}
  out = template.template_example(ex, CFG)
  np.testing.assert_array_equal(out["input_ids"][:, 0], [mc.BOS, mc.ASSISTANT, mc.TEXT, 256, 257, 258, mc.EOS])
  np.testing.assert_array_equal(out["loss_weights"][:, 0], [0, 1, 1, 1, 1, 1, 1])
  assert out["audio_mel"].shape == (0, 8, 128, 100) and out["audio_chunk_lens"].shape == (0, 8)
  assert (out["audio_rows"] == -1).all()


def test_user_codes_weightless_and_assistant_codes_weighted():
  """text_to_audio: the user caption weighs 0, every cell of the assistant codec span 0.125."""
  codes = np.arange(16, dtype=np.int16).reshape(2, 8)
  ex = {"id": "g", "source": "music_gen", "task": "text_to_audio", "messages": [
      {"role": "user", "modality": "text", "text_ids": np.array([600, 601], np.int32)},
      {"role": "assistant", "modality": "audio", "codes": codes}]}
  out = template.template_example(ex, CFG)
  w = out["loss_weights"]
  assert not w[:6].any()  # bos user text 600 601 eos
  np.testing.assert_array_equal(w[6:8], [[1.0] + [0.0] * 7] * 2)  # assistant, audio
  np.testing.assert_array_equal(w[8:8 + 9], np.full((9, 8), 0.125, np.float32))
  np.testing.assert_array_equal(w[-1], [1.0] + [0.0] * 7)
  assert w.shape[0] == 8 + 9 + 1
  # One audio frame (8 cells) weighs as much as one text token.
  assert w[8:17].sum() == pytest.approx(9.0)


@pytest.mark.parametrize("bad, match", [
    ({"role": "assistant", "modality": "text", "text_ids": np.array([CFG.codec_start], np.int32)}, "text_ids"),
    ({"role": "assistant", "modality": "audio", "codes": np.full((2, 8), 1024, np.int16)}, "codes outside"),
    ({"role": "assistant", "modality": "audio", "codes": np.zeros((2, 4), np.int16)}, "4 streams"),
    ({"role": "user", "modality": "audio", "mel": np.zeros((80, 10), np.float16)}, "80 bins"),
])
def test_content_outside_the_model_layout_is_an_error(bad, match):
  ex = {"id": "bad-1", "source": "s", "task": "dialogue", "messages": [bad]}
  with pytest.raises(template.TemplateError, match=match) as e:
    template.template_example(ex, CFG, where="shard f.array_record record 7")
  assert "shard f.array_record record 7" in str(e.value) and "bad-1" in str(e.value)


def test_interleave_and_deinterleave_are_inverse():
  """The delay pattern's two directions (template.interleave_codes / deinterleave_rows), issue 11 test c."""
  rng = np.random.default_rng(7)
  for t in (1, 2, 9, 50):
    codes = rng.integers(0, CFG.codebook_size, (t, S)).astype(np.int16)
    rows = template.interleave_codes(codes, CFG)
    assert rows.shape == (t + S - 1, S)
    back, invalid = template.deinterleave_rows(rows, CFG)
    assert invalid == 0 and back.dtype == np.int32
    np.testing.assert_array_equal(back, codes)
    np.testing.assert_array_equal(template.interleave_codes(back, CFG), rows)
    # The same rows as the templated training example's assistant audio.
    ex = template.template_example({"id": "x", "messages": [
        {"role": "user", "modality": "text", "text_ids": np.array([300])},
        {"role": "assistant", "modality": "audio", "codes": codes}]}, CFG)
    np.testing.assert_array_equal(ex["input_ids"][7:7 + t + S - 1], rows)
  # Rows from a model that broke the pattern: pads inside frames count as invalid and read as code 0
  # (the reference clips them silently), ids of another stream are clipped into the codebook.
  rows = template.interleave_codes(np.full((3, S), 5), CFG)
  rows[2, 1] = CFG.codec_pad_id(1)
  rows[4, 3] = CFG.codec_id(4, 9)
  back, invalid = template.deinterleave_rows(rows, CFG)
  assert invalid == 2 and back[1, 1] == 0 and back[1, 3] == CFG.codebook_size - 1
  assert template.deinterleave_rows(rows[:S - 1], CFG)[0].shape == (0, S)  # fewer than 8 rows: no frame


def test_prompts_are_the_training_template_cut_at_the_first_assistant_message():
  msgs = [{"role": "system", "modality": "text", "text_ids": np.array([300, 301])},
          {"role": "user", "modality": "text", "text_ids": np.array([302])},
          {"role": "assistant", "modality": "text", "text_ids": np.array([303])},
          {"role": "assistant", "modality": "audio", "codes": np.zeros((2, S), np.int16)}]
  prompt, enforce = template.template_prompt({"id": "x", "messages": msgs}, CFG)
  full = template.template_example({"id": "x", "messages": msgs}, CFG)
  assert enforce == ["text", "audio"]
  n = len(prompt["input_ids"])
  np.testing.assert_array_equal(prompt["input_ids"], full["input_ids"][:n])  # same rows, same code
  assert prompt["input_ids"][-1, 0] == mc.EOS and full["input_ids"][n, 0] == mc.ASSISTANT
  cut, enforce = template.task_prompt("sft_generation", [{"text_ids": np.array([300])},
                                                         {"text_ids": np.array([5])}])
  assert [m["role"] for m in cut] == ["system", "user"] and enforce == ["text", "audio"]
  assert template.split_thinking(template.think_caption(" plan ", "A tone.")) == ("plan", "A tone.")
  assert template.split_thinking("no thinking") == ("", "no thinking")
