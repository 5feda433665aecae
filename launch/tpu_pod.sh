#!/usr/bin/env bash
# Runs decoder_jax training on every worker of a Cloud TPU VM: one host or a pod slice.
#
# usage: launch/tpu_pod.sh [--dry_run] --name NAME --zone ZONE [--accelerator_type TYPE]
#          [--version VERSION] [--project PROJECT] [--create] [--delete_after]
#          [--libtpu_init_args ARGS] [--xla_flags FLAGS] [--env NAME=VALUE]... -- TRAIN_FLAGS...
#
# Steps, one command each. Every command is printed first, as "+ " and the command quoted
# for a POSIX shell. With --dry_run the script prints them (on stdout) and runs none.
#   1. git archive: HEAD of this repository into a tarball in a local temporary folder.
#   2. --create only: gcloud compute tpus tpu-vm create.
#   3. gcloud compute tpus tpu-vm scp: the tarball to every worker (--worker=all).
#   4. gcloud compute tpus tpu-vm ssh --worker=all: unpack into ~/decoder_jax, make
#      ~/decoder_jax/.venv if it is missing (Python >= 3.11), pip install the package and
#      jax[tpu]. Files deleted from the repository since the last copy stay on the workers.
#   5. gcloud compute tpus tpu-vm ssh --worker=all: the same absl command on every worker,
#      .venv/bin/python -m decoder_jax.train --distributed=on TRAIN_FLAGS...
#      --distributed=on: jax.distributed.initialize() finds the workers of the slice itself
#      (from the TPU metadata server). A later --distributed=... in TRAIN_FLAGS wins (absl).
#   6. --delete_after only: gcloud compute tpus tpu-vm delete, once steps 3 to 5 have run,
#      failed or not (the VM costs money while it exists). Not after a failed step 1 or 2.
#
# Why HEAD and not the working tree: the run's code is then one commit, named in git log,
# and the copy holds only tracked files (no .venv, workdirs or data, which can be GBs).
# Uncommitted edits are not copied; the script warns when tracked files have some.
#
# Environment of the training processes (env NAME=VALUE on the remote command line):
#   TPU_STDERR_LOG_LEVEL  the caller's value, else 2. libtpu's stderr level, as in glog:
#                         0 info, 1 warning, 2 error. Full logs: /tmp/tpu_logs on each worker.
#   JAX_PLATFORMS=tpu     so a worker without a usable TPU fails, not trains on its CPU.
#   LIBTPU_INIT_ARGS      --libtpu_init_args, else the caller's LIBTPU_INIT_ARGS, else unset
#                         (libtpu's defaults; no flag set is measured for this codebase yet).
#   XLA_FLAGS             --xla_flags only. The caller's XLA_FLAGS are not forwarded: they
#                         are usually meant for the local machine.
#   --env NAME=VALUE      anything else; given last, so it overrides the values above.
#
# Requirements: gcloud (authenticated, with the TPU API enabled), git, and for a pod slice
# the ssh key in an agent (ssh-add ~/.ssh/google_compute_engine), as gcloud asks for
# --worker=all. The workdir must be a path every worker sees, e.g. gs://BUCKET/run.
set -euo pipefail

USAGE="usage: launch/tpu_pod.sh [--dry_run] --name NAME --zone ZONE [--accelerator_type TYPE] \
[--version VERSION] [--project PROJECT] [--create] [--delete_after] [--libtpu_init_args ARGS] \
[--xla_flags FLAGS] [--env NAME=VALUE]... -- TRAIN_FLAGS..."

# setup.cfg has no tpu extra, so jax[tpu] is installed by name. The version comes from
# setup.cfg's jax requirement; libtpu comes from PyPI or from these find-links.
LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html
REMOTE_DIR=decoder_jax  # ~/decoder_jax: remote commands start in the home folder
TARBALL_NAME=decoder_jax.tar.gz

usage_error() {
  printf 'error: %s\n%s\n' "$1" "$USAGE" >&2
  exit 2
}

print_help() {
  # The header comment of this file, without its first line and the "# " prefixes.
  local line
  while IFS= read -r line; do
    [[ $line == '#'* ]] || break
    [[ $line == '#!'* ]] && continue
    line=${line#\#}
    printf '%s\n' "${line# }"
  done <"${BASH_SOURCE[0]}"
}

# Quotes one word for a POSIX shell: as it is when it has no special characters, else in
# single quotes (each ' written as '\''); in --opt=VALUE only VALUE, for readability. Sets
# the variable named by $1. (The script avoids bash 4 features, for macOS's bash 3.2.)
quote_word() {
  local prefix="" word=$2
  if [[ $word =~ ^--[A-Za-z0-9_-]+= ]]; then
    prefix=${BASH_REMATCH[0]}
    word=${word#"$prefix"}
  fi
  if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf -v "$1" '%s%s' "$prefix" "$word"
  elif [[ $word == *[[:cntrl:]]* ]]; then  # a newline, a tab: bash's $'...' keeps one line
    printf -v "$1" '%s%q' "$prefix" "$word"
  else
    printf -v "$1" "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}

dry_run=0
# Prints a command; runs it unless --dry_run.
run() {
  local line="+" word quoted
  for word in "$@"; do
    quote_word quoted "$word"
    line+=" $quoted"
  done
  if ((dry_run)); then
    printf '%s\n' "$line"
    return 0
  fi
  printf '%s\n' "$line" >&2
  "$@"
}

name="" zone="" accelerator_type="" version=tpu-ubuntu2204-base project=""
create=0 delete_after=0 xla_flags="" libtpu_init_args=${LIBTPU_INIT_ARGS:-}
extra_env=() train_flags=() seen_dashdash=0

# An option's value: "--opt=VALUE" or "--opt VALUE". Sets $value and $shift_by.
take_value() {
  if [[ $1 == *=* ]]; then
    value=${1#*=} shift_by=1
  elif (($# >= 2)); then
    value=$2 shift_by=2
  else
    usage_error "${1} needs a value"
  fi
}

while (($#)); do
  value="" shift_by=1
  case $1 in
    --dry_run) dry_run=1 ;;
    --create) create=1 ;;
    --delete_after) delete_after=1 ;;
    -h | --help) print_help; exit 0 ;;
    --name | --name=*) take_value "$@"; name=$value ;;
    --zone | --zone=*) take_value "$@"; zone=$value ;;
    --accelerator_type | --accelerator_type=*) take_value "$@"; accelerator_type=$value ;;
    --version | --version=*) take_value "$@"; version=$value ;;
    --project | --project=*) take_value "$@"; project=$value ;;
    --libtpu_init_args | --libtpu_init_args=*) take_value "$@"; libtpu_init_args=$value ;;
    --xla_flags | --xla_flags=*) take_value "$@"; xla_flags=$value ;;
    --env | --env=*)
      take_value "$@"
      [[ $value =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants NAME=VALUE, got: $value"
      extra_env+=("$value") ;;
    --) seen_dashdash=1; shift; train_flags=("$@"); break ;;
    *) usage_error "unknown option: $1 (train flags go after --)" ;;
  esac
  shift "$shift_by"
done

[[ -n $name ]] || usage_error "--name is required"
[[ -n $zone ]] || usage_error "--zone is required"
((seen_dashdash)) || usage_error "no -- before the train flags"
((${#train_flags[@]})) || usage_error "no train flags after -- (at least --config and --workdir)"
if ((create)) && [[ -z $accelerator_type ]]; then
  usage_error "--create needs --accelerator_type (e.g. v4-32)"
fi

if ! ((dry_run)); then
  for tool in gcloud git; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      printf 'error: %s not found on PATH (install the Google Cloud SDK and git, or use --dry_run)\n' \
        "$tool" >&2
      exit 2
    fi
  done
fi

case ${BASH_SOURCE[0]} in
  */*) script_dir=${BASH_SOURCE[0]%/*} ;;
  *) script_dir=. ;;
esac
repo=$(cd "$script_dir/.." && pwd)

if command -v git >/dev/null 2>&1 \
  && [[ -n $(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  printf 'warning: uncommitted changes in %s are not copied (the workers get HEAD)\n' \
    "$repo" >&2
fi

if ((dry_run)); then
  tmpdir=$(mktemp -d -u)  # a name only: a dry run creates nothing
else
  tmpdir=$(mktemp -d)
  trap 'rm -rf -- "$tmpdir"' EXIT
fi
tarball=$tmpdir/$TARBALL_NAME

gcloud_where=(--zone="$zone")
[[ -n $project ]] && gcloud_where+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)

# Step 4's remote command. The setup.cfg pin jax>=0.10 needs Python >= 3.11, and the
# tpu-ubuntu2204-base image has 3.10: the venv then uses python3.11 (from apt: Ubuntu 22.04
# has it). An existing .venv of a new enough Python is kept, so a rerun only reinstalls.
MIN_PYTHON=3.11
check_python="import sys; sys.exit(sys.version_info < (${MIN_PYTHON/./, }))"
make_venv="py=python3; \$py -c \"$check_python\" 2>/dev/null || py=python$MIN_PYTHON; \
\$py -m venv --clear .venv 2>/dev/null || { sudo apt-get -qq update \
&& sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y \$py-venv \
&& \$py -m venv --clear .venv; }"
install_cmd="mkdir -p $REMOTE_DIR && tar -xzf $TARBALL_NAME -C $REMOTE_DIR \
&& rm -f $TARBALL_NAME && cd $REMOTE_DIR \
&& if ! { [ -x .venv/bin/pip ] && .venv/bin/python -c \"$check_python\"; }; then $make_venv; fi \
&& .venv/bin/pip install -q --upgrade pip \
&& .venv/bin/pip install -q -e . \"jax[tpu]\" -f $LIBTPU_FIND_LINKS"

# Step 5's remote command: each word through printf %q, so flags holding spaces, quotes,
# $ or newlines reach absl unchanged after the worker's shell (bash) parses the line.
train_env=("TPU_STDERR_LOG_LEVEL=${TPU_STDERR_LOG_LEVEL:-2}" JAX_PLATFORMS=tpu)
[[ -n $libtpu_init_args ]] && train_env+=("LIBTPU_INIT_ARGS=$libtpu_init_args")
[[ -n $xla_flags ]] && train_env+=("XLA_FLAGS=$xla_flags")
train_env+=(${extra_env[@]+"${extra_env[@]}"})  # empty arrays and set -u: bash 3.2
printf -v train_words ' %q' "${train_env[@]}" .venv/bin/python -m decoder_jax.train \
  --distributed=on "${train_flags[@]}"
train_cmd="cd $REMOTE_DIR && env$train_words"

status=0
run git -C "$repo" archive --format=tar.gz --output="$tarball" HEAD || status=$?
if ((status == 0 && create)); then
  run "${tpu_vm[@]}" create "$name" "${gcloud_where[@]}" --accelerator-type="$accelerator_type" \
    --version="$version" || status=$?
fi
if ((status == 0)); then
  run "${tpu_vm[@]}" scp "$tarball" "$name:$TARBALL_NAME" "${gcloud_where[@]}" --worker=all \
    && run "${tpu_vm[@]}" ssh "$name" "${gcloud_where[@]}" --worker=all --command="$install_cmd" \
    && run "${tpu_vm[@]}" ssh "$name" "${gcloud_where[@]}" --worker=all --command="$train_cmd" \
    || status=$?
  if ((delete_after)); then
    run "${tpu_vm[@]}" delete "$name" "${gcloud_where[@]}" --quiet || {
      rc=$?
      ((status)) || status=$rc
    }
  fi
fi
exit "$status"
