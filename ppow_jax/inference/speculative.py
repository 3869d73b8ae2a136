"""Speculative decoding: draft a window, verify it in one target pass, accept losslessly.

One cycle (METHOD.md §1), all inside one `lax.while_loop` with static shapes:
  1. the drafter consumes the tokens it has not seen yet (1 or 2 per row) and then drafts up to
     K_max tokens; a window policy decides per row how many of them are proposed (the cost-aware
     policy may propose none), and the draft loop exits early once no row proposes more;
  2. the target scores [pending token, d_1 .. d_L] in one forward, L being the longest proposed
     window of the batch rounded up to one of a few static widths (`costs.verify_widths`: one
     `lax.switch` branch each, all compiled once), so a short window also costs a short verify pass;
  3. the longest acceptable prefix of the proposed drafts is kept (greedy: equal to the target's
     argmax; sampling: the Leviathan/Chen rejection rule), plus one target token (the correction
     at the first rejection, or a bonus token after a fully accepted window);
  4. caches roll back by resetting per-row lengths; nothing is copied.

A fixed window with branches (`WindowPolicy.branches`, greedy only) drafts a tree instead: each
draft at depth d - 1 gets the drafter's top b_d next drafts as children, every draft on its own
copy of the drafter's cache, so a level is one batched drafter step; the target verifies the whole
tree (`tree_layout`: level by level) in one pass under a tree attention mask; the deepest accepted
path is kept, and its keys and values are moved into the slots a single chain would have used, so
everything after acceptance is the chain's code.

Invariant between cycles: the target's cache holds every emitted token except the last one
(`pending`); the drafter's cache may lack more (an LM drafter the last accepted draft, a feature
drafter every token of the last window), which it consumes as a `Chunk` at the start of the next
cycle. Drafters plug in through `ppow_jax.drafters.interface.Drafter`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ppow_jax import sharding
from ppow_jax.drafters.interface import Chunk, DraftCache, Drafter, concat_features
from ppow_jax.errors import InputError
from ppow_jax.inference.autoregressive import bucket, pad_prompts
from ppow_jax.inference.costs import verify_widths
from ppow_jax.inference.sampling import SamplingParams, processed_logprobs, sample_tokens
from ppow_jax.inference.windows import WindowPolicy
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig


@flax.struct.dataclass
class SpecState:
    tokens: jax.Array  # [B, N] generated tokens
    num_generated: jax.Array  # [B]
    budget: jax.Array  # [B]
    done: jax.Array  # [B] bool
    pending: jax.Array  # [B] last emitted token, in neither cache yet
    chunk: Chunk  # what the drafter consumes first in the next cycle
    target_cache: llama.KVCache
    drafter_cache: DraftCache
    key: jax.Array
    cycles: jax.Array  # [B] verify passes run for each row
    empty_windows: jax.Array  # [B] of those, the ones that verified no draft (a plain decode step)
    accept_hist: jax.Array  # [K_max + 1] how many cycles accepted k = 0..K_max drafts (all rows)
    saw_nan: jax.Array  # [B] bool
    ignore_eos: jax.Array  # scalar bool


@dataclasses.dataclass
class SpeculativeResult:
    tokens: list[list[int]]
    finished_by_eos: list[bool]
    cycles: list[int]  # verify passes per row
    empty_windows: list[int]  # verify passes per row that verified no draft (cost window only)
    accept_hist: list[int]  # index k: cycles that accepted k drafts
    prefill_seconds: float
    decode_seconds: float

    @property
    def tau(self) -> float:
        """Mean acceptance length: tokens per verify pass (accepted drafts + 1), over all cycles."""
        cycles = sum(self.accept_hist)
        return sum((k + 1) * n for k, n in enumerate(self.accept_hist)) / cycles if cycles else float("nan")


def _leading_true(mask: jax.Array) -> jax.Array:
    """[B, K] bool -> [B] number of leading True values."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=-1), axis=-1)


def accept_greedy(drafts: jax.Array, window: jax.Array, target_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy acceptance -> (k accepted drafts [B], the target token after them [B])."""
    target_choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, K + 1]
    k_max = drafts.shape[1]
    proposed = jnp.arange(k_max)[None, :] < window[:, None]
    k = _leading_true((drafts == target_choice[:, :k_max]) & proposed)
    return k, jnp.take_along_axis(target_choice, k[:, None], axis=1)[:, 0]


def draft_acceptance_logprobs(drafts: jax.Array, draft_logprobs: jax.Array, target_logprobs: jax.Array) -> jax.Array:
    """log min(1, p_i(x_i) / q_i(x_i)) [B, K]: the log-probability that lossless speculative sampling
    accepts draft i once the drafts before it are accepted. drafts [B, K] were sampled from
    exp(draft_logprobs) [B, K, V]; target_logprobs [B, >= K, V]. A draft with q = 0 cannot have been
    sampled, and p = 0 rejects."""
    k_max = drafts.shape[1]
    p_draft = jnp.take_along_axis(target_logprobs[:, :k_max], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(draft_logprobs, drafts[..., None], axis=-1)[..., 0]
    return jnp.minimum(p_draft - q_draft, 0.0)


def accept_sampling(key: jax.Array, drafts: jax.Array, window: jax.Array, draft_logprobs: jax.Array,
                    target_logits: jax.Array, sampling: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    drafts [B, K] were sampled from exp(draft_logprobs) [B, K, V]; target_logits [B, K + 1, V].
    Draft i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the
    token is drawn from norm(max(0, p - q)); after a fully accepted window, from p (the bonus).
    Returns (k accepted drafts [B], the target token after them [B]).
    """
    accept_key, residual_key = jax.random.split(key)
    batch, k_max = drafts.shape
    target_logprobs = processed_logprobs(target_logits, sampling)  # the distribution plain sampling uses
    uniform = jax.random.uniform(accept_key, (batch, k_max))
    proposed = jnp.arange(k_max)[None, :] < window[:, None]
    accepted = (jnp.log(uniform) < draft_acceptance_logprobs(drafts, draft_logprobs, target_logprobs)) & proposed
    k = _leading_true(accepted)

    rows = jnp.arange(batch)
    p_next = jnp.exp(target_logprobs[rows, k])  # [B, V]
    q_next = jnp.exp(draft_logprobs[rows, jnp.minimum(k, k_max - 1)])
    residual = jnp.maximum(p_next - q_next, 0.0)
    # When p = q the residual is all zeros (rejection then has probability 0, but float rounding
    # can still get here): fall back to p instead of dividing by zero.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_next)
    bonus = (k >= window)[:, None]
    distribution = jnp.where(bonus, p_next, residual)
    token = jax.random.categorical(residual_key, jnp.log(distribution), axis=-1).astype(jnp.int32)
    return k, token


class TreeLayout(NamedTuple):
    """A static draft tree flattened level by level: [pending, depth 1's drafts, .., depth K's]; the
    children of a draft are contiguous, in the drafter's order (most likely first)."""

    branches: tuple[int, ...]  # children per draft at depths 1..K
    ancestors: np.ndarray  # [T, T] bool: token t attends to token u (its ancestors and itself)
    depths: np.ndarray  # [T] positions past the pending token's
    parents: np.ndarray  # [T] the token each one follows (0 for the pending token itself)
    paths: np.ndarray  # [T, K + 1] the path through each token: its ancestors, then first children to depth K


def tree_layout(branches: Sequence[int]) -> TreeLayout:
    """The tree in which each draft at depth d - 1 has `branches[d - 1]` children (d = 1..K)."""
    level_sizes = [1]
    for b in branches:
        level_sizes.append(level_sizes[-1] * b)
    offsets = np.cumsum([0] + level_sizes)
    size, k_max = int(offsets[-1]), len(branches)
    depths = np.zeros(size, np.int32)
    parents = np.zeros(size, np.int32)
    paths = np.zeros((size, k_max + 1), np.int32)
    for depth in range(1, k_max + 1):
        for i in range(level_sizes[depth]):
            node = offsets[depth] + i
            depths[node] = depth
            parents[node] = offsets[depth - 1] + i // branches[depth - 1]
    ancestors = np.zeros((size, size), bool)
    for node in range(size):
        up = node
        while True:  # the node, its ancestors and the pending token
            ancestors[node, up] = True
            paths[node, depths[up]] = up
            if up == 0:
                break
            up = parents[up]
        down, i = node, node - offsets[depths[node]]
        for depth in range(depths[node] + 1, k_max + 1):  # first children: the most likely continuation
            i *= branches[depth - 1]
            down = offsets[depth] + i
            paths[node, depth] = down
    return TreeLayout(tuple(branches), ancestors, depths, parents, paths)


def accept_greedy_tree(tree_tokens: jax.Array, target_logits: jax.Array,
                       layout: TreeLayout) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy acceptance of a tree: tree_tokens [B, T] laid out by `layout` (index 0, the pending token,
    is not checked), target_logits [B, T, V] -> (k accepted drafts [B], the target token after them [B],
    the kept path [B, K + 1] of indices among the T: the deepest accepted draft's, the first such draft
    on ties, so a tree never accepts less than its first path alone would)."""
    target_choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, T]
    matches = tree_tokens == target_choice[:, layout.parents]
    accepted = jnp.ones_like(matches)
    for depth in range(1, len(layout.branches) + 1):  # a draft is accepted if it matches and its parent is
        level = layout.depths == depth
        accepted = jnp.where(level[None], matches & accepted[:, layout.parents], accepted)
    size = tree_tokens.shape[1]
    rank = jnp.where(accepted, jnp.asarray(layout.depths) * size - jnp.arange(size), -1)
    deepest = jnp.argmax(rank, axis=1)
    k = jnp.asarray(layout.depths)[deepest]
    return k, jnp.take_along_axis(target_choice, deepest[:, None], axis=1)[:, 0], jnp.asarray(layout.paths)[deepest]


def _move_into_chain_slots(cache: llama.KVCache, base: jax.Array, order: jax.Array) -> llama.KVCache:
    """Moves the keys and values of the tree tokens `order` [B, K + 1] (indices among the T written
    from slot `base` [B]) to slots base .. base + K, where a single chain's would be."""
    batch, width = order.shape
    source = base[:, None] + order
    target = base[:, None] + jnp.arange(width)[None]

    def move(a: jax.Array) -> jax.Array:  # [B, KV, S, hd]
        moved = jnp.take_along_axis(a, source[:, None, :, None], axis=2)
        heads = jnp.arange(a.shape[1])[None, :, None]
        return a.at[jnp.arange(batch)[:, None, None], heads, target[:, None, :]].set(moved, mode="drop")

    return cache.replace(k=tuple(move(a) for a in cache.k), v=tuple(move(a) for a in cache.v))


def cache_margin(drafter: Drafter, window: WindowPolicy) -> int:
    """Cache positions a cycle may write past the last emitted token: the drafter's, or a tree's."""
    return max(drafter.cache_margin(window.k_max), window.tree_tokens if window.is_tree else 0)


class SpeculativeDecoder:
    """Batched speculative decoding of a target with any drafter on a device mesh."""

    def __init__(self, target_config: ModelConfig, target_params: llama.Params, drafter: Drafter,
                 drafter_params, *, eos_token_ids: Sequence[int], pad_token_id: int = 0,
                 mesh: Optional[Mesh] = None):
        if drafter.vocab_size != target_config.vocab_size:
            raise InputError(f"drafter vocabulary ({drafter.vocab_size} tokens) does not match the target's "
                             f"({target_config.vocab_size} tokens)")
        self.target_config, self.drafter = target_config, drafter
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        self.eos_token_ids = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
        self.pad_token_id = pad_token_id
        self.target_shardings = sharding.param_shardings(target_params, self.mesh)
        self.drafter_shardings = sharding.param_shardings(drafter_params, self.mesh)
        self.target_params = jax.device_put(target_params, self.target_shardings)
        self.drafter_params = jax.device_put(drafter_params, self.drafter_shardings)
        self._compiled: dict = {}

    def _state_shardings(self, state: SpecState) -> SpecState:
        by_batch = lambda a: sharding.batch_sharding(self.mesh, a.shape)
        replicated = sharding.replicated(self.mesh)
        batch_fields = {f.name: by_batch(getattr(state, f.name)) for f in dataclasses.fields(state)
                        if f.name not in ("chunk", "target_cache", "drafter_cache", "key", "accept_hist", "ignore_eos")}
        return SpecState(**batch_fields, chunk=jax.tree_util.tree_map(by_batch, state.chunk),
                         target_cache=sharding.cache_shardings(state.target_cache, self.mesh),
                         drafter_cache=DraftCache(kv=sharding.cache_shardings(state.drafter_cache.kv, self.mesh),
                                                  hidden=by_batch(state.drafter_cache.hidden)),
                         key=replicated, accept_hist=replicated, ignore_eos=replicated)

    def _start(self, target_params, drafter_params, tokens, lengths, budget, rng, ignore_eos, *, cache_len: int,
               buffer: int, sampling: SamplingParams, k_max: int) -> SpecState:
        """Prefills both models on the prompts and samples the first token from the target."""
        batch = tokens.shape[0]
        drafter = self.drafter
        target = llama.prefill(target_params, tokens, cache_len, self.target_config, num_valid=lengths,
                               hidden_layers=drafter.feature_layers)
        features = concat_features(target.hidden_states)
        _, drafter_cache = drafter.prefill(drafter_params, target_params, drafter.init_cache(batch, cache_len),
                                           tokens, lengths, features)
        rng, first_key = jax.random.split(rng)
        first = sample_tokens(first_key, target.logits, sampling)
        saw_nan = jnp.any(jnp.isnan(target.logits), axis=-1)
        hit_eos = jnp.any(first[:, None] == self.eos_token_ids[None], axis=-1) & ~ignore_eos
        return SpecState(
            tokens=jnp.full((batch, buffer), self.pad_token_id, jnp.int32).at[:, 0].set(first),
            num_generated=jnp.ones((batch,), jnp.int32), budget=budget,
            done=hit_eos | (budget <= 1) | saw_nan, pending=first,
            chunk=drafter.start_chunk(first, features, lengths, self.pad_token_id, k_max),
            target_cache=target.cache, drafter_cache=drafter_cache, key=rng, cycles=jnp.zeros((batch,), jnp.int32),
            empty_windows=jnp.zeros((batch,), jnp.int32),
            accept_hist=jnp.zeros((k_max + 1,), jnp.int32), saw_nan=saw_nan, ignore_eos=ignore_eos)

    def _start_fn(self, batch: int, prompt_len: int, cache_len: int, buffer: int, sampling: SamplingParams,
                  k_max: int):
        key = ("start", batch, prompt_len, cache_len, buffer, sampling, k_max)
        if key not in self._compiled:
            start = functools.partial(self._start, cache_len=cache_len, buffer=buffer, sampling=sampling,
                                      k_max=k_max)
            by_batch = lambda *shape: sharding.batch_sharding(self.mesh, (batch, *shape))
            replicated = sharding.replicated(self.mesh)
            abstract = jax.eval_shape(start, self.target_params, self.drafter_params,
                                      jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
                                      jax.ShapeDtypeStruct((batch,), jnp.int32),
                                      jax.ShapeDtypeStruct((batch,), jnp.int32), jax.random.key(0),
                                      jax.ShapeDtypeStruct((), bool))
            self._compiled[key] = jax.jit(
                start, in_shardings=(self.target_shardings, self.drafter_shardings, by_batch(prompt_len), by_batch(),
                                     by_batch(), replicated, replicated),
                out_shardings=self._state_shardings(abstract))
        return self._compiled[key]

    def _loop_fn(self, state: SpecState, sampling: SamplingParams, window: WindowPolicy):
        key = ("loop", state.tokens.shape, state.target_cache.max_len, sampling, window)
        if key not in self._compiled:
            state_sh = self._state_shardings(state)
            loop = functools.partial(_speculative_loop, target_config=self.target_config, drafter=self.drafter,
                                     sampling=sampling, window=window, eos_token_ids=self.eos_token_ids,
                                     pad_token_id=self.pad_token_id)
            self._compiled[key] = jax.jit(loop, in_shardings=(self.target_shardings, self.drafter_shardings, state_sh),
                                          out_shardings=state_sh, donate_argnums=(2,))
        return self._compiled[key]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), window: WindowPolicy = WindowPolicy(), *,
                 seed: int = 0, ignore_eos: bool = False) -> SpeculativeResult:
        if window.needs_costs:
            raise InputError("the cost window needs this machine's cycle costs: measure them with "
                             "ppow_jax.inference.costs.measure_cycle_costs (the CLIs' --cycle-costs auto does)")
        window.check_sampling(sampling.greedy)
        # The caches must hold a whole cycle's writes past the last emitted token.
        tokens, lengths, cache_len = pad_prompts(self.target_config, prompts, max_new_tokens, self.pad_token_id,
                                                 extra_cache=cache_margin(self.drafter, window))
        batch = tokens.shape[0]
        start_fn = self._start_fn(batch, tokens.shape[1], cache_len, bucket(max_new_tokens), sampling, window.k_max)
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            state = start_fn(self.target_params, self.drafter_params, tokens, lengths,
                             np.full((batch,), max_new_tokens, np.int32), jax.random.key(seed), np.asarray(ignore_eos))
            jax.block_until_ready(state)
            prefill_seconds = time.perf_counter() - start
            start = time.perf_counter()
            state = self._loop_fn(state, sampling, window)(self.target_params, self.drafter_params, state)
            jax.block_until_ready(state)
        decode_seconds = time.perf_counter() - start
        if bool(jnp.any(state.saw_nan)):
            rows = np.flatnonzero(np.asarray(state.saw_nan)).tolist()
            raise FloatingPointError(f"NaN logits in rows {rows}; no token was sampled from them")
        out, counts, cycles, empty, hist = jax.device_get((state.tokens, state.num_generated, state.cycles,
                                                           state.empty_windows, state.accept_hist))
        rows = [row[:n].tolist() for row, n in zip(out, counts)]
        eos = set(np.asarray(self.eos_token_ids).tolist())
        return SpeculativeResult(tokens=rows, finished_by_eos=[bool(r) and r[-1] in eos and not ignore_eos for r in rows],
                                 cycles=cycles.tolist(), empty_windows=empty.tolist(), accept_hist=hist.tolist(),
                                 prefill_seconds=prefill_seconds, decode_seconds=decode_seconds)


def _draft(drafter: Drafter, drafter_params, target_params, state: SpecState, key: jax.Array, *,
           sampling: SamplingParams, window: WindowPolicy):
    """Runs the drafter: consume the pending chunk, then draft up to K_max tokens.

    Returns (drafts [B, K], draft_logprobs [B, K, V] or None for greedy, window [B], steps run,
    drafter cache whose lengths still count every drafted token).
    """
    batch, k_max = state.pending.shape[0], window.k_max
    logits, cache = drafter.consume(drafter_params, target_params, state.drafter_cache, state.chunk)
    keys = jax.random.split(key, k_max)
    keep_logprobs = not sampling.greedy

    def propose(step, logits):
        if sampling.greedy:
            logprobs = jax.nn.log_softmax(logits, axis=-1)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            logprobs = processed_logprobs(logits, sampling)
            token = jax.random.categorical(keys[step], logprobs, axis=-1).astype(jnp.int32)
        return token, logprobs

    token, logprobs = propose(0, logits)
    window_state = window.init(batch)
    proposing, window_state = window.keep_drafting(0, logprobs, window_state)
    proposing = proposing & ~state.done
    drafts = jnp.zeros((batch, k_max), jnp.int32).at[:, 0].set(token)
    draft_logprobs = (jnp.zeros((batch, k_max, logprobs.shape[-1]), jnp.float32).at[:, 0].set(logprobs)
                      if keep_logprobs else jnp.zeros((batch, k_max, 0), jnp.float32))
    carry = (jnp.ones((), jnp.int32), cache, drafts, draft_logprobs, proposing, proposing.astype(jnp.int32),
             window_state)

    def cond(c):
        step, _, _, _, proposing, _, _ = c
        return (step < k_max) & jnp.any(proposing)

    def body(c):
        step, cache, drafts, draft_logprobs, proposing, window_len, window_state = c
        previous = jax.lax.dynamic_index_in_dim(drafts, step - 1, axis=1, keepdims=False)
        logits, cache = drafter.step(drafter_params, target_params, cache, previous)
        token, logprobs = propose(step, logits)
        drafts = drafts.at[:, step].set(token)
        if keep_logprobs:
            draft_logprobs = draft_logprobs.at[:, step].set(logprobs)
        keep, window_state = window.keep_drafting(step, logprobs, window_state)
        proposing = proposing & keep
        return (step + 1, cache, drafts, draft_logprobs, proposing, window_len + proposing.astype(jnp.int32),
                window_state)

    steps, cache, drafts, draft_logprobs, _, window_len, _ = jax.lax.while_loop(cond, body, carry)
    return drafts, (draft_logprobs if keep_logprobs else None), window_len, steps, cache


def _verify(target_params, verify_tokens: jax.Array, cache: llama.KVCache, window_len: jax.Array,
            active: jax.Array, widths: tuple[int, ...], *, target_config: ModelConfig,
            feature_layers: tuple[int, ...]):
    """The target's pass over [pending, d_1 .. d_L] at the smallest of `widths` (ascending, the last
    K + 1) that holds every row's window -> (logits [B, K + 1, V], hidden states [n, B, K + 1, D] or
    None, cache), zero-padded past that width (acceptance never reads there: a row accepts at most
    its window)."""
    k_max = verify_tokens.shape[1] - 1

    def at_width(width: int):
        def run(cache: llama.KVCache):
            out = llama.forward(target_params, verify_tokens[:, :width], cache, target_config,
                                num_valid=jnp.where(active, width, 0), hidden_layers=feature_layers)
            pad = k_max + 1 - width
            logits = jnp.pad(out.logits, ((0, 0), (0, pad), (0, 0)))
            hidden = None if out.hidden_states is None else jnp.pad(out.hidden_states,
                                                                    ((0, 0), (0, 0), (0, pad), (0, 0)))
            return logits, hidden, out.cache
        return run

    if len(widths) == 1:
        return at_width(widths[0])(cache)
    branch = jnp.searchsorted(jnp.asarray(widths), jnp.max(window_len) + 1)
    return jax.lax.switch(branch, [at_width(w) for w in widths], cache)


class _Verified(NamedTuple):
    """One cycle up to acceptance, as the rest of the cycle reads it (a tree's kept chain only)."""

    drafts: jax.Array  # [B, K]
    window_len: jax.Array  # [B] drafts proposed (0 for done rows)
    steps: jax.Array  # drafts made, as `Drafter.after_verify` reads it
    drafter_cache: DraftCache
    accepted: jax.Array  # [B]
    next_token: jax.Array  # [B] the target's token after the accepted drafts
    verify_features: Optional[jax.Array]  # [B, K + 1, F] the target's features for [pending, drafts]
    target_cache: llama.KVCache  # lengths not yet rolled back
    saw_nan: jax.Array  # [B]


def _chain_cycle(target_params, drafter_params, s: SpecState, draft_key: jax.Array, accept_key: jax.Array, *,
                 target_config: ModelConfig, drafter: Drafter, sampling: SamplingParams,
                 window: WindowPolicy) -> _Verified:
    """Draft one chain under the window policy, verify it, accept its longest acceptable prefix."""
    active = ~s.done
    k_max = window.k_max
    drafts, draft_logprobs, window_len, steps, drafter_cache = _draft(
        drafter, drafter_params, target_params, s, draft_key, sampling=sampling, window=window)
    window_len = jnp.where(active, window_len, 0)
    verify_tokens = jnp.concatenate([s.pending[:, None], drafts], axis=1)  # [B, K + 1]
    # A fixed window always fills K_max + 1 positions: one width, no switch.
    widths = (k_max + 1,) if window.kind == "fixed" else verify_widths(k_max)
    logits, hidden_states, target_cache = _verify(target_params, verify_tokens, s.target_cache, window_len,
                                                  active, widths, target_config=target_config,
                                                  feature_layers=drafter.feature_layers)
    saw_nan = jnp.any(jnp.isnan(logits), axis=(1, 2)) & active
    if sampling.greedy:
        k, next_token = accept_greedy(drafts, window_len, logits)
    else:
        k, next_token = accept_sampling(accept_key, drafts, window_len, draft_logprobs, logits, sampling)
    return _Verified(drafts, window_len, steps, drafter_cache, k, next_token, concat_features(hidden_states),
                     target_cache, saw_nan)


def _tree_cycle(target_params, drafter_params, s: SpecState, draft_key: jax.Array, accept_key: jax.Array, *,
                target_config: ModelConfig, drafter: Drafter, sampling: SamplingParams,
                window: WindowPolicy) -> _Verified:
    """Draft the window's tree greedily, verify it in one target pass, keep the deepest accepted path."""
    del draft_key, accept_key, sampling  # greedy only: `SpeculativeDecoder.generate` refuses sampling
    active = ~s.done
    batch, k_max = s.pending.shape[0], window.k_max
    layout = tree_layout(window.branches)
    logits, cache = drafter.consume(drafter_params, target_params, s.drafter_cache, s.chunk)
    levels = []
    for depth, children in enumerate(window.branches, start=1):
        # Row (b, i) of the level above becomes rows (b, i, c): draft i's top `children` next drafts,
        # each stepped on its own copy of i's drafter cache (the last level is not stepped).
        level = jax.lax.top_k(logits, children)[1].astype(jnp.int32).reshape(batch, -1)
        levels.append(level)
        if depth < k_max:
            cache = jax.tree_util.tree_map(lambda a: jnp.repeat(a, children, axis=0), cache)
            logits, cache = drafter.step(drafter_params, target_params, cache, level.reshape(-1))

    tree_tokens = jnp.concatenate([s.pending[:, None], *levels], axis=1)  # [B, T]
    out = llama.forward(target_params, tree_tokens, s.target_cache, target_config,
                        positions=s.target_cache.lengths[:, None] + jnp.asarray(layout.depths)[None],
                        num_valid=jnp.where(active, tree_tokens.shape[1], 0),
                        hidden_layers=drafter.feature_layers, tree_ancestors=layout.ancestors)
    saw_nan = jnp.any(jnp.isnan(out.logits), axis=(1, 2)) & active
    k, next_token, path = accept_greedy_tree(tree_tokens, out.logits, layout)
    features = concat_features(out.hidden_states)
    if features is not None:
        features = jnp.take_along_axis(features, path[:, :, None], axis=1)
    # The cache copy of the kept path's draft at depth K - 1 holds the drafter's run along the path.
    copy = path[:, k_max - 1] - int(np.sum(layout.depths < k_max - 1))  # its index within its level
    copies = cache.kv.lengths.shape[0] // batch
    kept_cache = jax.tree_util.tree_map(
        lambda a: a.reshape(batch, copies, *a.shape[1:])[jnp.arange(batch), copy], cache)
    return _Verified(jnp.take_along_axis(tree_tokens, path[:, 1:], axis=1), jnp.where(active, k_max, 0),
                     jnp.asarray(k_max, jnp.int32), kept_cache, k, next_token, features,
                     _move_into_chain_slots(out.cache, s.target_cache.lengths, path), saw_nan)


def _speculative_loop(target_params, drafter_params, state: SpecState, *, target_config: ModelConfig,
                      drafter: Drafter, sampling: SamplingParams, window: WindowPolicy,
                      eos_token_ids: jax.Array, pad_token_id: int) -> SpecState:
    k_max = window.k_max

    def cond(s: SpecState):
        return ~jnp.all(s.done)

    def body(s: SpecState) -> SpecState:
        key, draft_key, accept_key = jax.random.split(s.key, 3)
        active = ~s.done
        batch = active.shape[0]
        cycle = _tree_cycle if window.is_tree else _chain_cycle
        drafts, window_len, steps, drafter_cache, k, next_token, verify_features, target_cache, saw_nan = cycle(
            target_params, drafter_params, s, draft_key, accept_key, target_config=target_config, drafter=drafter,
            sampling=sampling, window=window)

        # Emit d_1..d_k and the target token, cut at the first EOS and at the row's budget.
        positions = jnp.arange(k_max + 1)[None, :]
        emitted = jnp.where(positions < k[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
        is_eos = jnp.any(emitted[..., None] == eos_token_ids, axis=-1) & (positions <= k[:, None]) & ~s.ignore_eos
        first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), k_max + 1)
        count = jnp.minimum(jnp.minimum(k + 1, first_eos + 1), s.budget - s.num_generated)
        count = jnp.where(active & ~saw_nan, count, 0)
        slots = jnp.where(positions < count[:, None], s.num_generated[:, None] + positions, s.tokens.shape[1])
        tokens = s.tokens.at[jnp.arange(batch)[:, None], slots].set(emitted, mode="drop")
        num_generated = s.num_generated + count
        done = s.done | saw_nan | (first_eos < count) | (num_generated >= s.budget)

        # Roll back: the target keeps pending + k drafts; the drafter decides what it keeps.
        target_lengths = s.target_cache.lengths + jnp.where(active, 1 + k, 0)
        drafter_cache, chunk = drafter.after_verify(
            s.drafter_cache, drafter_cache, s.chunk, drafts, k, steps, next_token,
            verify_features, active, pad_token_id)
        hist = s.accept_hist + jnp.zeros((k_max + 1,), jnp.int32).at[k].add(active.astype(jnp.int32))
        return s.replace(
            tokens=tokens, num_generated=num_generated, done=done, pending=next_token, chunk=chunk,
            target_cache=target_cache.replace(lengths=target_lengths), drafter_cache=drafter_cache, key=key,
            cycles=s.cycles + active.astype(jnp.int32),
            empty_windows=s.empty_windows + (active & (window_len == 0)).astype(jnp.int32), accept_hist=hist, saw_nan=s.saw_nan | saw_nan)

    return jax.lax.while_loop(cond, body, state)
