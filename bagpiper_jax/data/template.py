"""One decoded record -> the per-example arrays that the packer concatenates (docs/data.md#sequence-format).

Layout of one example (L rows, S = num_streams = 8):

  <|bos|>
  per message i:  <|role|> <|modality|> content  closer
      closer = <|eot|> if message i+1 has the same role, else <|eos|>.  The last message has no
      successor, so "the next message has the same role" is false and it is closed by <|eos|>.

Content rows:
  * text ([n] unified ids): n rows, id in stream 0, 0 in streams 1..7.
  * user / system audio (mel [M=128, T]): L_enc = encoder_output_length(T) placeholder rows, all
    streams 0 (the adapter overwrites their embeddings). The mel is cut into chunks of F = 100
    frames and the chunks into encoder windows of C = 8 chunks (`audio_mel` [w, C, M, F], the last
    chunk zero-padded, `audio_chunk_lens` [w, C]). Because every chunk but the last is full, the
    L_enc encoder frames of one audio are contiguous in the flattened encoder output of its windows
    ([w * C * 13]), so `audio_rows` of the placeholders is `base + arange(L_enc)` with
    `base = (windows of earlier audios of this example) * C * 13`.  Each audio starts its own window:
    the encoder's windowed attention must not mix two recordings.
  * assistant audio (codes [T, S], raw 0..1023): delay interleave over T + S - 1 rows; stream n
    holds `codec_id(n, codes[r - n, n])` at rows n <= r < n + T and `codec_pad_id(n)` elsewhere
    (its leading and trailing delay pads).

Loss weights (float32 [L, S]) sit on the TARGET cell: the model predicts row t from rows < t, and
`loss_weights[t, s]` is the weight of predicting id[t, s].  Only assistant messages are trained,
and all of an assistant message is: its role row, its modality row, its content and its closer.
  * role / modality / text / closer rows: 1.0 in stream 0, 0.0 in streams 1..7 (their target there
    is the 0 filler, which is not a prediction the model should be trained to make).
  * codec rows: 1 / S = 0.125 in every stream, stream 0 included and delay pads included, so one
    audio frame weighs as much as one text token.
<|bos|> and every non-assistant row weigh 0. Row 0 (<|bos|>) weighing 0 also matters for packing:
its "predecessor" is the last row of the previous document in the packed row.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bagpiper_jax.audio import mel_to_windows
from bagpiper_jax.model import config as mc


class TemplateError(ValueError):
  """A record that cannot be turned into the sequence format (names the record and the field)."""


def _content_rows(m: Mapping[str, Any], cfg: mc.ModelConfig) -> int:
  if "text_ids" in m:
    return len(m["text_ids"])
  if "mel" in m:
    return mc.encoder_output_length(m["mel"].shape[1], cfg.audio_encoder.n_window)
  return m["codes"].shape[0] + cfg.num_streams - 1


def num_rows(example: Mapping[str, Any], cfg: mc.ModelConfig) -> int:
  """Rows of the templated example without building it: 1 + sum(3 + content rows)."""
  return 1 + sum(3 + _content_rows(m, cfg) for m in example["messages"])


def template_example(example: Mapping[str, Any], cfg: mc.ModelConfig, *,
                     where: str = "record") -> dict[str, np.ndarray]:
  """Builds the arrays of one example.

  Args:
    example: a decoded record (`bagpiper_jax.data.records.decode`), already validated.
    cfg: the model config (vocabulary layout, streams, encoder chunking).
    where: names the record in errors (shard file and record index).

  Returns:
    dict with input_ids int32 [L, S], loss_weights float32 [L, S], audio_rows int32 [L]
    (doc-local encoder frame index, -1 elsewhere), audio_mel [w, C, M, F] (the record's float
    dtype), audio_chunk_lens int32 [w, C].

  Raises:
    TemplateError: content that does not fit the model config (text id outside the text range,
      codes outside the codebook, wrong stream count or mel bin count).
  """
  s_count = cfg.num_streams
  enc = cfg.audio_encoder
  chunk, per_win = enc.chunk_frames, enc.chunks_per_window
  frames_per_chunk = enc.frames_per_chunk_out
  where = f"{where} (id={example.get('id', '?')!r})"
  messages = example["messages"]

  total = num_rows(example, cfg)
  ids = np.zeros((total, s_count), np.int32)
  weights = np.zeros((total, s_count), np.float32)
  audio_rows = np.full((total,), -1, np.int32)
  mels, lens = [], []
  windows = 0
  codec_weight = cfg.codec_loss_weight
  pad_ids = np.array([cfg.codec_pad_id(n) for n in range(s_count)], np.int32)
  code_base = pad_ids + 1  # codec_id(n, c) = codec_pad_id(n) + 1 + c

  ids[0, 0] = mc.BOS
  r = 1
  for i, m in enumerate(messages):
    role = m["role"]
    trained = role == "assistant"
    ids[r, 0] = mc.ROLE_IDS[role]
    ids[r + 1, 0] = mc.MODALITY_IDS[m["modality"]]
    if trained:
      weights[r:r + 2, 0] = 1.0  # the role and modality rows are targets too (docs/model.md#loss)
    r += 2
    n = _content_rows(m, cfg)
    if "text_ids" in m:
      t = np.asarray(m["text_ids"])
      if t.size and (t.min() < 0 or t.max() >= cfg.codec_start):
        raise TemplateError(
            f"{where}: messages[{i}].text_ids has ids in [{t.min()}, {t.max()}], outside the "
            f"special+text range [0, {cfg.codec_start}) of this model config")
      ids[r:r + n, 0] = t
      if trained:
        weights[r:r + n, 0] = 1.0
    elif "codes" in m:
      codes = np.asarray(m["codes"])
      if codes.shape[1] != s_count:
        raise TemplateError(f"{where}: messages[{i}].codes has {codes.shape[1]} streams, model has {s_count}")
      if codes.min() < 0 or codes.max() >= cfg.codebook_size:
        raise TemplateError(f"{where}: messages[{i}].codes outside [0, {cfg.codebook_size}): "
                            f"min {codes.min()}, max {codes.max()}")
      t_frames = codes.shape[0]
      block = ids[r:r + n]
      block[:] = pad_ids
      for s in range(s_count):
        block[s:s + t_frames, s] = codes[:, s].astype(np.int32) + code_base[s]
      if trained:
        weights[r:r + n] = codec_weight
    else:  # continuous audio
      if trained:  # records.validate forbids assistant mel; the loss has no target for it.
        raise TemplateError(f"{where}: messages[{i}] assistant audio must be codes, not mel")
      mel = np.asarray(m["mel"])
      if mel.shape[0] != enc.num_mel_bins:
        raise TemplateError(f"{where}: messages[{i}].mel has {mel.shape[0]} bins, encoder wants {enc.num_mel_bins}")
      if not np.issubdtype(mel.dtype, np.floating):
        raise TemplateError(f"{where}: messages[{i}].mel must be float, got {mel.dtype}")
      win, cl = mel_to_windows(mel, enc)
      mels.append(win)
      lens.append(cl)
      audio_rows[r:r + n] = windows * per_win * frames_per_chunk + np.arange(n, dtype=np.int32)
      windows += win.shape[0]
    r += n
    same_next = i + 1 < len(messages) and messages[i + 1]["role"] == role
    ids[r, 0] = mc.EOT if same_next else mc.EOS
    if trained:
      weights[r, 0] = 1.0
    r += 1
  assert r == total, (r, total)

  if mels:
    audio_mel = mels[0] if len(mels) == 1 else np.concatenate(mels)
    chunk_lens = lens[0] if len(lens) == 1 else np.concatenate(lens)
  else:
    audio_mel = np.zeros((0, per_win, enc.num_mel_bins, chunk), np.float16)
    chunk_lens = np.zeros((0, per_win), np.int32)
  return {
      "input_ids": ids,
      "loss_weights": weights,
      "audio_rows": audio_rows,
      "audio_mel": audio_mel,
      "audio_chunk_lens": chunk_lens,
  }
