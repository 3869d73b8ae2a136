"""Drafters that are language models over the target's vocabulary.

Two kinds share this code, because both are Llama-family decoders run by `llama.forward`:
- an independent small LM that shares the target's tokenizer (its own config and weights);
- the training-free self-speculative drafter: the target's first N layers with the target's final
  norm and output head (no new weights; it validates the engine on real models).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from ppow_jax.drafters.interface import Chunk, DraftCache
from ppow_jax.errors import InputError
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LMDrafter:
    """Static description of an LM drafter; its parameters travel separately (a jit argument).

    Its cache keeps every drafted token that the target accepted, so a cycle starts by consuming
    only the target's token (and the last accepted draft when the drafter never ran on it):
    chunks are 1 or 2 tokens wide.
    """

    config: ModelConfig
    name: str = "lm"
    feature_layers: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def chunk_width(self, k_max: int) -> int:
        return 2

    def cache_margin(self, k_max: int) -> int:
        return k_max + 2

    def init_cache(self, batch: int, cache_len: int) -> DraftCache:
        return DraftCache(kv=llama.init_cache(self.config, batch, cache_len), hidden=jnp.zeros((batch, 0)))

    def prefill(self, params, target_params, cache: DraftCache, tokens: jax.Array, lengths: jax.Array,
                target_features: Optional[jax.Array]) -> tuple[jax.Array, DraftCache]:
        out = llama.forward(params, tokens, cache.kv, self.config, num_valid=lengths, logits_at="last")
        return out.logits, cache.replace(kv=out.cache)

    def start_chunk(self, first_token: jax.Array, target_features: Optional[jax.Array], lengths: jax.Array,
                    pad_token_id: int, k_max: int) -> Chunk:
        batch = first_token.shape[0]
        return Chunk(tokens=jnp.stack([first_token, jnp.full_like(first_token, pad_token_id)], axis=1),
                     features=jnp.zeros((batch, 2, 0)), length=jnp.ones((batch,), jnp.int32))

    def consume(self, params, target_params, cache: DraftCache, chunk: Chunk) -> tuple[jax.Array, DraftCache]:
        out = llama.forward(params, chunk.tokens, cache.kv, self.config, num_valid=chunk.length, logits_at="last")
        return out.logits, cache.replace(kv=out.cache)

    def step(self, params, target_params, cache: DraftCache, token: jax.Array) -> tuple[jax.Array, DraftCache]:
        out = llama.forward(params, token[:, None], cache.kv, self.config, logits_at="last")
        return out.logits, cache.replace(kv=out.cache)

    def after_verify(self, cache_at_start: DraftCache, cache: DraftCache, chunk: Chunk, drafts: jax.Array,
                     accepted: jax.Array, steps: jax.Array, next_token: jax.Array,
                     verify_features: Optional[jax.Array], active: jax.Array,
                     pad_token_id: int) -> tuple[DraftCache, Chunk]:
        # Keep what was consumed plus the accepted drafts already processed: the drafter ran on
        # d_1..d_{steps-1}, so after a fully accepted window it still lacks the last draft.
        base = cache_at_start.kv.lengths + chunk.length
        lengths = jnp.where(active, base + jnp.minimum(accepted, steps - 1), cache_at_start.kv.lengths)
        last_draft = jnp.take_along_axis(drafts, jnp.maximum(accepted - 1, 0)[:, None], axis=1)[:, 0]
        needs_last = accepted == steps
        tokens = jnp.where(needs_last[:, None], jnp.stack([last_draft, next_token], axis=1),
                           jnp.stack([next_token, jnp.full_like(next_token, pad_token_id)], axis=1))
        next_chunk = chunk.replace(tokens=tokens, length=jnp.where(needs_last, 2, 1).astype(jnp.int32))
        return cache.replace(kv=cache.kv.replace(lengths=lengths)), next_chunk


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
