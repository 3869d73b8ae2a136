"""What the speculative engine needs from a drafter, whatever its kind.

A drafter is a static description (a frozen dataclass: a jit static argument) plus a parameter
pytree passed separately. The engine drives it through three calls:
  - `consume`: run a chunk of tokens the drafter has not seen (the prompt, or what the last cycle
    accepted), with the target's features for them when the drafter reads features; returns the
    logits after the last valid token (the first draft's distribution);
  - `step`: draft one more token from the previous draft;
  - `after_verify`: given what the target accepted, roll the drafter's cache back (by lengths)
    and say which tokens it must consume at the start of the next cycle.
Logits are always over the target's vocabulary (a reduced draft vocabulary is scattered back, with
-inf elsewhere), so acceptance and window policies never see the drafter's internals.
"""

from __future__ import annotations

from typing import Optional, Protocol

import flax.struct
import jax

from ppow_jax.models import llama


@flax.struct.dataclass
class DraftCache:
    kv: llama.KVCache
    hidden: jax.Array  # [B, D] last output hidden state (fed back by feature drafters); [B, 0] otherwise


@flax.struct.dataclass
class Chunk:
    """Tokens the drafter consumes first in the next cycle, right-padded to a static width."""

    tokens: jax.Array  # [B, C]
    features: jax.Array  # [B, C, F] the target's features for them (F = 0 for drafters without features)
    length: jax.Array  # [B] valid tokens, >= 1


class Drafter(Protocol):
    name: str
    feature_layers: tuple[int, ...]  # target layers whose outputs the drafter reads; () for none
    vocab_size: int  # the target vocabulary its logits range over

    def chunk_width(self, k_max: int) -> int: ...

    def cache_margin(self, k_max: int) -> int:
        """Cache positions the drafter may write past the last emitted token in one cycle."""

    def init_cache(self, batch: int, cache_len: int) -> DraftCache: ...

    def prefill(self, params, target_params, cache: DraftCache, tokens: jax.Array, lengths: jax.Array,
                target_features: Optional[jax.Array]) -> tuple[jax.Array, DraftCache]: ...

    def start_chunk(self, first_token: jax.Array, target_features: Optional[jax.Array], lengths: jax.Array,
                    pad_token_id: int, k_max: int) -> Chunk: ...

    def consume(self, params, target_params, cache: DraftCache, chunk: Chunk) -> tuple[jax.Array, DraftCache]: ...

    def step(self, params, target_params, cache: DraftCache, token: jax.Array) -> tuple[jax.Array, DraftCache]: ...

    def after_verify(self, cache_at_start: DraftCache, cache: DraftCache, chunk: Chunk, drafts: jax.Array,
                     accepted: jax.Array, steps: jax.Array, next_token: jax.Array,
                     verify_features: Optional[jax.Array], active: jax.Array,
                     pad_token_id: int) -> tuple[DraftCache, Chunk]: ...


def concat_features(hidden_states: Optional[jax.Array]) -> Optional[jax.Array]:
    """`llama.forward`'s hidden states [n, B, T, D] -> features [B, T, n*D] (low, mid, high concatenated)."""
    if hidden_states is None:
        return None
    n, batch, seq, width = hidden_states.shape
    return hidden_states.transpose(1, 2, 0, 3).reshape(batch, seq, n * width)
