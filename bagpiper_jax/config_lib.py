"""Shared defaults for the ml_collections configs in `configs/`.

A config file picks a model size and a stage; stages differ only in data, not in code paths:

  warmup   decoder layers frozen; embeddings, lm_head, stream_emb, adapter, final norm trained.
  pretrain everything but the audio encoder trained.
  sft      init from a pretrain checkpoint; SFT dialogue templates.

Use: `--config=configs/bagpiper_8b.py:pretrain` (the part after ':' is the stage).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from bagpiper_jax.convert import vllm_config
from bagpiper_jax.model.config import ModelConfig

STAGES = ("warmup", "pretrain", "sft")

# Sampling factors per pretraining subset (docs/data.md#pretraining-data).
PRETRAIN_MIXTURE = {
    "music_und": 3.15,
    "sound_und": 3.17,
    "speech_und": 1.0,
    "music_gen": 4.21,
    "sound_gen": 4.27,
    "speech_gen": 1.0,
    "text_only": 1.0,
}


def model_config(**overrides) -> ml_collections.ConfigDict:
  """The model section as a ConfigDict, from ModelConfig defaults (8B) plus overrides."""
  d = dataclasses.asdict(ModelConfig())
  enc = overrides.pop("audio_encoder", {})
  d.update(overrides)
  d["audio_encoder"].update(enc)
  return ml_collections.ConfigDict(d)


def base_config(stage: str) -> ml_collections.ConfigDict:
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.model = model_config()

  # What is trained. Regexes over '/'-joined parameter paths; the audio encoder is never trained.
  c.trainable = ml_collections.ConfigDict()
  c.trainable.freeze = ["audio_encoder/.*"]
  if stage == "warmup":
    c.trainable.freeze += ["layers/.*"]
  c.trainable.freeze_text_embedding_rows = False  # warmup option: keep ids 256..codec_start fixed
  c.init_from = ""  # Orbax checkpoint dir to initialise params from (sft: a pretrain checkpoint)

  # Data.
  c.data = ml_collections.ConfigDict()
  c.data.train_sources = {}  # name -> ml_collections dict(path=glob, weight=float)
  c.data.eval_sources = {}
  c.data.template = "sft" if stage == "sft" else "pretrain"
  c.data.seq_len = 8192  # packed tokens per row
  c.data.max_audio_windows = 16  # encoder windows (8 x 100 mel frames) per packed row
  c.data.per_device_batch = 1  # rows per device; rows per host: batch.host_rows (the one formula)
  c.data.shuffle_seed = 0
  c.data.rows_per_slot = 1  # rows of one data slot; slots = global batch rows / this (docs/training.md#data-slots)
  c.data.num_workers = 0  # Grain prefetch processes per data slot (0: in the main process)
  c.data.packing_bins = 32  # best-fit bins per packing round (>= 98% fill on the pretraining mix)
  c.data.read_threads = 8  # threads per host reading + templating records, shared by its slots
  c.data.read_buffer = 64  # templated documents in flight per host (audio ones hold ~0.5 MB of mel each)
  c.data.mixture_weighting = "factor"  # factor: share = weight x records (docs/data.md); proportion: = weight
  c.data.demo = False  # True: generate and use the shipped synthetic demo data
  c.data.demo_dir = ""  # where demo shards are generated ("" = demo_data next to the workdir)
  c.data.synthetic = False  # True: in-memory synthetic batches (bagpiper_jax/synthetic.py), no files

  # Optimiser (docs/training.md stage recipes).
  c.optim = ml_collections.ConfigDict()
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 3e-7
  c.optim.clip_norm = 1.0
  c.optim.grad_accum_steps = 1
  # Keep the optimizer state (Adam moments) in host memory (pinned_host) between steps; each step
  # moves it to HBM for the update and back (train_state.StateLayout, train_step.train_step).
  c.optim.offload_state = False
  if stage == "warmup":
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule, c.optim.min_lr_ratio = 5e-4, 100, "constant", 1.0
    c.train_steps = 10_000
  elif stage == "pretrain":
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule, c.optim.min_lr_ratio = 1e-4, 5_000, "cosine", 0.3
    c.train_steps = 600_000
  else:
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule, c.optim.min_lr_ratio = 1e-5, 500, "cosine", 0.1
    c.train_steps = 20_000

  # Mesh: logical axes -> mesh axes live in bagpiper_jax/sharding.py; shapes here.
  # -1 in ici means "all remaining devices". dcn multiplies across slices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = dict(data=1, fsdp=-1, tensor=1, sequence=1)
  c.mesh.dcn = dict(data=1, fsdp=1, tensor=1, sequence=1)

  # Checkpointing, logging, eval.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.log_every_steps = 10
  c.eval_every_steps = 1000
  c.eval_steps = 20  # batches per eval source (the loss is reported per source and overall)
  # Samples for held-out examples (bagpiper_jax/generate/sample_action.py): captions for eval clips,
  # clips for eval captions, to TensorBoard and <workdir>/samples/step_<N>/.
  c.sample_every_steps = 0  # 0 = never
  c.sample = ml_collections.ConfigDict()
  c.sample.num = 2  # eval examples per direction
  c.sample.tokenizer = ""  # tokenizer file to print captions ("" = ids)
  c.sample.codec = ""  # local X-Codec directory to write WAVs ("" = codes only)
  c.sample.max_text_steps = 256
  c.sample.max_audio_steps = 512
  c.sample.max_cache_len = 2048
  c.nan_policy = "stop"  # stop | skip

  # Releases written by the run (convert/release_action.py, docs/release.md): every release_every_steps
  # (and at the last step) a release directory <workdir>/releases/<step>/ (0: never).
  c.release_every_steps = 0
  c.release = ml_collections.ConfigDict()
  c.release.dtype = "bfloat16"  # bfloat16 | float32 | keep
  c.release.max_shard_size = "5GB"
  c.release.tokenizer = ""  # tokenizer.json to ship; "" = the one the training data's index.json records
  c.release.codec = ""  # XcodecModel dir to ship; "" = the one the training data's index.json records
  c.release.with_tokenizer = True  # False: no tokenizer files
  c.release.with_codec = True  # False: no codec tensors (weights-only)
  c.release.xcodec_hf_model_tag = vllm_config.DEFAULT_XCODEC_TAG  # config.json: the codec the vLLM fork loads
  c.device_peak_flops = 0.0  # 0: look up by device kind

  # Compilation (bagpiper_jax/compile_cache.py, trainer.py, profiling.py).
  c.compilation_cache_dir = "compilation_cache"  # relative: under the workdir; absolute or gs://; "" = off
  c.compilation_cache_min_compile_secs = 0.0  # programs that compile faster are not cached (0: all)
  c.compiled_train_step = ""  # executable from `launch.aot_compile --save_compiled` to run instead of compiling
  c.profile_steps = ""  # "N,M": jax.profiler trace of steps N..M into <workdir>/profile (TensorBoard / xprof)
  return c
