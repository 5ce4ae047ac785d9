"""What a user asks for -> a templated prompt (engine.Prompt), through the training data's own code.

A request is one of (docs/generation.md#requests):

  caption     --audio                          pretraining audio_to_text: the model writes a rich caption
  understand  --audio --prompt                 SFT understanding: system, user audio, user question
  render      --caption                        pretraining text_to_audio: the model writes the audio
  generate    --prompt                         SFT generation: system, user request; the model thinks,
                                               writes the rich caption (<|eot|>), then the audio
  messages    {"messages": [...]} (JSONL)      any dialogue in the SFT manifest format; the prompt is
                                               the part before the first assistant message

Text goes through the run's tokenizer and the unified id mapping the data tool uses; audio through
bagpiper_jax/audio.py (16 kHz mono mel, encoder windows), so the rows are exactly what training
saw. The message layout, task shapes and SFT system prompts are bagpiper_jax/data/template.py's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from bagpiper_jax import audio as audio_lib
from bagpiper_jax import tokenizer as tokenizer_lib
from bagpiper_jax.data import template
from bagpiper_jax.generate import engine
from bagpiper_jax.model import config as mc

# Request task -> template.TASKS entry.
TASKS = {"caption": "audio_to_text", "render": "text_to_audio", "understand": "sft_understanding",
         "generate": "sft_generation"}
REQUEST_KEYS = ("id", "task", "audio", "prompt", "caption", "system", "messages", "enforce", "seed", "out")


class RequestError(ValueError):
  """A request that cannot become a prompt; the message names the request and the input at fault."""


def to_unified(raw_ids) -> np.ndarray:
  """Tokenizer ids -> unified text ids, as the data tool maps them (data_pipeline/build.py: + 256).

  TODO(issue 10): switch to `tokenizer.to_unified` (the reference maps raw id 0 to <|pad|>) once it
  lands, together with the data tool, so prompts keep matching the records.
  """
  return np.asarray(raw_ids, np.int32) + tokenizer_lib.UNIFIED_TEXT_OFFSET


def from_unified(ids) -> list[int]:
  """Unified text ids -> tokenizer ids (ids below the text range are dropped: they are no text).

  TODO(issue 10): switch to `tokenizer.from_unified`.
  """
  ids = np.asarray(ids, np.int64)
  return [int(i) for i in ids[ids >= tokenizer_lib.UNIFIED_TEXT_OFFSET] - tokenizer_lib.UNIFIED_TEXT_OFFSET]


@dataclasses.dataclass
class Request:
  id: str
  task: str = ""  # caption | understand | render | generate | messages; "" = from the fields given
  audio: Optional[str] = None
  prompt: Optional[str] = None
  caption: Optional[str] = None
  system: Optional[str] = None
  messages: Optional[list] = None  # [{"role", "modality", "content"}]; audio content = a path
  enforce: Optional[list] = None  # modalities of the assistant segments (messages requests)
  seed: int = 42
  out: Optional[str] = None  # WAV path for audio output

  @classmethod
  def from_json(cls, d: Any, where: str, base_dir: str = "") -> "Request":
    """A JSONL line's object; relative audio paths are taken from `base_dir` (the file's directory)."""
    if not isinstance(d, dict):
      raise RequestError(f"{where}: a request must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(REQUEST_KEYS))
    if unknown:
      raise RequestError(f"{where}: unknown keys {unknown}; a request has {list(REQUEST_KEYS)}")
    fix = lambda p: p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
    msgs = d.get("messages")
    if msgs is not None:
      if not isinstance(msgs, list) or not msgs:
        raise RequestError(f"{where}: 'messages' must be a non-empty list")
      out = []
      for i, m in enumerate(msgs):
        if not isinstance(m, dict) or {"role", "modality", "content"} - set(m):
          raise RequestError(f"{where}: messages[{i}] needs role, modality and content")
        c = m["content"]
        if m["modality"] == "audio":
          c = fix(c["path"] if isinstance(c, dict) else c)
        out.append({"role": m["role"], "modality": m["modality"], "content": c})
      msgs = out
    try:
      seed = int(d.get("seed", 42))
    except (TypeError, ValueError) as e:
      raise RequestError(f"{where}: seed must be an integer, got {d.get('seed')!r}") from e
    return cls(id=str(d.get("id", where)), task=str(d.get("task", "")), audio=fix(d.get("audio")),
               prompt=d.get("prompt"), caption=d.get("caption"), system=d.get("system"), messages=msgs,
               enforce=d.get("enforce"), seed=seed, out=d.get("out"))

  def resolved_task(self) -> str:
    if self.task:
      if self.task not in (*TASKS, "messages"):
        raise RequestError(f"request {self.id!r}: task {self.task!r} not in {[*TASKS, 'messages']}")
      return self.task
    if self.messages:
      return "messages"
    if self.audio:
      return "understand" if self.prompt else "caption"
    if self.caption:
      return "render"
    if self.prompt:
      return "generate"
    raise RequestError(f"request {self.id!r}: nothing to do (give audio, prompt, caption or messages)")


@dataclasses.dataclass
class Built:
  prompt: engine.Prompt
  task: str
  notes: list[str]


class PromptBuilder:
  """Turns requests into prompts for one model config and tokenizer."""

  def __init__(self, cfg: mc.ModelConfig, tokenizer: Optional[tokenizer_lib.Tokenizer], *,
               max_audio_windows: int):
    self.cfg, self.tokenizer, self.max_windows = cfg, tokenizer, int(max_audio_windows)

  def text(self, text: Any, what: str, req: Request) -> dict:
    if not isinstance(text, str) or not text.strip():
      raise RequestError(f"request {req.id!r}: {what} is empty")
    if self.tokenizer is None:
      raise RequestError(f"request {req.id!r}: text input needs a tokenizer (--tokenizer)")
    ids = self.tokenizer.encode(text)
    if not ids:
      raise RequestError(f"request {req.id!r}: {what} tokenises to no ids")
    return {"text_ids": to_unified(ids)}

  def audio(self, path: Any, req: Request, notes: list) -> dict:
    if not isinstance(path, str) or not path:
      raise RequestError(f"request {req.id!r}: audio must be a file path")
    try:
      wav, said = audio_lib.load_clip(path)
    except audio_lib.AudioError as e:
      raise RequestError(f"request {req.id!r}: {e}") from e
    notes += said
    frames = audio_lib.num_frames(wav.shape[0])
    need = audio_lib.num_windows(frames, self.cfg.audio_encoder)
    if need > self.max_windows:
      enc = self.cfg.audio_encoder
      win_s = enc.n_window_infer * audio_lib.HOP_LENGTH / audio_lib.SAMPLE_RATE
      secs = wav.shape[0] / audio_lib.SAMPLE_RATE
      raise RequestError(f"request {req.id!r}: {path} lasts {secs:.1f} s and needs {need} encoder windows "
                         f"of {win_s:g} s; the limit is {self.max_windows} ({self.max_windows * win_s:g} s, "
                         "--max_audio_windows)")
    return {"mel": audio_lib.mel_features(wav)}

  def build(self, req: Request) -> Built:
    task = req.resolved_task()
    notes: list[str] = []
    if task == "messages":
      msgs = []
      for i, m in enumerate(req.messages):
        if m["role"] not in mc.ROLE_IDS or m["modality"] not in ("text", "audio"):
          raise RequestError(f"request {req.id!r}: messages[{i}] has role {m['role']!r} / modality "
                             f"{m['modality']!r}")
        if m["role"] == "assistant":
          msgs.append({"role": "assistant", "modality": m["modality"], "text_ids": np.zeros(1, np.int32)})
          continue
        content = (self.text(m["content"], f"messages[{i}]", req) if m["modality"] == "text"
                   else self.audio(m["content"], req, notes))
        msgs.append({"role": m["role"], "modality": m["modality"], **content})
      prompt_msgs, enforce = template.split_at_first_assistant(msgs)
      if req.enforce is not None:
        enforce = list(req.enforce)
      elif not enforce:
        enforce = ["text"]
    else:
      name = TASKS[task]
      if task == "caption":
        contents = [self.audio(req.audio, req, notes)]
      elif task == "render":
        contents = [self.text(req.caption, "caption", req)]
      elif task == "understand":
        system = req.system if req.system is not None else template.UNDERSTAND_SYSTEM_PROMPT
        question = req.prompt or template.UNDERSTAND_DEFAULT_QUESTION
        contents = [self.text(system, "system", req), self.audio(req.audio, req, notes),
                    self.text(question, "prompt", req)]
      else:  # generate
        system = req.system if req.system is not None else template.TTS_SYSTEM_PROMPT
        contents = [self.text(system, "system", req), self.text(req.prompt, "prompt", req)]
      prompt_msgs, enforce = template.task_prompt(name, contents)
      if req.enforce is not None:
        enforce = list(req.enforce)
    bad = [m for m in enforce if m not in engine.MODES]
    if bad:
      raise RequestError(f"request {req.id!r}: enforce {bad} not in {list(engine.MODES)}")
    try:
      arrays, _ = template.template_prompt({"id": req.id, "messages": prompt_msgs}, self.cfg,
                                           where=f"request {req.id!r}")
    except template.TemplateError as e:
      raise RequestError(str(e)) from e
    return Built(engine.Prompt.from_template(arrays, enforce, req.seed), task, notes)
