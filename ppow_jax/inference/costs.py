"""What a speculative cycle costs on this machine, measured: the inputs of cost-aware windows.

A cycle of a window of L drafts costs one target verify pass over L + 1 positions and about L + 1
drafter steps. How those compare with a plain decode step depends on the hardware: on an
accelerator a verify pass of a few tokens costs about one decode step, while on a CPU the jump from
one row to two switches XLA to a small-matrix kernel and costs 1.4-1.7 steps (BENCHMARKS.md, "What a
cycle costs"). The engine verifies at a few static widths (`verify_widths`), so the costs are
measured at those widths, for the batch size that will be decoded, in units of one decode step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Hashable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.drafters.interface import DraftCache, Drafter
from ppow_jax.errors import MeasurementError
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

# Verify widths the engine compiles for windows that vary (each is one branch of a `lax.switch`):
# powers of two, capped at K_max + 1. On a CPU a pass over 2, 3 or 4 positions costs about the same
# (the small-matrix kernel), on an accelerator all of them about one decode step, so rounding a
# window up to the next width costs little, and fewer branches compile faster.
_WIDTH_STEPS = (1, 2, 4, 8, 16, 32)
# How long one timed run of a looped cost program lasts at least: long enough that the n calls a run
# of 2n adds over a run of n stand well above the noise (benchmarks/cost_sturdiness.py), short
# enough that measuring the costs of a K_max = 10 engine stays within seconds.
MIN_LOOP_SECONDS = 0.02


def verify_widths(k_max: int) -> tuple[int, ...]:
    """The static verify widths for windows of up to `k_max` drafts: ascending, from 1 to k_max + 1."""
    return tuple(sorted({min(w, k_max + 1) for w in _WIDTH_STEPS}))


def _seconds(fn: Callable, args: tuple) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall time of a jitted call, after one call that compiles it."""
    _seconds(fn, args)  # compile
    return float(np.median([_seconds(fn, args) for _ in range(repeats)]))


def autorange_loop_steps(calls: dict[Hashable, tuple[Callable, tuple]], min_seconds: float,
                         max_steps: int = 1 << 16) -> dict[Hashable, int]:
    """For each looped program (its last argument n: how many calls it runs), the smallest power of two
    n at which a run takes at least `min_seconds` (the faster of two runs, so that one stall does not
    stop the doubling early), capped at `max_steps`; as `timeit` ranges its loops. The difference of a
    program timed at n and at 2n is then n calls long, well above what load and launching add to one
    run, however cheap the call is."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = {}
    for name, (fn, args) in calls.items():
        _seconds(fn, (*args, 1))  # compile (n is traced: one program serves every loop length)
        n = 1
        while n < max_steps and min(_seconds(fn, (*args, n)) for _ in range(2)) < min_seconds:
            n = min(2 * n, max_steps)
        steps[name] = n
    return steps


def interleaved_time_ratios(calls: dict[Hashable, tuple[Callable, tuple]], reference: Hashable,
                            repeats: int, *, loop_steps: Union[None, int, Mapping[Hashable, int]] = None
                            ) -> dict[Hashable, float]:
    """Each jitted call's wall time over the `reference` call's: the median over `repeats` rounds that
    time every call once, after one call each that compiles them.

    Only ratios are wanted, and a round is short, so a change of machine load (another process, a
    frequency step) shifts a round's calls alike instead of one call's median. Six measurements of
    the SmolLM2 costs on the idle 2-core host spread by 0.45 (T = 2) and 0.73 (T = 3-4) decode steps
    with each call's repeats back to back, and by 0.29 and 0.38 interleaved (BENCHMARKS.md, session 22).

    With `loop_steps` (one n for every call, or one per call), each function takes a last argument n
    and runs n dependent calls in one program; a round times it at n and at 2n and takes the
    difference over n, which cancels what a program costs once per launch (the host's dispatch) and
    leaves what a call costs inside a loop, as in the engine's `lax.while_loop`.
    """
    steps = loop_steps if loop_steps is None or isinstance(loop_steps, Mapping) else dict.fromkeys(calls, loop_steps)
    if steps is not None and set(steps) != set(calls):
        raise ValueError(f"loop_steps names {sorted(map(str, steps))}, the calls are {sorted(map(str, calls))}")
    if steps is not None and (bad := {name: n for name, n in steps.items() if n < 1}):
        raise ValueError(f"loop_steps must be >= 1, got {bad}")

    def seconds(name: Hashable) -> float:
        fn, args = calls[name]
        if steps is None:
            return _seconds(fn, args)
        n = steps[name]
        return (_seconds(fn, (*args, 2 * n)) - _seconds(fn, (*args, n))) / n

    for name in calls:  # compile
        seconds(name)
    ratios = {name: [] for name in calls}
    for _ in range(repeats):
        round_seconds = {name: seconds(name) for name in calls}
        for name in calls:
            ratios[name].append(round_seconds[name] / round_seconds[reference])
    return {name: float(np.median(values)) for name, values in ratios.items()}


@dataclasses.dataclass(frozen=True)
class CycleCosts:
    """verify[T - 1]: a target pass over T positions (T = 1..K_max + 1, each at the width the engine
    runs it at); draft: one drafter step. Both in units of a plain decode step (verify[0] = 1)."""

    verify: tuple[float, ...]
    draft: float

    def describe(self) -> str:
        widths = ", ".join(f"T={t + 1}: {c:.2f}" for t, c in enumerate(self.verify))
        return f"verify {widths}; drafter step {self.draft:.3f} (decode steps)"


def filled_caches(target_config: ModelConfig, drafter: Drafter, k_max: int, *, batch: int = 1,
                  context: int = 256) -> tuple[llama.KVCache, DraftCache]:
    """The target's and the drafter's caches for timing a cycle: `context` positions filled, room for a
    verify pass of k_max + 1 tokens (and the drafter's margin) after them."""
    cache_len = context + k_max + 2
    filled = jnp.full((batch,), context, jnp.int32)
    target_cache = llama.init_cache(target_config, batch, cache_len).replace(lengths=filled)
    draft_cache = drafter.init_cache(batch, cache_len + drafter.cache_margin(k_max))
    return target_cache, draft_cache.replace(kv=draft_cache.kv.replace(lengths=filled))


def looped_cycle_programs(target_config: ModelConfig, target_params, drafter: Drafter, drafter_params, k_max: int,
                          *, batch: int = 1, context: int = 256) -> dict[Hashable, tuple[Callable, tuple]]:
    """The programs `measure_cycle_costs` times -> {verify width: (program, args), "draft": ...}: each
    runs its last argument n dependent calls (each one's argmax feeds the next; the caches are written
    in place, as in the engine) at batch `batch`, over a cache with `context` positions filled."""
    target_cache, draft_cache = filled_caches(target_config, drafter, k_max, batch=batch, context=context)

    def verify_loop(p, tokens, cache, n):
        def body(_, carry):
            tokens, cache = carry
            out = llama.forward(p, tokens, cache, target_config, hidden_layers=drafter.feature_layers)
            next_tokens = jnp.broadcast_to(jnp.argmax(out.logits[:, -1], -1)[:, None], tokens.shape)
            return next_tokens.astype(tokens.dtype), out.cache.replace(lengths=cache.lengths)  # same slots again
        return jax.lax.fori_loop(0, n, body, (tokens, cache))[0]

    forward = jax.jit(verify_loop)
    calls = {width: (forward, (target_params, jnp.zeros((batch, width), jnp.int32), target_cache))
             for width in verify_widths(k_max)}

    def draft_loop(p, tp, cache, token, n):
        def body(_, token):  # the drafter's logits cover the target vocabulary: the argmax is a target id
            return jnp.argmax(drafter.step(p, tp, cache, token)[0], -1).astype(token.dtype)
        return jax.lax.fori_loop(0, n, body, token)

    calls["draft"] = (jax.jit(draft_loop), (drafter_params, target_params, draft_cache, jnp.zeros((batch,), jnp.int32)))
    return calls


def measure_cycle_costs(target_config: ModelConfig, target_params, drafter: Drafter, drafter_params, k_max: int,
                        *, batch: int = 1, context: int = 256, repeats: int = 9,
                        min_loop_seconds: float = MIN_LOOP_SECONDS) -> CycleCosts:
    """Times target passes at every verify width and a drafter step (batch `batch`, a cache with
    `context` positions filled) -> costs relative to the T = 1 pass.

    Each program (`looped_cycle_programs`) runs n calls in one loop, with n ranged so that a run
    takes at least `min_loop_seconds` (`autorange_loop_steps`), and is timed at n and 2n
    (`interleaved_time_ratios(..., loop_steps=...)`), so what the host spends launching a program
    drops out. On an H200 one call per program put the drafter step at 0.47 decode steps, where
    `benchmarks/verify_cost.py` gives 0.07 (BENCHMARKS.md, "On a GPU").
    """
    calls = looped_cycle_programs(target_config, target_params, drafter, drafter_params, k_max,
                                  batch=batch, context=context)
    loop_steps = autorange_loop_steps(calls, min_loop_seconds)
    ratios = interleaved_time_ratios(calls, reference=1, repeats=repeats, loop_steps=loop_steps)
    if bad := {name: ratio for name, ratio in ratios.items() if not (ratio > 0 and math.isfinite(ratio))}:
        raise MeasurementError(f"cycle costs on this machine came out non-positive or not finite ({bad}): the "
                               "timings are swamped by noise; rerun on a quieter machine or give the costs "
                               "(--cycle-costs, or config.ppow.gamma for PPOW)")
    widths = verify_widths(k_max)
    verify = tuple(ratios[min(w for w in widths if w >= t)] for t in range(1, k_max + 2))
    return CycleCosts(verify=verify, draft=ratios["draft"])
