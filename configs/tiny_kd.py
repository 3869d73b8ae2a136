"""A tiny KD run for tests: the real SmolLM2 tokenizer, a tiny random target, seconds of compute.

The target path is filled in by the test (`--config.target=DIR`), as are the data and work dirs.
"""

import ml_collections

from ppow_jax.cli import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "smollm2_135m_kd.py")
    config.target = ""
    config.workdir = ""
    config.export_dtype = "float32"
    config.data.cache_dir = ""
    config.data.max_prompts = 16
    config.data.dev_prompts = 4
    config.data.dev_cache_dir = ""
    config.data.max_prompt_tokens = 128
    config.data.max_new_tokens = 24
    config.data.batch_size = 4
    config.data.seq_len = 160
    config.data.feature_batch_size = 4
    config.drafter.feature_layers = (0, 1, 2)
    config.drafter.draft_vocab_size = 256
    config.drafter.intermediate_size = 64
    config.train.batch_size = 4
    config.train.steps = 40
    config.train.unroll_steps = 3
    config.train.loss_positions = 0
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 5
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.keep_checkpoints = 2
    config.train.eval_every = 20
    config.train.eval_window = 4
    config.train.eval_stride = 4
    config.calibration.batches = 2
    config.calibration.window = 4
    return config
