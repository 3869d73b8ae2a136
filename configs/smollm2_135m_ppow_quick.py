"""The README's main job: a short PPOW fine-tune of the committed token-level SmolLM2 drafter.

python -m ppow_jax.distill --config configs/smollm2_135m_ppow_quick.py   # the target answers 24 prompts
python -m ppow_jax.train --config configs/smollm2_135m_ppow_quick.py     # PPOW from checkpoints/.../kd
Sized to finish, with the eval that follows it, within 15 minutes on a 2-core CPU; the full run is
configs/smollm2_135m_ppow.py.
"""

import ml_collections

from ppow_jax.cli import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "smollm2_135m_ppow.py")
    config.workdir = "runs/quick/ppow"
    config.data.cache_dir = "runs/quick/distill"
    config.data.features_dir = ""  # its own small cache in WORKDIR/features
    config.data.max_prompts = 24
    config.data.dev_prompts = 0  # no held-out probe in the 15-minute job
    config.data.max_new_tokens = 128
    config.data.batch_size = 8
    config.data.seq_len = 256
    config.data.max_prompt_tokens = 128
    config.ppow.sequences_per_iteration = 2
    # γ as measured by the full run on a 2-core CPU (BENCHMARKS.md): skips the start-up measurement
    # and its one-minute target compile.
    config.ppow.gamma = 0.02
    config.train.steps = 40
    config.train.warmup_steps = 2
    config.calibration.batches = 2
    return config
