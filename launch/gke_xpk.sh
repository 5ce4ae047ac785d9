#!/usr/bin/env bash
# Submit a bagpiper_jax training run to a GKE TPU cluster with xpk (see launch/gke_xpk.md).
#
#   launch/gke_xpk.sh CLUSTER WORKLOAD TPU_TYPE [NUM_SLICES] -- TRAIN_FLAGS...
#   launch/gke_xpk.sh my-cluster bp8b-pre v5p-128 2 -- --config=configs/bagpiper_8b.py:pretrain --workdir=gs://b/run
#
# Environment: BASE_IMAGE (default python:3.11-slim; an image with the dependencies preinstalled
# starts faster), MAX_RESTARTS (default 50: preemptions resume from the latest checkpoint),
# PRIORITY (default medium), XPK (default xpk), DRY_RUN=1 prints the command instead of running it.
# TPU_TYPE is xpk's spelling: v5p-128, v6e-256, v5litepod-256 (v5e).
set -euo pipefail

die() { echo "gke_xpk.sh: $*" >&2; exit 2; }
[[ $# -ge 3 ]] || { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
CLUSTER=$1 WORKLOAD=$2 TPU_TYPE=$3
shift 3
NUM_SLICES=1
if [[ $# -gt 0 && "$1" != "--" ]]; then NUM_SLICES=$1; shift; fi
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || die "give the training flags after --, e.g. -- --config=configs/bagpiper_8b.py:pretrain --workdir=gs://..."
ARGS=("$@")
[[ " ${ARGS[*]} " == *" --workdir=gs://"* ]] ||
  echo "gke_xpk.sh: warning: --workdir is not a gs:// path; pods do not share a local disk" >&2
if [[ "$NUM_SLICES" -gt 1 && " ${ARGS[*]} " != *"--config.mesh.dcn."* ]]; then
  ARGS+=("--config.mesh.dcn.data=$NUM_SLICES")
  echo "gke_xpk.sh: $NUM_SLICES slices: added --config.mesh.dcn.data=$NUM_SLICES (data parallel over DCN)" >&2
fi

REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
JAX_VERSION=$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "")
TRAIN=$(printf '%q ' "${ARGS[@]}")
# xpk layers --script-dir into the base image at the working directory and runs --command there on
# every pod (one pod per TPU VM host, all slices); jax.distributed.initialize() reads the host list
# and, for several slices, the MEGASCALE_* settings that xpk/JobSet put in the environment.
COMMAND="python3 -m pip install -q 'jax[tpu]${JAX_VERSION:+==$JAX_VERSION}' -e . && \
python3 -m bagpiper_jax.train --jax_distributed $TRAIN"

CMD=("${XPK:-xpk}" workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --tpu-type "$TPU_TYPE"
     --num-slices "$NUM_SLICES" --base-docker-image "${BASE_IMAGE:-python:3.11-slim}" --script-dir "$REPO"
     --max-restarts "${MAX_RESTARTS:-50}" --priority "${PRIORITY:-medium}" --command "$COMMAND")
if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${CMD[@]}"; printf '\n'; else "${CMD[@]}"; fi
