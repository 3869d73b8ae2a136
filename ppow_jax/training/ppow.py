"""PPOW: window-level RL fine-tuning of an EAGLE-3 drafter (METHOD.md §3).

The drafter is the policy, a window of K drafts is the action, the target's verification is the
environment. One iteration is two jitted functions (with `estimator="exact"`, one gradient step on
the same objective's expectation in closed form instead: see its section below):

  1. `rollout`: B sequences from the target-feature cache; the drafter's teacher-forced context
     pass over each (its hidden states and keys/values at every position); A anchors per sequence,
     drawn uniformly or with ADAW priority; at each anchor G windows of K drafts sampled from the
     drafter (at `rollout_temperature`, 1 by default), all B·A·G windows at once in one `lax.scan`; verification gives each window's
     accepted length k and each draft's acceptance probability; rewards (their expectation over k)
     and group-normalised advantages.
  2. `update`: PPO's clipped surrogate on the drafts' log-probabilities plus β·KL(Q‖P) anchored to
     the target, `epochs` × `minibatches` (minibatches split by sequence) in one `lax.scan`.
     Optionally (`context_kl_beta`) the same anchor also at every response position of the
     sequences, on the teacher-forced first draft: the windows reach a few dozen positions per
     sequence, the context pass that the update already runs covers all of them.

Verification, two ways (`verifier`):
  - "cache": when the data are the target's own greedy responses (self-distillation at T = 0), the
    target's choice after a matched prefix is the data's next token and its distribution there is
    the cached final hidden times its head, so greedy acceptance needs no target forward at all.
    P is then known only on the matched prefix (positions j <= k), which is where the KL term runs,
    and the proximity gap Δ is the first token's (the only one conditioned on a verified prefix).
  - "target": the live target. One teacher-forced forward over the B sequences fills a KV cache; it
    is repeated per window with its length set to the anchor (the same as prefilling each prefix),
    and one forward verifies [x_a, d_1..d_K] for all windows; acceptance is the engine's own
    (`accept_greedy`, or lossless `accept_sampling`), Δ sums over the window.

Shapes: B sequences of length L, A anchors per sequence, G windows per anchor, W = A·G windows per
sequence, K drafts per window, N the draft vocabulary, V the target's.

The rollout temperature τ: the policy PPO optimises is the drafter's distribution at τ, Q^(1/τ)
renormalised, and its expected reward. At τ = 1 that is the sampled drafts' acceptance; an engine
that drafts greedily (T = 0 serving) is judged on its argmax instead, which a lower τ approaches.
The KL anchor always acts on Q itself.

Rewards are expectations over the acceptance coin flips given the drafts: verification gives each
draft's acceptance probability once the drafts before it are accepted (0 or 1 under greedy
acceptance, min(1, p/q) under sampling acceptance), hence the distribution of k, and the window's
reward is R's mean under it. Under greedy acceptance that is R(k) itself; under sampling acceptance
it is the same objective without the coins' noise.

Under sampling acceptance the acceptance probabilities depend on Q itself (min(1, p/q)); the
score-function update, as METHOD.md's, treats the reward as given and leaves that dependence out.
Group normalisation then scales any spread of a group's expected rewards, however small, to unit
size, as it does a spread of sampled k.

Policy-gradient terms are kept for the drafts that are reached with positive probability (under
greedy acceptance d_1..d_{k+1}): the reward does not depend on the drafts after a sure rejection,
so their score-function terms have zero mean and add only noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ppow_jax import multihost, sharding
from ppow_jax.drafters.eagle import Eagle3Drafter, layer_output, layer_qkv, to_target_vocabulary, unrolled_hidden
from ppow_jax.errors import InputError
from ppow_jax.inference.costs import measure_cycle_costs
from ppow_jax.inference.sampling import SamplingParams
from ppow_jax.inference.speculative import accept_greedy, accept_sampling, draft_acceptance_logprobs
from ppow_jax.inference.windows import MAX_WINDOW, calibration_features
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig
from ppow_jax.training.kd import TargetConstants, TrainState, gradient_step, on_mesh, output_head

Batch = dict[str, jax.Array]
VERIFIERS = ("cache", "target")
ACCEPTANCE = ("greedy", "sampling")
ESTIMATORS = ("sampled", "exact")


@dataclasses.dataclass(frozen=True)
class PPOWSettings:
    group_size: int = 8  # G windows per anchor (advantages are normalised within them)
    window: int = 10  # K drafts per window
    anchors_per_sequence: int = 4  # A
    clip_epsilon: float = 0.2
    kl_beta: float = 0.1  # weight of the KL to the target
    # "reverse": KL(Q‖P), METHOD.md's anchor; "forward": KL(P‖Q), the token-level loss's direction
    kl_direction: str = "reverse"
    epochs: int = 2
    minibatches: int = 2  # per epoch, split by sequence
    gamma: float = 0.1  # drafter-step cost / target-verify cost (R_speed = k / (kγ + 1))
    cost_aware_reward: bool = True  # False: R_speed = k
    proximity_reward: bool = True  # R_dist = η·1[Δ < ε] when k = 0
    proximity_eta: float = 1.0
    proximity_epsilon: float = 2.0
    adaw: bool = True  # priority sampling of anchors by window criticality
    priority_temperature: float = 1.0
    priority_floor: float = 0.2  # share of the uniform distribution mixed in (easy windows still appear)
    verifier: str = "cache"
    acceptance: str = "greedy"
    rollout_temperature: float = 1.0  # τ: windows are sampled from Q^(1/τ) (see the module docstring)
    # Weight of a second anchor at every response position of the sequences, on the drafter's
    # teacher-forced first draft (the token-level loss's step 0); 0: the windows' anchor only.
    context_kl_beta: float = 0.0
    # "sampled": G windows per anchor and PPO (METHOD.md); "exact": the same objective's expectation
    # over anchors, windows and acceptance in closed form (cache verifier only; see `exact_loss`).
    estimator: str = "sampled"

    def __post_init__(self):
        for name in ("group_size", "window", "anchors_per_sequence", "epochs", "minibatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"ppow.{name} must be an integer >= 1, got {value!r}")
        if self.group_size < 2:
            raise InputError(f"ppow.group_size must be >= 2 (advantages are normalised within a group), got {self.group_size}")
        if self.window > MAX_WINDOW:
            raise InputError(f"ppow.window must be <= {MAX_WINDOW}, got {self.window}")
        if self.kl_direction not in ("reverse", "forward"):
            raise InputError(f"ppow.kl_direction must be 'reverse' or 'forward', got {self.kl_direction!r}")
        if self.verifier not in VERIFIERS:
            raise InputError(f"ppow.verifier must be one of {VERIFIERS}, got {self.verifier!r}")
        if self.acceptance not in ACCEPTANCE:
            raise InputError(f"ppow.acceptance must be one of {ACCEPTANCE}, got {self.acceptance!r}")
        if self.verifier == "cache" and self.acceptance != "greedy":
            raise InputError("ppow.verifier='cache' verifies greedily from the self-distilled data; "
                             "sampling acceptance needs ppow.verifier='target'")
        if not self.gamma > 0 or not math.isfinite(self.gamma):
            raise InputError(f"ppow.gamma must be a positive number, got {self.gamma}")
        if not 0.0 < self.priority_floor <= 1.0:
            raise InputError(f"ppow.priority_floor must be in (0, 1], got {self.priority_floor}")
        if not self.priority_temperature > 0:
            raise InputError(f"ppow.priority_temperature must be > 0, got {self.priority_temperature}")
        if not self.rollout_temperature > 0 or not math.isfinite(self.rollout_temperature):
            raise InputError(f"ppow.rollout_temperature must be a positive number, got {self.rollout_temperature}")
        if not self.clip_epsilon > 0 or self.kl_beta < 0:
            raise InputError(f"ppow.clip_epsilon must be > 0 and ppow.kl_beta >= 0, got {self.clip_epsilon}, {self.kl_beta}")
        if not self.context_kl_beta >= 0 or not math.isfinite(self.context_kl_beta):
            raise InputError(f"ppow.context_kl_beta must be a number >= 0, got {self.context_kl_beta}")
        if self.estimator not in ESTIMATORS:
            raise InputError(f"ppow.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.estimator == "exact" and self.verifier != "cache":
            raise InputError("ppow.estimator='exact' follows the self-distilled data, the path greedy acceptance "
                             "takes; it needs ppow.verifier='cache'")


# ----- rewards -----

def speed_reward(accepted: jax.Array, gamma: float, cost_aware: bool = True) -> jax.Array:
    """R_speed = k / (kγ + 1): tokens per unit of cost (one verify pass plus k drafter steps)."""
    k = accepted.astype(jnp.float32)
    return k / (k * gamma + 1.0) if cost_aware else k


def proximity_reward(accepted: jax.Array, gap: jax.Array, eta: float, epsilon: float) -> jax.Array:
    """R_dist = η·1[Δ < ε] for windows rejected at the first draft (k = 0), 0 otherwise."""
    return eta * ((accepted == 0) & (gap < epsilon)).astype(jnp.float32)


def group_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Rewards [..., G] normalised within each group: (r - mean) / (std + eps)."""
    mean = jnp.mean(rewards, axis=-1, keepdims=True)
    return (rewards - mean) / (jnp.std(rewards, axis=-1, keepdims=True) + eps)


def informative_group_fraction(rewards: jax.Array, valid: jax.Array) -> jax.Array:
    """Share of valid groups (rewards [..., G], valid [...]) whose G rewards are not all equal.

    A group of equal rewards has zero advantages, so it gives the policy term no signal.
    """
    spread = jnp.max(rewards, axis=-1) - jnp.min(rewards, axis=-1) > 1e-6
    return jnp.sum(spread & valid) / jnp.maximum(jnp.sum(valid), 1)


def criticality(target_logprobs: jax.Array, draft_logprobs: jax.Array) -> jax.Array:
    """v = C(P)·KL(P‖Q), C(P) = 1 - H(P)/log N, over the last axis (the draft vocabulary)."""
    p = jnp.exp(target_logprobs)
    confidence = 1.0 + jnp.sum(p * target_logprobs, axis=-1) / math.log(target_logprobs.shape[-1])
    return confidence * jnp.sum(p * (target_logprobs - draft_logprobs), axis=-1)


def leading_matches(matches: jax.Array) -> jax.Array:
    """[..., K] bool -> [...] number of leading True values (the accepted length)."""
    return jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1)


def window_sums(values: jax.Array, window: int) -> jax.Array:
    """[B, L] -> [B, L]: sum of values[a : a + window] (the positions past L count as 0)."""
    csum = jnp.pad(jnp.cumsum(values, axis=-1), ((0, 0), (1, window)), mode="edge")
    csum = csum.at[:, 0].set(0)
    seq = values.shape[1]
    return csum[:, window:window + seq] - csum[:, :seq]


def reach_probabilities(accept_probs: jax.Array) -> jax.Array:
    """Acceptance probabilities [..., K] -> [..., K + 1]: P(k >= j) for j = 0..K."""
    ones = jnp.ones(accept_probs.shape[:-1] + (1,), accept_probs.dtype)
    return jnp.concatenate([ones, jnp.cumprod(accept_probs, axis=-1)], axis=-1)


def accepted_length_distribution(accept_probs: jax.Array) -> jax.Array:
    """Acceptance probabilities [..., K] -> [..., K + 1]: P(k = j) for j = 0..K."""
    reach = reach_probabilities(accept_probs)
    return reach - jnp.concatenate([reach[..., 1:], jnp.zeros_like(reach[..., :1])], axis=-1)


def expected_rewards(accept_probs: jax.Array, gap: jax.Array, settings: "PPOWSettings") -> tuple[jax.Array, jax.Array]:
    """The windows' mean R_speed and R_dist over their distribution of k -> (speed, proximity), [B, W] each."""
    s = settings
    lengths = accepted_length_distribution(accept_probs)  # [B, W, K + 1]
    speed = jnp.sum(lengths * speed_reward(jnp.arange(s.window + 1), s.gamma, s.cost_aware_reward), axis=-1)
    if not s.proximity_reward:
        return speed, jnp.zeros_like(speed)
    return speed, lengths[..., 0] * proximity_reward(jnp.zeros_like(gap, jnp.int32), gap, s.proximity_eta,
                                                     s.proximity_epsilon)


# ----- the drafter as a policy over windows -----

class DrafterContext(NamedTuple):
    """The drafter's teacher-forced pass over whole sequences (step 0 of every chain)."""

    hidden: jax.Array  # [B, L, D]: the hidden at position i predicts x_{i+1}
    keys: jax.Array  # [B, L, KV, hd]
    values: jax.Array  # [B, L, KV, hd]


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array,
            chain: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None) -> jax.Array:
    """Queries [B, W, KV, Gh, hd] over context keys [B, L, KV, hd] (visible [B|1, W, L]) and, for
    chain steps, the chain's own keys (k, v [B, W, S, KV, hd], visible [B|1, W|1, S]) -> [B, W, KV, Gh, hd]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    low = jnp.finfo(jnp.float32).min
    scores = jnp.einsum("bwkgd,blkd->bwkgl", q, keys, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, :, None, None, :], scores, low)
    if chain is not None:
        chain_k, chain_v, chain_visible = chain
        own = jnp.einsum("bwkgd,bwskd->bwkgs", q, chain_k, preferred_element_type=jnp.float32) * scale
        scores = jnp.concatenate([scores, jnp.where(chain_visible[:, :, None, None, :], own, low)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    seq = keys.shape[1]
    out = jnp.einsum("bwkgl,blkd->bwkgd", probs[..., :seq], values)
    if chain is not None:
        out = out + jnp.einsum("bwkgs,bwskd->bwkgd", probs[..., seq:], chain_v)
    return out


def _embedded(drafter: Eagle3Drafter, params: dict, embed_table: jax.Array, target_ids: jax.Array) -> jax.Array:
    c = drafter.layer_config
    x = jnp.take(embed_table, target_ids, axis=0).astype(c.compute_jnp_dtype)
    return llama.rms_norm(x, params["layer"]["embed_norm"], c.rms_norm_eps)


def _rope(drafter: Eagle3Drafter, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    return llama.rope_angles(positions, llama.rope_inverse_frequencies(drafter.layer_config))


def context_pass(drafter: Eagle3Drafter, params: dict, embed_table: jax.Array, tokens: jax.Array,
                 target_features: jax.Array) -> DrafterContext:
    """Position i reads x_i and the target's feature at i-1, attending causally (as inference does)."""
    batch, seq = tokens.shape
    cos, sin = _rope(drafter, jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)))
    g = drafter.project_features(params, target_features)
    g = jnp.pad(g, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    q, k, v = layer_qkv(drafter, params["layer"], _embedded(drafter, params, embed_table, tokens), g, cos, sin)
    causal = (jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None])[None]
    hidden = layer_output(drafter, params["layer"], g, _attend(q, k, v, causal))
    return DrafterContext(hidden=hidden, keys=k, values=v)


def draft_windows(drafter: Eagle3Drafter, params: dict, embed_table: jax.Array, context: DrafterContext,
                  anchors: jax.Array, window: int, *, key: Optional[jax.Array] = None,
                  forced: Optional[jax.Array] = None, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Windows of `window` drafts after anchors [B, W] -> (draft ids [B, W, K], log-probs [B, W, K, N]).

    Draft j+1 comes from the hidden at position a+j: the context's at j = 0, then the chain's own,
    which reads draft j at position a+j and attends to the context keys at positions <= a and to the
    chain's keys so far (exactly the engine's drafting after the target verified up to a). Drafts
    are sampled at `temperature` with `key`, taken greedily when neither is given, or teacher-forced to
    `forced` [B, W, K] (recomputing a rollout's log-probabilities under new parameters).
    """
    c = drafter.layer_config
    batch, width = anchors.shape
    layer, d2t = params["layer"], params["d2t"]
    hidden = jnp.take_along_axis(context.hidden, anchors[..., None], axis=1)  # [B, W, D]
    visible = jnp.arange(context.keys.shape[1])[None, None, :] <= anchors[..., None]  # [B, W, L]
    slots = max(window - 1, 1)
    chain_k = jnp.zeros((batch, width, slots, c.num_kv_heads, c.head_dim), c.compute_jnp_dtype)
    chain_v = jnp.zeros_like(chain_k)
    keys = jax.random.split(key, window) if key is not None else None

    def choose(j, logprobs):
        if forced is not None:
            return forced[:, :, j]
        if keys is not None:
            return jax.random.categorical(keys[j], logprobs / temperature, axis=-1).astype(jnp.int32)
        return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)

    def step(carry, j):
        hidden, chain_k, chain_v = carry
        logprobs = jax.nn.log_softmax(drafter.draft_logits(params, hidden), axis=-1)
        draft = choose(j, logprobs)
        # The chain's next position a+j+1 reads that draft and this hidden.
        cos, sin = _rope(drafter, anchors + j + 1)
        q, k, v = layer_qkv(drafter, layer, _embedded(drafter, params, embed_table, jnp.take(d2t, draft)),
                            hidden, cos, sin)
        chain_k = chain_k.at[:, :, j].set(k)
        chain_v = chain_v.at[:, :, j].set(v)
        own_visible = (jnp.arange(slots) <= j)[None, None, :]
        out = _attend(q, context.keys, context.values, visible, (chain_k, chain_v, own_visible))
        return (layer_output(drafter, layer, hidden, out), chain_k, chain_v), (draft, logprobs)

    # K-1 chain steps, then the last draft from the last hidden (no position after it is needed).
    (hidden, _, _), (drafts, logprobs) = jax.lax.scan(step, (hidden, chain_k, chain_v), jnp.arange(window - 1))
    last_logprobs = jax.nn.log_softmax(drafter.draft_logits(params, hidden), axis=-1)
    drafts = jnp.concatenate([drafts, choose(window - 1, last_logprobs)[None]])
    logprobs = jnp.concatenate([logprobs, last_logprobs[None]])
    return jnp.moveaxis(drafts, 0, -1), jnp.moveaxis(logprobs, 0, 2)


# ----- anchors -----

def valid_anchors(loss_mask: jax.Array, window: int) -> jax.Array:
    """[B, L] -> [B, L] bool: a window of K drafts after anchor a predicts response tokens only."""
    full = window_sums(loss_mask.astype(jnp.int32), window) == window
    return full & (jnp.arange(loss_mask.shape[1]) >= 1)[None]


def anchor_priorities(valid: jax.Array, scores: Optional[jax.Array], temperature: float, floor: float) -> jax.Array:
    """Sampling probabilities over anchors [B, L]: softmax(score / T) mixed with a uniform floor,
    or uniform without scores; 0 at invalid anchors."""
    count = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1)
    uniform = valid / count
    if scores is None:
        return uniform
    priority = jax.nn.softmax(jnp.where(valid, scores / temperature, -jnp.inf), axis=-1)
    priority = jnp.where(valid, priority, 0.0)
    return (1.0 - floor) * priority + floor * uniform


def standardised(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Window scores [B, L] as z-scores over each row's valid anchors, so the priority temperature
    means the same thing whatever the scale of v (raw scores spread over several nats would put
    nearly all the priority on a handful of windows no draft can match)."""
    count = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(valid, scores, 0.0), axis=-1, keepdims=True) / count
    std = jnp.sqrt(jnp.sum(jnp.where(valid, (scores - mean) ** 2, 0.0), axis=-1, keepdims=True) / count)
    return (scores - mean) / (std + 1e-6)


def window_scores(target_logprobs: jax.Array, draft_logprobs: jax.Array, valid: jax.Array, window: int) -> jax.Array:
    """ADAW's window scores [B, L]: the mean criticality of the K positions after each anchor (P and
    the drafter's teacher-forced Q over the draft vocabulary, [B, L, N]), standardised per sequence."""
    return standardised(window_sums(criticality(target_logprobs, draft_logprobs), window) / window, valid)


def sample_anchors(key: jax.Array, probabilities: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """`count` distinct anchors per row (Gumbel top-k) -> (anchors [B, A], valid [B, A])."""
    gumbel = jax.random.gumbel(key, probabilities.shape)
    scores = jnp.where(probabilities > 0, jnp.log(jnp.maximum(probabilities, 1e-30)) + gumbel, -jnp.inf)
    values, anchors = jax.lax.top_k(scores, count)
    return anchors.astype(jnp.int32), jnp.isfinite(values)


# ----- verification -----

class Verification(NamedTuple):
    accepted: jax.Array  # [B, W] k
    # [B, W, K] each draft's acceptance probability once the drafts before it are accepted (0 or 1
    # under greedy acceptance; past the first sure rejection it does not matter)
    accept_probs: jax.Array
    gap: jax.Array  # [B, W] Δ (target log-prob gap between its preferred and the drafted tokens)
    target_logprobs: jax.Array  # [B, W, K, N] P over the draft vocabulary at each draft position
    target_known: jax.Array  # [B, W, K] bool: where P is the target's given the drafted prefix


def target_draft_logprobs(target_hidden: jax.Array, head_rows: jax.Array) -> jax.Array:
    """Final-normed target hidden [..., D] -> its log-probs over the draft vocabulary [..., N] (renormalised)."""
    logits = target_hidden.astype(jnp.float32) @ head_rows.astype(jnp.float32).T
    return jax.nn.log_softmax(logits, axis=-1)


def verify_from_cache(batch: Batch, target: "PPOWTarget", anchors: jax.Array, drafts: jax.Array,
                      window: int) -> Verification:
    """Greedy verification against the self-distilled data (see the module docstring)."""
    offsets = jnp.arange(window)
    positions = anchors[..., None] + offsets  # [B, W, K]: where draft j+1 is predicted
    batch_size, width = anchors.shape
    flat = positions.reshape(batch_size, -1)
    wanted = jnp.take_along_axis(batch["tokens"], flat + 1, axis=1).reshape(positions.shape)
    matches = jnp.take(target.constants.d2t, drafts) == wanted
    accepted = leading_matches(matches)
    hidden = jnp.take_along_axis(batch["target_hidden"], flat[..., None], axis=1).reshape(*positions.shape, -1)
    target_logprobs = target_draft_logprobs(hidden, target.constants.head_rows)
    first = jax.nn.log_softmax(hidden[:, :, 0].astype(jnp.float32) @ target.head.astype(jnp.float32).T, axis=-1)
    drafted = jnp.take(target.constants.d2t, drafts[..., 0])
    gap = (jnp.take_along_axis(first, wanted[..., 0, None], axis=-1)
           - jnp.take_along_axis(first, drafted[..., None], axis=-1))[..., 0]
    return Verification(accepted=accepted, accept_probs=matches.astype(jnp.float32), gap=gap,
                        target_logprobs=target_logprobs, target_known=offsets[None, None, :] <= accepted[..., None])


def verify_with_target(target_config: ModelConfig, target_params: dict, target: "PPOWTarget", tokens: jax.Array,
                       anchors: jax.Array, drafts: jax.Array, draft_logprobs: jax.Array, key: jax.Array,
                       acceptance: str) -> Verification:
    """Verification by the live target, all B·W windows in one forward (see the module docstring)."""
    batch_size, seq = tokens.shape
    width, window = anchors.shape[1], drafts.shape[-1]
    prefill = llama.prefill(target_params, tokens, seq + window + 1, target_config)
    rows = jnp.repeat(jnp.arange(batch_size), width)
    windows = rows.shape[0]
    cache = llama.KVCache(k=tuple(x[rows] for x in prefill.cache.k), v=tuple(x[rows] for x in prefill.cache.v),
                          lengths=anchors.reshape(-1))
    d2t = target.constants.d2t
    draft_ids = jnp.take(d2t, drafts).reshape(windows, window)
    last_verified = jnp.take_along_axis(tokens, anchors, axis=1).reshape(-1, 1)
    logits = llama.forward(target_params, jnp.concatenate([last_verified, draft_ids], axis=1), cache,
                           target_config).logits  # [BW, K + 1, V]
    proposed = jnp.full((windows,), window, jnp.int32)
    # The target's T = 1 distribution at each draft: sampling acceptance's p, and the gap Δ.
    logprobs = jax.nn.log_softmax(logits[:, :window].astype(jnp.float32), axis=-1)
    if acceptance == "greedy":
        accepted, _ = accept_greedy(draft_ids, proposed, logits)
        accept_probs = (draft_ids == jnp.argmax(logits[:, :window], axis=-1)).astype(jnp.float32)
    else:
        full = to_target_vocabulary(draft_logprobs.reshape(windows, window, -1), d2t, target_config.vocab_size)
        accepted, _ = accept_sampling(key, draft_ids, proposed, full, logits, SamplingParams(temperature=1.0))
        accept_probs = jnp.exp(draft_acceptance_logprobs(draft_ids, full, logprobs))
    gap = jnp.sum(jnp.max(logprobs, axis=-1) - jnp.take_along_axis(logprobs, draft_ids[..., None], axis=-1)[..., 0], -1)
    target_logprobs = jax.nn.log_softmax(jnp.take(logits[:, :window], d2t, axis=-1), axis=-1)
    shape = anchors.shape
    return Verification(accepted=accepted.reshape(shape), accept_probs=accept_probs.reshape(*shape, window),
                        gap=gap.reshape(shape),
                        target_logprobs=target_logprobs.reshape(*shape, window, -1),
                        target_known=jnp.ones((*shape, window), bool))


# ----- rollout and update -----

@flax.struct.dataclass
class PPOWTarget:
    """The frozen target as the rollout needs it: KD's constants plus the full output head (for Δ)."""

    constants: TargetConstants
    head: jax.Array  # [V, D]

    @classmethod
    def from_target(cls, target_params: dict, d2t: np.ndarray) -> "PPOWTarget":
        return cls(constants=TargetConstants.from_target(target_params, d2t), head=output_head(target_params))


@flax.struct.dataclass
class Rollout:
    """Everything the update needs, sequence-major so that minibatches split the first axis."""

    tokens: jax.Array  # [B, L]
    features: jax.Array  # [B, L, F]
    anchors: jax.Array  # [B, W]
    drafts: jax.Array  # [B, W, K] draft ids
    old_logprobs: jax.Array  # [B, W, K] their log-probs under the rollout policy
    advantages: jax.Array  # [B, W]
    policy_mask: jax.Array  # [B, W, K] drafts that get the PPO term: valid anchor, reached with probability > 0
    target_logprobs: jax.Array  # [B, W, K, N]
    kl_mask: jax.Array  # [B, W, K] valid anchor and P known
    # Only for the context anchor (context_kl_beta > 0), else None:
    context_target_logprobs: Optional[jax.Array] = None  # [B, L, N] P at every position
    context_kl_mask: Optional[jax.Array] = None  # [B, L] positions that predict a response token


def tempered(logprobs: jax.Array, temperature: float) -> jax.Array:
    """Log-probs of the rollout policy Q^(1/τ), renormalised."""
    return logprobs if temperature == 1.0 else jax.nn.log_softmax(logprobs / temperature, axis=-1)


def rollout(params: dict, target: PPOWTarget, batch: Batch, key: jax.Array, target_params: Optional[dict], *,
            drafter: Eagle3Drafter, settings: PPOWSettings,
            target_config: Optional[ModelConfig] = None) -> tuple[Rollout, dict]:
    """Samples B·A·G windows, verifies them and scores them -> (rollout, metrics)."""
    s = settings
    anchor_key, draft_key, verify_key = jax.random.split(key, 3)
    embed = target.constants.embed
    context = context_pass(drafter, params, embed, batch["tokens"], batch["features"])

    valid = valid_anchors(batch["loss_mask"], s.window)
    context_anchor = s.context_kl_beta > 0
    scores = None
    p = None
    if s.adaw or context_anchor:
        p = target_draft_logprobs(batch["target_hidden"], target.constants.head_rows)  # [B, L, N]
    if s.adaw:
        q = jax.nn.log_softmax(drafter.draft_logits(params, context.hidden), axis=-1)
        scores = window_scores(p, q, valid, s.window)
    chosen, chosen_valid = sample_anchors(anchor_key, anchor_priorities(valid, scores, s.priority_temperature,
                                                                        s.priority_floor), s.anchors_per_sequence)
    anchors = jnp.repeat(chosen, s.group_size, axis=1)  # [B, W]: the G windows of an anchor side by side
    anchor_valid = jnp.repeat(chosen_valid, s.group_size, axis=1)

    drafts, logprobs = draft_windows(drafter, params, embed, context, anchors, s.window, key=draft_key,
                                     temperature=s.rollout_temperature)
    policy_logprobs = tempered(logprobs, s.rollout_temperature)
    old_logprobs = jnp.take_along_axis(policy_logprobs, drafts[..., None], axis=-1)[..., 0]
    if s.verifier == "cache":
        verified = verify_from_cache(batch, target, anchors, drafts, s.window)
    else:
        verified = verify_with_target(target_config, target_params, target, batch["tokens"], anchors, drafts,
                                      policy_logprobs, verify_key, s.acceptance)

    speed, proximity = expected_rewards(verified.accept_probs, verified.gap, s)
    rewards = speed + proximity
    batch_size = anchors.shape[0]
    grouped_rewards = rewards.reshape(batch_size, s.anchors_per_sequence, s.group_size)
    advantages = jnp.where(anchor_valid, group_advantages(grouped_rewards).reshape(anchors.shape), 0.0)
    reach = reach_probabilities(verified.accept_probs)  # [B, W, K + 1]
    policy_mask = anchor_valid[..., None] & (reach[..., :-1] > 0)
    kl_mask = anchor_valid[..., None] & verified.target_known

    # In expectation over the acceptance coins, as the rewards (the sampled k's figures under greedy acceptance).
    first_rejection = 1.0 - verified.accept_probs[..., 0]
    proximity_hit = jnp.where(proximity > 0, first_rejection, 0.0)
    metrics = {"reward": masked_mean(rewards, anchor_valid),
               "accepted": masked_mean(jnp.sum(reach[..., 1:], axis=-1), anchor_valid),
               "proximity_hits": masked_mean(proximity_hit, anchor_valid),
               "first_rejected": masked_mean(first_rejection, anchor_valid),
               "informative_groups": informative_group_fraction(grouped_rewards, chosen_valid),
               "first_gap": masked_mean(verified.gap, first_rejection * anchor_valid),
               "window_score": masked_mean(jnp.take_along_axis(scores, chosen, axis=1), chosen_valid)
               if scores is not None else jnp.zeros(()),
               "anchors": jnp.sum(chosen_valid)}
    return Rollout(tokens=batch["tokens"], features=batch["features"], anchors=anchors, drafts=drafts,
                   old_logprobs=old_logprobs, advantages=advantages, policy_mask=policy_mask,
                   target_logprobs=verified.target_logprobs, kl_mask=kl_mask,
                   context_target_logprobs=p if context_anchor else None,
                   context_kl_mask=batch["loss_mask"].astype(bool) if context_anchor else None), metrics


def kl_divergence(direction: str, draft_logprobs: jax.Array, target_logprobs: jax.Array) -> jax.Array:
    """KL(Q‖P) ("reverse") or KL(P‖Q) ("forward") over the last axis."""
    if direction == "reverse":
        return jnp.sum(jnp.exp(draft_logprobs) * (draft_logprobs - target_logprobs), axis=-1)
    return jnp.sum(jnp.exp(target_logprobs) * (target_logprobs - draft_logprobs), axis=-1)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where `mask` is set (or weighted by it, for a float mask), over all axes; 0 when
    the mask is empty. The denominator is at least 1, which only matters for weights summing below 1."""
    weight = mask.astype(jnp.float32)
    return jnp.sum(values * weight) / jnp.maximum(weight.sum(), 1.0)


def ppo_loss(trainable: dict, d2t: jax.Array, embed: jax.Array, data: Rollout, *, drafter: Eagle3Drafter,
             settings: PPOWSettings) -> tuple[jax.Array, dict]:
    """Clipped surrogate on the drafts' log-probs + β·KL to the target on the windows (+ the context
    anchor's β_c·KL at every response position), masked means -> (loss, metrics)."""
    params = {**trainable, "d2t": d2t}
    context = context_pass(drafter, params, embed, data.tokens, data.features)
    _, logprobs = draft_windows(drafter, params, embed, context, data.anchors, settings.window, forced=data.drafts)
    new = jnp.take_along_axis(tempered(logprobs, settings.rollout_temperature), data.drafts[..., None], axis=-1)[..., 0]
    ratio = jnp.exp(new - data.old_logprobs)
    advantage = data.advantages[..., None]
    eps = settings.clip_epsilon
    surrogate = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * advantage)
    policy_loss = -masked_mean(surrogate, data.policy_mask)
    kl_to_target = masked_mean(kl_divergence(settings.kl_direction, logprobs, data.target_logprobs), data.kl_mask)
    loss = policy_loss + settings.kl_beta * kl_to_target
    context_kl = jnp.zeros(())  # reported as 0 when the context anchor is off, as window_score without ADAW
    if settings.context_kl_beta > 0:
        context_logprobs = jax.nn.log_softmax(drafter.draft_logits(params, context.hidden), axis=-1)  # [B, L, N]
        context_kl = masked_mean(kl_divergence(settings.kl_direction, context_logprobs, data.context_target_logprobs),
                                 data.context_kl_mask)
        loss = loss + settings.context_kl_beta * context_kl
    return loss, {"loss": loss, "policy_loss": policy_loss, "kl_to_target": kl_to_target, "context_kl": context_kl,
                  "clip_fraction": masked_mean(jnp.abs(ratio - 1.0) > eps, data.policy_mask),
                  "approx_kl": masked_mean(data.old_logprobs - new, data.policy_mask)}


def ppo_update(state: TrainState, data: Rollout, target: PPOWTarget, key: jax.Array, *, drafter: Eagle3Drafter,
               settings: PPOWSettings, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict]:
    """`epochs` passes over the rollout in `minibatches` sequence splits, one `lax.scan`."""
    batch_size = data.tokens.shape[0]
    per_minibatch = batch_size // settings.minibatches
    orders = jnp.stack([jax.random.permutation(k, batch_size) for k in jax.random.split(key, settings.epochs)])
    orders = orders.reshape(settings.epochs * settings.minibatches, per_minibatch)
    grad_fn = jax.value_and_grad(functools.partial(ppo_loss, drafter=drafter, settings=settings), has_aux=True)
    d2t, embed = target.constants.d2t, target.constants.embed

    def minibatch_step(carry, rows):
        params, opt_state = carry
        minibatch = jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), data)
        (_, metrics), grads = grad_fn(params, d2t, embed, minibatch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {**metrics, "grad_norm": optax.tree.norm(grads)}

    (params, opt_state), metrics = jax.lax.scan(minibatch_step, (state.params, state.opt_state), orders)
    metrics = jax.tree_util.tree_map(jnp.mean, metrics)
    metrics["learning_rate"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ----- the exact estimator: the rollout's expectation in closed form -----
#
# Under greedy acceptance from the cache, a window is accepted up to draft j exactly when drafts
# 1..j are the data's next tokens, and the drafter's distribution for draft j+1 on that path is the
# "training-time test" forward's step j (`unrolled_hidden`, pinned to `draft_windows` by the tests).
# So what the sampled estimator averages over G windows per anchor has closed forms: P(k >= j) is a
# product of the policy's probabilities of the data's tokens, and the near-miss probability is a
# sum over the draft vocabulary. The policy term is then the G -> ∞ limit of the sampled one: group
# normalisation becomes E[(R - μ)/σ · ∇log π] = ∇μ/σ, with μ and σ the window reward's mean and
# spread at the anchor, divided, as `ppo_loss`'s mean over reached drafts, by the expected number of
# reached drafts. It has no rollout noise and reaches every valid anchor of every sequence. ADAW's
# priorities weight the anchors (the distribution of one draw; the sampled estimator's A distinct
# draws include anchors somewhat more evenly). PPO's ratio and clipping guard the reuse of stale
# samples; with no samples each batch takes one plain gradient step (G, A, epochs, minibatches and
# clip_epsilon are unused).

def to_draft_ids(token_ids: jax.Array, d2t: jax.Array, vocab_size: int) -> jax.Array:
    """Target ids [...] -> draft ids [...], -1 outside the draft vocabulary."""
    t2d = jnp.full((vocab_size,), -1, jnp.int32).at[d2t].set(jnp.arange(d2t.shape[0], dtype=jnp.int32))
    return jnp.take(t2d, token_ids)


def per_anchor(steps: jax.Array) -> jax.Array:
    """[K, B, L] values of unrolled step j at position i -> [B, L, K]: step j of the window anchored
    at a sits at position a + j (positions past the end read 0)."""
    return jnp.stack([jnp.pad(steps[j, :, j:], ((0, 0), (0, j))) for j in range(steps.shape[0])], axis=-1)


def path_acceptance(policy_logprobs: jax.Array, following: jax.Array) -> jax.Array:
    """The policy's unrolled log-probs [K, B, L, N] and the draft ids of the data's next tokens
    x_{i+1} [B, L] (-1 outside the draft vocabulary) -> [B, L, K]: at anchor a, the probability that
    draft j+1 is x_{a+j+1} (greedy acceptance) once drafts 1..j were."""
    chosen = jnp.take_along_axis(policy_logprobs, jnp.maximum(following, 0)[None, ..., None], axis=-1)[..., 0]
    return per_anchor(jnp.where(following[None] >= 0, jnp.exp(chosen), 0.0))


def near_miss_probability(first_policy_logprobs: jax.Array, target_logits: jax.Array, preferred_logit: jax.Array,
                          following: jax.Array, epsilon: float) -> jax.Array:
    """P(k = 0 and Δ < ε) at every anchor [B, L]: the first draft x ~ Q_τ is not the target's
    y = x_{a+1} and Δ = log p(y) - log p(x) < ε, the cache verifier's gap. The softmax's normaliser
    cancels in Δ, so it reads the target's logits over the draft vocabulary [B, L, N] and y's
    logit [B, L] (y may lie outside the draft vocabulary; `following` holds its draft id or -1)."""
    near = (preferred_logit[..., None] - target_logits) < epsilon
    not_preferred = jnp.arange(target_logits.shape[-1]) != following[..., None]
    return jnp.sum(jnp.exp(first_policy_logprobs) * (near & not_preferred), axis=-1)


def reward_moments(accept_probs: jax.Array, near_miss: jax.Array, settings: PPOWSettings) -> tuple[jax.Array, jax.Array]:
    """A window's reward R = R_speed(k) + R_dist over its distribution -> (mean μ, spread σ), [B, L] each.
    R takes R_speed(k) with P(k) for k >= 1, η with the near-miss probability, 0 otherwise."""
    s = settings
    lengths = accepted_length_distribution(accept_probs)  # [..., K + 1]
    values = speed_reward(jnp.arange(s.window + 1), s.gamma, s.cost_aware_reward)  # R_speed(0) = 0
    eta = s.proximity_eta if s.proximity_reward else 0.0
    mean = jnp.sum(lengths * values, axis=-1) + eta * near_miss
    variance = (jnp.sum(lengths[..., 1:] * (values[1:] - mean[..., None]) ** 2, axis=-1)
                + near_miss * (eta - mean) ** 2 + (lengths[..., 0] - near_miss) * mean ** 2)
    return mean, jnp.sqrt(jnp.maximum(variance, 0.0))


class ExactWindows(NamedTuple):
    """Every anchor's windows in closed form (`exact_windows`)."""

    logprobs: jax.Array  # [K, B, L, N] the drafter's unrolled log-probs (Q itself, not tempered)
    accept_probs: jax.Array  # [B, L, K] along the data path, under the policy Q_τ
    near_miss: jax.Array  # [B, L] P(k = 0 and Δ < ε); 0 when the proximity reward is off
    target_logprobs: jax.Array  # [B, L, N] P over the draft vocabulary, renormalised


def exact_windows(params: dict, target: PPOWTarget, batch: Batch, *, drafter: Eagle3Drafter,
                  settings: PPOWSettings) -> ExactWindows:
    """Every anchor's windows in closed form: the drafter's unrolled forward along the data, then
    `windows_from_logits`."""
    logits = unrolled_logits(params, target, batch, drafter=drafter, window=settings.window)
    return windows_from_logits(logits, target, batch, settings=settings)


def unrolled_logits(params: dict, target: PPOWTarget, batch: Batch, *, drafter: Eagle3Drafter,
                    window: int) -> jax.Array:
    """The drafter's "training-time test" forward along the data -> logits [K, B, L, N]."""
    hidden = unrolled_hidden(drafter, params, target.constants.embed, batch["tokens"], batch["features"], window)
    return drafter.draft_logits(params, hidden)


def windows_from_logits(logits: jax.Array, target: PPOWTarget, batch: Batch, *,
                        settings: PPOWSettings) -> ExactWindows:
    """The windows at every anchor from the drafter's unrolled logits [K, B, L, N]: its log-probs, the
    acceptance probabilities along the data under Q_τ, the near-miss probability and the target's
    log-probs (its own function, so that the windows can be differentiated with respect to the logits)."""
    s = settings
    d2t, tokens = target.constants.d2t, batch["tokens"]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    policy = tempered(logprobs, s.rollout_temperature)
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # x_{i+1} at position i
    following = to_draft_ids(next_tokens, d2t, target.head.shape[0])
    target_hidden = batch["target_hidden"].astype(jnp.float32)
    target_logits = target_hidden @ target.constants.head_rows.astype(jnp.float32).T  # [B, L, N]
    near_miss = jnp.zeros(tokens.shape)
    if s.proximity_reward:
        preferred = jnp.einsum("bld,bld->bl", target_hidden, jnp.take(target.head, next_tokens, axis=0).astype(jnp.float32))
        near_miss = near_miss_probability(policy[0], target_logits, preferred, following, s.proximity_epsilon)
    return ExactWindows(logprobs=logprobs, accept_probs=path_acceptance(policy, following), near_miss=near_miss,
                        target_logprobs=jax.nn.log_softmax(target_logits, axis=-1))


def exact_loss(trainable: dict, target: PPOWTarget, batch: Batch, *, drafter: Eagle3Drafter,
               settings: PPOWSettings, eps: float = 1e-6) -> tuple[jax.Array, dict]:
    """-(the sampled estimator's policy term in expectation) + β·E[KL to the target on the windows'
    verified positions] (+ the context anchor) -> (loss, metrics). See the section comment."""
    s = settings
    windows = exact_windows({**trainable, "d2t": target.constants.d2t}, target, batch, drafter=drafter, settings=s)
    logprobs, p = windows.logprobs, windows.target_logprobs
    mean, spread = reward_moments(windows.accept_probs, windows.near_miss, s)
    # P(k >= j), j = 0..K: j <= K - 1 are the drafts reached, where P is known and the policy term acts.
    reach = reach_probabilities(windows.accept_probs)
    reached = jax.lax.stop_gradient(reach[..., :-1])  # [B, L, K]

    # The anchors' sampling distribution (uniform, or ADAW's priorities) as weights; each row sums to 1.
    valid = valid_anchors(batch["loss_mask"], s.window)
    scores = None
    if s.adaw:
        scores = window_scores(p, logprobs[0], valid, s.window)
    weights = jax.lax.stop_gradient(anchor_priorities(valid, scores, s.priority_temperature, s.priority_floor))
    drafts_per_window = jnp.maximum(masked_mean(jnp.sum(reached, axis=-1), weights), eps)
    # μ minus itself held constant: the gradient ∇μ/σ, and the value 0, as the sampled surrogate's at ratio 1
    # (μ/σ itself would be huge where σ is nearly 0, and say nothing).
    advantage = (mean - jax.lax.stop_gradient(mean)) / (jax.lax.stop_gradient(spread) + eps)
    policy_loss = -masked_mean(advantage, weights) / drafts_per_window

    kl = per_anchor(kl_divergence(s.kl_direction, logprobs, p[None]))  # [B, L, K]
    kl_weights = weights[..., None] * reached
    kl_to_target = jnp.sum(kl * kl_weights) / jnp.maximum(jnp.sum(kl_weights), eps)
    loss = policy_loss + s.kl_beta * kl_to_target
    context_kl = jnp.zeros(())
    if s.context_kl_beta > 0:
        context_kl = masked_mean(kl_divergence(s.kl_direction, logprobs[0], p), batch["loss_mask"].astype(bool))
        loss = loss + s.context_kl_beta * context_kl
    return loss, {"loss": loss, "policy_loss": policy_loss, "kl_to_target": kl_to_target, "context_kl": context_kl,
                  "reward": masked_mean(mean, weights),
                  "accepted": masked_mean(jnp.sum(reach[..., 1:], axis=-1), weights),
                  "first_rejected": masked_mean(1.0 - windows.accept_probs[..., 0], weights),
                  "proximity_hits": masked_mean(windows.near_miss, weights),
                  "window_score": masked_mean(scores, weights) if scores is not None else jnp.zeros(()),
                  "anchors": jnp.sum(valid)}


def exact_update(state: TrainState, batch: Batch, target: PPOWTarget, *, drafter: Eagle3Drafter,
                 settings: PPOWSettings, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule) -> tuple[TrainState, dict]:
    """One gradient step on `exact_loss` for a batch of sequences."""
    return gradient_step(functools.partial(exact_loss, drafter=drafter, settings=settings), state, target, batch,
                         optimizer=optimizer, schedule=schedule)


class PPOWTrainer:
    """The sharded PPOW iteration for one drafter and target: `iteration(state, batch)`."""

    def __init__(self, drafter: Eagle3Drafter, target_config: ModelConfig, target_params: dict, d2t: np.ndarray,
                 settings: PPOWSettings, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                 mesh: Optional[Mesh] = None):
        self.drafter, self.settings, self.target_config = drafter, settings, target_config
        self.optimizer, self.schedule = optimizer, schedule
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        target = PPOWTarget.from_target(target_params, drafter.check_d2t(d2t))
        shardings = PPOWTarget(
            constants=TargetConstants(
                embed=sharding.named_sharding(self.mesh, sharding.PARAM_AXES["embed"], target.constants.embed.shape),
                head_rows=sharding.named_sharding(self.mesh, ("vocab", "embed"), target.constants.head_rows.shape),
                d2t=sharding.replicated(self.mesh)),
            head=sharding.named_sharding(self.mesh, ("vocab", "embed"), target.head.shape))
        self.target = multihost.put(target, shardings)
        self.target_shardings = shardings
        # The live target is only needed to verify with it.
        self.target_params = None
        if settings.verifier == "target":
            self.target_params = multihost.put(target_params, sharding.param_shardings(target_params, self.mesh))
        self._rollout_fn = self._update_fn = None

    def init_state(self, params: dict, key: jax.Array) -> TrainState:
        """The train state from drafter params (the token-level drafter PPOW starts from)."""
        trainable = {k: v for k, v in params.items() if k != "d2t"}
        trainable = multihost.put(trainable, sharding.param_shardings(trainable, self.mesh))
        return on_mesh(TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                  opt_state=jax.jit(self.optimizer.init)(trainable), rng=jax.random.key_data(key)),
                       self.mesh)

    def drafter_params(self, state: TrainState) -> dict:
        return {**state.params, "d2t": self.target.constants.d2t}

    def _compile(self, state: TrainState, batch: dict) -> None:
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        replicated = sharding.replicated(self.mesh)
        batch_sh = multihost.global_batch_shardings(self.mesh, batch)
        if self.settings.estimator == "exact":
            step = functools.partial(exact_update, drafter=self.drafter, settings=self.settings,
                                     optimizer=self.optimizer, schedule=self.schedule)
            self._update_fn = jax.jit(step, in_shardings=(state_sh, batch_sh, self.target_shardings),
                                      out_shardings=(state_sh, replicated), donate_argnums=(0,))
            return
        target_params_sh = None if self.target_params is None else \
            jax.tree_util.tree_map(lambda x: x.sharding, self.target_params)
        roll = functools.partial(rollout, drafter=self.drafter, settings=self.settings, target_config=self.target_config)
        self._rollout_fn = jax.jit(
            lambda params, target, batch, key, target_params: roll({**params, "d2t": target.constants.d2t}, target,
                                                                   batch, key, target_params),
            in_shardings=(state_sh.params, self.target_shardings, batch_sh, replicated, target_params_sh))
        update = functools.partial(ppo_update, drafter=self.drafter, settings=self.settings, optimizer=self.optimizer,
                                   schedule=self.schedule)
        self._update_fn = jax.jit(update, out_shardings=(state_sh, replicated), donate_argnums=(0,))

    def iteration(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
        exact = self.settings.estimator == "exact"
        sequences = multihost.global_batch_shape(batch["tokens"])[0]
        if not exact and sequences % self.settings.minibatches:
            raise InputError(f"{sequences} sequences per iteration do not split into "
                             f"{self.settings.minibatches} minibatches")
        if self._update_fn is None:
            self._compile(state, batch)
        batch = multihost.local_to_global(batch, self.mesh)
        if exact:  # no samples, so no randomness: one gradient step
            with jax.set_mesh(self.mesh):
                return self._update_fn(state, batch, self.target)
        rollout_key, update_key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng), 3)
        state = state.replace(rng=jax.random.key_data(next_key))
        with jax.set_mesh(self.mesh):
            data, rollout_metrics = self._rollout_fn(state.params, self.target, batch, rollout_key, self.target_params)
            state, update_metrics = self._update_fn(state, data, self.target, update_key)
        return state, {**rollout_metrics, **update_metrics}


# ----- the cost ratio γ and the calibrated confidence for adaptive windows -----

def measure_cost_ratio(drafter: Eagle3Drafter, drafter_params: dict, target_config: ModelConfig,
                       target_params: dict, window: int, *, context: int = 256, repeats: int = 9) -> float:
    """γ on this machine: a drafter step over a target verify pass of K+1 tokens (batch 1, each inside a
    jitted loop), from the cycle costs the engine's cost window measures."""
    costs = measure_cycle_costs(target_config, target_params, drafter, drafter_params, window, context=context,
                                repeats=repeats)
    return costs.draft / costs.verify[window]


def strided_anchors(loss_mask: jax.Array, window: int, stride: int,
                    span: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """Every `stride`-th position as an anchor -> (anchors [B, W], valid [B, W]); anchors too close to
    the end (invalid) are clamped. With `span`, only the `span` positions from each row's first valid
    anchor on are taken (W = ceil(span / stride)): a short answer after a long prompt then costs
    windows at its own positions only, not at every position of the sequence."""
    batch_size, seq = loss_mask.shape
    valid = valid_anchors(loss_mask, window)
    if span is None:
        positions = jnp.broadcast_to(jnp.arange(0, seq, stride, dtype=jnp.int32), (batch_size, -(-seq // stride)))
    else:
        first = jnp.argmax(valid, axis=-1).astype(jnp.int32)
        # Past the end, the last position: never a valid anchor, as its window would lie past the end.
        positions = jnp.minimum(first[:, None] + jnp.arange(0, span, stride, dtype=jnp.int32), seq - 1)
    return jnp.minimum(positions, seq - window - 1), jnp.take_along_axis(valid, positions, axis=-1)


def greedy_window_records(drafter: Eagle3Drafter, params: dict, target: PPOWTarget, batch: Batch,
                          window: int, stride: int = 1,
                          span: Optional[int] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy windows at every `stride`-th position as anchor (or, with `span`, at the `span`
    positions from each row's first valid anchor on), verified from the cache -> (features [B, W, K, 3]
    of each draft for the confidence model, accepted [B, W, K] whether it was accepted, reached
    [B, W, K] whether the anchor is valid and every draft before it was accepted)."""
    context = context_pass(drafter, params, target.constants.embed, batch["tokens"], batch["features"])
    anchors, valid = strided_anchors(batch["loss_mask"], window, stride, span)
    drafts, logprobs = draft_windows(drafter, params, target.constants.embed, context, anchors, window)
    verified = verify_from_cache(batch, target, anchors, drafts, window)
    offsets = jnp.arange(window)
    valid = valid[..., None]
    accepted = offsets < verified.accepted[..., None]
    reached = (offsets <= verified.accepted[..., None]) & valid
    features = calibration_features(logprobs, jnp.broadcast_to(offsets, logprobs.shape[:-1]))
    return features, accepted, reached


class AcceptanceCounts(NamedTuple):
    """Per-sequence sums of a held-out split's windows [S each]: the windows, their accepted drafts
    (expected, under sampling acceptance) and their accepted first drafts."""

    windows: np.ndarray
    accepted_drafts: np.ndarray
    first_accepted: np.ndarray

    def total_windows(self) -> int:
        """The split's window count; a split without windows has nothing to measure and is refused."""
        windows = int(self.windows.sum())
        if not windows:
            raise InputError("no valid windows to measure acceptance on: the sequences are too short")
        return windows

    def means(self) -> dict[str, float]:
        """-> mean accepted length per window and first-draft accept rate."""
        windows = self.total_windows()
        return {"accept_length": float(self.accepted_drafts.sum()) / windows,
                "first_accept": float(self.first_accepted.sum()) / windows}

    def accept_length_difference(self, baseline: "AcceptanceCounts") -> tuple[float, float]:
        """(this accept length minus the baseline's on the same windows, its standard error over
        sequences): windows of one sequence are correlated, so the sequence is the sampling unit
        (a ratio estimator's linearised variance)."""
        if not np.array_equal(self.windows, baseline.windows):
            raise InputError("accept lengths compare only on the same windows of the same sequences")
        total = self.total_windows()
        per_sequence = self.accepted_drafts - baseline.accepted_drafts
        difference = per_sequence.sum() / total
        residuals = per_sequence - difference * self.windows
        count = np.count_nonzero(self.windows)  # sequences too short for a window are not samples
        return float(difference), float(np.sqrt(count / max(count - 1, 1) * np.sum(residuals ** 2)) / total)


def _counts(batch_counts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> AcceptanceCounts:
    return AcceptanceCounts(*(np.concatenate(part) for part in zip(*batch_counts)))


def greedy_window_counts(accepted: np.ndarray, reached: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`greedy_window_records`' accepted and reached [B, W, K] -> per row [B each]: its valid windows,
    their accepted drafts and their accepted first drafts."""
    valid = reached[..., 0]
    return valid.sum(axis=-1), (accepted & reached).sum(axis=(-2, -1)), (accepted[..., 0] & valid).sum(axis=-1)


def greedy_acceptance(records, params: dict, target: PPOWTarget, batches) -> AcceptanceCounts:
    """How far the drafter's greedy windows get on some sequences (a held-out split: the learning
    curve of both training stages). `records` is `greedy_window_records` with the drafter, window
    and stride bound, jitted."""
    counts = []
    for batch in batches:
        _, accepted, reached = jax.device_get(records(params, target, batch))
        counts.append(greedy_window_counts(accepted, reached))
    return _counts(counts)


def sampled_window_records(drafter: Eagle3Drafter, params: dict, target: PPOWTarget, target_params: dict,
                           batch: Batch, key: jax.Array, *, target_config: ModelConfig, window: int,
                           stride: int = 1) -> tuple[jax.Array, jax.Array]:
    """Windows sampled from the drafter at T = 1 at every `stride`-th position, verified by the live
    target under lossless sampling acceptance (T = 1) -> (accept_probs [B, W, K]: each draft's
    acceptance probability once the drafts before it are accepted, valid [B, W])."""
    draft_key, verify_key = jax.random.split(key)
    context = context_pass(drafter, params, target.constants.embed, batch["tokens"], batch["features"])
    anchors, valid = strided_anchors(batch["loss_mask"], window, stride)
    drafts, logprobs = draft_windows(drafter, params, target.constants.embed, context, anchors, window,
                                     key=draft_key)
    verified = verify_with_target(target_config, target_params, target, batch["tokens"], anchors, drafts, logprobs,
                                  verify_key, "sampling")
    return verified.accept_probs, valid


def sampled_acceptance(records, params: dict, target: PPOWTarget, target_params: dict, batches,
                       key: jax.Array) -> AcceptanceCounts:
    """The T = 1 counterpart of `greedy_acceptance`: accepted drafts in expectation over the
    acceptance coins (the drafts are sampled with `key`, so the figure is deterministic for given
    weights). `records` is `sampled_window_records` with the drafter, target config, window and
    stride bound, jitted."""
    counts = []
    for batch, batch_key in zip(batches, jax.random.split(key, len(batches))):
        accept_probs, valid = jax.device_get(records(params, target, target_params, batch, batch_key))
        reach = np.cumprod(accept_probs.astype(np.float64), axis=-1)
        counts.append((valid.sum(axis=-1), np.where(valid, reach.sum(axis=-1), 0.0).sum(axis=-1),
                       np.where(valid, accept_probs[..., 0], 0.0).sum(axis=-1)))
    return _counts(counts)


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iterations: int = 25) -> np.ndarray:
    """Logistic regression by Newton's method: features [n, f], labels [n] -> weights [f + 1] (bias first)."""
    x = np.concatenate([np.ones((len(features), 1)), features.astype(np.float64)], axis=1)
    y = labels.astype(np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        gradient = x.T @ (p - y) + l2 * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        w = w - np.linalg.solve(hessian, gradient)
    return w


class NothingToCalibrate(InputError):
    """The calibration drafts are all accepted or all rejected (or there are none): no model to fit."""


def fit_window_calibration(drafter: Eagle3Drafter, params: dict, target: PPOWTarget, batches, window: int) -> dict:
    """Fits P(draft accepted | drafts before it accepted) from what the drafter knows (its top log-prob,
    its entropy, the step) on greedy windows; -> the `window_calibration` entry of a drafter description."""
    records = jax.jit(functools.partial(greedy_window_records, drafter, window=window))
    features, labels = [], []
    for batch in batches:
        f, accepted, reached = jax.device_get(records(params, target, batch))
        features.append(f[reached])
        labels.append(accepted[reached])
    if sum(len(part) for part in labels) == 0:
        raise NothingToCalibrate("the calibration batches hold no draft positions: raise calibration.batches")
    features, labels = np.concatenate(features), np.concatenate(labels)
    if labels.all():
        raise NothingToCalibrate(f"all {len(labels)} calibration drafts were accepted: raise calibration.window "
                                 "or calibration.batches")
    if not labels.any():
        raise NothingToCalibrate(f"all {len(labels)} calibration drafts were rejected: train the drafter further")
    weights = fit_logistic(features, labels)
    predicted = 1.0 / (1.0 + np.exp(-(weights[0] + features @ weights[1:])))
    return {"weights": [float(w) for w in weights], "features": ["bias", "top_logprob", "entropy", "step"],
            "drafts": int(len(labels)), "accept_rate": float(labels.mean()),
            "log_loss": float(-np.mean(labels * np.log(predicted + 1e-9) + (1 - labels) * np.log(1 - predicted + 1e-9)))}


def settings_from_config(ppow: Any, gamma: float) -> PPOWSettings:
    """`config.ppow` (ml-collections) and the γ in use -> settings."""
    return PPOWSettings(group_size=ppow.group_size, window=ppow.window, anchors_per_sequence=ppow.anchors_per_sequence,
                        clip_epsilon=ppow.clip_epsilon, kl_beta=ppow.kl_beta,
                        kl_direction=ppow.get("kl_direction", "reverse"), epochs=ppow.epochs,
                        minibatches=ppow.minibatches, gamma=gamma, cost_aware_reward=ppow.cost_aware_reward,
                        proximity_reward=ppow.proximity_reward, proximity_eta=ppow.proximity_eta,
                        proximity_epsilon=ppow.proximity_epsilon, adaw=ppow.adaw,
                        priority_temperature=ppow.priority_temperature, priority_floor=ppow.priority_floor,
                        verifier=ppow.verifier, acceptance=ppow.acceptance,
                        rollout_temperature=ppow.get("rollout_temperature", 1.0),
                        context_kl_beta=ppow.get("context_kl_beta", 0.0), estimator=ppow.get("estimator", "sampled"))
