#!/bin/bash
# The real-chip number: one NVIDIA GPU (H100/H200), JAX with CUDA + flax, optax, orbax, torch, transformers.
#
#   bash launch/gpu_bench.sh                # about 5 minutes (H200); BUDGET_S=... (default 540) bounds it
#   JAX_PLATFORMS=cpu PRESET=tiny bash launch/gpu_bench.sh   # a dry run of the script on a CPU
#
# 1. python -m launch.gpu_check: the GPU attention kernels (cuDNN through jax.nn.dot_product_attention,
#    jax's Pallas/Triton kernel and ours that skips the blocks between documents, each with its
#    default and other block sizes) against the XLA path at the bench shape,
#    values + gradients, and their fwd+bwd time; the torch peer's first-step loss against ours on the
#    GPU (same weights, same batch, bf16). Picks the fastest passing kernel (and pallas blocks).
# 2. python -m launch.gpu_sweep --preset=h100: the jax step at several settings in one process (remat
#    policy incl. minimal_with_context, which keeps the GPU kernel's residuals; rows per micro-batch;
#    the layer scan unrolled; the kernel): s/step, tokens/s, MFU against the chip's dense bf16 peak,
#    the program's memory (launch/README.md "On a GPU" has the measured table);
#    then 2 steps of the fastest point traced and summarized (busy fraction, kernel kinds, largest
#    kernels; bagpiper_jax/profiling.py).
# 3. python -m bagpiper_jax.bench --preset=h100 --separate_processes: jax and torch (transformers
#    Qwen3Model, sdpa, bf16 autocast) each in its own process on the same batch (the preset's
#    micro-batch of 1 row: torch has no activation checkpointing); MFU and the jax / torch ratio.
#
# Each part gets what is left of BUDGET_S (a part cut short still prints what it finished). Pure-python
# wheels the GPU image may lack (ml_collections, tensorboardX) are taken from tmp/gpu_site when it
# exists; make it on a machine with the registry, then carry it:
#   pip install --target tmp/gpu_site --no-deps ml_collections==1.1.0 tensorboardX==2.6.5
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d tmp/gpu_site ]; then export PYTHONPATH="$PYTHONPATH:$PWD/tmp/gpu_site"; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92  # one framework per process: JAX may take the GPU
export TF_CPP_MIN_LOG_LEVEL=1
OUT="${OUT:-/tmp}"
BUDGET_S="${BUDGET_S:-540}"
PRESET="${PRESET:-h100}"  # bagpiper_jax.bench preset (tiny: a dry run of this script on a CPU)
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
quiet() { grep -v "^[IW][0-9]\{4\}"; }

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

echo "== 1. attention kernels and the torch peer on the GPU ($(left) s left)"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 python -m launch.gpu_check --json="$OUT/gpu_check.json" 2>&1 \
  | quiet | tee "$OUT/gpu_check.log"
read -r ATTN BLOCKS < <(python -c "
import json; r = json.load(open('$OUT/gpu_check.json'))
print(r['best_attention'], r.get('best_blocks', '').replace(',', '/') or '-')" 2>/dev/null || echo "pallas_gpu -")
B=""; if [ "$BLOCKS" != "-" ]; then B=",blocks=$BLOCKS"; fi

# The points by the card's memory (GPU_GIB overrides; nvidia-smi's total otherwise). The H200 (141 GB)
# table's best point, 4 rows with the layer loop unrolled, took 75.03 GiB: more than an H100 (80 GB)
# gives at XLA_PYTHON_CLIENT_MEM_FRACTION=0.92, where 4 rows under the layer scan (60.67 GiB) fit.
GPU_GIB="${GPU_GIB:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null \
  | head -1 | awk '{printf "%d", $1 / 1024}')}"
if [ "${GPU_GIB:-0}" -ge 100 ]; then
  PTS=(--point="remat=minimal_with_context,rows=4,attention=pallas_gpu,blocks=128/128/64/64/64/64,unroll=28"  # the 2026-11-27 H200 best
       --point="remat=minimal_with_context,rows=4,attention=pallas_gpu_docs,unroll=28"  # ours: skips the blocks between documents
       --point="remat=minimal_with_context,rows=8,attention=$ATTN$B,unroll=28")
else  # an 80 GB card (or unknown): 4 rows under the layer scan, then 2 rows unrolled
  PTS=(--point="remat=minimal_with_context,rows=4,attention=pallas_gpu,blocks=128/128/64/64/64/64"  # 41.5% on the H200
       --point="remat=minimal_with_context,rows=4,attention=pallas_gpu_docs"  # ours: skips the blocks between documents
       --point="remat=minimal_with_context,rows=2,attention=$ATTN$B,unroll=28")
fi
echo "== 2. jax step settings (attention $ATTN${B:+, blocks $BLOCKS}; ${GPU_GIB:-?} GiB card; $(left) s left)"
timeout $(( $(left) - 100 )) python -m launch.gpu_sweep --preset="$PRESET" --steps=4 "${PTS[@]}" \
  --out="$OUT/gpu_sweep.jsonl" --profile_dir="$OUT/profile" 2>&1 | quiet | tee "$OUT/gpu_sweep.log"

echo "== 3. jax vs torch, bench preset h100 (attention $ATTN; $(left) s left)"
timeout $(( $(left) - 5 )) python -m bagpiper_jax.bench --preset="$PRESET" --attention="$ATTN" --steps=4 \
  --separate_processes 2>&1 | quiet | tee "$OUT/gpu_bench.log"

echo
echo "================ SUMMARY ($(date -u +%F), $(( $(date +%s) - T0 )) s) ================"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
grep -E "^(attention|best attention|torch peer)" "$OUT/gpu_check.log"
grep -E "^(gpu_sweep|point|best point|profile|  )" "$OUT/gpu_sweep.log"
grep -E "^(preset|attention pairs|peak|matmul|bagpiper_jax|torch Qwen3|jax compile|RATIO)" "$OUT/gpu_bench.log"
