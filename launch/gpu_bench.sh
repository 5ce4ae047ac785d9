#!/bin/bash
# The real-chip number: one NVIDIA GPU (H100), JAX with CUDA + flax, optax, orbax, torch, transformers.
#
#   bash launch/gpu_bench.sh                # ~8-10 minutes; one summary block at the end
#
# 1. python -m launch.gpu_check: the GPU attention kernels (cuDNN through jax.nn.dot_product_attention,
#    Pallas/Triton) against the XLA path at the bench shape, values + gradients, and their speed; the
#    torch peer's first-step loss against ours on the GPU (same weights, same batch, bf16).
# 2. python -m bagpiper_jax.bench --preset=h100 --separate_processes: ~2.1B decoder, bf16, packed rows
#    of 4,096, 4 micro-batches per step; jax (fastest passing attention kernel from 1) and torch
#    (transformers Qwen3Model, sdpa, bf16 autocast) each in its own process; MFU against the chip's
#    dense bf16 peak and the jax / torch tokens/s ratio.
# 3. The best point measured so far (remat minimal, 2 rows per micro-batch), jax side only, with
#    --profile_dir: 2 steps traced, then where the GPU time went (busy fraction, kernel kinds, largest
#    kernels; bagpiper_jax/profiling.py summarize_trace). The trace stays in $OUT/profile.
#
# Pure-python wheels the GPU image may lack (ml_collections, tensorboardX) are taken from tmp/gpu_site
# when it exists; make it on a machine with the registry, then carry it:
#   pip install --target tmp/gpu_site --no-deps ml_collections==1.1.0 tensorboardX==2.6.5
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d tmp/gpu_site ]; then export PYTHONPATH="$PYTHONPATH:$PWD/tmp/gpu_site"; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92  # the bench runs one framework per process: JAX may take the GPU
export TF_CPP_MIN_LOG_LEVEL=1
OUT="${OUT:-/tmp}"
mkdir -p "$OUT"
T0=$(date +%s)

echo "== environment"
python - <<'EOF'
import importlib, jax
print("jax", jax.__version__, jax.devices())
for m in ("flax", "optax", "orbax.checkpoint", "torch", "transformers", "ml_collections", "tensorboardX"):
  try:
    mod = importlib.import_module(m)
    print(f"  {m} {getattr(mod, '__version__', '?')}")
  except Exception as e:  # noqa
    print(f"  {m} MISSING ({e})")
try:
  import torch
  print("  torch cuda", torch.cuda.is_available(), torch.version.cuda, torch.backends.cudnn.version())
except Exception:
  pass
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null

echo "== 1. attention kernels and the torch peer on the GPU"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 python -m launch.gpu_check --json="$OUT/gpu_check.json" 2>&1 | grep -v "^[IW][0-9]\{4\}" | tee "$OUT/gpu_check.log"
ATTN=$(python -c "import json; print(json.load(open('$OUT/gpu_check.json'))['best_attention'])" 2>/dev/null || echo cudnn)

echo "== 2. bench preset h100 (attention $ATTN)"
timeout 360 python -m bagpiper_jax.bench --preset=h100 --attention="$ATTN" --steps=5 --separate_processes 2>&1 \
  | grep -v "^[IW][0-9]\{4\}" | tee "$OUT/gpu_bench.log"

echo "== 3. profile of the best point so far (remat minimal, 2 rows per micro-batch)"
timeout 300 python -m bagpiper_jax.bench --preset=h100 --attention="$ATTN" --remat=minimal --rows=2 --steps=3 \
  --skip_torch --profile_dir="$OUT/profile" 2>&1 | grep -v "^[IW][0-9]\{4\}" | tee "$OUT/gpu_profile.log"

echo
echo "================ SUMMARY ($(date -u +%F), $(( $(date +%s) - T0 )) s) ================"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
grep -E "^(attention|best attention|torch peer)" "$OUT/gpu_check.log"
grep -E "^(preset|peak|bagpiper_jax|torch Qwen3|jax compile|RATIO)" "$OUT/gpu_bench.log"
grep -E "^(bagpiper_jax|RATIO jax / peak|profile|  )" "$OUT/gpu_profile.log"
