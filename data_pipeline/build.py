"""One work item -> one record dict (bagpiper_jax.data.records), or an error saying why not.

Runs inside the writer's worker processes; holds the tokenizer and the codec, loaded once.

Sample rates. The public manifests promise 16 kHz mono audio. Audio at another rate is resampled
to 16 kHz (the model cannot use it otherwise) and REPORTED: one line in warnings.jsonl and a count
in index.json, so a mis-exported dataset shows up in the summary instead of silently changing
pitch or length. `sample_rate_policy="error"` makes such files errors instead. A manifest line that
states its own "sample_rate" which the file contradicts is always an error (the manifest is wrong
about the file, so its segment times may be too).

Batches. `build_many` builds several items at once so the codec runs on batches: clips of EQUAL
length are encoded together (the X-Codec encoder has no padding mask, so only equal lengths give
the same codes as one at a time; the published data is cut into fixed-length segments, so most
clips batch). Audio bytes that are not local files (embedded in parquet/tar inputs, or on gs://)
are passed in as `blobs`, keyed by the reference the item names (data_pipeline/hub.py).
Curation filters (data_pipeline/filters.py), when enabled, drop pretraining records as errors of
kind `filter_<reason>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Optional

import numpy as np

from bagpiper_jax import audio
from bagpiper_jax import codec as codec_lib
from bagpiper_jax.data import records
from bagpiper_jax.data import template
from bagpiper_jax import tokenizer as tokenizer_lib
from bagpiper_jax.model.config import encoder_output_length

from data_pipeline import codes as codes_lib
from data_pipeline import filters as filters_lib
from data_pipeline import fs
from data_pipeline import manifest as manifest_lib

SAMPLE_RATE_POLICIES = ("resample", "error")


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """Everything a worker needs to build records; picklable, and part of the shard fingerprint."""

  tokenizer: str
  codec: str = ""  # codes.load_codec spec
  sample_rate_policy: str = "resample"
  # Raw text id 0 -> <|pad|> as the reference (tokenizer.to_unified); False: -> 256 like every other id.
  text_id0_as_pad: bool = True
  filters: filters_lib.FilterSettings = filters_lib.FilterSettings()  # curation filters (all off)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with fs.open_read(path) as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def provenance(settings: BuildSettings) -> dict:
  """What made the data, for index.json: the tokenizer and the codec as absolute paths (or URLs) + hashes.

  The release export (bagpiper_jax/convert/release.py) reads this to ship the tokenizer and the codec
  the model was trained with. {"codec": {"kind": "npy"}} means the codes were precomputed elsewhere
  and the codec is not known here.
  """
  tok = fs.absolute(settings.tokenizer)
  if not fs.is_remote(tok) and os.path.isdir(tok):
    tok = os.path.join(tok, "tokenizer.json")
  out = {"tokenizer": {"path": tok, "sha256": _sha256(tok),
                       "kind": "sentencepiece" if tok.endswith(".model") else "hf_tokenizers"},
         "text_id0_as_pad": settings.text_id0_as_pad}
  kind, arg = codes_lib.check_codec_spec(settings.codec)
  if kind == "xcodec":
    d = fs.absolute(arg)
    files = sorted(fs.basename(f) for f in fs.match(fs.join(d, "*")))
    files = [f for f in files if f == "config.json" or f.endswith(".safetensors")]
    out["codec"] = {"kind": "xcodec", "dir": d, "sha256": {f: _sha256(fs.join(d, f)) for f in files}}
  elif kind:
    out["codec"] = {"kind": kind, "dir": fs.absolute(arg) if arg else ""}
  return out


class ItemError(Exception):
  """A per-item failure with a summary kind (see manifest.error)."""

  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind = kind


@dataclasses.dataclass
class Result:
  record: Optional[dict] = None
  error: Optional[dict] = None
  warnings: list = dataclasses.field(default_factory=list)
  text_tokens: int = 0
  audio_rows: int = 0


class _PendingCodes:
  """Stands for the codes of one clip until its batch is encoded (build_many)."""

  def __init__(self, path: str, wav: np.ndarray):
    self.path, self.wav = path, wav
    self.codes: Optional[np.ndarray] = None
    self.error: Optional[ItemError] = None


class Builder:
  """Turns items into records. Construct once per worker process.

  codec_device: where the X-Codec encoder runs ("cpu" or "cuda"); codec_batch_size: most clips per
  encoder call (1: one at a time).
  """

  def __init__(self, settings: BuildSettings, *, codec_device: str = "cpu", codec_batch_size: int = 1):
    if settings.sample_rate_policy not in SAMPLE_RATE_POLICIES:
      raise ValueError(f"sample_rate_policy {settings.sample_rate_policy!r} not in {SAMPLE_RATE_POLICIES}")
    self.settings = settings
    self.tokenizer = tokenizer_lib.load_tokenizer(settings.tokenizer)
    self.codec = codes_lib.load_codec(settings.codec, device=codec_device)
    self.codec_batch_size = max(int(codec_batch_size), 1)
    self._blobs: dict[str, Any] = {}
    self._pending: Optional[list[_PendingCodes]] = None

  # -- content builders ---------------------------------------------------------------------------

  def text_ids(self, text: str) -> np.ndarray:
    try:
      ids = self.tokenizer.encode(text)
    except Exception as e:
      raise ItemError("tokenizer", f"tokenizer failed ({type(e).__name__}: {e})") from e
    if not ids:
      raise ItemError("empty_text", f"text tokenises to no ids: {text[:80]!r}")
    return tokenizer_lib.to_unified(ids, id0_as_pad=self.settings.text_id0_as_pad)

  def _load(self, path: str, start, end, declared_sr, warnings: list, item) -> np.ndarray:
    data = self._blobs.get(path)
    if isinstance(data, Exception):  # embedded / remote audio that could not be read
      raise ItemError("missing_audio", str(data))
    try:
      wav, orig_sr = audio.load_audio(path, start=start, end=end, data=data)
    except audio.AudioError as e:
      kind = "missing_audio" if "file not found" in str(e) else (
          "bad_segment" if "segment" in str(e) else "corrupt_audio")
      raise ItemError(kind, str(e)) from e
    if declared_sr is not None and int(declared_sr) != orig_sr:
      raise ItemError("sample_rate", f"{path}: manifest says {int(declared_sr)} Hz, file is {orig_sr} Hz")
    if orig_sr != audio.SAMPLE_RATE:
      if self.settings.sample_rate_policy == "error":
        raise ItemError("sample_rate", f"{path}: {orig_sr} Hz, expected {audio.SAMPLE_RATE} Hz "
                        "(--sample_rate_policy=error)")
      warnings.append(manifest_lib.error(item.manifest, item.line, f"resampled_from_{orig_sr}",
                                         f"{path}: resampled {orig_sr} Hz -> 16000 Hz",
                                         item_id=item.id, source=item.source, audio=path))
    if wav.shape[0] < audio.HOP_LENGTH * 2:
      raise ItemError("too_short", f"{path}: only {wav.shape[0]} samples after cutting")
    dropped = item.task in ("audio_to_text", "text_to_audio") and filters_lib.duration_reason(
        self.settings.filters, wav.shape[0] / audio.SAMPLE_RATE)
    if dropped:
      raise ItemError(dropped[0], f"{path}: {dropped[1]}")
    return wav

  def mel(self, path, start, end, declared_sr, warnings, item) -> np.ndarray:
    return audio.mel_features(self._load(path, start, end, declared_sr, warnings, item))

  def codes(self, path, start, end, declared_sr, warnings, item) -> np.ndarray:
    if self.codec is None:
      raise ItemError("no_codec", "assistant audio needs codes but no --codec was given")
    wav = self._load(path, start, end, declared_sr, warnings, item) if self.codec.needs_waveform else None
    if wav is None and not os.path.exists(path):
      raise ItemError("missing_audio", f"{path}: file not found")
    if wav is not None and self._pending is not None:  # build_many encodes it with its batch
      pending = _PendingCodes(path, wav)
      self._pending.append(pending)
      return pending
    try:
      return self.codec.encode_file(path, start=start, end=end, wav_16k=wav)
    except (codec_lib.CodecError, audio.AudioError) as e:
      raise ItemError("codec", str(e)) from e

  # -- items --------------------------------------------------------------------------------------

  def build(self, item: manifest_lib.Item, blobs: Optional[dict] = None) -> Result:
    return self.build_many([item], blobs)[0]

  def build_many(self, items: list, blobs: Optional[dict] = None) -> list[Result]:
    """build() of each item (same results), with the codec run on batches of equal-length clips.

    blobs: {audio reference: bytes or the Exception met reading them} for audio that is not a local
    file (hub.fetch_audio).
    """
    self._blobs = blobs or {}
    self._pending = [] if self.codec is not None and self.codec.needs_waveform else None
    try:
      staged = []
      for item in items:
        res = Result()
        staged.append((item, res, self._guarded(item, res, lambda: self._messages(item, res.warnings))))
      self._encode_pending()
      for item, res, messages in staged:
        if res.error is None:
          self._finish(item, res, messages)
    finally:
      self._blobs, self._pending = {}, None
    return [res for _, res, _ in staged]

  def _guarded(self, item, res: Result, fn):
    """fn(), or None with res.error set to the reason it failed (never crash the run on one line)."""
    try:
      return fn()
    except ItemError as e:
      res.error = manifest_lib.error(item.manifest, item.line, e.kind, str(e), item_id=item.id,
                                     source=item.source, audio=item.audio_path())
    except Exception as e:  # pylint: disable=broad-except
      res.error = manifest_lib.error(item.manifest, item.line, "internal",
                                     f"{type(e).__name__}: {e}", item_id=item.id,
                                     source=item.source, audio=item.audio_path())
    return None

  def _encode_pending(self) -> None:
    """Encodes the clips build_many collected: equal lengths together, codec_batch_size at most."""
    groups: dict[int, list[_PendingCodes]] = {}
    for p in self._pending or ():
      groups.setdefault(p.wav.shape[0], []).append(p)
    for group in groups.values():
      for i in range(0, len(group), self.codec_batch_size):
        batch = group[i:i + self.codec_batch_size]
        try:
          for p, c in zip(batch, self.codec.encode_batch([p.wav for p in batch], [p.path for p in batch])):
            p.codes = c
        except (codec_lib.CodecError, audio.AudioError) as e:
          if len(batch) == 1:
            batch[0].error = ItemError("codec", str(e))
            continue
          for p in batch:  # find the clip at fault: one at a time
            try:
              p.codes = self.codec.encode_file(p.path, wav_16k=p.wav)
            except (codec_lib.CodecError, audio.AudioError) as e1:
              p.error = ItemError("codec", str(e1))

  def _finish(self, item, res: Result, messages: list) -> None:
    def resolve():
      for m in messages:
        p = m.get("codes")
        if isinstance(p, _PendingCodes):
          if p.error is not None:
            raise p.error
          m["codes"] = p.codes
      rec = {"id": item.id, "source": item.source, "task": item.task, "messages": messages}
      records.validate(rec, where=f"{item.manifest}:{item.line}")
      return rec

    rec = self._guarded(item, res, resolve)
    if rec is None:
      return
    res.record = rec
    for m in messages:
      if "text_ids" in m:
        res.text_tokens += int(m["text_ids"].shape[0])
      elif "mel" in m:
        res.audio_rows += encoder_output_length(int(m["mel"].shape[1]))
      else:
        res.audio_rows += int(m["codes"].shape[0]) + codec_lib.NUM_CODEBOOKS - 1  # delay interleave

  def _messages(self, item: manifest_lib.Item, warnings: list) -> list[dict[str, Any]]:
    row = item.row
    if item.task == "text_only":
      return template.task_messages(item.task, [{"text_ids": self.text_ids(row["text"])}])
    if item.task in ("audio_to_text", "text_to_audio"):
      seg = (row["audio"], row.get("start"), row.get("end"), row.get("sample_rate"), warnings, item)
      caption = self.text_ids(row["rich_caption"].strip())
      dropped = filters_lib.caption_reason(self.settings.filters, row["rich_caption"].strip(), len(caption))
      if dropped:
        raise ItemError(*dropped)
      if item.task == "audio_to_text":
        return template.task_messages(item.task, [{"mel": self.mel(*seg)}, {"text_ids": caption}])
      return template.task_messages(item.task, [{"text_ids": caption}, {"codes": self.codes(*seg)}])
    if item.task == "dialogue":
      out = []
      for m in row["messages"]:
        role, modality, content = m["role"], m["modality"], m["content"]
        if modality == "text":
          out.append({"role": role, "modality": "text", "text_ids": self.text_ids(content)})
          continue
        seg = (content["path"], content.get("start"), content.get("end"), content.get("sample_rate"),
               warnings, item)
        if role == "assistant":
          out.append({"role": role, "modality": "audio", "codes": self.codes(*seg)})
        else:
          out.append({"role": role, "modality": "audio", "mel": self.mel(*seg)})
      return out
    raise ItemError("internal", f"unknown task {item.task!r}")
