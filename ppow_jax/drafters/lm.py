"""Drafters that are language models over the target's vocabulary.

Two kinds share this code, because both are Llama-family decoders run by `llama.forward`:
- an independent small LM that shares the target's tokenizer (its own config and weights);
- the training-free self-speculative drafter: the target's first N layers with the target's final
  norm and output head (no new weights; it validates the engine on real models).
"""

from __future__ import annotations

import dataclasses

from ppow_jax.errors import InputError
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LMDrafter:
    """Static description of an LM drafter; its parameters travel separately (a jit argument)."""

    config: ModelConfig
    name: str = "lm"


def check_vocabulary(drafter_config: ModelConfig, target_config: ModelConfig) -> None:
    """A drafter must propose token ids of the target's vocabulary."""
    if drafter_config.vocab_size != target_config.vocab_size:
        raise InputError(f"drafter vocabulary ({drafter_config.vocab_size} tokens) does not match the target's "
                         f"({target_config.vocab_size} tokens)")


def self_speculative(target_config: ModelConfig, target_params: llama.Params,
                     num_layers: int) -> tuple[LMDrafter, llama.Params]:
    """The target's first `num_layers` layers + its final norm and head, as a drafter.

    The parameters are the target's own arrays (no copy).
    """
    if not 1 <= num_layers < target_config.num_layers:
        raise InputError(f"self-speculative drafter needs 1 <= N < {target_config.num_layers} layers, got {num_layers}")
    config = dataclasses.replace(target_config, num_layers=num_layers)
    params = {k: v for k, v in target_params.items() if k != "layers"}
    params["layers"] = target_params["layers"][:num_layers]
    return LMDrafter(config=config, name=f"self:{num_layers}"), params
