"""Turning logits into the distribution plain sampling draws from, and drawing from it.

`processed_logprobs` is the single definition of "the target's sampling distribution" (temperature,
then top-k, then top-p, as Hugging Face applies them): plain decoding samples from it, and the
speculative engine must use exactly the same distribution for lossless acceptance.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ppow_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (hashable: a change compiles a new program, a new seed does not)."""

    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1 disables nucleus filtering

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_logprobs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Log-probabilities [..., V] of the sampling distribution; filtered-out tokens get -inf.

    Must not be called for greedy params (there the distribution is a point mass on the argmax).
    """
    if params.greedy:
        raise ValueError("processed_logprobs is undefined for greedy sampling")
    logits = logits.astype(jnp.float32) / params.temperature
    vocab = logits.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth_largest = jax.lax.top_k(logits, params.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if params.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        keep = mass_before < params.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.nn.log_softmax(logits, axis=-1)


def sample_tokens(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
    """One token per row of logits [B, V] -> [B] int32."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed_logprobs(logits, params), axis=-1).astype(jnp.int32)
