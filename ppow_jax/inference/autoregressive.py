"""Plain autoregressive generation: a jitted prefill and a `lax.while_loop` decode.

Shapes are bucketed (prompt length, cache size, output buffer) so that prompts whose lengths
fall in the same bucket reuse one compiled program, and nothing recompiles from step to step:
every per-row quantity (lengths, token counts, done flags, budgets) is an array.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

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
    key: jax.Array
    step: jax.Array  # scalar int32


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

    # ----- compiled pieces (cached per static signature) -----

    def _state_shardings(self, state: DecodeState) -> DecodeState:
        by_batch = lambda a: sharding.batch_sharding(self.mesh, a.shape)
        return DecodeState(
            tokens=by_batch(state.tokens), num_generated=by_batch(state.num_generated),
            budget=by_batch(state.budget), done=by_batch(state.done), next_logits=by_batch(state.next_logits),
            saw_nan=by_batch(state.saw_nan), cache=sharding.cache_shardings(state.cache, self.mesh),
            key=sharding.replicated(self.mesh), step=sharding.replicated(self.mesh))

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
        key = (state.tokens.shape, state.cache.max_len, sampling)
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
               ignore_eos: bool = False) -> DecodeState:
        """Runs up to `max_steps` more decode steps (stops early when every row is done)."""
        fn = self._decode_fn(state, sampling)
        limit = jnp.asarray([int(state.step) + max_steps, int(ignore_eos)], jnp.int32)
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
        eos = set(np.asarray(self.eos_token_ids).tolist())
        return GenerationResult(tokens=rows, finished_by_eos=[bool(r) and r[-1] in eos and not ignore_eos for r in rows],
                                prefill_seconds=prefill_seconds, decode_seconds=decode_seconds)


def pad_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int,
                extra_cache: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Validates prompts and right-pads them to a bucketed [B, T] array.

    Returns (tokens, lengths, cache_len); the cache holds the prompt bucket, the new tokens and
    `extra_cache` more positions (speculative decoding writes a whole window past the last token).
    """
    if not prompts:
        raise InputError("no prompts given")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise InputError(f"prompt {int(np.argmin(lengths))} is empty (no tokens)")
    limit = config.max_position_embeddings
    longest = int(lengths.max())
    if longest + max_new_tokens > limit:
        raise InputError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context window of {limit} tokens")
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


def _rows(state: DecodeState) -> list[list[int]]:
    tokens, counts = jax.device_get((state.tokens, state.num_generated))
    return [row[:n].tolist() for row, n in zip(tokens, counts)]


def _decode_loop(params, state: DecodeState, limit: jax.Array, *, config: ModelConfig, sampling: SamplingParams,
                 eos_token_ids: jax.Array, pad_token_id: int) -> DecodeState:
    """`lax.while_loop` of decode steps until every row is done or `limit[0]` steps have run.

    `limit[1]` set means ignore EOS (benchmarks generate exactly the budget).
    """
    max_steps, ignore_eos = limit[0], limit[1].astype(bool)

    def cond(s: DecodeState):
        return (s.step < max_steps) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        key, step_key = jax.random.split(s.key)
        has_nan = jnp.any(jnp.isnan(s.next_logits), axis=-1)
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
