#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice (e.g. v5p-64): one process per TPU host.
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE [REPO_URL]      install the code on every host
#   launch/tpu_pod.sh train TPU_NAME ZONE CONFIG WORKDIR [TRAIN ARGS...]
#   launch/tpu_pod.sh train my-v5p-64 us-east5-a configs/structured_ffn.py:model=xl,method=lowrank \
#       /mnt/shared/runs/xl-lowrank32 --set mesh.fsdp=-1 --set mesh.data=1 --set model.dtype=bfloat16
#
# The same command runs on every host (gcloud ... ssh --worker=all). jax.distributed finds the
# coordinator and the host count from the TPU metadata (mesh.distributed=on). WORKDIR must be a
# filesystem all hosts share at the same path (Filestore/NFS, or a bucket mounted with gcsfuse):
# host 0 prepares the data there and writes logs; every host writes its checkpoint shards.
# Progress (from process 0) prints here; re-running `train` resumes from the newest checkpoint.
#
# Environment: REMOTE_DIR (default: structffn_jax, relative to the remote home) is the checkout on
# every host; GCLOUD_FLAGS is added to every gcloud call (e.g. --project=... --internal-ip).
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 3 ]] || usage
ACTION=$1 TPU=$2 ZONE=$3
shift 3
REMOTE_DIR=${REMOTE_DIR:-structffn_jax}

on_all_hosts() {
  # shellcheck disable=SC2086
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all ${GCLOUD_FLAGS:-} --command "$1"
}

case "$ACTION" in
  setup)
    REPO_URL=${1:-$(git config --get remote.origin.url)}
    on_all_hosts "set -e
      if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; else git clone $REPO_URL $REMOTE_DIR; fi
      cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate &&
      pip install -q -r requirements.txt && pip install -q -U 'jax[tpu]'"
    ;;
  train)
    [[ $# -ge 2 ]] || usage
    CONFIG=$1 WORKDIR=$2
    shift 2
    args=$(printf ' %q' --config "$CONFIG" --workdir "$WORKDIR" --set mesh.distributed=on "$@")
    # Every host runs the trainer; only process 0 logs, so the output is host 0's progress.
    on_all_hosts "cd $REMOTE_DIR && . .venv/bin/activate && python -m structffn_jax.train$args"
    ;;
  *)
    usage
    ;;
esac
