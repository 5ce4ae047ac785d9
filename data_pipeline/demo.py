"""Synthetic demo data: short clips with TRUE captions, manifests, a tokenizer, and shards.

`make_demo_data(out_dir)` synthesises a few hundred 1-6 s, 16 kHz clips with numpy (tones, chords,
arpeggios, white/pink noise bursts, sweeps, tremolo/vibrato tones, click trains; espeak-ng speech
when the binary is installed, skipped otherwise) and writes, under `out_dir`:

  wavs/clip_00000.wav ...                 16 kHz mono PCM-16
  manifests/pretrain.{train,eval}.jsonl   audio, rich_caption, direction, category, dataset,
                                          [start, end] (some clips sit inside a longer file),
                                          attributes (the facts the caption states: kind, level,
                                          wave, note, ...)
  manifests/attributes.json               how each attribute reads back from a caption
                                          (ATTRIBUTE_SPEC; bagpiper_jax/evaluate.py scores with it)
  manifests/text.{train,eval}.jsonl       text-only lines (true facts about notes, noise, ...)
  manifests/sft.{train,eval}.jsonl        `messages` dialogues: understanding (user audio ->
                                          assistant answer) and generation (system, user request,
                                          assistant <think>...</think> caption, assistant audio)
  tokenizer/spm.model                     SentencePiece (byte fallback), <= 512 pieces, so it
                                          fits configs/tiny.py's text_vocab_size=1024
  demo.json                               what was generated (seed, counts, paths): the stamp

Every caption is built from the parameters that made the clip (frequency, note, waveform, level
measured from the signal, duration, fades, timing), so it is true of the audio. Paths inside the
manifests are relative, so the output is identical for a given seed wherever it is written.

`ensure_demo_shards(out_dir)` additionally runs the record writer (data_pipeline.writer: the Beam
pipeline on the DirectRunner, 2 workers) into
`out_dir/shards/{train,eval}/<source>/shard-*.array_record` (+ index.json per split) unless they
are there already, and returns `out_dir/shards`. `demo_sources(shards, stage)` turns that into
config.data.{train,eval}_sources.

Assistant-audio codes come from a TINY RANDOM-WEIGHT X-Codec (`codec.build_tiny_xcodec`, built in
code, seed 0, no download): the real `transformers.XcodecModel` code path, 8 x 1024 codes at 50 Hz,
but the codes carry no learned meaning and cannot be decoded to sensible audio. For listening
tests, re-run the writer with the real xcodec-hubert-general directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, Optional

import librosa
import numpy as np
import soundfile as sf

from bagpiper_jax import codec as codec_lib
from bagpiper_jax import config_lib
from data_pipeline import build as build_lib
from data_pipeline import tokenizer_train
from data_pipeline import writer

SR = 16_000
DEFAULT_NUM_CLIPS = 240
DEMO_VERSION = 3  # 2: normalised log-mel, codec framing as the reference (issue 10); 3: manifests carry
# each clip's attributes (+ manifests/attributes.json)
DEMO_VOCAB_SIZE = 512
EVAL_EVERY = 10  # clip i goes to eval when i % EVAL_EVERY == EVAL_EVERY - 1
DATASET = "bagpiper_demo_synth"

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
CHORDS = {"major": (0, 4, 7), "minor": (0, 3, 7), "diminished": (0, 3, 6), "augmented": (0, 4, 8),
          "suspended fourth": (0, 5, 7)}
WAVES = ("sine", "square", "sawtooth", "triangle")
SPEECH_LINES = (
    "The quick brown fox jumps over the lazy dog.", "Please call me back after lunch.",
    "It is going to rain this afternoon.", "Turn left at the second traffic light.",
    "Bagpipers play loud music outdoors.", "Seven plus five makes twelve.",
    "The train to the coast leaves at noon.", "Thank you for listening.",
    "Can you hear the birds singing?", "My favourite colour is green.",
)


# How each attribute is read back from a caption (bagpiper_jax/evaluate.py reads this from
# manifests/attributes.json): "values" maps a value to a regex, tried in "order" (the first that
# matches wins: a tremolo caption also says "tone"); "capture" is a regex whose group 1 is the value.
ATTRIBUTE_SPEC = {
    "version": 1,
    "attributes": {
        "kind": {"order": ["speech", "clicks", "arpeggio", "chord", "tremolo", "vibrato", "chirp", "noise",
                           "tone"],
                 "values": {"speech": r"\b(voice|speaking)\b", "clicks": r"\bclicks?\b",
                            "arpeggio": r"\barpeggio\b", "chord": r"\bchord\b", "tremolo": r"\btremolo\b",
                            "vibrato": r"\bvibrato\b", "chirp": r"\bsweep\b", "noise": r"\bnoise\b",
                            "tone": r"\btone\b"}},
        "level": {"order": ["moderately loud", "quiet", "loud"],
                  "values": {"moderately loud": r"\bmoderately loud\b", "quiet": r"\bquiet\b",
                             "loud": r"(?<!moderately )\bloud\b"}},
        "wave": {"order": ["sine", "square", "sawtooth", "triangle"],
                 "values": {w: rf"\b{w}\b" for w in WAVES}},
        "noise_color": {"order": ["white", "pink"],
                        "values": {"white": r"\bwhite noise\b", "pink": r"\bpink noise\b"}},
        "chord_quality": {"order": list(CHORDS), "values": {q: rf"\b{q}\b" for q in CHORDS}},
        "pitch_direction": {"order": ["up", "down"],
                            "values": {"up": r"\b(rising|ascending)\b", "down": r"\b(falling|descending)\b"}},
        "note": {"capture": r"\bthe note ([A-G]#?-?\d+)\b"},
        "speaker": {"order": ["female", "male"], "values": {"female": r"\bfemale\b", "male": r"\bmale\b"}},
    },
}


# -- synthesis primitives ---------------------------------------------------------------------------

def midi_freq(midi: int) -> float:
  return 440.0 * 2.0 ** ((midi - 69) / 12.0)


def note_name(midi: int) -> str:
  return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def _fmt_hz(f: float) -> str:
  return f"{f:.0f} Hz" if abs(f - round(f)) < 0.05 else f"{f:.1f} Hz"


def oscillator(wave: str, freq, n: int) -> np.ndarray:
  """Band-limited (additive, harmonics below 7.5 kHz) waveform; `freq` scalar or per-sample."""
  freq = np.broadcast_to(np.asarray(freq, np.float64), (n,))
  phase = 2 * np.pi * np.cumsum(freq) / SR
  if wave == "sine":
    return np.sin(phase)
  top = int(7500 // float(freq.max()))
  out = np.zeros(n)
  for k in range(1, max(top, 1) + 1):
    if wave == "square" and k % 2:
      out += np.sin(k * phase) / k
    elif wave == "sawtooth":
      out += (-1) ** (k + 1) * np.sin(k * phase) / k
    elif wave == "triangle" and k % 2:
      out += (-1) ** ((k - 1) // 2) * np.sin(k * phase) / k**2
  return out / np.abs(out).max()


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  """1/f power spectrum (equal energy per octave), by shaping white noise in the frequency domain."""
  spec = np.fft.rfft(rng.standard_normal(n))
  f = np.arange(spec.shape[0], dtype=np.float64)
  f[0] = 1.0
  return np.fft.irfft(spec / np.sqrt(f), n)


def envelope(n: int, fade_in: float, fade_out: float) -> np.ndarray:
  env = np.ones(n)
  a, b = int(fade_in * SR), int(fade_out * SR)
  if a:
    env[:a] = np.linspace(0.0, 1.0, a)
  if b:
    env[n - b:] *= np.linspace(1.0, 0.0, b)
  return env


LEVELS = (("quiet", -32.0), ("moderately loud", -22.0), ("loud", -13.0))


def level_word(rms_db: float) -> str:
  return "quiet" if rms_db < -27.0 else ("moderately loud" if rms_db < -17.5 else "loud")


def set_level(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """Scales `x` to a random target RMS; returns it and the level word MEASURED afterwards."""
  _, target_db = LEVELS[rng.integers(len(LEVELS))]
  rms = float(np.sqrt(np.mean(x**2))) + 1e-12
  x = x * (10 ** (target_db / 20) / rms)
  peak = float(np.abs(x).max())
  if peak > 0.95:
    x = x * (0.95 / peak)
  return x, level_word(20 * np.log10(float(np.sqrt(np.mean(x**2))) + 1e-12))


def _fades(rng, dur: float) -> tuple[float, float, str]:
  fi = float(rng.choice([0.0, 0.0, round(float(rng.uniform(0.2, 0.3 * dur)), 1)]))
  fo = float(rng.choice([0.0, 0.0, round(float(rng.uniform(0.2, 0.3 * dur)), 1)]))
  parts = []
  if fi:
    parts.append(f"a soft {fi:.1f}-second fade-in")
  if fo:
    parts.append(f"a {fo:.1f}-second fade-out")
  if not parts:
    return fi, fo, ", starting and stopping abruptly"
  return fi, fo, ", with " + " and ".join(parts)


def _dur(rng, lo=1.0, hi=6.0) -> float:
  return round(float(rng.uniform(lo, hi)), 1)


# -- clip recipes: rng -> (waveform, caption, category, kind, attributes) ----------------------------
#
# `attributes` are the facts the caption states, by name (the kind is added as "kind"); the manifest
# rows carry them and manifests/attributes.json says how each is read back from a caption
# (ATTRIBUTE_SPEC), so evaluation can score generated captions without importing this module.

def clip_tone(rng):
  dur, wave, midi = _dur(rng), str(rng.choice(WAVES)), int(rng.integers(45, 82))
  n = int(dur * SR)
  fi, fo, env_txt = _fades(rng, dur)
  x, level = set_level(oscillator(wave, midi_freq(midi), n) * envelope(n, fi, fo), rng)
  cap = (f"A steady {_fmt_hz(midi_freq(midi))} {wave} tone (the note {note_name(midi)}), {level}, "
         f"lasting {dur:.1f} seconds{env_txt}.")
  return x, cap, "music", "tone", {"wave": wave, "level": level, "note": note_name(midi)}


def clip_chord(rng):
  dur, wave, root = _dur(rng), str(rng.choice(("sine", "triangle", "sawtooth"))), int(rng.integers(48, 67))
  quality = str(rng.choice(list(CHORDS)))
  notes = [root + k for k in CHORDS[quality]]
  n = int(dur * SR)
  fi, fo, env_txt = _fades(rng, dur)
  x = sum(oscillator(wave, midi_freq(m), n) for m in notes) * envelope(n, fi, fo)
  x, level = set_level(x, rng)
  names = ", ".join(note_name(m) for m in notes)
  cap = (f"A {NOTE_NAMES[root % 12]} {quality} chord ({names}) held on {wave} tones, {level}, "
         f"lasting {dur:.1f} seconds{env_txt}.")
  return x, cap, "music", "chord", {"wave": wave, "level": level, "chord_quality": quality}


def clip_arpeggio(rng):
  wave, root = str(rng.choice(WAVES)), int(rng.integers(48, 67))
  quality = str(rng.choice(("major", "minor")))
  k = int(rng.integers(3, 9))
  step = round(float(rng.uniform(0.2, 0.6)), 2)
  pattern = [root + CHORDS[quality][i % 3] + 12 * (i // 3) for i in range(k)]
  up = bool(rng.integers(2))
  if not up:
    pattern = pattern[::-1]
  n_note = int(step * SR)
  x = np.concatenate([oscillator(wave, midi_freq(m), n_note) * envelope(n_note, 0.01, 0.05)
                      for m in pattern])
  x, level = set_level(x, rng)
  cap = (f"{'An ascending' if up else 'A descending'} {NOTE_NAMES[root % 12]} {quality} arpeggio of "
         f"{k} {wave}-wave notes ({', '.join(note_name(m) for m in pattern)}), each {step:.2f} seconds "
         f"long, {level}, {k * step:.2f} seconds in total.")
  return x, cap, "music", "arpeggio", {"wave": wave, "level": level, "chord_quality": quality,
                                       "pitch_direction": "up" if up else "down"}


def clip_noise(rng):
  color = str(rng.choice(("white", "pink")))
  burst = _dur(rng, 0.5, 4.0)
  pre = round(float(rng.choice([0.0, rng.uniform(0.2, 1.0)])), 1)
  post = round(float(rng.choice([0.0, rng.uniform(0.2, 1.0)])), 1)
  n = int(burst * SR)
  x = rng.standard_normal(n) if color == "white" else pink_noise(rng, n)
  x, level = set_level(x, rng)
  x = np.concatenate([np.zeros(int(pre * SR)), x, np.zeros(int(post * SR))])
  total = pre + burst + post
  if pre or post:
    lead = f"{pre:.1f} seconds of silence, then " if pre else ""
    cap = (f"{lead}a {level} {burst:.1f}-second burst of {color} noise"
           f"{f', then {post:.1f} seconds of silence' if post else ''}; {total:.1f} seconds in total.")
    cap = cap[0].upper() + cap[1:]
  else:
    cap = f"A {level} burst of {color} noise lasting {burst:.1f} seconds, starting and stopping abruptly."
  return x, cap, "sound", "noise", {"level": level, "noise_color": color}


def clip_chirp(rng):
  dur = _dur(rng)
  f0, f1 = sorted(float(v) for v in rng.choice([100, 200, 300, 500, 800, 1000, 2000, 3000, 4000], 2,
                                                replace=False))
  up = bool(rng.integers(2))
  if not up:
    f0, f1 = f1, f0
  expo = bool(rng.integers(2))
  n = int(dur * SR)
  t = np.arange(n) / n
  freq = f0 * (f1 / f0) ** t if expo else f0 + (f1 - f0) * t
  x, level = set_level(oscillator("sine", freq, n) * envelope(n, 0.01, 0.01), rng)
  cap = (f"A sine sweep {'rising' if up else 'falling'} {'exponentially' if expo else 'linearly'} "
         f"from {f0:.0f} Hz to {f1:.0f} Hz over {dur:.1f} seconds, {level}.")
  return x, cap, "sound", "chirp", {"wave": "sine", "level": level, "pitch_direction": "up" if up else "down"}


def clip_tremolo(rng):
  dur, f = _dur(rng), float(rng.choice([200, 250, 300, 400, 500, 600, 800]))
  rate = float(rng.choice([2, 3, 4, 5, 6, 8]))
  n = int(dur * SR)
  t = np.arange(n) / SR
  x = np.sin(2 * np.pi * f * t) * (0.55 + 0.45 * np.sin(2 * np.pi * rate * t))
  x, level = set_level(x, rng)
  cap = (f"A {f:.0f} Hz sine tone with a {rate:.0f} Hz tremolo (its loudness pulses {rate:.0f} times "
         f"per second), {level}, lasting {dur:.1f} seconds.")
  return x, cap, "sound", "tremolo", {"wave": "sine", "level": level}


def clip_vibrato(rng):
  dur, f = _dur(rng), float(rng.choice([220, 330, 440, 550, 660, 880]))
  rate, dev = float(rng.choice([4, 5, 6, 7])), float(rng.choice([5, 10, 20, 40]))
  n = int(dur * SR)
  freq = f + dev * np.sin(2 * np.pi * rate * np.arange(n) / SR)
  fi, fo, env_txt = _fades(rng, dur)
  x, level = set_level(oscillator("sine", freq, n) * envelope(n, fi, fo), rng)
  cap = (f"A {f:.0f} Hz sine tone with a {rate:.0f} Hz vibrato of plus or minus {dev:.0f} Hz, "
         f"{level}, lasting {dur:.1f} seconds{env_txt}.")
  return x, cap, "music", "vibrato", {"wave": "sine", "level": level}


def clip_clicks(rng):
  k, period = int(rng.integers(2, 11)), round(float(rng.uniform(0.15, 0.6)), 2)
  t0 = round(float(rng.uniform(0.1, 0.8)), 1)
  tail = round(float(rng.uniform(0.2, 0.8)), 1)
  total = round(t0 + (k - 1) * period + tail, 2)
  loud = bool(rng.integers(2))
  x = np.zeros(int(round(total * SR)))
  click = (0.9 if loud else 0.25) * np.hanning(32) * np.sign(np.sin(np.arange(32)))
  for i in range(k):
    s = int(round((t0 + i * period) * SR))
    x[s:s + 32] += click[: len(x) - s]
  cap = (f"Silence broken by {k} {'loud' if loud else 'soft'} clicks, one every {period:.2f} seconds "
         f"starting at {t0:.1f} seconds; {total:.2f} seconds in total.")
  return x, cap, "sound", "clicks", {}


def clip_speech(rng, espeak: str, workdir: str):
  text = str(rng.choice(SPEECH_LINES))
  voice, who = [("en+m3", "male"), ("en+f3", "female"), ("en-us+m1", "male"), ("en-us+f2", "female")][
      int(rng.integers(4))]
  speed = int(rng.choice([130, 160, 190]))
  pace = {130: "slowly", 160: "at a normal pace", 190: "quickly"}[speed]
  path = os.path.join(workdir, "speech.wav")
  subprocess.run([espeak, "-v", voice, "-s", str(speed), "-w", path, text], check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
  x, sr = sf.read(path, dtype="float64", always_2d=True)
  x = librosa.resample(x.mean(axis=1), orig_sr=sr, target_sr=SR) if sr != SR else x.mean(axis=1)
  x = x[: 6 * SR]
  x, level = set_level(x, rng)
  cap = (f"A synthetic {who} voice speaking English {pace} and {level}, saying: \"{text}\" "
         f"({len(x) / SR:.1f} seconds).")
  return x, cap, "speech", "speech", {"level": level, "speaker": who}


RECIPES = (("tone", clip_tone, 0.17), ("chord", clip_chord, 0.12), ("arpeggio", clip_arpeggio, 0.1),
           ("noise", clip_noise, 0.15), ("chirp", clip_chirp, 0.12), ("tremolo", clip_tremolo, 0.08),
           ("vibrato", clip_vibrato, 0.08), ("clicks", clip_clicks, 0.1))
SPEECH_WEIGHT = 0.15


def find_espeak() -> Optional[str]:
  return shutil.which("espeak-ng")


# -- text-only facts and SFT dialogues --------------------------------------------------------------

def text_facts(rng, k: int) -> list[str]:
  out = []
  for _ in range(k):
    r = int(rng.integers(5))
    m = int(rng.integers(36, 90))
    if r == 0:
      out.append(f"The note {note_name(m)} has a frequency of about {_fmt_hz(midi_freq(m))}.")
    elif r == 1:
      q = str(rng.choice(list(CHORDS)))
      names = ", ".join(NOTE_NAMES[(m + i) % 12] for i in CHORDS[q])
      out.append(f"A {NOTE_NAMES[m % 12]} {q} chord is made of the notes {names}.")
    elif r == 2:
      out.append(f"One octave above {note_name(m)} is {note_name(m + 12)}, at twice the frequency.")
    elif r == 3:
      out.append(str(rng.choice((
          "White noise has the same energy at every frequency.",
          "Pink noise has the same energy in every octave, so it sounds darker than white noise.",
          "A square wave contains only odd harmonics.",
          "A sawtooth wave contains every harmonic, each weaker than the last.",
          "Tremolo is a periodic change of loudness; vibrato is a periodic change of pitch.",
          "A sine sweep, or chirp, glides continuously from one frequency to another."))))
    else:
      f = int(rng.choice([100, 200, 441, 1000, 4000]))
      out.append(f"At a sample rate of 16000 Hz, one period of a {f} Hz tone lasts "
                 f"{16000 / f:.1f} samples.")
  return out


KIND_PHRASES = {"tone": "a steady tone", "chord": "a held chord", "arpeggio": "an arpeggio",
                "noise": "a noise burst", "chirp": "a frequency sweep", "tremolo": "a tone with tremolo",
                "vibrato": "a tone with vibrato", "clicks": "a click train", "speech": "speech"}
SYSTEM_PROMPT = "You are Bagpiper, an assistant that listens to, describes and generates audio."


def sft_dialogue(rng, clip: dict) -> dict:
  """An understanding or a generation dialogue about one clip (captions stay true)."""
  audio = {"path": clip["audio"]}
  if "start" in clip:
    audio.update(start=clip["start"], end=clip["end"])
  if rng.integers(2) and clip["seconds"] <= 4.0:
    request = str(rng.choice(("Please generate this sound: ", "Make audio that matches: ",
                              "Create the following: ")))
    think = (f"<think>The request describes {KIND_PHRASES[clip['kind']]}; I will render it as "
             "described.</think> ")
    msgs = [{"role": "system", "modality": "text", "content": SYSTEM_PROMPT},
            {"role": "user", "modality": "text", "content": request + clip["rich_caption"]},
            {"role": "assistant", "modality": "text", "content": think + clip["rich_caption"]},
            {"role": "assistant", "modality": "audio", "content": audio}]
    task = "generation"
  else:
    q, a = "Describe this audio in detail.", clip["rich_caption"]
    if rng.integers(2):
      q = "How long is this recording?"
      a = f"It lasts about {clip['seconds']:.1f} seconds."
    msgs = [{"role": "user", "modality": "audio", "content": audio},
            {"role": "user", "modality": "text", "content": q},
            {"role": "assistant", "modality": "text",
             "content": f"<think>I listen to the whole clip before answering.</think> {a}"}]
    task = "understanding"
  return {"id": f"sft_{clip['id']}", "category": clip["category"], "sft_task": task, "messages": msgs}


# -- the two entry points ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DemoPaths:
  root: str
  wav_dir: str
  tokenizer: str
  manifests: dict  # split ("train"/"eval") -> list of manifest paths

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")


def make_demo_data(out_dir: str, num_clips: int = DEFAULT_NUM_CLIPS, seed: int = 0, *,
                   use_espeak: bool = True) -> DemoPaths:
  """Generates clips, manifests and the tokenizer into `out_dir` (see module docstring).

  Deterministic: clip i is drawn from np.random.default_rng([seed, i]); the same (seed, num_clips,
  espeak availability) gives byte-identical manifests and wavs.
  """

  if num_clips < EVAL_EVERY:
    raise ValueError(f"num_clips must be >= {EVAL_EVERY} (one eval clip per {EVAL_EVERY})")
  wav_dir, man_dir = os.path.join(out_dir, "wavs"), os.path.join(out_dir, "manifests")
  os.makedirs(wav_dir, exist_ok=True)
  os.makedirs(man_dir, exist_ok=True)
  espeak = find_espeak() if use_espeak else None
  names = [r[0] for r in RECIPES] + (["speech"] if espeak else [])
  probs = np.array([r[2] for r in RECIPES] + ([SPEECH_WEIGHT] if espeak else []))
  probs /= probs.sum()
  fns = dict((r[0], r[1]) for r in RECIPES)

  clips: dict[str, list] = {"train": [], "eval": []}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(num_clips):
      rng = np.random.default_rng([seed, i])
      kind = str(rng.choice(names, p=probs))
      if kind == "speech":
        x, cap, category, kind, attrs = clip_speech(rng, espeak, tmp)
      else:
        x, cap, category, kind, attrs = fns[kind](rng)
      seconds = len(x) / SR
      row = {"id": f"clip_{i:05d}", "rich_caption": cap, "category": category, "kind": kind,
             "attributes": {"kind": kind, **attrs},
             "dataset": "bagpiper_demo_espeak" if kind == "speech" else DATASET,
             "direction": str(rng.choice(("und", "gen", "und,gen"))), "seconds": round(seconds, 3)}
      if rng.random() < 0.15:  # the clip is a segment of a longer file with other sound around it
        pre, post = round(float(rng.uniform(0.2, 1.0)), 2), round(float(rng.uniform(0.2, 1.0)), 2)
        hum = 0.01 * np.sin(2 * np.pi * 60.0 * np.arange(int((pre + post) * SR)) / SR)
        x = np.concatenate([hum[: int(pre * SR)], x, hum[int(pre * SR):]])
        row.update(start=pre, end=round(pre + seconds, 4))
      sf.write(os.path.join(wav_dir, f"clip_{i:05d}.wav"), np.clip(x, -1, 1).astype(np.float32), SR,
               subtype="PCM_16")
      row["audio"] = f"../wavs/clip_{i:05d}.wav"
      clips["eval" if i % EVAL_EVERY == EVAL_EVERY - 1 else "train"].append(row)

  manifests: dict[str, list] = {}
  all_text = []
  for split, rows in clips.items():
    srng = np.random.default_rng([seed, 10_000_000 + (split == "eval")])
    pre_rows = [{k: r[k] for k in ("id", "audio", "rich_caption", "direction", "category", "dataset",
                                   "start", "end", "attributes") if k in r} for r in rows]
    facts = text_facts(srng, max(len(rows) // 2, 4))
    sft = [sft_dialogue(srng, r) for r in rows[:: 3]]
    paths = [os.path.join(man_dir, f"{name}.{split}.jsonl") for name in ("pretrain", "text", "sft")]
    _write_jsonl(paths[0], pre_rows)
    _write_jsonl(paths[1], [{"id": f"text_{split}_{j:05d}", "text": t} for j, t in enumerate(facts)])
    _write_jsonl(paths[2], sft)
    manifests[split] = paths
    all_text += [r["rich_caption"] for r in rows] + facts
    all_text += [m["content"] for d in sft for m in d["messages"] if m["modality"] == "text"]

  with open(os.path.join(man_dir, "attributes.json"), "w") as f:
    json.dump(ATTRIBUTE_SPEC, f, indent=1, sort_keys=True)
  tok = tokenizer_train.train_sentencepiece(all_text, os.path.join(out_dir, "tokenizer", "spm"),
                                          DEMO_VOCAB_SIZE, seed=seed)
  paths = DemoPaths(root=os.path.abspath(out_dir), wav_dir=os.path.abspath(wav_dir),
                    tokenizer=os.path.abspath(tok),
                    manifests={k: [os.path.abspath(p) for p in v] for k, v in manifests.items()})
  stamp = {"version": DEMO_VERSION, "seed": seed, "num_clips": num_clips, "espeak": bool(espeak),
           "clips": {k: len(v) for k, v in clips.items()}, "paths": paths.to_json()}
  with open(os.path.join(out_dir, "demo.json"), "w") as f:
    json.dump(stamp, f, indent=1, sort_keys=True)
  return paths


@contextlib.contextmanager
def _locked(path: str):
  """Exclusive lock, so several processes (hosts on one file system) do not generate at once."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _stamp_ok(path: str, want: dict, *, needs: tuple = ()) -> bool:
  if not all(os.path.exists(p) for p in needs):
    return False
  try:
    with open(path) as f:
      have = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return all(have.get(k) == v for k, v in want.items())


def ensure_demo_shards(out_dir: str, *, num_clips: int = DEFAULT_NUM_CLIPS, seed: int = 0,
                       num_workers: int = 2, shard_size: int = 64, progress: bool = False) -> str:
  """Demo data + shards in `out_dir`, generated once; returns the shard root `out_dir/shards`.

  Layout of the returned directory:
    train/<source>/shard-NNNNN-of-MMMMM.array_record   sources: music_und, music_gen, sound_und,
    eval/<source>/...                                   sound_gen, text_only, sft, and speech_und /
    train/index.json, eval/index.json                   speech_gen only when espeak-ng is installed
  Each split's index.json lists its sources, record counts and errors (data_pipeline.writer).
  Calling it again with the same arguments returns at once; other arguments regenerate.
  """

  out_dir = os.path.abspath(out_dir)
  shard_root = os.path.join(out_dir, "shards")
  want = {"version": DEMO_VERSION, "seed": seed, "num_clips": num_clips}
  done_stamp = os.path.join(shard_root, "demo_shards.json")
  needs = tuple(os.path.join(shard_root, s, "index.json") for s in ("train", "eval"))
  if _stamp_ok(done_stamp, want, needs=needs):
    return shard_root
  with _locked(os.path.join(out_dir, ".lock")):
    if _stamp_ok(done_stamp, want, needs=needs):  # another process finished while we waited
      return shard_root
    if _stamp_ok(os.path.join(out_dir, "demo.json"), want):
      with open(os.path.join(out_dir, "demo.json")) as f:
        paths = DemoPaths(**json.load(f)["paths"])
    else:
      paths = make_demo_data(out_dir, num_clips=num_clips, seed=seed)
    xcodec_dir = os.path.join(out_dir, "xcodec_tiny")
    if not os.path.isfile(os.path.join(xcodec_dir, "config.json")):
      try:
        codec_lib.build_tiny_xcodec(xcodec_dir, seed=0)
      except ImportError as e:
        raise ImportError(f"the demo's audio codes need torch + transformers (pip install -e "
                          f"'.[torch]'): {e}") from e
    settings = build_lib.BuildSettings(tokenizer=paths.tokenizer, codec=f"xcodec:{xcodec_dir}")
    summary = {}
    splits = ("train", "eval")
    indexes = writer.write_many([(paths.manifests[s], os.path.join(shard_root, s)) for s in splits],
                                settings, shard_size=shard_size, num_workers=num_workers,
                                progress=progress, log=print if progress else (lambda s: None))
    for split, index in zip(splits, indexes):
      if index["incomplete_shards"]:
        raise RuntimeError(f"demo shards incomplete: {index['incomplete_shards']} (see "
                           f"{os.path.join(shard_root, split, 'index.json')})")
      summary[split] = {"records": index["num_records"], "errors": index["errors"]["total"],
                        "sources": {k: v["records"] for k, v in index["sources"].items()}}
    with open(done_stamp, "w") as f:
      json.dump({**want, "splits": summary}, f, indent=1, sort_keys=True)
  return shard_root


def demo_model_files(out_dir: str) -> dict[str, str]:
  """The demo's tokenizer and (tiny, random) X-Codec directory, for generation and samples."""
  out_dir = os.path.abspath(out_dir)
  return {"tokenizer": os.path.join(out_dir, "tokenizer", "spm.model"),
          "codec": os.path.join(out_dir, "xcodec_tiny")}


def demo_sources(shard_root: str, stage: str = "pretrain") -> tuple[dict[str, Any], dict[str, Any]]:
  """(train_sources, eval_sources) for config.data from ensure_demo_shards' output.

  pretrain / warmup: every pretraining subset that has records, weighted by the sampling
  factors (config_lib.PRETRAIN_MIXTURE); sft: {"sft": 1.0}. Paths are source directories.
  """
  out = []
  for split in ("train", "eval"):
    with open(os.path.join(shard_root, split, "index.json")) as f:
      index = json.load(f)
    have = {k for k, v in index["sources"].items() if v["records"] > 0}
    weights = {"sft": 1.0} if stage == "sft" else config_lib.PRETRAIN_MIXTURE
    out.append({k: {"path": os.path.join(shard_root, split, k), "weight": float(w)}
                for k, w in weights.items() if k in have})
  return out[0], out[1]
