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

Generation uses the same code (bagpiper_jax/generate): `template_prompt` is `template_example` of
the messages before the first assistant message (the reference cuts there, so a prompt always ends
with the closing <|eos|> of the last user/system message), `TASKS` says which messages each task
has (the prompt is the part before the first assistant message, the assistant modalities after it
are what the reference calls `enforce_modality`), `interleave_codes` / `deinterleave_rows` are the
two directions of the delay pattern, and `think_caption` / `split_thinking` the SFT text format
(docs/data.md#sft-data).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bagpiper_jax.audio import mel_to_windows
from bagpiper_jax.model import config as mc

# Which messages (role, modality) each task has, in order (docs/data.md). The data tool builds
# records in these shapes; generation templates the part before the first assistant message.
TASKS: dict[str, tuple[tuple[str, str], ...]] = {
    "audio_to_text": (("user", "audio"), ("assistant", "text")),
    "text_to_audio": (("user", "text"), ("assistant", "audio")),
    "text_only": (("assistant", "text"),),
    # SFT (docs/data.md#sft-data): caption-then-process generation and understanding.
    "sft_generation": (("system", "text"), ("user", "text"), ("assistant", "text"), ("assistant", "audio")),
    "sft_understanding": (("system", "text"), ("user", "audio"), ("user", "text"), ("assistant", "text")),
}

# The reference's SFT system prompts (docs/data.md#sft-data) and default understanding question.
TTS_SYSTEM_PROMPT = (
    "You are a helpful assistant that generates audio based on user requests. You can create various "
    "types of audio including sound effects, music, speech, ambient sounds, and any combination of "
    "these. When given a request, first think through what the user wants and how to create "
    "high-quality audio, then provide a detailed description of the audio you will generate.")
UNDERSTAND_SYSTEM_PROMPT = "You are an audio understanding assistant."
UNDERSTAND_DEFAULT_QUESTION = "What sound is in this audio?"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def think_caption(reasoning: str, caption: str) -> str:
  r"""The assistant text of generation SFT: `<think>\n{reasoning}\n</think>\n\n{caption}`."""
  return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{caption.strip()}"


def split_thinking(text: str) -> tuple[str, str]:
  """(reasoning, answer) of an assistant text; reasoning is "" when there is no `</think>`."""
  if THINK_CLOSE not in text:
    return "", text.strip()
  head, tail = text.split(THINK_CLOSE, 1)
  return head.replace(THINK_OPEN, "", 1).strip(), tail.strip()


def task_messages(task: str, contents: list) -> list[dict[str, Any]]:
  """Messages of `task` (TASKS) with the given contents, one per message, each a dict holding one
  record content key (text_ids / mel / codes). Raises TemplateError on a count mismatch."""
  if task not in TASKS:
    raise TemplateError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
  shape = TASKS[task]
  if len(contents) != len(shape):
    raise TemplateError(f"task {task!r} has {len(shape)} messages {list(shape)}, got {len(contents)} "
                        "contents")
  return [{"role": r, "modality": m, **c} for (r, m), c in zip(shape, contents)]


def task_prompt(task: str, contents: list) -> tuple[list[dict[str, Any]], list[str]]:
  """(prompt messages of `task` with `contents`, one per message before the first assistant message;
  modalities of its assistant messages) -- what generation templates and enforces for a task."""
  if task not in TASKS:
    raise TemplateError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
  shape = TASKS[task]
  first = next((i for i, (role, _) in enumerate(shape) if role == "assistant"), len(shape))
  if len(contents) != first:
    raise TemplateError(f"task {task!r} prompts have {first} messages {list(shape[:first])}, got "
                        f"{len(contents)}")
  return ([{"role": r, "modality": m, **c} for (r, m), c in zip(shape[:first], contents)],
          [m for _, m in shape[first:]])


def split_at_first_assistant(messages: list) -> tuple[list, list[str]]:
  """(messages before the first assistant message, modalities of the assistant messages from there).

  The reference's inference cut (its `is_train=False` path): the prompt is everything before the
  first assistant message; the assistant turns that follow are what the model generates.
  """
  for i, m in enumerate(messages):
    if m["role"] == "assistant":
      return list(messages[:i]), [x["modality"] for x in messages[i:] if x["role"] == "assistant"]
  return list(messages), []


def interleave_codes(codes: np.ndarray, cfg: mc.ModelConfig) -> np.ndarray:
  """Codec codes [T, S] (0..codebook_size-1) -> delay-interleaved unified ids [T + S - 1, S].

  Row r, stream n holds `codec_id(n, codes[r - n, n])` for n <= r < n + T and `codec_pad_id(n)`
  elsewhere (the leading and trailing delay pads). `deinterleave_rows` is the inverse.
  """
  codes = np.asarray(codes)
  t, s_count = codes.shape
  pads = np.array([cfg.codec_pad_id(n) for n in range(s_count)], np.int32)
  out = np.tile(pads, (t + s_count - 1, 1))
  for n in range(s_count):
    out[n:n + t, n] = codes[:, n].astype(np.int32) + pads[n] + 1
  return out


def deinterleave_rows(rows: np.ndarray, cfg: mc.ModelConfig) -> tuple[np.ndarray, int]:
  """Delay-interleaved unified ids [R, S] -> (codes [R - S + 1, S] int32, number of invalid cells).

  Frame f of stream n is read from row f + n (the reference's `T_original = R - 7`). A cell that is
  not one of stream n's codes (its pad, or any other id) is counted as invalid and, as the reference
  does, clipped into the codebook (a pad becomes code 0). The exact inverse of `interleave_codes`:
  `deinterleave_rows(interleave_codes(c)) == (c, 0)` and, for rows with pads exactly in the delay
  positions, `interleave_codes(deinterleave_rows(r)[0]) == r`.
  """
  rows = np.asarray(rows)
  r, s_count = rows.shape
  t = r - s_count + 1
  if t <= 0:
    return np.zeros((0, s_count), np.int32), 0
  base = np.array([cfg.codec_pad_id(n) + 1 for n in range(s_count)], np.int64)
  cells = np.stack([rows[n:n + t, n] for n in range(s_count)], axis=1).astype(np.int64) - base
  invalid = int(np.sum((cells < 0) | (cells >= cfg.codebook_size)))
  return np.clip(cells, 0, cfg.codebook_size - 1).astype(np.int32), invalid


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
      ids[r:r + n] = interleave_codes(codes, cfg)
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


def template_prompt(example: Mapping[str, Any], cfg: mc.ModelConfig, *,
                    where: str = "prompt") -> tuple[dict[str, np.ndarray], list[str]]:
  """A generation prompt from an example (record format, assistant messages optional).

  Returns (arrays of `template_example` for the messages before the first assistant message, the
  modalities of the assistant messages after it). The prompt ends with <|eos|>; the model is then
  fed <|assistant|> and chooses (or is told) the modality (docs/model.md#decoding-rules-of-the-reference).
  """
  prompt, assistant = split_at_first_assistant(list(example["messages"]))
  out = template_example({**example, "messages": prompt}, cfg, where=where)
  return out, assistant
