#!/usr/bin/env bash
# Run bagpiper_jax on Cloud TPU VMs: the same command on every worker of every slice.
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [NUM_SLICES]   # queued resource (v5p-128, v6e-256, v5litepod-256)
#   launch/tpu_vm.sh setup  NAME ZONE                            # ship this checkout to all workers, pip install
#   launch/tpu_vm.sh train  NAME ZONE -- --config=configs/bagpiper_8b.py:pretrain --workdir=gs://BUCKET/run
#   launch/tpu_vm.sh logs   NAME ZONE [WORKER]                   # tail the log of one worker (default 0)
#   launch/tpu_vm.sh stop   NAME ZONE                            # SIGTERM: train.py checkpoints, then exits
#   launch/tpu_vm.sh run    NAME ZONE -- COMMAND...              # any shell command on all workers
#   launch/tpu_vm.sh delete NAME ZONE
#
# Environment: PROJECT (default: gcloud's), NUM_SLICES (default 1; nodes are NAME-0..NAME-<n-1>
# when > 1, as `queued-resources create --node-prefix` names them), RUNTIME_VERSION (default by
# accelerator), REMOTE_DIR (default bagpiper_jax, relative to the home directory on the workers),
# DRY_RUN=1 prints the gcloud commands instead of running them.
#
# Why every worker: a TPU slice of more than one host is one JAX program over all hosts
# (multi-controller). Each worker runs the same `python -m bagpiper_jax.train --jax_distributed`;
# `jax.distributed.initialize()` finds the other workers (and, for multi-slice, the MEGASCALE_*
# settings of the queued resource) from the TPU metadata, and each process feeds its own share of
# the batch. Start them all within a few minutes of each other (one `--worker=all` ssh does that);
# a worker that is not started leaves the others waiting in initialize().
set -euo pipefail

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

[[ $# -ge 3 ]] || usage
CMD=$1 NAME=$2 ZONE=$3
shift 3
NUM_SLICES=${NUM_SLICES:-1}
REMOTE_DIR=${REMOTE_DIR:-bagpiper_jax}
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")
LOG_DIR='$HOME/bagpiper_logs'

g() {  # run (or print) one gcloud command
  # Dry run: one printf of the whole line, so commands started in parallel never interleave.
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf 'gcloud%s\n' "$(printf ' %q' "$@")"; else gcloud "$@"; fi
}

nodes() {
  if [[ "$NUM_SLICES" -le 1 ]]; then echo "$NAME"; else for ((i = 0; i < NUM_SLICES; i++)); do echo "$NAME-$i"; done; fi
}

on_all_workers() {  # run a shell command on every worker of every node, nodes in parallel
  local command=$1 pids=() node
  for node in $(nodes); do
    g compute tpus tpu-vm ssh "$node" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$command" &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return $rc
}

runtime_for() {
  case $1 in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime for accelerator '$1'; set RUNTIME_VERSION" ;;
  esac
}

after_dashdash() {  # drop a leading "--"
  if [[ "${1:-}" == "--" ]]; then shift; fi
  printf '%q ' "$@"
}

case $CMD in
  create)
    [[ $# -ge 1 ]] || die "create needs ACCELERATOR, e.g. v5p-128"
    ACCEL=$1
    NUM_SLICES=${2:-$NUM_SLICES}
    RUNTIME=${RUNTIME_VERSION:-$(runtime_for "$ACCEL")}
    if [[ "$NUM_SLICES" -le 1 ]]; then
      g compute tpus queued-resources create "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
        --node-id "$NAME" --accelerator-type "$ACCEL" --runtime-version "$RUNTIME"
    else
      g compute tpus queued-resources create "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
        --node-count "$NUM_SLICES" --node-prefix "$NAME" --accelerator-type "$ACCEL" --runtime-version "$RUNTIME"
      echo "multi-slice: export NUM_SLICES=$NUM_SLICES for the other commands"
    fi
    ;;
  setup)
    # Ship the working tree (tracked + untracked, not ignored): what you tested is what runs.
    REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
    TMPD=$(mktemp -d)
    TARBALL=$TMPD/bagpiper_jax.tar.gz
    (cd "$REPO" && git ls-files -co --exclude-standard -z | tar czf "$TARBALL" --null -T -)
    JAX_VERSION=$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "")
    JAX_PIN=${JAX_VERSION:+==$JAX_VERSION}
    for node in $(nodes); do
      g compute tpus tpu-vm scp "$TARBALL" "$node:bagpiper_jax.tar.gz" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all &
    done
    wait
    on_all_workers "set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR $LOG_DIR && tar xzf bagpiper_jax.tar.gz -C $REMOTE_DIR \
&& cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q 'jax[tpu]$JAX_PIN' -e . \
&& python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
    rm -rf "$TMPD"
    ;;
  train)
    [[ "${1:-}" == "--" ]] && shift
    if [[ "$NUM_SLICES" -gt 1 && " $* " != *"--config.mesh.dcn."* ]]; then
      set -- "$@" "--config.mesh.dcn.data=$NUM_SLICES"
      echo "tpu_vm.sh: $NUM_SLICES slices: added --config.mesh.dcn.data=$NUM_SLICES (data parallel over DCN)" >&2
    fi
    ARGS=$(after_dashdash "$@")
    # nohup + pid file: the run survives the ssh session; `stop` signals exactly this process.
    on_all_workers "cd $REMOTE_DIR && mkdir -p $LOG_DIR && \
nohup python3 -m bagpiper_jax.train --jax_distributed $ARGS > $LOG_DIR/train.log 2>&1 & echo \$! > $LOG_DIR/train.pid; \
echo \"\$(hostname): started pid \$(cat $LOG_DIR/train.pid)\""
    echo "follow with: $0 logs $NAME $ZONE"
    ;;
  logs)
    WORKER=${1:-0}
    g compute tpus tpu-vm ssh "$(nodes | head -1)" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker="$WORKER" \
      --command "tail -n 100 -f $LOG_DIR/train.log"
    ;;
  stop)
    on_all_workers "test -f $LOG_DIR/train.pid && kill -TERM \$(cat $LOG_DIR/train.pid) || echo \"\$(hostname): no run\""
    ;;
  run)
    on_all_workers "cd $REMOTE_DIR && $(after_dashdash "$@")"
    ;;
  delete)
    g compute tpus queued-resources delete "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --force --quiet
    ;;
  *)
    usage
    ;;
esac
