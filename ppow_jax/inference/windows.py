"""Window policies: how many drafted tokens of each row go to verification.

Every policy is static-shape and masked: the drafter always runs up to K_max steps (the loop exits
early only when no row wants more), and a policy returns, per row, how many leading drafts the
acceptance step may accept. Learned policies (PPOW's, LTD's) plug in as further kinds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ppow_jax.errors import InputError

POLICIES = ("fixed", "confidence")
MAX_WINDOW = 32


@dataclasses.dataclass(frozen=True)
class WindowPolicy:
    kind: str = "fixed"
    k_max: int = 5
    threshold: float = 0.5  # "confidence": keep drafting while the drafter's top probability >= this

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise InputError(f"unknown window policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or not 1 <= self.k_max <= MAX_WINDOW:
            raise InputError(f"k_max must be an integer in [1, {MAX_WINDOW}], got {self.k_max}")
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"confidence threshold must be in [0, 1], got {self.threshold}")

    def keep_drafting(self, step: int | jax.Array, draft_logprobs: jax.Array) -> jax.Array:
        """Whether each row proposes the draft just made at `step` (0-based) -> [B] bool.

        `draft_logprobs` [B, V] is the drafter's distribution at that step. The first draft is
        always proposed, so every cycle verifies at least one drafted token.
        """
        if self.kind == "fixed":
            return jnp.ones(draft_logprobs.shape[:1], bool)
        confidence = jnp.exp(jnp.max(draft_logprobs, axis=-1))
        return (confidence >= self.threshold) | (step == 0)
