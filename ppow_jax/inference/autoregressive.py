"""Plain autoregressive generation: a jitted prefill and a `lax.while_loop` decode.

Shapes are bucketed (prompt length, cache size, output buffer) so that prompts whose lengths
fall in the same bucket reuse one compiled program, and nothing recompiles from step to step:
every per-row quantity (lengths, token counts, done flags, budgets) is an array.

`generate_continuously` keeps a fixed set of rows (slots) busy over a stream of prompts: when
some rows finish, the loop returns to the host, which hands their answers back and prefills new
prompts into those rows. A batch no longer waits for its longest answer (self-distillation:
about 73% of row steps did useful work at a mean of 186 of 256 tokens). Each row then samples
with its own key, so a prompt's answer does not depend on which prompts shared the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Callable, Hashable, Iterable, Iterator, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ppow_jax import sharding
from ppow_jax.errors import InputError
from ppow_jax.inference.sampling import SamplingParams, sample_tokens
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@flax.struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B, N] generated tokens (pad after each row's end)
    num_generated: jax.Array  # [B] int32
    budget: jax.Array  # [B] int32: max new tokens for each row
    done: jax.Array  # [B] bool: row hit EOS or its budget
    next_logits: jax.Array  # [B, V] float32 logits for the next token of each row
    saw_nan: jax.Array  # [B] bool: a NaN reached the logits (reported, never sampled silently)
    cache: llama.KVCache
    key: jax.Array  # one key for the batch (split every step), or [B] keys, one per row (folded with its step)
    step: jax.Array  # scalar int32


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt of a stream (`generate_continuously`); its samples are drawn with the key
    `fold_in(key(seed), stream)`, whatever else is in the batch. When sampling, every request of a
    stream needs its own (seed, stream) pair: requests that shared one would draw alike."""

    id: Hashable
    prompt: Sequence[int]
    seed: int = 0
    stream: int = 0


@dataclasses.dataclass(frozen=True)
class Answer:
    request: Request
    tokens: list[int]  # EOS included when it was produced
    finished_by_eos: bool


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, EOS included when it was produced
    finished_by_eos: list[bool]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class AutoregressiveDecoder:
    """Batched autoregressive decoding of one model on a device mesh (default: one device)."""

    def __init__(self, config: ModelConfig, params: llama.Params, *, eos_token_ids: Sequence[int],
                 pad_token_id: int = 0, mesh: Optional[Mesh] = None):
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        self.eos_token_ids = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
        self.pad_token_id = pad_token_id
        self.param_shardings = sharding.param_shardings(params, self.mesh)
        self.params = jax.device_put(params, self.param_shardings)
        self._prefill_fns: dict = {}
        self._decode_fns: dict = {}
        self._admit_fns: dict = {}

    # ----- compiled pieces (cached per static signature) -----

    def _state_shardings(self, state: DecodeState) -> DecodeState:
        by_batch = lambda a: sharding.batch_sharding(self.mesh, a.shape)
        return DecodeState(
            tokens=by_batch(state.tokens), num_generated=by_batch(state.num_generated),
            budget=by_batch(state.budget), done=by_batch(state.done), next_logits=by_batch(state.next_logits),
            saw_nan=by_batch(state.saw_nan), cache=sharding.cache_shardings(state.cache, self.mesh),
            key=by_batch(state.key) if state.key.ndim else sharding.replicated(self.mesh),
            step=sharding.replicated(self.mesh))

    def _prefill_fn(self, batch: int, prompt_len: int, cache_len: int):
        key = (batch, prompt_len, cache_len)
        if key not in self._prefill_fns:
            config = self.config
            cache_sh = sharding.cache_shardings(jax.eval_shape(
                lambda: llama.init_cache(config, batch, cache_len)), self.mesh)
            tokens_sh = sharding.batch_sharding(self.mesh, (batch, prompt_len))
            lengths_sh = sharding.batch_sharding(self.mesh, (batch,))

            def prefill(params, tokens, prompt_lengths):
                out = llama.prefill(params, tokens, cache_len, config, num_valid=prompt_lengths)
                return out.logits, out.cache

            self._prefill_fns[key] = jax.jit(
                prefill, in_shardings=(self.param_shardings, tokens_sh, lengths_sh),
                out_shardings=(sharding.batch_sharding(self.mesh, (batch, config.vocab_size)), cache_sh))
        return self._prefill_fns[key]

    def _decode_fn(self, state: DecodeState, sampling: SamplingParams):
        key = (state.tokens.shape, state.cache.max_len, state.key.ndim, sampling)
        if key not in self._decode_fns:
            state_sh = self._state_shardings(state)
            self._decode_fns[key] = jax.jit(
                functools.partial(_decode_loop, config=self.config, sampling=sampling,
                                  eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id),
                in_shardings=(self.param_shardings, state_sh, None), out_shardings=state_sh,
                donate_argnums=(1,))
        return self._decode_fns[key]

    # ----- public API -----

    def prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Validates prompts and pads them into a [B, bucket] array; returns (tokens, lengths, cache_len)."""
        return pad_prompts(self.config, prompts, max_new_tokens, self.pad_token_id)

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, cache_len: int):
        fn = self._prefill_fn(tokens.shape[0], tokens.shape[1], cache_len)
        with jax.set_mesh(self.mesh):
            return fn(self.params, tokens, lengths)

    def init_state(self, next_logits: jax.Array, cache: llama.KVCache, max_new_tokens: int, seed: int) -> DecodeState:
        batch = next_logits.shape[0]
        buffer = bucket(max_new_tokens)
        state = DecodeState(
            tokens=jnp.full((batch, buffer), self.pad_token_id, jnp.int32),
            num_generated=jnp.zeros((batch,), jnp.int32), budget=jnp.full((batch,), max_new_tokens, jnp.int32),
            done=jnp.zeros((batch,), bool), next_logits=next_logits, saw_nan=jnp.zeros((batch,), bool),
            cache=cache, key=jax.random.key(seed), step=jnp.zeros((), jnp.int32))
        return jax.device_put(state, self._state_shardings(state))

    def decode(self, state: DecodeState, sampling: SamplingParams, max_steps: int, *,
               ignore_eos: bool = False, until_done: Optional[int] = None) -> DecodeState:
        """Runs up to `max_steps` more decode steps, stopping early once `until_done` rows (default:
        every row) are done."""
        fn = self._decode_fn(state, sampling)
        rows = state.tokens.shape[0]
        limit = jnp.asarray([int(state.step) + max_steps, int(ignore_eos), rows if until_done is None else until_done],
                            jnp.int32)
        with jax.set_mesh(self.mesh):
            return fn(self.params, state, limit)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), *, seed: int = 0, ignore_eos: bool = False,
                 on_tokens: Optional[Callable[[list[list[int]]], None]] = None,
                 stream_every: int = 8) -> GenerationResult:
        """Generates up to `max_new_tokens` per prompt.

        `on_tokens`, when given, is called with every row's tokens so far after each chunk of
        `stream_every` steps (streaming); the chunks reuse one compiled loop.
        """
        tokens, lengths, cache_len = self.prepare(prompts, max_new_tokens)
        start = time.perf_counter()
        next_logits, cache = self.prefill(tokens, lengths, cache_len)
        next_logits.block_until_ready()
        prefill_seconds = time.perf_counter() - start
        state = self.init_state(next_logits, cache, max_new_tokens, seed)
        start = time.perf_counter()
        chunk = stream_every if on_tokens is not None else max_new_tokens
        while True:
            state = self.decode(state, sampling, chunk, ignore_eos=ignore_eos)
            finished = bool(jnp.all(state.done))
            if on_tokens is not None:
                on_tokens(_rows(state))
            if finished:
                break
        decode_seconds = time.perf_counter() - start
        if bool(jnp.any(state.saw_nan)):
            rows = np.flatnonzero(np.asarray(state.saw_nan)).tolist()
            raise FloatingPointError(f"the model produced NaN logits in rows {rows}; no token was sampled from them")
        rows = _rows(state)
        return GenerationResult(tokens=rows, finished_by_eos=[bool(r) and r[-1] in self._eos_set and not ignore_eos
                                                              for r in rows],
                                prefill_seconds=prefill_seconds, decode_seconds=decode_seconds)

    def generate_continuously(self, requests: Iterable[Request], max_new_tokens: int,
                              sampling: SamplingParams = SamplingParams(), *, max_prompt_len: int, slots: int,
                              refill: int = 0, ignore_eos: bool = False) -> Iterator[Answer]:
        """Answers a stream of requests with `slots` rows, yielding each answer as it finishes (not
        in request order).

        The decode loop hands control back once `refill` busy rows (default a sixteenth of the slots,
        at least 1) are done; their answers are yielded and that many new prompts are prefilled
        together into them. Small groups keep rows busiest: on a 2-core CPU with 32 slots, refill 1-2
        kept 91-93% of row-steps useful and refill 4 89% (BENCHMARKS.md, "Continuous batching"). One
        compiled decode loop serves the whole stream, and one prefill per prompt-length bucket. Every
        prompt must have at most `max_prompt_len` tokens.
        """
        if slots < 1:
            raise InputError(f"slots must be >= 1, got {slots}")
        if refill < 0:
            raise InputError(f"refill must be >= 0 (0: a sixteenth of the slots), got {refill}")
        # A whole number of prefill rows per device of the batch axis, or the prefill runs whole on each.
        per_device = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        refill = min(-(-(refill or max(1, slots // 16)) // per_device) * per_device, slots)
        if max_prompt_len < 1:
            raise InputError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        _check_fits(self.config, max_prompt_len, max_new_tokens)
        # Every row must fit the longest prompt and its answer. Rounded up to a multiple of 16 rather than
        # a power of two: attention reads every slot of every row at every step.
        cache_len = max(bucket(max_prompt_len), -(-(max_prompt_len + max_new_tokens) // MIN_BUCKET) * MIN_BUCKET)
        state = self._idle_state(slots, cache_len, max_new_tokens)
        occupants: list[Optional[Request]] = [None] * slots
        pending = _checked_requests(requests, sampling, max_prompt_len)
        exhausted = False
        while True:
            free = [row for row, request in enumerate(occupants) if request is None]
            while free and not exhausted:
                wanted = min(refill, len(free))
                group = list(itertools.islice(pending, wanted))
                exhausted = len(group) < wanted
                if group:
                    rows, free = free[:len(group)], free[len(group):]
                    state = self._admit(state, rows, group, refill, max_new_tokens)
                    for row, request in zip(rows, group):
                        occupants[row] = request
            busy = slots - len(free)
            if not busy:
                return
            until_done = len(free) + (busy if exhausted else min(refill, busy))
            state = self.decode(state, sampling, max_new_tokens, ignore_eos=ignore_eos, until_done=until_done)
            done, saw_nan, generated, counts = jax.device_get(
                (state.done, state.saw_nan, state.tokens, state.num_generated))  # one transfer per round
            if bad := [occupants[row].id for row in np.flatnonzero(saw_nan) if occupants[row] is not None]:
                raise FloatingPointError(f"the model produced NaN logits for requests {bad}; no token was sampled "
                                         "from them")
            for row in [row for row in np.flatnonzero(done) if occupants[row] is not None]:
                tokens = generated[row, :counts[row]].tolist()
                eos = bool(tokens) and tokens[-1] in self._eos_set and not ignore_eos
                yield Answer(occupants[row], tokens, eos)
                occupants[row] = None

    @functools.cached_property
    def _eos_set(self) -> set[int]:
        return set(np.asarray(self.eos_token_ids).tolist())

    def _idle_state(self, slots: int, cache_len: int, max_new_tokens: int) -> DecodeState:
        """Every row done and empty, one key per row."""
        cache = llama.init_cache(self.config, slots, cache_len)
        state = DecodeState(
            tokens=jnp.full((slots, bucket(max_new_tokens)), self.pad_token_id, jnp.int32),
            num_generated=jnp.zeros((slots,), jnp.int32), budget=jnp.zeros((slots,), jnp.int32),
            done=jnp.ones((slots,), bool), next_logits=jnp.zeros((slots, self.config.vocab_size), jnp.float32),
            saw_nan=jnp.zeros((slots,), bool), cache=cache, key=jax.random.split(jax.random.key(0), slots),
            step=jnp.zeros((), jnp.int32))
        return jax.device_put(state, self._state_shardings(state))

    def _admit(self, state: DecodeState, rows: list[int], group: list[Request], refill: int,
               max_new_tokens: int) -> DecodeState:
        """Prefills `group` (padded to `refill` prompts, so one program per length bucket) into `rows`."""
        prompts = [list(r.prompt) for r in group] + [[self.pad_token_id]] * (refill - len(group))
        tokens, lengths, _ = pad_prompts(self.config, prompts, max_new_tokens, self.pad_token_id)
        cache_len = state.cache.max_len
        next_logits, cache = self.prefill(tokens, lengths, cache_len)
        slots = np.full((refill,), state.tokens.shape[0], np.int32)  # the padding prompts' rows: out of range, dropped
        slots[:len(group)] = rows
        seeds = np.zeros((refill, 2), np.int32)
        seeds[:len(group)] = [(r.seed, r.stream) for r in group]
        shapes = (state.tokens.shape, cache_len)
        if shapes not in self._admit_fns:
            self._admit_fns[shapes] = jax.jit(functools.partial(_admit_rows, pad_token_id=self.pad_token_id),
                                              out_shardings=self._state_shardings(state), donate_argnums=(0,))
        with jax.set_mesh(self.mesh):
            return self._admit_fns[shapes](state, jnp.asarray(slots), next_logits, cache, jnp.asarray(seeds),
                                           jnp.full((refill,), max_new_tokens, jnp.int32))


_KEY_PART_LIMIT = 2 ** 31  # seeds and streams travel as int32


def _checked_requests(requests: Iterable[Request], sampling: SamplingParams, max_prompt_len: int) -> Iterator[Request]:
    """The requests, each refused with a clear error as it comes: a prompt over `max_prompt_len`, a
    seed or stream outside [0, 2**31), or (when sampling) a (seed, stream) pair already used."""
    used: set[tuple[int, int]] = set()
    for request in requests:
        if len(request.prompt) > max_prompt_len:
            raise InputError(f"request {request.id!r} has {len(request.prompt)} prompt tokens, over "
                             f"max_prompt_len={max_prompt_len}")
        pair = (request.seed, request.stream)
        if not all(isinstance(v, (int, np.integer)) and 0 <= v < _KEY_PART_LIMIT for v in pair):
            raise InputError(f"request {request.id!r}: seed and stream must be integers in [0, 2**31), got {pair}")
        if not sampling.greedy:
            if pair in used:
                raise InputError(f"request {request.id!r} reuses (seed, stream) {pair}: sampled requests need their own")
            used.add(pair)
        yield request


def pad_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int,
                extra_cache: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Validates prompts and right-pads them to a bucketed [B, T] array.

    Returns (tokens, lengths, cache_len); the cache holds the prompt bucket, the new tokens and
    `extra_cache` more positions (speculative decoding writes a whole window past the last token).
    """
    if not prompts:
        raise InputError("no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise InputError(f"prompt {int(np.argmin(lengths))} is empty (no tokens)")
    longest = int(lengths.max())
    _check_fits(config, longest, max_new_tokens)
    for p in prompts:
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    prompt_len = bucket(longest)
    tokens = np.full((len(prompts), prompt_len), pad_token_id, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    # Padding positions past the cache are dropped on write, so the cache needs only the real tokens.
    cache_len = bucket(longest + max_new_tokens + extra_cache)
    return tokens, lengths, cache_len


def _check_fits(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Refuses a budget under one token, or a prompt and budget over the model's context window."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise InputError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context window of {limit} tokens")


def _rows(state: DecodeState) -> list[list[int]]:
    tokens, counts = jax.device_get((state.tokens, state.num_generated))
    return [row[:n].tolist() for row, n in zip(tokens, counts)]


def _decode_loop(params, state: DecodeState, limit: jax.Array, *, config: ModelConfig, sampling: SamplingParams,
                 eos_token_ids: jax.Array, pad_token_id: int) -> DecodeState:
    """`lax.while_loop` of decode steps until `limit[2]` rows are done or `limit[0]` steps have run.

    `limit[1]` set means ignore EOS (benchmarks generate exactly the budget).
    """
    max_steps, ignore_eos, until_done = limit[0], limit[1].astype(bool), limit[2]

    def cond(s: DecodeState):
        return (s.step < max_steps) & (jnp.sum(s.done) < until_done)

    def body(s: DecodeState) -> DecodeState:
        has_nan = jnp.any(jnp.isnan(s.next_logits), axis=-1)
        if s.key.ndim:  # a key per row: a row's draw depends only on its key and its own step
            key = s.key
            step_keys = jax.vmap(jax.random.fold_in)(s.key, s.num_generated)
            token = jax.vmap(lambda k, logits: sample_tokens(k, logits[None], sampling)[0])(step_keys, s.next_logits)
        else:
            key, step_key = jax.random.split(s.key)
            token = sample_tokens(step_key, s.next_logits, sampling)
        active = ~s.done & ~has_nan
        token = jnp.where(active, token, pad_token_id)
        rows = jnp.arange(token.shape[0])
        tokens = s.tokens.at[rows, s.num_generated].set(jnp.where(active, token, s.tokens[rows, s.num_generated]),
                                                        mode="drop")
        num_generated = s.num_generated + active.astype(jnp.int32)
        hit_eos = jnp.any(token[:, None] == eos_token_ids[None, :], axis=-1) & ~ignore_eos
        done = s.done | has_nan | (active & hit_eos) | (num_generated >= s.budget)
        out = llama.forward(params, token[:, None], s.cache, config, num_valid=active.astype(jnp.int32),
                            logits_at="last")
        return DecodeState(tokens=tokens, num_generated=num_generated, budget=s.budget, done=done,
                           next_logits=out.logits, saw_nan=s.saw_nan | has_nan, cache=out.cache, key=key,
                           step=s.step + 1)

    return jax.lax.while_loop(cond, body, state)


def _admit_rows(state: DecodeState, slots: jax.Array, next_logits: jax.Array, cache: llama.KVCache,
                seeds: jax.Array, budgets: jax.Array, *, pad_token_id: int) -> DecodeState:
    """Writes freshly prefilled prompts into rows `slots` [R] of a running state (out-of-range slots
    are dropped); `seeds` [R, 2] give each row's key, fold_in(key(seed), stream)."""
    put = lambda old, new: old.at[slots].set(new.astype(old.dtype), mode="drop")
    keys = jax.vmap(lambda pair: jax.random.fold_in(jax.random.key(pair[0]), pair[1]))(seeds)
    rows = slots.shape[0]
    return state.replace(
        tokens=put(state.tokens, jnp.full((rows, state.tokens.shape[1]), pad_token_id)),
        num_generated=put(state.num_generated, jnp.zeros((rows,), jnp.int32)),
        budget=put(state.budget, budgets),
        done=put(state.done, jnp.zeros((rows,), bool)), next_logits=put(state.next_logits, next_logits),
        saw_nan=put(state.saw_nan, jnp.zeros((rows,), bool)),
        cache=jax.tree.map(put, state.cache, cache),
        key=state.key.at[slots].set(keys, mode="drop"))
