"""Hugging Face directory loading: tiny random transformers models must give transformers' logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest_weights import hf_logits, our_logits, rel_err, tiny_hf_model, to_jax
from ppow_jax.errors import CheckpointError, InputError
from ppow_jax.weights.hf_loader import load_hf_directory
from ppow_jax.weights.registry import load_model, resolve_model_path

pytest.importorskip("torch")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {
    # name: (kind, model kwargs, save kwargs)
    "llama_untied_llama3_rope": ("llama", dict(tie=False, rope_scaling=LLAMA3_ROPE), {}),
    "llama_tied_sharded": ("llama", dict(tie=True, seed=1), dict(max_shard_size="20KB")),
    "qwen2_tied": ("qwen2", dict(tie=True, seed=2), {}),
    "qwen3_untied_head_dim": ("qwen3", dict(tie=False, seed=3, head_dim=32), {}),
}
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 40))


def _save(tmp_path, name):
    kind, model_kwargs, save_kwargs = CASES[name]
    model = tiny_hf_model(kind, **model_kwargs)
    directory = tmp_path / name
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return model, directory


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tmp_path, name):
    model, directory = _save(tmp_path, name)
    if "sharded" in name:
        assert (directory / "model.safetensors.index.json").is_file()
    config, params = load_hf_directory(directory)
    kind, model_kwargs, _ = CASES[name]
    assert config.architecture == kind
    assert config.tie_word_embeddings == model_kwargs["tie"]
    assert ("lm_head" in params) != model_kwargs["tie"]
    assert config.attention_bias == (kind == "qwen2")
    assert config.qk_norm == (kind == "qwen3")
    assert (config.rope_scaling is not None) == ("rope_scaling" in model_kwargs)
    if "head_dim" in model_kwargs:
        assert config.head_dim == model_kwargs["head_dim"] != config.hidden_size // config.num_heads

    error = rel_err(our_logits(config, to_jax(params), TOKENS), hf_logits(model, TOKENS))
    assert error <= 1e-4, error


def test_llama3_rope_scaling_matters(tmp_path):
    """The rope-scaling case above would be vacuous if scaling did not change these logits."""
    import dataclasses

    model, directory = _save(tmp_path, "llama_untied_llama3_rope")
    config, params = load_hf_directory(directory)
    unscaled = dataclasses.replace(config, rope_scaling=None)
    assert rel_err(our_logits(unscaled, to_jax(params), TOKENS), hf_logits(model, TOKENS)) > 1e-2


def test_old_style_rope_config_and_bfloat16(tmp_path):
    """Pre-transformers-5 configs (`rope_theta` + `rope_scaling`) and bfloat16 parameters."""
    model, directory = _save(tmp_path, "llama_untied_llama3_rope")
    cfg = json.loads((directory / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (directory / "config.json").write_text(json.dumps(cfg))
    config, params = load_hf_directory(directory, param_dtype="bfloat16")
    assert config.param_dtype == config.compute_dtype == "bfloat16"
    assert config.rope_scaling.factor == 8.0
    assert params["layers"][0]["wqkv"].dtype.name == "bfloat16"
    f32_config = config.with_dtypes("float32")
    error = rel_err(our_logits(f32_config, to_jax(params), TOKENS), hf_logits(model, TOKENS))
    assert error <= 3e-2, error  # bfloat16 weights, float32 compute


def test_load_model_on_hf_directory(tmp_path):
    _, directory = _save(tmp_path, "qwen2_tied")
    # A tokenizer.json is required next to the weights; any byte-level one will do here.
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    backend = Backend(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<|im_end|>": 3}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))

    loaded = load_model(directory, param_dtype="float32", compute_dtype="bfloat16")
    assert resolve_model_path(directory) == directory == loaded.path
    assert loaded.config.compute_dtype == "bfloat16" and loaded.config.param_dtype == "float32"
    assert type(loaded.params["embed"]).__module__.startswith("jax")
    assert loaded.tokenizer.eos_token_ids == (3,)
    with pytest.raises(InputError, match="chat template"):
        loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(InputError, match="param_dtype"):
        load_model(directory, param_dtype="int8")


# ---------------------------------------------------------------------------------------------
# Bad checkpoints.

def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_hf_directory(tmp_path)
    with pytest.raises(CheckpointError, match="directory without config.json"):
        resolve_model_path(tmp_path)


def test_missing_weights_file(tmp_path):
    _, directory = _save(tmp_path, "qwen2_tied")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf_directory(directory)


def test_missing_shard(tmp_path):
    _, directory = _save(tmp_path, "llama_tied_sharded")
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, which is missing"):
        load_hf_directory(directory)


def test_missing_tensor(tmp_path):
    from safetensors.numpy import save_file

    model, directory = _save(tmp_path, "qwen2_tied")
    state = {k: v.numpy() for k, v in model.state_dict().items()
             if k not in ("lm_head.weight", "model.layers.1.self_attn.k_proj.bias")}
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.k_proj.bias' is missing"):
        load_hf_directory(directory)


def test_truncated_safetensors(tmp_path):
    _, directory = _save(tmp_path, "qwen2_tied")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_directory(directory)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_hf_directory(directory)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "RoPE scaling type 'yarn'"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias=true is not supported for model_type 'llama'"),
])
def test_unsupported_config(tmp_path, change, message):
    _, directory = _save(tmp_path, "qwen2_tied")
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(change)
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_hf_directory(directory)


def test_unknown_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; expected one of the names smollm2-135m-instruct"):
        resolve_model_path(tmp_path / "nope")
    text = tmp_path / "weights.bin"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="is not a .gguf file"):
        resolve_model_path(text)
