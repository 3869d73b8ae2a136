#!/usr/bin/env bash
# GPU measurements for a lent accelerator machine, in two stages (two calls of the device tool).
#
# The device tool carries at most 64 MiB per call, so the 98 MB SmolLM2 GGUF travels in two halves
# (`.gpu/gguf.part1`, then `.gpu/gguf.part2`; files under the ignored `.gpu/` stay on the machine
# between calls). Stage `costs` needs no real weights; stage `eval` joins the halves and runs
# `python -m ppow_jax.eval` over the four eval sets, in priority order, until BUDGET_S runs out.
#
#   benchmarks/gpu_session.sh costs    # .whl/ (the gguf wheel), .gpu/gguf.part1, .gpu/data/eval carried
#   benchmarks/gpu_session.sh eval     # .gpu/gguf.part2 carried
#
# LIMIT (questions per set, 10) and NEW_TOKENS (128) size the evals.
# Results: $OUT/<stage>.log and, for `eval`, $OUT/eval_results.tgz (one results.json/.md per run).
set -uo pipefail
stage=${1:?usage: gpu_session.sh costs|eval}
out=${OUT:?OUT must name the output folder}
cd "$(dirname "$0")/.."
mkdir -p .gpu /tmp/site
if [ -n "$(ls .whl/*.whl 2>/dev/null)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PPOW_JAX_CACHE_DIR=$PWD/.gpu/xla
exec > >(tee "$out/$stage.log") 2>&1

case "$stage" in
costs)
  cp .gpu/gguf.part1 /root/gguf.part1  # a second copy, outside the checkout
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint, chex; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, 'chex', chex.__version__, jax.devices())"
  for dtype in float32 bfloat16; do
    start=$SECONDS
    python3 benchmarks/verify_cost.py --tokens 1 2 3 4 5 6 9 11 --repeats 50 --dtype "$dtype"
    echo "verify_cost $dtype: $((SECONDS - start)) s with compiles"
  done
  start=$SECONDS
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_speculative.py \
    -k "greedy_equals_autoregressive or batch_sizes_and_eos or compiles_once"
  echo "pytest rc $? in $((SECONDS - start)) s"
  ;;
eval)
  budget=${BUDGET_S:-360}
  deadline=$((SECONDS + budget))
  part1=.gpu/gguf.part1; [ -f "$part1" ] || part1=/root/gguf.part1
  target=.gpu/SmolLM2-135M-Instruct.Q4_1.gguf
  cat "$part1" .gpu/gguf.part2 > "$target" || exit 1
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $target" | sha256sum -c || exit 1
  sets=(mt_bench humaneval gsm8k alpaca)
  questions=("${sets[@]/#/.gpu/data/eval/}"); questions=("${questions[@]/%//question.jsonl}")
  kd=checkpoints/smollm2-135m-instruct/kd
  results=.gpu/results; rm -rf "$results"; mkdir -p "$results"
  run() {  # NAME EVAL-FLAGS...: one eval, if at least 40 s of the budget are left
    local name=$1; shift
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 40 ]; then echo "skipped $name: budget spent"; return; fi
    local start=$SECONDS
    timeout "$left" python3 -m ppow_jax.eval --target "$target" --questions "${questions[@]}" \
      --limit "${LIMIT:-10}" --max-new-tokens "${NEW_TOKENS:-128}" --out "$results/$name" "$@" 2>&1 | grep -v "questions:"
    echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - start)) s"
    tar -czf "$out/eval_results.tgz" -C "$results" .
  }
  # TF32 (`--matmul-precision default`) rows as measured at c755b7f, where that was the eval's default,
  # and one full-float32 row (the default since), the only one whose greedy outputs all equalled plain decoding's.
  tf32=(--matmul-precision default)
  run kd-fixed4-T0 --drafter "$kd" --k-max 4 "${tf32[@]}"
  run kd-fixed4-T0-highest --drafter "$kd" --k-max 4
  run kd-confidence8-T0 --drafter "$kd" --window confidence --k-max 8 --threshold 0.3 "${tf32[@]}"
  run kd-adaptive8-T0 --drafter "$kd" --window adaptive --k-max 8 --threshold 0.25 "${tf32[@]}"
  run kd-fixed4-T1 --drafter "$kd" --k-max 4 --temperature 1 "${tf32[@]}"
  run kd-fixed8-T0 --drafter "$kd" --k-max 8 "${tf32[@]}"
  run kd-fixed2-T0 --drafter "$kd" --k-max 2 "${tf32[@]}"
  run kd-adaptive8-T1 --drafter "$kd" --window adaptive --k-max 8 --threshold 0.25 --temperature 1 "${tf32[@]}"
  run kd-cost8-T0 --drafter "$kd" --window cost --k-max 8
  run kd-fixed4-T0-bf16 --drafter "$kd" --k-max 4 --dtype bfloat16
  ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
