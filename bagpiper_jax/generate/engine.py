"""Batched Bagpiper decoding in one jitted program: prefill, then a `lax.while_loop` of one-row steps.

    gen = Generator(cfg, params, settings=DecodeSettings())
    outs = gen.generate([Prompt.from_template(arrays, enforce=("text",), seed=42), ...])

What one request goes through (the reference's `inference`, docs/generation.md has the details):

  prefill the templated prompt (it ends with the closing <|eos|> of the last user/system message);
  per assistant segment:
    feed <|assistant|>; the modality is the request's enforced one (`enforce`, the reference's
    `enforce_modality`), else the argmax of <|text|> / <|audio|>;
    feed the modality row; then sample one row per step and feed it back, with the per-stream
    masks of the mode (text: stream 0 text ids, streams 1..7 emit 0; audio: stream n its own
    1,025 ids), <|eos|>/<|eot|> allowed on stream 0 from `min_steps` on;
    the segment ends at <|eos|>/<|eot|> or after `max_steps` rows; the last row is fed with
    streams 1..7 set to 0;
    another segment follows if the reference would decode one (the segment ended with <|eot|>,
    or more enforced modalities remain), bounded by `extra_segments` beyond the enforced ones.

Audio segments end "complete" by default (the reference leaves this as a TODO): stream 0's end
signal (its pad, <|eos|> or <|eot|>, from `min_steps`) fixes T frames, the next 7 rows finish
streams 1..7 (codes while stream n has frames left, its pad after), and the closer follows, so the
[T + 7, 8] rows de-interleave to exactly T frames in every stream; leading delay pads are forced.
`audio_end="reference"` decodes exactly as the reference (no forcing; R rows give R - 7 frames).

Classifier-free guidance (a mode's `cfg` != 1): the batch runs 2B cache rows; when a row starts such
a segment, its unconditional half becomes the cache of an all-pad context of the same length (the
reference's `_prepare_cfg_cache`; a causal model's K/V of pad rows at positions 0..L-1 do not
depend on L, so it is a slice of one all-pad prefill), then both halves are fed the same rows and
`logits = cfg * cond + (1 - cfg) * uncond`, masked after combining.

Batching: prompts are left-padded to a common bucketed length P (real rows at slots
[P - p_b, P), RoPE positions from 0), so every row writes the same cache slot each step; the cache
[layers, B(x2), S, K, D] is sharded by the training rules (model/decode.py CACHE_AXES). Shapes are
static per (batch, P, audio windows, S): each new combination compiles once. Seeds are per request
(a request's draws do not depend on its batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bagpiper_jax import sharding, train_state, train_step
from bagpiper_jax.data import template
from bagpiper_jax.generate import sampling
from bagpiper_jax.model import config as mc
from bagpiper_jax.model.decode import BagpiperDecoder, CACHE_AXES

MODES = ("text", "audio")
TEXT_MODE, AUDIO_MODE = 0, 1
MODE_TOKEN = {TEXT_MODE: mc.TEXT, AUDIO_MODE: mc.AUDIO}
AUDIO_ENDS = ("complete", "reference")

# Per-row phase: what the row fed this step was.
FEED_ASSISTANT, SEGMENT, FEED_FINAL, DONE = 0, 1, 2, 3
# Output flags of recorded rows.
F_MODALITY, F_CONTENT, F_CLOSER, F_CLOSER_LIMIT, F_END_MAX, F_END_CACHE = 1, 2, 3, 4, 5, 6


class GenerateError(ValueError):
  """A request or setting that cannot be decoded; the message names it and the limit."""


@dataclasses.dataclass(frozen=True)
class SegmentSettings:
  """Decoding of one modality (the reference's `inference_config[modality]`)."""

  temperature: float
  top_k: int
  top_p: float = 1.0  # an addition: 1.0 = off, as the reference
  cfg: float = 1.0  # classifier-free guidance scale; 1.0 = no unconditional branch
  min_steps: int = 1  # <|eos|>/<|eot|> (and, in "complete" audio, stream 0's pad) allowed from here
  max_steps: int = 2048  # rows of the segment, its closer included

  def check(self, name: str) -> None:
    if self.temperature < 0:
      raise GenerateError(f"{name} temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise GenerateError(f"{name} top_k must be >= 0 (0 = all), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise GenerateError(f"{name} top_p must be in (0, 1], got {self.top_p}")
    if self.min_steps < 0 or self.max_steps < 1:
      raise GenerateError(f"{name} needs min_steps >= 0 and max_steps >= 1, got {self.min_steps}, "
                          f"{self.max_steps}")


# The reference's inference settings (conf/inference_*.yaml; text max_step as its PAPER_DECODING).
TEXT_DEFAULTS = SegmentSettings(temperature=0.6, top_k=20, cfg=1.0, min_steps=1, max_steps=2048)
AUDIO_DEFAULTS = SegmentSettings(temperature=0.8, top_k=20, cfg=3.0, min_steps=50, max_steps=2048)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  text: SegmentSettings = TEXT_DEFAULTS
  audio: SegmentSettings = AUDIO_DEFAULTS
  audio_end: str = "complete"  # complete | reference (module docstring)
  extra_segments: int = 0  # free-modality segments allowed after the enforced ones (after <|eot|>)
  always_cfg_branch: bool = False  # run the unconditional branch even at cfg == 1 (tests)

  def check(self) -> None:
    self.text.check("text")
    self.audio.check("audio")
    if self.audio_end not in AUDIO_ENDS:
      raise GenerateError(f"audio_end {self.audio_end!r} not in {AUDIO_ENDS}")
    if self.audio_end == "complete" and self.audio.max_steps < 9:
      raise GenerateError(f"audio max_steps {self.audio.max_steps} leaves no frame: a complete audio segment "
                          "needs T + 7 rows and its closer (max_steps >= 9)")
    if self.extra_segments < 0:
      raise GenerateError(f"extra_segments must be >= 0, got {self.extra_segments}")

  def mode(self, m: int) -> SegmentSettings:
    return self.text if m == TEXT_MODE else self.audio

  def uses_cfg(self, m: int) -> bool:
    return self.always_cfg_branch or self.mode(m).cfg != 1.0


@dataclasses.dataclass
class Prompt:
  """One templated request (template.template_prompt arrays) and how to decode it."""

  input_ids: np.ndarray  # [P, S]
  audio_rows: np.ndarray  # [P], -1 = not a continuous-audio row
  audio_mel: np.ndarray  # [W, C, M, F]
  audio_chunk_lens: np.ndarray  # [W, C]
  enforce: tuple[str, ...] = ()  # modalities of the assistant segments, in order
  seed: int = 42  # the reference re-seeds every request with 42

  @classmethod
  def from_template(cls, arrays, enforce: Sequence[str] = (), seed: int = 42) -> "Prompt":
    bad = [m for m in enforce if m not in MODES]
    if bad:
      raise GenerateError(f"enforced modalities {bad} cannot be decoded; expected {MODES}")
    return cls(np.asarray(arrays["input_ids"]), np.asarray(arrays["audio_rows"]),
               np.asarray(arrays["audio_mel"]), np.asarray(arrays["audio_chunk_lens"]),
               tuple(enforce), int(seed))

  @property
  def length(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def windows(self) -> int:
    return int(self.audio_mel.shape[0])


@dataclasses.dataclass
class Segment:
  modality: str
  rows: np.ndarray  # content rows [R, S] (closer excluded)
  closer: Optional[int]  # mc.EOS / mc.EOT, or None
  end: str  # eos | eot | max_steps | cache_full; "+limit" when a complete audio end was forced


@dataclasses.dataclass
class Output:
  segments: list[Segment]
  prompt_rows: int
  decode_rows: int  # rows fed after the prompt (assistant/modality/content/closer rows)


def segment_text(seg: Segment, decode_ids: Callable[[np.ndarray], str]) -> str:
  """A text segment's string: stream 0 of its rows, unified ids -> `decode_ids`."""
  return decode_ids(np.asarray(seg.rows[:, 0]))


def segment_codes(seg: Segment, cfg: mc.ModelConfig) -> tuple[np.ndarray, int]:
  """An audio segment's codes [T, S] and its count of invalid cells (template.deinterleave_rows)."""
  return template.deinterleave_rows(seg.rows, cfg)


def _pow2_at_least(n: int, lo: int) -> int:
  return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-int(n) // m) * m


@dataclasses.dataclass(frozen=True)
class _Shape:
  batch: int
  prompt: int
  windows: int
  cache: int
  use_cfg: bool
  max_segments: int

  @property
  def iters(self) -> int:
    return self.cache - self.prompt


class Generator:
  """Decodes batches of prompts with one model; compiled programs are cached per shape."""

  def __init__(self, cfg: mc.ModelConfig, params, *, settings: DecodeSettings = DecodeSettings(),
               mesh: Optional[Mesh] = None, max_cache_len: int = 8192, max_batch: int = 8,
               prompt_bucket: int = 64):
    settings.check()
    self.cfg, self.settings = cfg, settings
    self.model = BagpiperDecoder(cfg)
    if mesh is None:
      mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)
    self.mesh = mesh
    if max_cache_len > cfg.max_position_embeddings:
      raise GenerateError(f"max_cache_len {max_cache_len} > the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}")
    self.max_cache_len, self.prompt_bucket = int(max_cache_len), int(prompt_bucket)
    self.batch_multiple = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    self.max_batch = _round_up(max(1, int(max_batch)), self.batch_multiple)
    self._abstract, logical = train_state.param_specs(cfg)
    self._param_shardings = sharding.logical_to_sharding(logical, self._abstract, mesh, log=False)
    self.params = None if params is None else self._place_params(params)  # None: AOT compilation only
    self._compiled: dict[_Shape, Callable] = {}

  # ---- placement ----

  def _place_params(self, params):
    abstract, shardings = self._abstract, self._param_shardings
    flat_p, tree_p = jax.tree.flatten(params)
    flat_a, tree_a = jax.tree.flatten(abstract)
    if tree_p != tree_a:
      raise GenerateError("the parameters do not have the model's tree (another model version or size?)")
    bad = [f"{a.shape} vs {tuple(np.shape(p))}" for p, a in zip(flat_p, flat_a)
           if tuple(np.shape(p)) != a.shape]
    if bad:
      raise GenerateError(f"{len(bad)} parameters have another shape than the model config says, "
                          f"e.g. {bad[:3]}")
    placed = lambda p, s: isinstance(p, jax.Array) and p.sharding == s
    return jax.tree.map(lambda p, s: p if placed(p, s) else jax.device_put(p, s), params, shardings)

  def _replicated(self, x):
    x = np.asarray(x)
    s = NamedSharding(self.mesh, PartitionSpec())
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  # ---- planning ----

  def plan_rows(self, enforce: Sequence[str]) -> int:
    """Decode steps a request may take (the cache slots it needs after its prompt)."""
    st = self.settings
    per = {"text": st.text.max_steps + 2, "audio": st.audio.max_steps + 2}
    free = st.extra_segments if enforce else max(1, st.extra_segments)
    return sum(per[m] for m in enforce) + free * max(per.values())

  def _shape(self, prompts: Sequence[Prompt]) -> _Shape:
    longest = max(p.length for p in prompts)
    pb = min(_round_up(longest, self.prompt_bucket), self.max_cache_len)
    plan = max(self.plan_rows(p.enforce) for p in prompts)
    cache = min(self.max_cache_len, _round_up(pb + plan, 128))
    if cache - pb < 2:
      raise GenerateError(f"a prompt of {longest} rows leaves no room to decode in the cache of "
                          f"{self.max_cache_len} rows (raise --max_cache_len)")
    windows = max(p.windows for p in prompts)
    st = self.settings
    may_audio = any("audio" in p.enforce or st.extra_segments > 0 or not p.enforce for p in prompts)
    may_text = any("text" in p.enforce or st.extra_segments > 0 or not p.enforce for p in prompts)
    use_cfg = (may_audio and st.uses_cfg(AUDIO_MODE)) or (may_text and st.uses_cfg(TEXT_MODE))
    free = max(st.extra_segments, 0 if all(p.enforce for p in prompts) else 1)
    max_seg = max(len(p.enforce) for p in prompts) + free
    return _Shape(batch=_round_up(_pow2_at_least(len(prompts), 1), self.batch_multiple), prompt=pb,
                  windows=_pow2_at_least(windows, 1) if windows else 0, cache=cache, use_cfg=use_cfg,
                  max_segments=max(1, max_seg))

  def check_prompt(self, p: Prompt, where: str = "request") -> None:
    """Raises GenerateError when the prompt cannot fit the cache."""
    if p.length + 2 > self.max_cache_len:
      raise GenerateError(f"{where}: the prompt has {p.length} rows, more than the cache of "
                          f"{self.max_cache_len} rows leaves room for (raise --max_cache_len, or shorten "
                          "the audio/text)")

  # ---- the batch ----

  def _host_batch(self, prompts: Sequence[Prompt], shape: _Shape):
    cfg, b, pl = self.cfg, shape.batch, shape.prompt
    ids = np.zeros((b, pl, cfg.num_streams), np.int32)
    seg = np.zeros((b, pl), np.int32)
    pos = np.zeros((b, pl), np.int32)
    start = np.full((b,), pl - 1, np.int32)
    max_seg = shape.max_segments
    enforce = np.full((b, max_seg), -1, np.int32)
    n_enf = np.zeros((b,), np.int32)
    seeds = np.zeros((b,), np.uint32)
    valid = np.zeros((b,), bool)
    enc = cfg.audio_encoder
    if shape.windows:
      mel = np.zeros((b, shape.windows, enc.chunks_per_window, enc.num_mel_bins, enc.chunk_frames),
                     np.float32)
      lens = np.zeros((b, shape.windows, enc.chunks_per_window), np.int32)
      rows = np.full((b, pl), -1, np.int32)
    for i, p in enumerate(prompts):
      n = p.length
      s0 = pl - n
      ids[i, s0:] = p.input_ids
      seg[i, s0:] = 1
      pos[i, s0:] = np.arange(n)
      start[i] = s0
      for j, m in enumerate(p.enforce):
        enforce[i, j] = MODES.index(m)
      n_enf[i] = len(p.enforce)
      seeds[i] = np.uint32(p.seed % 2**32)
      valid[i] = True
      if shape.windows:
        rows[i, s0:] = p.audio_rows
        if p.windows:
          mel[i, :p.windows] = p.audio_mel
          lens[i, :p.windows] = p.audio_chunk_lens
    for i in range(len(prompts), b):  # filler rows: one pad row, done from the start
      ids[i, -1, 0] = mc.BOS
      seg[i, -1] = 1
    batch = {"input_ids": ids, "loss_weights": np.zeros(ids.shape, np.float32), "segment_ids": seg,
             "positions": pos}
    if shape.windows:
      batch.update(audio_mel=mel, audio_chunk_lens=lens, audio_rows=rows)
    lengths = np.array([p.length for p in prompts] + [1] * (b - len(prompts)), np.int32)
    return batch, {"start": start, "length": lengths, "enforce": enforce, "n_enforced": n_enf, "seeds": seeds,
                   "valid": valid}

  # ---- the program ----

  def _program(self, shape: _Shape):
    if shape not in self._compiled:
      self._compiled[shape] = jax.jit(functools.partial(self._decode, shape))
    return self._compiled[shape]

  def _decode(self, shape: _Shape, params, batch, meta):
    with train_step.mesh_rules(self.mesh):
      params = self.cast(params)
      state = self.prefill_state(shape, params, batch, meta)
      body = functools.partial(self.decode_step, shape, params)
      state = jax.lax.while_loop(lambda s: (s["t"] < shape.iters) & jnp.any(s["phase"] != DONE), body, state)
    return {"rows": state["out_rows"], "flags": state["out_flags"], "count": state["n_out"],
            "steps": state["t"]}

  def cast(self, params):
    """Floating parameters in the compute dtype (the reference decodes in bf16 with model.to(dtype))."""
    dt = jnp.dtype(self.cfg.dtype)
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

  def _apply(self, params, method, *args):
    return self.model.apply({"params": params}, *args, method=method)

  def prefill_state(self, shape: _Shape, params, batch, meta) -> dict:
    """The loop's initial state: the prompt prefilled into the cache, every row about to feed <|assistant|>.

    `params` are already cast (`cast`); so are they for `decode_step`, the loop body.
    """
    cfg = self.cfg
    b, s = shape.batch, shape.cache
    b2 = 2 * b if shape.use_cfg else b
    _, (k, v) = self._apply(params, BagpiperDecoder.prefill, batch)
    zeros = jnp.zeros((cfg.num_layers, b2, s, cfg.num_kv_heads, cfg.head_dim), k.dtype)
    place = lambda c, x: nn.with_logical_constraint(jax.lax.dynamic_update_slice(c, x, (0, 0, 0, 0, 0)),
                                                    CACHE_AXES)
    kc, vc = place(zeros, k), place(zeros, v)
    state = {"k": kc, "v": vc}
    if shape.use_cfg:
      kc, vc = place(kc, jnp.concatenate([k, k], 1)), place(vc, jnp.concatenate([v, v], 1))
      pads = {"input_ids": jnp.zeros((1, s, cfg.num_streams), jnp.int32),
              "loss_weights": jnp.zeros((1, s, cfg.num_streams), jnp.float32),
              "segment_ids": jnp.ones((1, s), jnp.int32), "positions": jnp.arange(s, dtype=jnp.int32)[None]}
      _, (kp, vp) = self._apply(params, BagpiperDecoder.prefill, pads)
      state.update(k=kc, v=vc, k_pad=kp, v_pad=vp)
    row = lambda tok: jnp.zeros((b, cfg.num_streams), jnp.int32).at[:, 0].set(tok)
    state.update(
        t=jnp.zeros((), jnp.int32),
        inp=row(mc.ASSISTANT),
        pos=meta["length"],
        phase=jnp.where(meta["valid"], FEED_ASSISTANT, DONE).astype(jnp.int32),
        mode=jnp.zeros((b,), jnp.int32), seg=jnp.zeros((b,), jnp.int32), r=jnp.zeros((b,), jnp.int32),
        end_row=jnp.full((b,), -1, jnp.int32), closer=jnp.full((b,), -1, jnp.int32),
        forced=jnp.zeros((b,), bool), cont=jnp.zeros((b,), bool),
        out_rows=jnp.zeros((b, shape.iters, cfg.num_streams), jnp.int32),
        out_flags=jnp.zeros((b, shape.iters), jnp.int32), n_out=jnp.zeros((b,), jnp.int32),
        start=meta["start"], enforce=meta["enforce"], n_enforced=meta["n_enforced"],
        keys=jax.vmap(jax.random.key)(meta["seeds"]),
        offsets=self._apply(params, BagpiperDecoder.stream_offsets))
    return state

  def decode_step(self, shape: _Shape, params, st: dict) -> dict:
    """One loop iteration: every row feeds its row, the model steps, rows sample and advance."""
    cfg, cs = self.cfg, self.settings
    b, s = shape.batch, shape.cache
    t = st["t"]
    slot = shape.prompt + t
    iters_left = shape.iters - t
    slots = jnp.arange(s, dtype=jnp.int32)
    kv_mask = (slots[None] >= st["start"][:, None]) & (slots[None] < slot)
    inp, pos = st["inp"], st["pos"]
    if shape.use_cfg:
      kv_mask, inp2, pos2 = (jnp.concatenate([x, x]) for x in (kv_mask, inp, pos))
    else:
      inp2, pos2 = inp, pos
    base, (k1, v1) = self._apply(params, BagpiperDecoder.step, inp2[:, None], pos2[:, None],
                                 (st["k"], st["v"]), kv_mask)
    kc = jax.lax.dynamic_update_slice(st["k"], k1.astype(st["k"].dtype), (0, 0, slot, 0, 0))
    vc = jax.lax.dynamic_update_slice(st["v"], v1.astype(st["v"].dtype), (0, 0, slot, 0, 0))
    base = base[:, 0]
    cond = base[:b]
    uncond = base[b:] if shape.use_cfg else None

    def guided(m):
      scale = cs.mode(m).cfg
      if not (shape.use_cfg and cs.uses_cfg(m)):
        return cond
      return scale * cond + (1.0 - scale) * uncond

    phase, mode, seg, r = st["phase"], st["mode"], st["seg"], st["r"]
    keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, t), 2))(st["keys"])
    zeros_row = jnp.zeros((b, cfg.num_streams), jnp.int32)

    # Modality of a new segment (rows that fed <|assistant|>).
    seg_c = jnp.clip(seg, 0, shape.max_segments - 1)
    enf = jnp.take_along_axis(st["enforce"], seg_c[:, None], axis=1)[:, 0]
    enf = jnp.where(seg < st["n_enforced"], enf, -1)
    free = jnp.where(cond[:, mc.AUDIO] > cond[:, mc.TEXT], AUDIO_MODE, TEXT_MODE)
    new_mode = jnp.where(enf >= 0, enf, free).astype(jnp.int32)

    # Text rows: stream 0 over text ids (+ closers from min_steps); streams 1..7 emit 0.
    tl = guided(TEXT_MODE)
    ids = jnp.arange(cfg.vocab_size)
    allowed = (ids >= cfg.num_specials) & (ids < cfg.codec_start)
    closers = (ids == mc.EOS) | (ids == mc.EOT)
    ok = allowed[None] | (closers[None] & (r >= cs.text.min_steps)[:, None])
    tl = jnp.where(ok, tl, -jnp.inf)
    tsample = functools.partial(sampling.sample, temperature=cs.text.temperature, top_k=cs.text.top_k,
                                top_p=cs.text.top_p)
    text_tok = jax.vmap(tsample)(tl, keys[:, 0])
    text_row = zeros_row.at[:, 0].set(text_tok)
    text_closer = (text_tok == mc.EOS) | (text_tok == mc.EOT)

    # Audio rows: each stream over its own block (+ <|eos|>/<|eot|> columns for stream 0).
    audio_row, audio_closer, new_end, new_closer, new_forced = self._audio_rows(
        shape, guided(AUDIO_MODE), st["offsets"], keys[:, 1], st, iters_left)

    is_audio = mode == AUDIO_MODE
    row = jnp.where(is_audio[:, None], audio_row, text_row)
    is_closer = jnp.where(is_audio, audio_closer, text_closer)
    max_steps = jnp.where(is_audio, cs.audio.max_steps, cs.text.max_steps)
    end_max = ~is_closer & (r >= max_steps - 1)
    end_cache = ~is_closer & ~end_max & (iters_left <= 1)
    limit_closer = is_closer & is_audio & new_forced
    flag = jnp.where(is_closer, jnp.where(limit_closer, F_CLOSER_LIMIT, F_CLOSER),
                     jnp.where(end_max, F_END_MAX, jnp.where(end_cache, F_END_CACHE, F_CONTENT)))
    seg_end = flag != F_CONTENT
    max_seg = st["n_enforced"] + cs.extra_segments
    max_seg = jnp.where(st["n_enforced"] > 0, max_seg, jnp.maximum(max_seg, 1))
    cont_new = ((seg + 1 < max_seg) & ((row[:, 0] == mc.EOT) | (seg + 1 < st["n_enforced"]))
                & (flag != F_END_CACHE))

    in_a, in_s, in_f = phase == FEED_ASSISTANT, phase == SEGMENT, phase == FEED_FINAL
    mod_row = zeros_row.at[:, 0].set(jnp.where(new_mode == AUDIO_MODE, mc.AUDIO, mc.TEXT))
    final_row = zeros_row.at[:, 0].set(row[:, 0])  # the segment's last row, streams 1..7 zeroed
    asst_row = zeros_row.at[:, 0].set(mc.ASSISTANT)
    col = lambda x: x[:, None]
    again = in_f & st["cont"]
    next_inp = jnp.where(col(in_a), mod_row, jnp.where(
        col(in_s), jnp.where(col(seg_end), final_row, row), jnp.where(col(again), asst_row, zeros_row)))
    next_phase = jnp.where(in_a, SEGMENT, jnp.where(
        in_s, jnp.where(seg_end, FEED_FINAL, SEGMENT), jnp.where(again, FEED_ASSISTANT, DONE)))
    next_phase = next_phase.astype(jnp.int32)

    record = in_a | in_s
    rec_row = jnp.where(col(in_a), mod_row, row)
    rec_flag = jnp.where(in_a, F_MODALITY, flag)
    bi = jnp.arange(b)
    n_out = jnp.minimum(st["n_out"], shape.iters - 1)
    out_rows = st["out_rows"].at[bi, n_out].set(jnp.where(col(record), rec_row, st["out_rows"][bi, n_out]))
    out_flags = st["out_flags"].at[bi, n_out].set(jnp.where(record, rec_flag, st["out_flags"][bi, n_out]))

    is_audio_seg = in_s & is_audio
    new = dict(st)
    new.update(
        t=t + 1, inp=next_inp, pos=pos + 1, phase=next_phase,
        mode=jnp.where(in_a, new_mode, mode),
        seg=jnp.where(in_f & st["cont"], seg + 1, seg),
        r=jnp.where(in_a, 0, jnp.where(in_s, r + 1, r)),
        end_row=jnp.where(in_a, -1, jnp.where(is_audio_seg, new_end, st["end_row"])),
        closer=jnp.where(in_a, -1, jnp.where(is_audio_seg, new_closer, st["closer"])),
        forced=jnp.where(in_a, False, jnp.where(is_audio_seg, new_forced, st["forced"])),
        cont=jnp.where(in_s & seg_end, cont_new, st["cont"]),
        out_rows=out_rows, out_flags=out_flags, n_out=st["n_out"] + record.astype(jnp.int32),
        k=kc, v=vc)
    if shape.use_cfg:
      cfg_mode = jnp.where(new_mode == AUDIO_MODE, cs.uses_cfg(AUDIO_MODE), cs.uses_cfg(TEXT_MODE))
      reset = in_a & cfg_mode
      new["k"], new["v"] = jax.lax.cond(jnp.any(reset), functools.partial(self._reset_uncond, shape, slot),
                                        lambda kv, *_: kv, (kc, vc), reset, st["start"], st["k_pad"],
                                        st["v_pad"])
    return new

  def _reset_uncond(self, shape: _Shape, slot, kv, reset, start, k_pad, v_pad):
    """Unconditional rows of `reset` rows := the all-pad context over their slots [start, slot].

    One layer at a time, in place: the temporary is one layer's half cache, not the whole half.
    """
    b, s = shape.batch, shape.cache
    slots = jnp.arange(s, dtype=jnp.int32)
    rel = slots[None] - start[:, None]  # [B, S]: the position a slot holds
    src = jnp.clip(rel, 0, s - 1)
    use = (reset[:, None] & (rel >= 0) & (slots[None] <= slot))[:, :, None, None]

    def layer(i, kv):
      out = []
      for cache, pad in zip(kv, (k_pad, v_pad)):
        picked = jnp.take(pad[i, 0], src, axis=0).astype(cache.dtype)  # [B, S, K, D]
        old = jax.lax.dynamic_index_in_dim(cache, i, axis=0, keepdims=False)[b:]
        new = jnp.where(use, picked, old)
        out.append(jax.lax.dynamic_update_slice(cache, new[None], (i, b, 0, 0, 0)))
      return tuple(out)

    return jax.lax.fori_loop(0, self.cfg.num_layers, layer, tuple(kv))

  def _audio_rows(self, shape: _Shape, logits, offsets, keys, st, iters_left):
    """Samples one audio row per batch row: (row [B, S], is its closer row, end row T, closer id, forced)."""
    cfg, cs = self.cfg, self.settings
    s_count, blk = cfg.num_streams, cfg.codec_block
    b = logits.shape[0]
    idx = cfg.codec_start + jnp.arange(s_count)[:, None] * blk + jnp.arange(blk)[None]  # [S, blk]
    cand = logits[:, idx] + offsets[jnp.arange(s_count)[:, None], idx][None]
    closers = jnp.stack([logits[:, mc.EOS] + offsets[0, mc.EOS], logits[:, mc.EOT] + offsets[0, mc.EOT]], -1)
    extra = jnp.full((b, s_count, 2), -jnp.inf).at[:, 0].set(closers)
    cand = jnp.concatenate([cand, extra], axis=-1)  # [B, S, blk + 2]
    n = jnp.arange(s_count)[None, :, None]
    c = jnp.arange(blk + 2)[None, None, :]
    is_pad, is_code, is_eos, is_eot = c == 0, (c >= 1) & (c < blk), c == blk, c == blk + 1
    r, end_row, closer = st["r"][:, None, None], st["end_row"][:, None, None], st["closer"][:, None, None]
    a = cs.audio
    if cs.audio_end == "reference":
      allowed = (c < blk) | ((n == 0) & ~is_pad & ~is_code & (r >= a.min_steps))
    else:
      ongoing = end_row < 0
      force = (r >= a.max_steps - 8) | (iters_left <= 8)
      may_end = (r >= a.min_steps) | force
      chosen = (is_eos & (closer == mc.EOS)) | (is_eot & (closer == mc.EOT))
      s0 = jnp.where(ongoing, (is_code & ~force) | ((is_pad | is_eos | is_eot) & may_end),
                     jnp.where(r < end_row + 7, is_pad, jnp.where(closer >= 0, chosen, is_eos | is_eot)))
      sn = jnp.where(r < n, is_pad, jnp.where(ongoing | (r < end_row + n), is_code, is_pad))
      allowed = jnp.where(n == 0, s0, sn)
    cand = jnp.where(allowed, cand, -jnp.inf)
    asample = functools.partial(sampling.sample, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    cols = jax.vmap(asample)(cand, keys)  # [B, S]
    ids = jnp.where(cols < blk, cfg.codec_start + jnp.arange(s_count)[None] * blk + cols,
                    jnp.where(cols == blk, mc.EOS, mc.EOT)).astype(jnp.int32)
    r1, end1, closer1 = st["r"], st["end_row"], st["closer"]
    if cs.audio_end == "reference":
      is_closer = (ids[:, 0] == mc.EOS) | (ids[:, 0] == mc.EOT)
      return ids, is_closer, end1, closer1, st["forced"]
    s0 = cols[:, 0]
    ongoing1 = end1 < 0
    signal = ongoing1 & ((s0 == 0) | (s0 >= blk))
    force1 = (r1 >= a.max_steps - 8) | (iters_left <= 8)
    new_end = jnp.where(signal, r1, end1)
    new_closer = jnp.where(signal & (s0 == blk), mc.EOS, jnp.where(signal & (s0 == blk + 1), mc.EOT, closer1))
    new_forced = st["forced"] | (signal & force1)
    ids = ids.at[:, 0].set(jnp.where(signal, cfg.codec_pad_id(0), ids[:, 0]))
    is_closer = (end1 >= 0) & (r1 == end1 + 7)
    closer_row = jnp.zeros_like(ids).at[:, 0].set(ids[:, 0])
    ids = jnp.where(is_closer[:, None], closer_row, ids)
    return ids, is_closer, new_end, new_closer, new_forced

  # ---- ahead-of-time compilation (launch/aot_compile.py --decode) ----

  def step_shape(self, *, batch: int, cache: int, use_cfg: bool, prompt: int = 128,
                 max_segments: int = 2) -> _Shape:
    return _Shape(batch=batch, prompt=prompt, windows=0, cache=cache, use_cfg=use_cfg,
                  max_segments=max_segments)

  def abstract_step(self, shape: _Shape):
    """(jitted one-iteration step, abstract params, abstract loop state), all with their shardings on
    the mesh and nothing allocated: `step.lower(params, state).compile()` is the program every decode
    iteration runs (model step, cache write, sampling, bookkeeping)."""
    cfg = self.cfg
    abstract, p_sh = self._abstract, self._param_shardings
    dt = jnp.dtype(cfg.dtype)
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(
        a.shape, dt if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=sh), abstract, p_sh)
    b, pl = shape.batch, shape.prompt
    batch = {"input_ids": jax.ShapeDtypeStruct((b, pl, cfg.num_streams), jnp.int32),
             "loss_weights": jax.ShapeDtypeStruct((b, pl, cfg.num_streams), jnp.float32),
             "segment_ids": jax.ShapeDtypeStruct((b, pl), jnp.int32),
             "positions": jax.ShapeDtypeStruct((b, pl), jnp.int32)}
    meta = {"start": (b,), "length": (b,), "n_enforced": (b,), "enforce": (b, shape.max_segments)}
    meta = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in meta.items()}
    meta.update(seeds=jax.ShapeDtypeStruct((b,), jnp.uint32), valid=jax.ShapeDtypeStruct((b,), jnp.bool_))
    state = jax.eval_shape(functools.partial(self.prefill_state, shape), params, batch, meta)
    rep = NamedSharding(self.mesh, PartitionSpec())
    cache_sh = lambda x: sharding.logical_to_sharding(PartitionSpec(*CACHE_AXES), x, self.mesh, log=False)
    st_sh = {k: (cache_sh(v) if k in ("k", "v", "k_pad", "v_pad") else rep) for k, v in state.items()}
    state = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=st_sh[k]) for k, v in state.items()}

    def step(p, st):
      with train_step.mesh_rules(self.mesh):
        return self.decode_step(shape, p, st)
    fn = jax.jit(step, in_shardings=(p_sh, st_sh), out_shardings=st_sh, donate_argnums=(1,))
    return fn, params, state

  # ---- public ----

  def generate(self, prompts: Sequence[Prompt], *, params=None,
               progress: Optional[Callable[[int, int], None]] = None) -> list[Output]:
    """Decodes `prompts` in batches of at most `max_batch`; outputs in order.

    `params` replaces the generator's parameters for this call (e.g. the training state's, which
    already have the mesh's shardings).
    """
    for i, p in enumerate(prompts):
      self.check_prompt(p, f"request {i}")
    params = self.params if params is None else self._place_params(params)
    out: list[Output] = []
    for lo in range(0, len(prompts), self.max_batch):
      chunk = list(prompts[lo:lo + self.max_batch])
      out += self._generate_batch(chunk, params)
      if progress is not None:
        progress(len(out), len(prompts))
    return out

  def _generate_batch(self, prompts: Sequence[Prompt], params) -> list[Output]:
    shape = self._shape(prompts)
    batch, meta = self._host_batch(prompts, shape)
    batch = {k: self._replicated(v) for k, v in batch.items()}
    meta = {k: self._replicated(v) for k, v in meta.items()}
    res = jax.device_get(self._program(shape)(params, batch, meta))
    return [parse_rows(res["rows"][i], res["flags"][i], int(res["count"][i]), p.length)
            for i, p in enumerate(prompts)]


def parse_rows(rows: np.ndarray, flags: np.ndarray, count: int, prompt_rows: int) -> Output:
  """Recorded rows and flags of one batch row -> its segments."""
  segments: list[Segment] = []
  cur: Optional[dict] = None
  decode_rows = 0

  def close(end: str, closer: Optional[int] = None):
    segments.append(Segment(cur["modality"], np.asarray(cur["rows"], np.int32).reshape(-1, rows.shape[-1]),
                            closer, end))

  for i in range(count):
    f, row = int(flags[i]), rows[i]
    if f == F_MODALITY:
      decode_rows += 2
      if cur is not None:
        close("cache_full")
      cur = {"modality": "audio" if row[0] == mc.AUDIO else "text", "rows": []}
      continue
    decode_rows += 1
    if f == F_CONTENT:
      cur["rows"].append(row)
    elif f in (F_CLOSER, F_CLOSER_LIMIT):
      end = "eos" if row[0] == mc.EOS else "eot"
      close(end + ("+limit" if f == F_CLOSER_LIMIT else ""), int(row[0]))
      cur = None
    elif f in (F_END_MAX, F_END_CACHE):
      cur["rows"].append(row)
      close("max_steps" if f == F_END_MAX else "cache_full")
      cur = None
  if cur is not None:
    close("cache_full")
  return Output(segments, prompt_rows, decode_rows)
