"""Shared helpers and fixtures of the weight-loading and tokenizer tests (imported explicitly).

Peers: transformers (the reference implementation of every architecture we load) and gguf-py's
writer (a GGUF converter in the style of llama.cpp's convert_hf_to_gguf, including its q/k row
permutation for the llama architecture).
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
from typing import Optional

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppow_jax.errors import CheckpointError
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def data_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PPOW_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


def eval_questions() -> list[dict]:
    """Every question of eval/*/question.jsonl, in a fixed order (dataset name, then file order)."""
    files = sorted((data_root() / "eval").glob("*/question.jsonl"))
    if not files:
        pytest.skip(f"no eval question files under {data_root()} (set PPOW_DATA_ROOT)")
    questions = []
    for file in files:
        for line in file.read_text().splitlines():
            if line.strip():
                questions.append(dict(json.loads(line), dataset=file.parent.name))
    return questions


def smollm2_gguf_path() -> pathlib.Path:
    from ppow_jax.weights.registry import resolve_model_path

    try:
        return resolve_model_path("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(str(e))


def rel_err(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@functools.partial(jax.jit, static_argnames=("config", "logits_at"))
def _forward(params, tokens, cache, num_valid, config: ModelConfig, logits_at: str):
    return llama.forward(params, tokens, cache, config, num_valid=num_valid, logits_at=logits_at)


def our_logits(config: ModelConfig, params: dict, tokens) -> np.ndarray:
    """float32 logits [B, T, V] of a full forward over tokens [B, T]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    batch, seq = tokens.shape
    out = _forward(params, tokens, llama.init_cache(config, batch, seq), jnp.full((batch,), seq, jnp.int32),
                   config=config, logits_at="all")
    return np.asarray(out.logits)


def our_greedy(config: ModelConfig, params: dict, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuation: one right-padded prefill, then one token per step against the KV cache."""
    batch, longest = len(prompts), max(map(len, prompts))
    tokens = np.zeros((batch, longest), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    cache = llama.init_cache(config, batch, longest + new_tokens)
    out = _forward(params, jnp.asarray(tokens), cache, lengths, config=config, logits_at="last")
    generated = []
    ones = jnp.ones((batch,), jnp.int32)
    for _ in range(new_tokens):
        next_tokens = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
        generated.append(np.asarray(next_tokens))
        out = _forward(params, next_tokens[:, None], out.cache, ones, config=config, logits_at="last")
    return np.stack(generated, axis=1).tolist()


def to_jax(params: dict) -> dict:
    return jax.tree.map(jnp.asarray, params)


# ---------------------------------------------------------------------------------------------
# Tiny random transformers models.

def tiny_hf_model(kind: str, *, tie: bool, seed: int = 0, rope_scaling: Optional[dict] = None,
                  hidden: int = 64, intermediate: int = 96, heads: int = 4, kv_heads: int = 2,
                  head_dim: Optional[int] = None, vocab: int = 128, layers: int = 2):
    """A random transformers CausalLM of `kind` (llama, qwen2, qwen3), float32.

    Weights are redrawn with a large scale and norm weights away from 1, so that attention is far
    from uniform and a RoPE, permutation or norm mistake changes the logits clearly.
    """
    import torch
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_theta=10000.0)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, head_dim=head_dim or hidden // heads,
                                          rope_scaling=rope_scaling)
        model_class = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common)
        model_class = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=head_dim or hidden // heads)
        model_class = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif param.ndim == 2:
                param.copy_(torch.randn_like(param) * (1.5 / math.sqrt(param.shape[1])))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    if tie:
        model.tie_weights()
    return model


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


# ---------------------------------------------------------------------------------------------
# A GGUF writer for transformers models, following llama.cpp's converter.

def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: half-split rows of each head -> interleaved pairs."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensors_from_hf(model, arch: Optional[str] = None) -> dict[str, np.ndarray]:
    """GGUF-named float32 tensors in GGUF numpy order ([out, in]), q/k permuted for the llama arch.

    arch: the GGUF architecture, default the model's own (a Qwen2 model written as `llama` is a
    Llama with q/k/v biases, which llama.cpp's llama arch supports).
    """
    config = model.config
    arch = arch or config.model_type
    out = {}
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = array
        elif name == "model.norm.weight":
            out["output_norm.weight"] = array
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["output.weight"] = array
        elif name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            gguf_name = f"blk.{index}.{_HF_TO_GGUF[rest]}"
            if arch == "llama" and rest.startswith("self_attn.q_proj."):
                array = permute_rows(array, config.num_attention_heads)
            elif arch == "llama" and rest.startswith("self_attn.k_proj."):
                array = permute_rows(array, config.num_key_value_heads)
            out[gguf_name] = array
        else:
            raise AssertionError(f"unexpected tensor {name}")
    return out


def llama3_rope_factors(config) -> Optional[np.ndarray]:
    """llama.cpp's rope_freqs tensor (per-frequency divisors) for a config with llama3 scaling."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    original = rope["original_max_position_embeddings"]
    low_wavelen = original / rope["low_freq_factor"]
    high_wavelen = original / rope["high_freq_factor"]
    factors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            low, high = rope["low_freq_factor"], rope["high_freq_factor"]
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(factors, np.float32)


def write_gguf(path: pathlib.Path, arch: str, hf_config, tensors: dict[str, np.ndarray],
               qtypes: Optional[dict[str, gguf.GGMLQuantizationType]] = None,
               raw: Optional[dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]] = None) -> None:
    """Writes a GGUF with the metadata of `hf_config`.

    tensors: float32 arrays stored as qtypes[name] (default F32) via gguf.quants.quantize;
    raw: already-encoded blocks (uint8 in GGUF byte shape) with their type, written as they are.
    """
    qtypes = qtypes or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(hf_config.num_hidden_layers)
    writer.add_context_length(hf_config.max_position_embeddings)
    writer.add_embedding_length(hf_config.hidden_size)
    writer.add_feed_forward_length(hf_config.intermediate_size)
    writer.add_head_count(hf_config.num_attention_heads)
    writer.add_head_count_kv(hf_config.num_key_value_heads)
    writer.add_rope_freq_base(float(hf_config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    factors = llama3_rope_factors(hf_config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    for name, array in tensors.items():
        qtype = qtypes.get(name, gguf.GGMLQuantizationType.F32)
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    for name, (blocks, qtype) in (raw or {}).items():
        writer.add_tensor(name, blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF, loaded once per test module.

@pytest.fixture(scope="module")
def smollm2_path() -> pathlib.Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from ppow_jax.weights.registry import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="module")
def hf_smollm2_model(smollm2_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer(smollm2_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
