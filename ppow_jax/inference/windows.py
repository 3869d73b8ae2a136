"""Window policies: how many drafted tokens of each row go to verification.

Every policy is static-shape and masked: the drafter always runs up to K_max steps (the loop exits
early only when no row wants more), and a policy decides, per row and step, whether the draft just
made is proposed (a row that stops proposing stays stopped). A policy carries a small per-row state through the
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
- cost (cost-aware, from the same calibrated model and this machine's measured cycle costs,
  `ppow_jax.inference.costs`): after each draft, keep it if some longer window is expected to
  emit more tokens per unit of cycle cost than stopping before it, projecting the drafts still to
  come at the current draft's p̂. This is the only policy that may propose no draft at all: where a
  verify pass of two positions costs much more than a decode step (a CPU), an unpromising first
  draft makes the cycle a plain decode step, so a weak drafter does not slow decoding down.

A fixed window may also branch (greedy only): with `branches` = (b_1, .., b_K) (missing depths
branch once) the engine drafts a tree of depth K_max in which every draft at depth d - 1 (the
pending token at depth 0) has the drafter's top b_d next drafts as children, so (4,) is four
chains, each from one of the top four first drafts. The whole tree is verified in one target pass
under a tree attention mask, and the deepest accepted path is kept. Its first path is the chain a
single chain would draft.

Every policy except `cost` proposes the first draft. The engine verifies at the smallest of its
static widths that holds the longest proposed window, so a policy that stops early also saves
verify work.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ppow_jax.errors import InputError

POLICIES = ("fixed", "confidence", "divergence", "adaptive", "cost")
CALIBRATED = ("adaptive", "cost")  # the policies that read a trained drafter's acceptance model
CALIBRATION_FEATURES = 3  # top log-prob, entropy, step
MAX_WINDOW = 32
MAX_TREE_TOKENS = 1024  # a tree's verify pass, pending token included


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
    calibration: tuple[float, ...] = ()  # adaptive, cost: logistic weights (bias, then CALIBRATION_FEATURES)
    # cost: verify_costs[T - 1] is a verify pass over T = 1..k_max + 1 positions, draft_cost one drafter
    # step, both in decode steps (`ppow_jax.inference.costs.CycleCosts`)
    verify_costs: tuple[float, ...] = ()
    draft_cost: float = 0.0
    # children per draft at depths 1..k_max (fixed window, greedy); missing depths: 1; all 1: a chain
    branches: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise InputError(f"unknown window policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or not 1 <= self.k_max <= MAX_WINDOW:
            raise InputError(f"k_max must be an integer in [1, {MAX_WINDOW}], got {self.k_max}")
        branches = (self.branches,) if isinstance(self.branches, int) else tuple(self.branches)
        if (len(branches) > self.k_max
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in branches)):
            raise InputError(f"branches must be at most k_max = {self.k_max} counts of at least 1 (children per "
                             f"draft at each depth), got {self.branches!r}")
        object.__setattr__(self, "branches", branches + (1,) * (self.k_max - len(branches)))  # frozen: normalised once
        if self.is_tree and self.kind != "fixed":
            raise InputError(f"a tree ({', '.join(map(str, branches))} branches) drafts every path to k_max: it needs "
                             f"the fixed window, not {self.kind!r}")
        if self.tree_tokens > MAX_TREE_TOKENS:
            raise InputError(f"a tree of branches {branches} and depth {self.k_max} verifies {self.tree_tokens} tokens "
                             f"per cycle, more than {MAX_TREE_TOKENS}")
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"window threshold must be in [0, 1], got {self.threshold}")
        if self.kind in CALIBRATED and len(self.calibration) != CALIBRATION_FEATURES + 1:
            raise InputError(f"the {self.kind} window needs {CALIBRATION_FEATURES + 1} calibration weights (a drafter "
                             f"trained with its window calibration), got {len(self.calibration)}")
        if self.kind == "cost" and self.verify_costs:  # empty: to be measured (`costs.measure_cycle_costs`)
            costs = (*self.verify_costs, self.draft_cost)
            if len(self.verify_costs) != self.k_max + 1:
                raise InputError(f"the cost window needs verify costs for T = 1..{self.k_max + 1} positions "
                                 f"(k_max + 1 of them), got {len(self.verify_costs)}")
            if not all(math.isfinite(c) and c >= 0 for c in costs) or not all(c > 0 for c in self.verify_costs):
                raise InputError(f"cycle costs must be finite, verify costs positive and the drafter step's "
                                 f"non-negative, got verify {self.verify_costs}, drafter step {self.draft_cost}")

    @property
    def is_tree(self) -> bool:
        return any(b > 1 for b in self.branches)

    @property
    def tree_tokens(self) -> int:
        """Tokens of one verify pass over the tree (the chain's k_max + 1 without branches)."""
        total, level = 1, 1
        for b in self.branches:
            level *= b
            total += level
        return total

    def check_sampling(self, greedy: bool) -> None:
        """Refuses what this window cannot decode losslessly: a tree under sampling."""
        if self.is_tree and not greedy:
            raise InputError(f"tree drafting (branches {self.branches}) is greedy only: lossless sampling over "
                             "several drafted paths is not implemented; use --branches 1 or temperature 0")

    @property
    def needs_costs(self) -> bool:
        """A cost window whose cycle costs are still to be measured on this machine."""
        return self.kind == "cost" and not self.verify_costs

    def init(self, batch: int) -> jax.Array:
        """Per-row policy state: the sum of criticality estimates so far (divergence), the log of the
        predicted probability that the window so far is accepted (adaptive), or that log and the
        expected number of accepted drafts in the window so far ([B, 2], cost)."""
        return jnp.zeros((batch, 2) if self.kind == "cost" else (batch,), jnp.float32)

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
            total = state + jax.nn.log_sigmoid(self._acceptance_logit(draft_logprobs, step))
            return (total >= math.log(max(self.threshold, 1e-30))) | first, total
        if self.kind == "cost":
            return self._pays_off(step, jax.nn.log_sigmoid(self._acceptance_logit(draft_logprobs, step)), state)
        total = state + normalised_entropy(draft_logprobs)
        return (total / (step + 1) <= self.threshold) | first, total

    def _acceptance_logit(self, draft_logprobs: jax.Array, step: int | jax.Array) -> jax.Array:
        """The calibrated model's logit that the draft at `step` is accepted, given the ones before it."""
        weights = jnp.asarray(self.calibration, jnp.float32)
        return weights[0] + calibration_features(draft_logprobs, step) @ weights[1:]

    def _pays_off(self, step: int | jax.Array, log_accept: jax.Array,
                  state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The cost policy's decision for the draft at `step` (0-based), accepted with predicted
        probability exp(log_accept) [B] if the ones before it were.

        Stopping before it gives a window of `step` drafts: (1 + E) expected tokens for a verify pass
        of step + 1 positions and step + 1 drafter steps, E being the expected accepted drafts so far.
        Keeping it, a window of L > step drafts is expected to add P·(1 + p + ... + p^(L-step-1)),
        P the probability that the whole window up to this draft is accepted and p this draft's own.
        """
        k_max = self.k_max
        log_window, expected = state[:, 0], state[:, 1]
        p = jnp.exp(log_accept)
        window_accepted = jnp.exp(log_window + log_accept)  # P
        verify = jnp.asarray(self.verify_costs, jnp.float32)
        lengths = jnp.arange(k_max + 1)  # candidate windows L = 0..k_max
        cycle_cost = verify + jnp.minimum(lengths + 1, k_max) * self.draft_cost  # [k_max + 1]
        stop = (1.0 + expected) / jnp.take(cycle_cost, step)
        extra = lengths - step  # drafts of window L from this one on
        projected = window_accepted[:, None] * jnp.cumsum(p[:, None] ** jnp.maximum(extra - 1, 0)[None, :]
                                                           * (extra >= 1)[None, :], axis=-1)
        # cumsum runs over L; terms before this draft are masked to 0, so projected[L] sums its m < L - step.
        rate = (1.0 + expected[:, None] + projected) / cycle_cost[None, :]
        best = jnp.max(jnp.where((extra >= 1)[None, :], rate, -jnp.inf), axis=-1)
        keep = best >= stop
        return keep, jnp.stack([log_window + log_accept, expected + window_accepted], axis=-1)
