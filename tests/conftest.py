"""Shared test set-up: 8 fake CPU devices (for the sharding tests) and tiny model configs."""

import os

# Must happen before jax is imported anywhere: the sharding tests need 8 host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Programs compiled once are reused by later tests that build the same ones (new jit objects).
jax.config.update("jax_compilation_cache_dir", os.environ.get("PPOW_TEST_JAX_CACHE_DIR", "/tmp/ppow_jax_test_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from ppow_jax.models import llama  # noqa: E402
from ppow_jax.models.config import ModelConfig, RopeScaling  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Python 3.11's ast.parse can fail ("AST constructor recursion depth mismatch") when pytest
    # re-parses source to format a failure after deep JAX tracing, which crashes the xdist worker
    # and hides the failure; Python's own traceback format shows it instead.
    if config.option.tbstyle == "auto":
        config.option.tbstyle = "native"


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


def load_config(name: str):
    """configs/NAME.py's config."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="session")
def shared_data_root() -> pathlib.Path:
    root = data_root()
    if not (root / "eval").is_dir():
        pytest.skip(f"shared data not found at {root} (set PPOW_DATA_ROOT)")
    return root


# ----- a tiny target with the real tokenizer, and its self-distilled data -----

@pytest.fixture(scope="session")
def tiny_target():
    from conftest_weights import smollm2_gguf_path
    from ppow_jax.text.tokenizer import Tokenizer
    from ppow_jax.weights.registry import LoadedModel

    tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
    config = tiny_config(vocab_size=tokenizer.vocab_size, num_layers=3)
    return LoadedModel(config=config, params=tiny_params(config, std=0.3), tokenizer=tokenizer, path=pathlib.Path("tiny"))


def tiny_distillation(tiny_target, shared_data_root):
    """What the tiny target's self-distillations share -> (prompts, greedy decoder, settings)."""
    from ppow_jax.data import sources
    from ppow_jax.data.distill import DistillSettings
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder

    config = load_config("tiny_kd")
    prompts, _ = sources.read_training_prompts(shared_data_root, ["alpaca_seed_tasks", "gsm8k_train"])
    tok = tiny_target.tokenizer
    decoder = AutoregressiveDecoder(tiny_target.config, tiny_target.params, eos_token_ids=tok.eos_token_ids,
                                    pad_token_id=tok.pad_token_id or 0)
    # model: what training compares with its config.target (the tiny configs leave it empty)
    settings = DistillSettings(model=str(config.target), max_prompt_tokens=config.data.max_prompt_tokens,
                               max_new_tokens=config.data.max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
    return prompts, decoder, settings


@pytest.fixture(scope="session")
def distilled(tmp_path_factory, tiny_target, shared_data_root):
    """A self-distilled cache made in two runs (the second resumes), plus the config it used."""
    from ppow_jax.data.distill import self_distill

    config = load_config("tiny_kd")
    cache = tmp_path_factory.mktemp("distill")
    prompts, decoder, settings = tiny_distillation(tiny_target, shared_data_root)
    tok = tiny_target.tokenizer
    first = self_distill(decoder, tok, prompts, cache, settings, batch_size=4, max_prompts=8, progress=False)
    second = self_distill(decoder, tok, prompts, cache, settings, batch_size=4, max_prompts=16,
                          dev_prompts=config.data.dev_prompts, progress=False)
    dev_cache = tmp_path_factory.mktemp("distill-dev")
    self_distill(decoder, tok, prompts, dev_cache, settings, batch_size=4, max_prompts=16,
                 dev_prompts=config.data.dev_prompts, split="dev", progress=False)
    config.data.cache_dir = str(cache)
    config.data.dev_cache_dir = str(dev_cache)
    return config, first, second
