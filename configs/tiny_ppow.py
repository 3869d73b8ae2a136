"""A tiny PPOW run for tests: a tiny random target and a tiny token-level drafter, seconds of compute.

The test fills in the target, the data and work dirs and `init_from`.
"""

import ml_collections

from ppow_jax.cli import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "tiny_kd.py")
    config.stage = "ppow"
    config.ppow = sibling_config(__file__, "smollm2_135m_ppow.py").ppow
    config.ppow.sequences_per_iteration = 4
    config.ppow.anchors_per_sequence = 2
    config.ppow.group_size = 4
    config.ppow.window = 4
    config.ppow.gamma = 0.1
    # METHOD.md's objective as stated (the SmolLM2 config departs from it where measured to help)
    config.ppow.kl_direction = "reverse"
    config.ppow.kl_beta = 0.2
    config.ppow.proximity_eta = 1.0
    config.ppow.rollout_temperature = 1.0
    config.ppow.estimator = "sampled"
    config.ppow.adaw = True
    config.ppow.priority_temperature = 1.0
    config.data.features_dir = ""
    config.train.eval_every = 10
    config.train.steps = 20
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 2
    config.train.end_learning_rate_factor = 1.0
    config.train.log_every = 2
    config.train.checkpoint_every = 5
    return config
