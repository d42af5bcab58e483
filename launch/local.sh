#!/usr/bin/env bash
# Run N processes of one command on this machine, joined by jax.distributed over 127.0.0.1.
#
#   launch/local.sh N COMMAND...
#   CPU_DEVICES=2 launch/local.sh 2 python -m structffn_jax.train \
#       --config configs/tiny.py --workdir runs/tiny-2proc
#
# Every process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which the
# trainer's mesh.distributed=auto picks up. Process 0 prints to this terminal; process i > 0 writes
# $LOG_DIR/process_<i>.log. If one process fails the others are stopped; SIGINT/SIGTERM are passed
# on to every process (the trainer checkpoints and exits, resumable).
#
# Environment:
#   CPU_DEVICES=K       simulate K CPU devices per process (rehearse multi-host without accelerators)
#   GPUS_PER_PROCESS=K  process i sees only GPUs [i*K, (i+1)*K) (set it on a GPU machine)
#   PORT=P              coordinator port (default: a free one)
#   LOG_DIR=D           logs of processes 1..N-1 (default: logs/local-<date>-<pid>)
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
N=$1
shift

PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-logs/local-$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$LOG_DIR"

export JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT
export JAX_NUM_PROCESSES=$N
if [[ -n "${CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="--xla_force_host_platform_device_count=$CPU_DEVICES ${XLA_FLAGS:-}"
  # XLA:CPU runs each simulated device's part of a collective on one thread of a pool sized by
  # NPROC (default: the cores); fewer threads than devices and a collective never completes.
  export NPROC=${NPROC:-$(( CPU_DEVICES > 8 ? 2 * CPU_DEVICES : 16 ))}
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
forward() {
  for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done
}
trap 'forward INT' INT
trap 'forward TERM' TERM

for (( i = 0; i < N; i++ )); do
  (
    export JAX_PROCESS_ID=$i
    if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
      export CUDA_VISIBLE_DEVICES=$(seq -s, $(( i * GPUS_PER_PROCESS )) $(( (i + 1) * GPUS_PER_PROCESS - 1 )))
    fi
    if (( i == 0 )); then
      exec "$@"
    else
      exec "$@" > "$LOG_DIR/process_$i.log" 2>&1
    fi
  ) &
  pids+=($!)
done
echo "local.sh: $N processes on $JAX_COORDINATOR_ADDRESS (pids ${pids[*]}); logs of 1..$((N - 1)) in $LOG_DIR" >&2

status=0
remaining=$N
while (( remaining > 0 )); do
  set +e
  wait -n
  rc=$?
  set -e
  if (( rc > 128 )) && [[ $(jobs -rp | wc -l) -eq $remaining ]]; then
    continue  # `wait` interrupted by a forwarded signal: keep waiting for the processes
  fi
  remaining=$(( remaining - 1 ))
  if (( rc != 0 && status == 0 )); then
    status=$rc
    echo "local.sh: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
exit $status
