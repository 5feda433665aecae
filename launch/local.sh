#!/usr/bin/env bash
# Starts NUM_PROCESSES training processes on this machine, joined by jax.distributed into
# one run: the same `python -m decoder_jax.train <train flags>` command in each, told its
# place by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. For tests and for
# trying multi-process training without a cluster (CPU collectives: gloo).
#
#   launch/local.sh [options] NUM_PROCESSES -- <train flags>
#
# Options:
#   --dry_run                  print the commands, run nothing
#   --port PORT                the coordinator's port (default: a free one)
#   --devices_per_process K    CPU devices each process presents (default 1; 0 leaves the
#                              config's mesh.num_cpu_devices alone)
#   --log_dir DIR              where processes 1.. write their output (default: a new
#                              temporary folder); process 0 writes to this terminal
#
# SIGTERM or Ctrl-C here reaches every process: all save the same step and exit. If one
# process fails the others are stopped, and the exit status is the failed one's.
set -euo pipefail

usage() {
  echo "usage: launch/local.sh [--dry_run] [--port PORT] [--devices_per_process K]" \
    "[--log_dir DIR] NUM_PROCESSES -- <train flags>" >&2
}

fail() {
  echo "error: $1" >&2
  usage
  exit 2
}

dry_run=0
port=""
devices_per_process=1
log_dir=""
num_processes=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry_run) dry_run=1; shift ;;
    --port) [[ $# -ge 2 ]] || fail "--port needs a value"; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --devices_per_process)
      [[ $# -ge 2 ]] || fail "--devices_per_process needs a value"
      devices_per_process="$2"; shift 2 ;;
    --devices_per_process=*) devices_per_process="${1#*=}"; shift ;;
    --log_dir) [[ $# -ge 2 ]] || fail "--log_dir needs a value"; log_dir="$2"; shift 2 ;;
    --log_dir=*) log_dir="${1#*=}"; shift ;;
    --) shift; break ;;
    -*) fail "unknown option $1" ;;
    *)
      [[ -z "$num_processes" ]] || fail "unexpected argument $1 (train flags go after --)"
      num_processes="$1"; shift ;;
  esac
done
train_flags=("$@")

[[ -n "$num_processes" ]] || fail "give NUM_PROCESSES"
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || fail "NUM_PROCESSES must be a positive integer, got $num_processes"
[[ "$devices_per_process" =~ ^[0-9]+$ ]] || fail "--devices_per_process must be a whole number, got $devices_per_process"
[[ -z "$port" || "$port" =~ ^[0-9]+$ ]] || fail "--port must be a number, got $port"
[[ ${#train_flags[@]} -gt 0 ]] || fail "give the train flags after --, e.g. -- --config=configs/shakespeare_char.py:cpu --workdir=/tmp/run"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
else
  python="python3"
fi

if [[ -z "$port" ]]; then
  if [[ $dry_run -eq 1 ]]; then
    port=12355
  else
    port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
if [[ -z "$log_dir" ]]; then
  if [[ $dry_run -eq 1 ]]; then
    log_dir="/tmp/decoder_jax_local.XXXXXX"
  else
    log_dir="$(mktemp -d -t decoder_jax_local.XXXXXX)"
  fi
fi

# No taskset pinning: XLA sizes its CPU thread pool by the cores a process may use, and a
# different pool changes how a matmul splits its sums (one core per process drifted from
# one process with 2 devices by 1e-5 in the loss after 80 steps; unpinned runs are bitwise).
extra=()  # the device count, unless the train flags set it themselves
if [[ $devices_per_process -gt 0 && " ${train_flags[*]} " != *" --config.mesh.num_cpu_devices="* ]]; then
  extra+=("--config.mesh.num_cpu_devices=$devices_per_process")
fi

command_for() {  # the argv of process $1, into the array `argv`
  local index="$1"
  argv=(env "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_processes"
        "JAX_PROCESS_ID=$index")
  argv+=("$python" -m decoder_jax.train --distributed=on "${train_flags[@]}" "${extra[@]}")
}

if [[ $dry_run -eq 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    command_for "$i"
    line="+ (cd $(printf '%q' "$repo") &&"
    for word in "${argv[@]}"; do line+=" $(printf '%q' "$word")"; done
    if [[ $i -gt 0 ]]; then line+=" > $(printf '%q' "$log_dir/process_$i.log") 2>&1"; fi
    echo "$line)"
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()
stop_all() {  # SIGTERM to every process still running
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all' TERM INT

cd "$repo"
for ((i = 0; i < num_processes; i++)); do
  command_for "$i"
  if [[ $i -eq 0 ]]; then
    "${argv[@]}" &
    echo "local.sh: process 0: pid $!, output here" >&2
  else
    "${argv[@]}" >"$log_dir/process_$i.log" 2>&1 &
    echo "local.sh: process $i: pid $!, output in $log_dir/process_$i.log" >&2
  fi
  pids+=("$!")
done

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  finished=""
  code=0
  wait -n -p finished "${running[@]}" || code=$?
  [[ -n "$finished" ]] || continue  # a trapped signal ended the wait, not a process
  still=()
  for pid in "${running[@]}"; do [[ "$pid" == "$finished" ]] || still+=("$pid"); done
  running=("${still[@]}")
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    if [[ ${#running[@]} -gt 0 ]]; then
      echo "local.sh: process pid $finished exited with status $code; stopping the others" >&2
      stop_all
    fi
  fi
done
if [[ $status -ne 0 ]]; then
  for ((i = 1; i < num_processes; i++)); do
    if [[ -s "$log_dir/process_$i.log" ]] && grep -q "^error:\|Traceback" "$log_dir/process_$i.log"; then
      echo "local.sh: the end of process $i's output:" >&2
      tail -n 5 "$log_dir/process_$i.log" >&2
    fi
  done
fi
exit "$status"
