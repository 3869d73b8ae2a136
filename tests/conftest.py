"""Shared test set-up: 8 fake CPU devices (for the sharding tests) and tiny model configs."""

import os

# Must happen before jax is imported anywhere: the sharding tests need 8 host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from ppow_jax.models import llama  # noqa: E402
from ppow_jax.models.config import ModelConfig, RopeScaling  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def data_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PPOW_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


def tiny_config(architecture: str = "llama", **overrides) -> ModelConfig:
    fields = dict(architecture=architecture, vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=512,
                  attention_bias=architecture == "qwen2", qk_norm=architecture == "qwen3")
    if architecture == "llama":
        fields["rope_scaling"] = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_params(config: ModelConfig, seed: int = 0, std: float = 0.3):
    # A large init std makes the logits peaked and input-dependent, so greedy paths diverge often.
    return llama.init_params(config, jax.random.key(seed), std=std)


@pytest.fixture(scope="session")
def shared_data_root() -> pathlib.Path:
    root = data_root()
    if not (root / "eval").is_dir():
        pytest.skip(f"shared data not found at {root} (set PPOW_DATA_ROOT)")
    return root
