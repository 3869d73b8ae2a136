"""Token-level training of the SmolLM2-135M-Instruct drafter on one GPU, on up to 8,766 prompts.

The recipe of configs/smollm2_135m_kd.py, scaled to what a lent accelerator does in minutes: the
target answers up to 8,766 training prompts (all but 4,473 of the GSM8K-train questions; the CPU
recipe distils 2,048 in about 96 minutes), batches are 8x larger and the drafter unrolls 5 steps,
as EAGLE-3 trains. `launch/gpu_train.sh` runs it
inside a device lease: it distils for as long as the lease allows, sets `train.steps` from a timed
step and the time left, `train.max_wall_seconds` as the deadline, and points the caches at the
machine's disk.

python -m ppow_jax.distill --config configs/smollm2_135m_kd_gpu.py
python -m ppow_jax.train --config configs/smollm2_135m_kd_gpu.py --config.train.steps=N
The dev split is the CPU recipe's (same seed, folders and sizes), so dev figures compare across the two.
"""

import ml_collections

from ppow_jax.cli import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "smollm2_135m_kd.py")
    config.workdir = "runs/gpu/kd"
    config.data.cache_dir = "runs/gpu/distill"
    config.data.dev_cache_dir = "runs/gpu/distill-dev"
    config.data.max_prompts = 0  # all but the dev split
    # GSM8K-train is 7,473 of the 13,265 prompts; the eval sets are mostly chat and code (BENCHMARKS.md,
    # "Continued training on a source-balanced extension"). Capped, the other sources are 2/3 of the mix.
    config.data.source_caps.gsm8k_train = 3000
    config.data.batch_size = 256  # decode rows per distillation batch: a GPU step costs about the same at 1 and 256
    config.data.feature_batch_size = 64
    config.data.read_ahead = 4
    config.train.batch_size = 32
    config.train.steps = 2000  # set from the measured step time by launch/gpu_train.sh
    config.train.unroll_steps = 5
    config.train.loss_positions = 0  # every position of the batch gets the head (masked to responses)
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 50
    config.train.log_every = 20
    config.train.checkpoint_every = 500
    config.train.eval_every = 500
    return config
