"""A tiny KD run for tests: the real SmolLM2 tokenizer, a tiny random target, seconds of compute.

The target path is filled in by the test (`--config.target=DIR`), as are the data and work dirs.
"""

import importlib.util
import pathlib

import ml_collections


def full_config() -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("smollm2_135m_kd.py")
    spec = importlib.util.spec_from_file_location("smollm2_135m_kd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    config = full_config()
    config.target = ""
    config.workdir = ""
    config.export_dtype = "float32"
    config.data.cache_dir = ""
    config.data.max_prompts = 16
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
    return config
