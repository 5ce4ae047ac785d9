"""Bagpiper 8B (Qwen3-8B-Base decoder, Qwen3-Omni audio tower). Stage after ':' (default pretrain),
optionally a TPU slice after a comma for the settings tuned for it:

  python -m bagpiper_jax.train --config=configs/bagpiper_8b.py:warmup --workdir=gs://...
  python -m bagpiper_jax.train --config=configs/bagpiper_8b.py:pretrain,v5p-128 --workdir=gs://...

Without a slice the config is the conservative one that fits every slice we compiled for (remat
`nothing_saveable`, one packed row per chip: 10-61% of HBM). `TOPOLOGY_PRESETS` hold, per slice, the
point of the AOT sweep (`python -m launch.sweep`, tables in launch/README.md) with the least executed
FLOPs per token within 85% of the chip's HBM. They are for warmup and pretrain (seq 8,192).
`SFT_PRESETS` are the same choice for SFT's 20,000-position rows (swept on the same three slices);
a slice that was not swept is refused rather than guessed.
"""

from bagpiper_jax import config_lib

# slice -> overrides: remat policy (+ names offloaded to host memory), splash fused backward kernel,
# packed rows per chip. Measured with libtpu 0.0.52 (launch/README.md, "Tuned configs").
_FIVE_NAMES = "decoder_layer_input,query_proj,key_proj,value_proj,out_proj"  # offloaded to pinned host memory


def _preset(remat_policy: str, remat_offload: str = "", rows: int = 1) -> dict:
  return dict(remat_policy=remat_policy, remat_offload=remat_offload, attention_fused_bwd=True,
              per_device_batch=rows)


TOPOLOGY_PRESETS = {
    "v5p-128": _preset("minimal_with_context", rows=2),
    "v6e-256": _preset("minimal_with_context", _FIVE_NAMES),
    "v5e-256": _preset("custom", _FIVE_NAMES),  # custom with no saved names: save nothing, offload 5
}

# SFT (seq 20,000), same rule (launch/README.md, "SFT's 20,000-position rows"). v5p-128:
# minimal_with_context + fused backward, 1 row: 68.97 GiB (72.6%), executed/model 1.405 against the plain
# config's 1.96. v6e-256 / v5e-256: nothing saved, the 5 names offloaded (19.2 GiB pinned host per chip),
# 1 row: 11.46 / 10.58 GiB (36% / 66%), 1.714; keeping more (minimal_with_context + offload,
# save_dot_except_mlp) runs out of memory or exceeds 85%.
SFT_PRESETS = {
    "v5p-128": _preset("minimal_with_context"),
    "v6e-256": _preset("custom", _FIVE_NAMES),
    "v5e-256": _preset("custom", _FIVE_NAMES),
}


def get_config(arg: str = "pretrain"):
  stage, _, slice_name = (arg or "pretrain").partition(",")
  c = config_lib.base_config(stage or "pretrain")
  # c.model keeps the 8B defaults: vocab 160392 = 256 specials + 151936 text + 8 x 1025 codec.
  c.model.attention_impl = "splash"  # TPU Pallas flash attention with segment ids (use "xla" elsewhere)
  c.model.codec_embedding = "matmul"  # no scatter-add sorts in the embedding gradient (model/config.py)
  c.model.lm_head_grad_per_row = True  # one [E, V] gradient reduction per step, not per loss chunk
  c.data.seq_len = 20_000 if c.stage == "sft" else 8192
  c.data.max_audio_windows = 32
  c.mesh.ici = dict(data=1, fsdp=-1, tensor=1, sequence=1)
  if slice_name:
    presets = SFT_PRESETS if c.stage == "sft" else TOPOLOGY_PRESETS
    if slice_name not in presets:
      raise ValueError(f"configs/bagpiper_8b.py:{arg}: no tuned settings for slice {slice_name!r}; known: "
                       f"{sorted(presets)} (or sweep it: python -m launch.sweep, launch/README.md)")
    p = presets[slice_name]
    c.model.remat_policy = p["remat_policy"]
    c.model.remat_offload = p["remat_offload"]
    c.model.attention_fused_bwd = p["attention_fused_bwd"]
    c.data.per_device_batch = p["per_device_batch"]
  return c
