"""From a checkpoint's tensor names to the model's parameter pytree, for every checkpoint format.

Each format (GGUF, Hugging Face safetensors) supplies a table of its tensor names and a `get`
function that reads one tensor; `assemble_params` walks the model's layout once for all formats.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from ppow_jax.models.config import ModelConfig
from ppow_jax.models.llama import fuse_projections

# get(name, expected shape [in, out], transpose, rope_heads) -> array. rope_heads is the number of
# heads of a q/k projection (a format whose q/k rows are permuted for RoPE undoes that), else 0.
GetTensor = Callable[[str, tuple[int, ...], bool, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorNames:
    embed: str
    final_norm: str
    lm_head: str
    layer_prefix: str  # with "{i}" for the layer index
    layer: dict[str, str]  # model key -> tensor name suffix (weights and, for Qwen, biases and norms)
    transposed: bool = True  # matrices are stored [out, in] (torch Linear, GGUF ne order)


GGUF_NAMES = TensorNames(
    embed="token_embd.weight", final_norm="output_norm.weight", lm_head="output.weight", layer_prefix="blk.{i}.",
    layer={"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
           "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
           "w_up": "ffn_up.weight", "w_down": "ffn_down.weight", "bq": "attn_q.bias", "bk": "attn_k.bias",
           "bv": "attn_v.bias", "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"})

HF_NAMES = TensorNames(
    embed="model.embed_tokens.weight", final_norm="model.norm.weight", lm_head="lm_head.weight",
    layer_prefix="model.layers.{i}.",
    layer={"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
           "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
           "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
           "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias",
           "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight",
           "k_norm": "self_attn.k_norm.weight"})


def assemble_params(config: ModelConfig, get: GetTensor, names: TensorNames) -> dict[str, Any]:
    """Reads every tensor the model needs through `get` and returns the fused parameter pytree."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    h, kv = config.num_heads, config.num_kv_heads
    t = names.transposed
    # model key -> (shape in the model, is a matrix to transpose, RoPE heads whose rows may be permuted)
    shapes = {"attn_norm": ((d,), False, 0), "wq": ((d, h * hd), t, h), "wk": ((d, kv * hd), t, kv),
              "wv": ((d, kv * hd), t, 0), "wo": ((h * hd, d), t, 0), "mlp_norm": ((d,), False, 0),
              "w_gate": ((d, f), t, 0), "w_up": ((d, f), t, 0), "w_down": ((f, d), t, 0)}
    if config.attention_bias:
        shapes.update(bq=((h * hd,), False, h), bk=((kv * hd,), False, kv), bv=((kv * hd,), False, 0))
    if config.qk_norm:
        shapes.update(q_norm=((hd,), False, 0), k_norm=((hd,), False, 0))

    params: dict[str, Any] = {"embed": get(names.embed, (config.vocab_size, d), False, 0)}
    layers = []
    for i in range(config.num_layers):
        prefix = names.layer_prefix.format(i=i)
        layer = {key: get(prefix + names.layer[key], shape, transpose, heads)
                 for key, (shape, transpose, heads) in shapes.items()}
        layers.append(fuse_projections(layer, config))
    params["layers"] = layers
    params["final_norm"] = get(names.final_norm, (d,), False, 0)
    if not config.tie_word_embeddings:
        params["lm_head"] = get(names.lm_head, (d, config.vocab_size), t, 0)
    return params
