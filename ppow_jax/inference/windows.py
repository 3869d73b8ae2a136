"""Window policies: how many drafted tokens of each row go to verification.

Every policy is static-shape and masked: the drafter always runs up to K_max steps (the loop exits
early only when no row wants more), and a policy decides, per row and step, whether the draft just
made is proposed; the first draft always is. A policy carries a small per-row state through the
draft loop, so learned policies (PPOW's, LTD's) plug in as further kinds.

- fixed: propose all K_max drafts.
- confidence: stop at the first draft whose probability under the drafter is below `threshold`.
- divergence (ADAW at inference, METHOD.md §3 item 7): the window's score is the running mean of
  the estimated token criticality v_t = C(P_t)·KL(P_t‖Q_t); stop once it exceeds `threshold`, so
  one uncertain token after confident ones does not end the window, but a run of them does.
  P_t is unknown before verification; the training-free estimate puts the drafter's own
  distribution in its place: v̂_t = H(Q_t)/log|V|, the normalised entropy (a drafter that spreads
  its mass is the one expected to diverge).
- adaptive (ADAW at inference with a learned estimate, PPOW): a logistic model calibrated on the
  drafter's own greedy windows (`ppow_jax.training.ppow.fit_window_calibration`) predicts from
  what the drafter knows before verification (its top log-prob, its entropy, the step) the
  probability p̂_j that draft j is accepted given that the ones before it were; the window grows
  while the predicted probability that all its drafts are accepted, Π p̂_j, is at least `threshold`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ppow_jax.errors import InputError

POLICIES = ("fixed", "confidence", "divergence", "adaptive")
CALIBRATION_FEATURES = 3  # top log-prob, entropy, step
MAX_WINDOW = 32


def normalised_entropy(logprobs: jax.Array) -> jax.Array:
    """H(Q)/log|V| in [0, 1] for logprobs [B, V] (-inf entries allowed) -> [B]."""
    probs = jnp.exp(logprobs)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * logprobs, 0.0), axis=-1)
    return entropy / math.log(logprobs.shape[-1])


def calibration_features(logprobs: jax.Array, step: jax.Array) -> jax.Array:
    """What the adaptive window's model reads for a draft: [..., V] log-probs (-inf allowed) and its
    0-based step -> [..., 3] (top log-prob, entropy in nats, step)."""
    probs = jnp.exp(logprobs)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * logprobs, 0.0), axis=-1)
    return jnp.stack([jnp.max(logprobs, axis=-1), entropy, jnp.asarray(step, jnp.float32) * jnp.ones_like(entropy)],
                     axis=-1)


@dataclasses.dataclass(frozen=True)
class WindowPolicy:
    kind: str = "fixed"
    k_max: int = 5
    # confidence: least top probability; divergence: largest mean criticality; adaptive: least
    # predicted probability that the whole window is accepted
    threshold: float = 0.5
    calibration: tuple[float, ...] = ()  # adaptive: logistic weights (bias, then CALIBRATION_FEATURES)

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise InputError(f"unknown window policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or not 1 <= self.k_max <= MAX_WINDOW:
            raise InputError(f"k_max must be an integer in [1, {MAX_WINDOW}], got {self.k_max}")
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"window threshold must be in [0, 1], got {self.threshold}")
        if self.kind == "adaptive" and len(self.calibration) != CALIBRATION_FEATURES + 1:
            raise InputError(f"the adaptive window needs {CALIBRATION_FEATURES + 1} calibration weights (a drafter "
                             f"trained with its window calibration), got {len(self.calibration)}")

    def init(self, batch: int) -> jax.Array:
        """Per-row policy state: the sum of criticality estimates so far (divergence), or the log of
        the predicted probability that the window so far is accepted (adaptive)."""
        return jnp.zeros((batch,), jnp.float32)

    def keep_drafting(self, step: int | jax.Array, draft_logprobs: jax.Array,
                      state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Whether each row proposes the draft just made at `step` (0-based) -> ([B] bool, new state).

        `draft_logprobs` [B, V] is the drafter's distribution at that step.
        """
        first = step == 0
        if self.kind == "fixed":
            return jnp.ones(draft_logprobs.shape[:1], bool), state
        if self.kind == "confidence":
            confidence = jnp.exp(jnp.max(draft_logprobs, axis=-1))
            return (confidence >= self.threshold) | first, state
        if self.kind == "adaptive":
            weights = jnp.asarray(self.calibration, jnp.float32)
            logit = weights[0] + calibration_features(draft_logprobs, step) @ weights[1:]
            total = state + jax.nn.log_sigmoid(logit)
            return (total >= math.log(max(self.threshold, 1e-30))) | first, total
        total = state + normalised_entropy(draft_logprobs)
        return (total / (step + 1) <= self.threshold) | first, total
