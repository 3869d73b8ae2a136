#!/usr/bin/env bash
# Reproduces the committed PPOW drafter for SmolLM2-135M-Instruct, checkpoints/smollm2-135m-instruct/ppow
# (BENCHMARKS.md, PPOW, eighteenth to twentieth rounds), from the committed token-level drafter:
#
#   1. the target answers four pools of 1,536 training prompts that the token-level drafter never saw
#      (the seeded prompt order after its 4,096; the second and third pools pass over GSM8K, which
#      made up most of the first 5,632; the fourth takes every prompt outside GSM8K that the others
#      left, and fills up with GSM8K); their feature caches are built on first use;
#   2. PPOW full (the exact estimator at K = 3, ADAW's priorities at temperature 4, lr 1e-4) on the
#      first two pools in one shuffle: 1,600 updates, then 800 more (seed 1);
#   3. on the first three pools in one shuffle: 1,600 more (seed 2), then 800 more (seed 3);
#   4. on all four pools in one shuffle: 1,600 more (seed 4), then 800 more (seed 5);
#      each run starts from the drafter the one before exported (a fresh optimiser and shuffle);
#   5. the last drafter is copied to checkpoints/smollm2-135m-instruct/ppow.
#
# On the 2-core CPU it was measured on: about 1 h of distillation on both cores, 27 min of
# features, then 7,200 updates of about 2.65 s each on one core (about 5.3 h). Every stage resumes when
# the script is run again (the distillation keeps each batch it finished, training resumes from its
# last checkpoint, a finished run only exports). RUNS (runs/release-ppow) holds the data and runs,
# RELEASE_DIR (checkpoints/smollm2-135m-instruct/ppow) gets the drafter; relative paths count from
# the repository root. Each run's cost ratio γ is pinned to the one its original run measured at
# start-up (on a 2-core AMD EPYC), so that the rewards do not depend on the machine that reruns it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/release-ppow}
RELEASE_DIR=${RELEASE_DIR:-checkpoints/smollm2-135m-instruct/ppow}
KD=configs/smollm2_135m_kd.py

distill() {  # NAME SKIP [more --config flags]
    local name=$1 skip=$2; shift 2
    python -m ppow_jax.distill --config "$KD" --config.data.max_prompts=1536 --config.data.skip_prompts="$skip" \
        --config.data.cache_dir="$RUNS/distill-$name" --config.data.dev_cache_dir="$RUNS/distill-dev" "$@"
}
distill unseen 4096
distill chat 5632 --config.data.source_caps.gsm8k_train=3241
distill chat2 7168 --config.data.source_caps.gsm8k_train=3241
# The prompts no pool above holds, counted after the token-level drafter's 4,096: all 481 left that are
# not GSM8K, and GSM8K up to 3,413 (the 2,358 of the first 4,096, then 1,055 more).
distill rest 4096 --config.data.source_caps.gsm8k_train=3413 \
    --config.data.exclude_caches="$RUNS/distill-unseen,$RUNS/distill-chat,$RUNS/distill-chat2"

pool() { echo "$RUNS/distill-$1:$RUNS/features-$1"; }
DATA=(--config.data.cache_dir="$RUNS/distill-unseen" --config.data.features_dir="$RUNS/features-unseen"
      --config.data.dev_cache_dir="$RUNS/distill-dev" --config.data.dev_features_dir="$RUNS/features-dev")
PPOW=(--config.train.max_seconds=0 --config.train.eval_every=0 --config.ppow.estimator=exact
      --config.ppow.window=3 --config.train.learning_rate=1e-4 --config.ppow.adaw=True
      --config.ppow.priority_temperature=4.0)

ppow() {  # WORKDIR STEPS SEED GAMMA EXTRA_CACHES: runs on from the drafter the run before exported
    python -m ppow_jax.train --config configs/smollm2_135m_ppow.py "${DATA[@]}" "${PPOW[@]}" \
        --config.workdir="$RUNS/$1" --config.train.steps="$2" --config.seed="$3" --config.ppow.gamma="$4" \
        --config.init_from="$start" --config.data.extra_caches="$5"
    start="$RUNS/$1/drafter"
}
start=checkpoints/smollm2-135m-instruct/kd
TWO_POOLS=$(pool chat)
THREE_POOLS="$(pool chat),$(pool chat2)"
FOUR_POOLS="$THREE_POOLS,$(pool rest)"
ppow two-pools-1600 1600 0 0.030757320663000225 "$TWO_POOLS"
ppow two-pools-2400 800 1 0.035790467013908006 "$TWO_POOLS"
ppow three-pools-1600 1600 2 0.03536882543299646 "$THREE_POOLS"
ppow three-pools-2400 800 3 0.03422735549944404 "$THREE_POOLS"
ppow four-pools-1600 1600 4 0.03716231751144343 "$FOUR_POOLS"
ppow four-pools-2400 800 5 0.0334023262693851 "$FOUR_POOLS"

# Copied beside the release first, so that a failed copy leaves the released drafter as it was.
rm -rf "$RELEASE_DIR.new"
cp -r "$start" "$RELEASE_DIR.new"
rm -rf "$RELEASE_DIR"
mv "$RELEASE_DIR.new" "$RELEASE_DIR"
echo "$RELEASE_DIR: $(du -sh "$RELEASE_DIR" | cut -f1)"
