"""The decoder and multi-stream head against executable references (transformers Qwen3, the loss of docs/model.md#loss)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from bagpiper_jax.convert import rules
from bagpiper_jax import batch as batch_lib
from bagpiper_jax.model import Bagpiper, ModelConfig
from bagpiper_jax.model import config as config_lib
from conftest import hf_qwen3, init_params, tiny_model_config


def _text_batch(ids, segment_ids=None, positions=None, streams=8):
  b, l = ids.shape
  x = np.zeros((b, l, streams), np.int32)
  x[..., 0] = ids
  seg = np.ones((b, l), np.int32) if segment_ids is None else segment_ids
  pos = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy() if positions is None else positions
  return {"input_ids": x, "loss_weights": np.zeros((b, l, streams), np.float32), "segment_ids": seg,
          "positions": pos}


def _merge(params, new):
  out = dict(params)
  for k, v in new.items():
    out[k] = _merge(params[k], v) if isinstance(v, dict) else jnp.asarray(v)
  return out


def _randomize(params, seed=1, std=0.2):
  """Every parameter moved by std * N(0, 1) noise (numpy's generator: drawing per leaf with jax.random
  compiles one program per shape, seconds each on XLA:CPU)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + std * rng.standard_normal(x.shape), x.dtype), params)


def test_text_logits_match_transformers_qwen3():
  cfg = tiny_model_config()
  hf = hf_qwen3(cfg, seed=3)
  rng = np.random.default_rng(0)
  ids = rng.integers(cfg.num_specials, cfg.codec_start, size=(2, 13)).astype(np.int32)
  batch = _text_batch(ids)
  params = init_params(cfg, batch)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  params = _merge(params, rules.from_torch_tensors(state.__getitem__, rules.decoder_rules(cfg)))
  # Random stream_emb: stream 0 must still equal plain Qwen3 (row 0 is held at zero).
  params["stream_emb"]["embedding"] = jax.random.normal(jax.random.PRNGKey(5), (8, cfg.hidden_size))
  ours = Bagpiper(cfg).apply({"params": params}, batch, method=Bagpiper.logits)
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  diff = np.abs(np.asarray(ours[:, :, 0]) - ref).max()
  assert diff < 1e-4, diff
  # And streams n>0 are lm_head(h + stream_emb[n]), not stream 0's logits.
  assert np.abs(np.asarray(ours[:, :, 3]) - ref).max() > 1e-2


def test_one_stream_model_is_a_plain_qwen3_lm():
  """num_streams=1 without audio is exactly a causal LM: its training loss is transformers'
  Qwen3ForCausalLM loss (mean next-token CE). This is the step launch/README.md compiles against
  MaxText's qwen3-8b ("the same work"), so it must be the same computation, not a look-alike."""
  cfg = tiny_model_config(num_streams=1)
  hf = hf_qwen3(cfg, seed=4)
  rng = np.random.default_rng(1)
  ids = rng.integers(cfg.num_specials, cfg.codec_start, size=(2, 13)).astype(np.int32)
  b, l = ids.shape
  batch = _text_batch(ids, streams=1)
  batch["loss_weights"][:] = 1.0
  params = init_params(cfg, batch)
  assert params["stream_emb"]["embedding"].shape == (1, cfg.hidden_size)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  params = _merge(params, rules.from_torch_tensors(state.__getitem__, rules.decoder_rules(cfg)))
  params["stream_emb"]["embedding"] = jnp.ones((1, cfg.hidden_size))  # row 0: held at zero, ignored
  loss, aux = Bagpiper(cfg).apply({"params": params}, batch)
  with torch.no_grad():
    t = torch.from_numpy(ids.astype(np.int64))
    ref = float(hf(t, labels=t).loss)
  assert abs(float(loss) - ref) < 1e-5 * max(1.0, ref), (float(loss), ref)
  assert float(aux["num_target_tokens"]) == b * (l - 1)


def test_packed_documents_equal_separate_documents():
  cfg = tiny_model_config()
  rng = np.random.default_rng(1)
  a = rng.integers(cfg.num_specials, cfg.codec_start, size=7)
  b = rng.integers(cfg.num_specials, cfg.codec_start, size=9)
  row = np.concatenate([a, b, np.zeros(4, np.int64)])[None].astype(np.int32)
  seg = np.array([[1] * 7 + [2] * 9 + [0] * 4], np.int32)
  pos = np.array([list(range(7)) + list(range(9)) + [0] * 4], np.int32)
  packed = _text_batch(row, seg, pos)
  params = _randomize(init_params(cfg, packed))
  model = Bagpiper(cfg)
  out = np.asarray(model.apply({"params": params}, packed, method=Bagpiper.logits))
  out_a = np.asarray(model.apply({"params": params}, _text_batch(a[None].astype(np.int32)),
                                 method=Bagpiper.logits))
  out_b = np.asarray(model.apply({"params": params}, _text_batch(b[None].astype(np.int32)),
                                 method=Bagpiper.logits))
  np.testing.assert_allclose(out[0, :7], out_a[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 7:16], out_b[0], atol=1e-5)


def test_query_chunked_attention_equals_dense():
  cfg = tiny_model_config(attention_q_chunk=0)
  rng = np.random.default_rng(4)
  row = rng.integers(cfg.num_specials, cfg.codec_start, size=(2, 23)).astype(np.int32)
  seg = np.array([[1] * 10 + [2] * 11 + [0] * 2, [1] * 23], np.int32)
  pos = np.array([list(range(10)) + list(range(11)) + [0, 0], list(range(23))], np.int32)
  batch = _text_batch(row, seg, pos)
  params = _randomize(init_params(cfg, batch))
  dense = Bagpiper(cfg).apply({"params": params}, batch, method=Bagpiper.logits)
  for q_chunk in (4, 5, 23):  # 23 = 4*5+3 and 5*4+3 exercise the padded last block
    chunked = Bagpiper(dataclasses.replace(cfg, attention_q_chunk=q_chunk)).apply(
        {"params": params}, batch, method=Bagpiper.logits)
    np.testing.assert_allclose(np.asarray(chunked)[:, :21], np.asarray(dense)[:, :21], atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked)[1], np.asarray(dense)[1], atol=1e-5)


def test_splash_attention_kernel_equals_xla_attention():
  """The TPU Pallas kernel (run in the interpreter) against the XLA path, values and gradients."""
  from bagpiper_jax.model import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 200, h, 16)), jnp.float32) for h in (4, 2, 2))
  seg = jnp.asarray([[1] * 90 + [2] * 100 + [0] * 10], jnp.int32)
  f_ref = lambda q, k, v: layers.attend(q, k, v, seg)
  f_splash = lambda q, k, v: layers.splash_attend(q, k, v, seg, interpret=True)
  np.testing.assert_allclose(f_splash(q, k, v), f_ref(q, k, v), atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  for a, b in zip(jax.grad(loss(f_splash), (0, 1, 2))(q, k, v), jax.grad(loss(f_ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=5e-5)


def _mixed_batch(cfg: ModelConfig):
  """One row per docs/data.md#sequence-format: text rows, a continuous-audio span, a delayed codec span; then a 2nd document."""
  enc = cfg.audio_encoder
  rows, weights, audio_rows = [], [], []
  text = lambda i, w=0.0: (rows.append([i] + [0] * 7), weights.append([w] + [0.0] * 7), audio_rows.append(-1))
  # Document 1: <bos> <user> <audio> [13 + 5 audio rows] <eos> <assistant> <audio> codec(T=3) <eos>
  text(config_lib.BOS)
  text(config_lib.USER)
  text(config_lib.AUDIO)
  n_audio = config_lib.encoder_output_length(140)  # one full chunk (13) + a 40-frame chunk (5)
  assert n_audio == 18
  for j in range(n_audio):
    rows.append([0] * 8)
    weights.append([0.0] * 8)
    audio_rows.append(j)
  text(config_lib.EOS)
  text(config_lib.ASSISTANT, 1.0)
  text(config_lib.AUDIO, 1.0)
  codes = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3], [2, 3, 8, 4, 6, 2, 6, 4]])
  t = codes.shape[0]
  for r in range(t + 7):
    row = []
    for n in range(8):
      f = r - n
      row.append(cfg.codec_id(n, codes[f, n] % cfg.codebook_size) if 0 <= f < t else cfg.codec_pad_id(n))
    rows.append(row)
    weights.append([0.125] * 8)
    audio_rows.append(-1)
  text(config_lib.EOS, 1.0)
  doc1 = len(rows)
  # Document 2: text only, assistant text.
  for i, w in [(config_lib.BOS, 0.0), (config_lib.ASSISTANT, 1.0), (config_lib.TEXT, 1.0), (300, 1.0),
               (301, 1.0), (config_lib.EOS, 1.0)]:
    text(i, w)
  doc2 = len(rows) - doc1
  pad = 3
  for _ in range(pad):
    text(0)
  mel = np.zeros((1, 1, enc.chunks_per_window, enc.num_mel_bins, enc.chunk_frames), np.float32)
  mel[0, 0, 0] = np.random.default_rng(2).normal(size=(enc.num_mel_bins, enc.chunk_frames))
  mel[0, 0, 1, :, :40] = np.random.default_rng(3).normal(size=(enc.num_mel_bins, 40))
  lens = np.zeros((1, 1, enc.chunks_per_window), np.int32)
  lens[0, 0, :2] = [100, 40]
  return {
      "input_ids": np.array([rows], np.int32),
      "loss_weights": np.array([weights], np.float32),
      "segment_ids": np.array([[1] * doc1 + [2] * doc2 + [0] * pad], np.int32),
      "positions": np.array([list(range(doc1)) + list(range(doc2)) + [0] * pad], np.int32),
      "audio_mel": mel, "audio_chunk_lens": lens, "audio_rows": np.array([audio_rows], np.int32),
  }


def _reference_loss(logits, batch, cfg):
  """The loss of docs/model.md#loss from full logits, in float64 numpy."""
  logits = np.asarray(logits, np.float64)[0]
  ids, w, seg = batch["input_ids"][0], batch["loss_weights"][0], batch["segment_ids"][0]
  total, count = 0.0, 0
  for t in range(ids.shape[0] - 1):
    if seg[t + 1] == 0 or seg[t + 1] != seg[t]:
      continue
    count += int(w[t + 1, 0] > 0)
    for n in range(8):
      if w[t + 1, n] == 0:
        continue
      lo = 0 if n == 0 else cfg.codec_start
      z = logits[t, n, lo:]
      lse = np.log(np.exp(z - z.max()).sum()) + z.max()
      total += w[t + 1, n] * (lse - logits[t, n, ids[t + 1, n]])
  return total / count


@pytest.mark.parametrize("chunk", [8, 7, 1000])
def test_multistream_loss_equals_hand_computed(chunk):
  cfg = dataclasses.replace(tiny_model_config(), loss_chunk_size=chunk)
  batch = _mixed_batch(cfg)
  params = _randomize(init_params(cfg, batch), std=0.1)
  model = Bagpiper(cfg)
  loss, aux = model.apply({"params": params}, batch)
  logits = model.apply({"params": params}, batch, method=Bagpiper.logits)
  expect = _reference_loss(logits, batch, cfg)
  assert abs(float(loss) - expect) < 1e-5 * max(1.0, abs(expect)), (float(loss), expect)
  # Per-part metrics from the same logits: text = stream-0 non-codec targets, audio = codec cells.
  text_only = dict(batch, loss_weights=batch["loss_weights"] * (batch["input_ids"] < cfg.codec_start))
  audio_only = dict(batch, loss_weights=batch["loss_weights"] * (batch["input_ids"] >= cfg.codec_start))
  n_text = sum(1 for t in range(1, 40) if text_only["loss_weights"][0, t, 0] > 0 and
               batch["segment_ids"][0, t] == batch["segment_ids"][0, t - 1])
  assert abs(float(aux["text_loss"]) - _reference_loss(logits, text_only, cfg)) < 1e-5 * n_text
  audio_w = float(audio_only["loss_weights"][0, 1:].sum())
  expect_audio = _reference_loss(logits, audio_only, cfg) * 10 / audio_w  # 10 codec rows weigh 10.0
  assert abs(float(aux["audio_loss"]) - expect_audio) < 1e-4, (float(aux["audio_loss"]), expect_audio)
  # 1 (doc1 closing) + 2 (<assistant> <audio>) + 10 codec rows + 5 (doc2) weighted stream-0 positions.
  assert float(aux["num_target_tokens"]) == 2 + 10 + 1 + 5


def _jnp_reference_loss(logits, batch, cfg):
  """The SPEC loss from full logits [B, L, S, V] in plain jnp (autodiff gives the reference gradient)."""
  ids, w, seg = (jnp.asarray(batch[k]) for k in ("input_ids", "loss_weights", "segment_ids"))
  same = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)
  tgt, wt = ids[:, 1:], w[:, 1:] * same[..., None]
  lg = logits[:, :-1]
  lse0 = jax.nn.logsumexp(lg[:, :, 0], axis=-1)
  lse_c = jax.nn.logsumexp(lg[:, :, 1:, cfg.codec_start:], axis=-1)
  lse = jnp.concatenate([lse0[..., None], lse_c], axis=-1)
  picked = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
  # ignore_index=0 on stream 0 (docs/model.md#loss): no term for a <|pad|> target, still counted below.
  w_term = wt.at[..., 0].set(jnp.where(tgt[..., 0] == 0, 0.0, wt[..., 0]))
  total = jnp.sum(w_term * (lse - picked)) + cfg.z_loss_weight * jnp.sum(w_term * lse * lse)
  return total / jnp.maximum(jnp.sum((wt[..., 0] > 0).astype(jnp.float32)), 1.0)


@pytest.mark.parametrize("per_row", [False, True])
def test_fused_loss_gradients_equal_autodiff_of_full_logits(per_row):
  """The loss's forward-pass gradients (custom VJP) against jax.grad of the loss written on all logits.
  Chunks of 7 positions (the last one padded) and a z-loss weight, so every term is exercised; 2 rows
  (the second weighted differently), so a per-row lm_head gradient (model.lm_head_grad_per_row) must be
  summed over the rows."""
  cfg = dataclasses.replace(tiny_model_config(), loss_chunk_size=7, z_loss_weight=1e-2,
                            lm_head_grad_per_row=per_row)
  batch = _mixed_batch(cfg)
  batch = {k: np.concatenate([v, v]) for k, v in batch.items()}
  batch["loss_weights"][1] *= np.linspace(0.1, 1.0, batch["loss_weights"].shape[1])[:, None]
  # Document 2's first text token becomes <|pad|> (a raw `!` under the reference's mapping): a weighted
  # stream-0 target that must add no gradient.
  ids = batch["input_ids"]
  first_text = int(np.flatnonzero(ids[0, :, 0] == 300)[0])
  assert batch["loss_weights"][0, first_text, 0] == 1.0
  batch = dict(batch, input_ids=ids.copy())
  batch["input_ids"][0, first_text, 0] = 0
  params = _randomize(init_params(cfg, batch), std=0.1)
  model = Bagpiper(cfg)
  # Jitted: op by op, the two gradients compile a program per primitive and shape (seconds on XLA:CPU).
  loss, grads = jax.jit(jax.value_and_grad(lambda p: model.apply({"params": p}, batch)[0]))(params)
  ref_fn = lambda p: _jnp_reference_loss(model.apply({"params": p}, batch, method=Bagpiper.logits), batch, cfg)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref_fn))(params)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  flat, ref_flat = jax.tree.leaves_with_path(grads), dict(jax.tree.leaves_with_path(ref_grads))
  for path, g in flat:
    r = ref_flat[path]
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5 * max(1.0, float(jnp.abs(r).max())),
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads["lm_head"]["kernel"]).sum()) > 0 and float(jnp.abs(grads["stream_emb"]["embedding"]).sum()) > 0


def test_metrics_are_zero_not_nan_without_audio_targets():
  cfg = tiny_model_config()
  ids = np.full((1, 12), 300, np.int32)
  batch = _text_batch(ids)
  batch["loss_weights"][0, 3:, 0] = 1.0
  _, aux = Bagpiper(cfg).apply({"params": init_params(cfg, batch)}, batch)
  assert float(aux["audio_loss"]) == 0.0 and np.isfinite(float(aux["text_loss"]))


def test_audio_rows_are_exactly_the_picked_adapter_frames():
  """Row l of the input is adapter(encoder(mel)) frame audio_rows[l] (bit for bit: a one-hot contraction
  must equal the gather it replaces), other rows are the token embeddings; the adapter's gradient equals
  the gather's (a scatter-add of the rows' cotangents). In bf16, where an inexact contraction would show."""
  cfg = dataclasses.replace(tiny_model_config(), dtype="bfloat16")
  batch = _mixed_batch(cfg)
  params = _randomize(init_params(cfg, batch), std=0.1)
  model = Bagpiper(cfg)
  jbatch = jax.tree.map(jnp.asarray, batch)
  x = model.apply({"params": params}, jbatch["input_ids"], method=Bagpiper.embed_rows)

  def frames_of(p):
    mel, lens = jbatch["audio_mel"], jbatch["audio_chunk_lens"]
    b, w = mel.shape[:2]
    f, _ = model.apply({"params": p}, mel.reshape(b * w, *mel.shape[2:]), lens.reshape(b * w, -1),
                       method=lambda m, *a: m.audio_encoder(*a))
    return model.apply({"params": p}, f.reshape(b, -1, f.shape[-1]), method=lambda m, f: m.adapter(f))

  def by_gather(p):
    emb, rows = frames_of(p), jbatch["audio_rows"]
    picked = jnp.take_along_axis(emb, jnp.maximum(rows, 0)[..., None], axis=1)
    return jnp.where((rows >= 0)[..., None], picked.astype(x.dtype), x)

  got = model.apply({"params": params}, jbatch, x, method=Bagpiper.audio_rows)
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(by_gather(params).astype(jnp.float32)))
  assert int((batch["audio_rows"] >= 0).sum()) == 18
  probe = jax.random.normal(jax.random.PRNGKey(3), got.shape).astype(got.dtype)
  g = jax.grad(lambda p: jnp.sum((model.apply({"params": p}, jbatch, x, method=Bagpiper.audio_rows) * probe)
                                 .astype(jnp.float32)))(params)["adapter"]["kernel"]
  g_ref = jax.grad(lambda p: jnp.sum((by_gather(p) * probe).astype(jnp.float32)))(params)["adapter"]["kernel"]
  assert float(jnp.abs(g_ref).sum()) > 0
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("codec_embedding", ["lookup", "matmul"])
def test_embed_rows_equal_the_sum_of_per_stream_lookups(dtype, codec_embedding):
  """embed_rows (stream 0 looked up; streams 1..7 looked up, or one multi-hot contraction with their
  codec blocks) equals the plain sum of the 8 lookups with id 0 zeroed in streams 1..7, rows of every kind (text,
  codec rows with pad and code ids, continuous-audio placeholders); its table gradient equals the
  lookups' (scatter-adds). The lookups' sum is taken in float32 and rounded once, as embed_rows does."""
  cfg = dataclasses.replace(tiny_model_config(), dtype=dtype, codec_embedding=codec_embedding)
  batch = _mixed_batch(cfg)
  ids = batch["input_ids"].copy()
  rng = np.random.default_rng(4)
  codec_rows = rng.random(ids.shape[:2]) < 0.5
  for n in range(cfg.num_streams):
    codes = np.where(rng.random(ids.shape[:2]) < 0.2, cfg.codec_pad_id(n),
                     cfg.codec_id(n, rng.integers(0, cfg.codebook_size, ids.shape[:2])))
    ids[..., n] = np.where(codec_rows, codes, ids[..., n] if n == 0 else 0)
  assert (ids[..., 1:] != 0).any() and (ids[..., 1:] == 0).any()
  params = _randomize(init_params(cfg, batch), std=0.5)
  model = Bagpiper(cfg)
  got = model.apply({"params": params}, jnp.asarray(ids), method=Bagpiper.embed_rows)

  def by_lookups(p):
    table = p["embed_tokens"]["embedding"].astype(got.dtype).astype(jnp.float32)
    keep = jnp.asarray(ids != 0).at[..., 0].set(True)
    return jnp.sum(jnp.where(keep[..., None], table[ids], 0.0), axis=2).astype(got.dtype)

  # Equal up to the order of the float32 additions (and, in bf16, the roundings: "lookup" rounds after
  # each stream, as the reference does).
  tol = 1e-6 if dtype == "float32" else 2.0 ** -6
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(by_lookups(params).astype(jnp.float32)),
                             rtol=tol, atol=tol)
  if dtype != "float32":
    return  # gradients in float32 only: "lookup" sums bf16 cotangents in its scatter-add (~1% off)
  probe = jax.random.normal(jax.random.PRNGKey(3), got.shape)
  grad = lambda f: jax.grad(lambda p: jnp.sum(f(p).astype(jnp.float32) * probe))(params)["embed_tokens"]["embedding"]
  g = grad(lambda p: model.apply({"params": p}, jnp.asarray(ids), method=Bagpiper.embed_rows))
  g_ref = grad(by_lookups)
  assert float(jnp.abs(g_ref[cfg.codec_pad_id(1):]).sum()) > 0
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def test_audio_rows_change_the_output_and_encoder_gets_no_gradient():
  cfg = tiny_model_config()
  batch = _mixed_batch(cfg)
  params = _randomize(init_params(cfg, batch), std=0.1)
  model = Bagpiper(cfg)
  other = dict(batch, audio_mel=batch["audio_mel"] * 2.0)
  l1, _ = model.apply({"params": params}, batch)
  l2, _ = model.apply({"params": params}, other)
  assert abs(float(l1) - float(l2)) > 1e-6
  grads = jax.grad(lambda p: model.apply({"params": p}, batch)[0])(params)
  enc_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["audio_encoder"]))
  assert enc_norm == 0.0
  assert float(jnp.abs(grads["adapter"]["kernel"]).sum()) > 0
  # stream_emb row 0 is held at zero: no gradient reaches it.
  assert float(jnp.abs(grads["stream_emb"]["embedding"][0]).sum()) == 0.0
  assert float(jnp.abs(grads["stream_emb"]["embedding"][1:]).sum()) > 0


def test_bad_input_raises_clear_errors(tiny_cfg):
  model = Bagpiper(tiny_cfg)
  good = _mixed_batch(tiny_cfg)
  params = init_params(tiny_cfg, good)
  call = lambda b: model.apply({"params": params}, b)
  with pytest.raises(ValueError, match=r"input_ids must be \[B, L, 8\]"):
    call(dict(good, input_ids=good["input_ids"][..., 0]))
  bad = dict(good, input_ids=good["input_ids"].copy())
  bad["input_ids"][0, 5, 2] = tiny_cfg.vocab_size + 7
  with pytest.raises(ValueError, match=r"out of the vocabulary.*row 5, stream 2"):
    call(bad)
  stray = dict(good, input_ids=good["input_ids"].copy())
  stray["input_ids"][0, 3, 4] = tiny_cfg.codec_id(5, 2)  # stream 5's code in stream 4
  with pytest.raises(ValueError, match=r"stream 4 holds id .* \[batch 0, row 3\]; stream 4 takes 0 or its codec block"):
    call(stray)
  with pytest.raises(ValueError, match="audio span mismatch"):
    lens = good["audio_chunk_lens"].copy()
    lens[0, 0, 1] = 60  # 8 encoder frames, but the row has 5 placeholder rows for that chunk
    call(dict(good, audio_chunk_lens=lens))
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    call(dict(good, segment_ids=good["segment_ids"][:, :-1]))
  with pytest.raises(ValueError, match="audio keys must come together"):
    call({k: v for k, v in good.items() if k != "audio_rows"})


def test_8b_trainable_parameter_count():
  cfg = ModelConfig()
  shapes = jax.eval_shape(lambda: Bagpiper(cfg).init(jax.random.PRNGKey(0), batch_lib.example(cfg, 1, 16, 1)))
  params = nn.meta.unbox(shapes["params"])
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  trainable = count({k: v for k, v in params.items() if k != "audio_encoder"})
  assert abs(trainable - 8.268e9) < 1e6, trainable
  assert params["embed_tokens"]["embedding"].shape == (160392, 4096)
  assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (36, 4096, 32, 128)
  # The Qwen3-Omni audio tower is about 0.65B parameters, all frozen.
  assert 0.6e9 < count(params["audio_encoder"]) < 0.7e9


def test_compile_size_does_not_grow_with_depth():
  sizes = []
  for n in (2, 8):
    cfg = tiny_model_config(num_layers=n, remat_policy="nothing_saveable")
    batch = _text_batch(np.full((1, 16), 300, np.int32))
    params = jax.eval_shape(lambda: init_params(cfg, batch))
    fn = jax.jit(jax.grad(lambda p, b: Bagpiper(cfg).apply({"params": p}, b)[0]))
    sizes.append(len(fn.lower(params, batch).as_text()))
  assert sizes[1] < 1.05 * sizes[0], sizes


def test_scan_unroll_keeps_parameters_loss_and_gradients():
  """model.scan_unroll (layers per scan iteration; a GPU speed knob) changes the program, not the model:
  the same parameter tree, loss and gradients as the flat scan."""
  batch = _text_batch(np.arange(300, 316, dtype=np.int32)[None])
  batch["loss_weights"][..., 0] = 1.0
  out = []
  for unroll in (1, 2):
    cfg = tiny_model_config(num_layers=4, scan_unroll=unroll, remat_policy="minimal_with_context")
    params = init_params(tiny_model_config(num_layers=4), batch)
    out.append(jax.value_and_grad(lambda p: Bagpiper(cfg).apply({"params": p}, batch)[0])(params))
  assert jax.tree.structure(out[0][1]) == jax.tree.structure(out[1][1])
  assert out[0][0] > 1.0 and float(jnp.abs(out[0][1]["layers"]["mlp"]["down_proj"]["kernel"]).max()) > 0
  np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[0][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_traces_under_a_mesh_with_logical_rules():
  """Every logical constraint and boxed param init has the rank it names (no DenseGeneral reshape)."""
  from bagpiper_jax import sharding  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config()
  batch = _mixed_batch(cfg)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)
  model = Bagpiper(cfg)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))
    loss, _ = jax.eval_shape(lambda v: model.apply(v, batch), shapes)
  assert loss.shape == ()
