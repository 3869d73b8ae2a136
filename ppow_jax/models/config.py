"""Static description of a Llama-family decoder (Llama, SmolLM, Qwen2, Qwen3).

The config is a frozen, hashable dataclass so that it can be a static argument of `jax.jit`:
it describes the graph, while the parameter pytree holds the arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling of RoPE (`rope_type: llama3` in Hugging Face configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder-only transformer of the Llama family."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on the q/k/v projections.
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE.
    max_position_embeddings: int = 2048
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                    f"unknown architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")

    @property
    def params_jnp_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def compute_jnp_dtype(self):
        return _DTYPES[self.compute_dtype]

    def with_dtypes(self, param_dtype: str, compute_dtype: Optional[str] = None) -> "ModelConfig":
        return dataclasses.replace(self, param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)

    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d + (2 * hd if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head
