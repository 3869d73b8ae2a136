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
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.drafters.interface import Drafter
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

# Verify widths the engine compiles for windows that vary (each is one branch of a `lax.switch`):
# powers of two, capped at K_max + 1. On a CPU a pass over 2, 3 or 4 positions costs about the same
# (the small-matrix kernel), on an accelerator all of them about one decode step, so rounding a
# window up to the next width costs little, and fewer branches compile faster.
_WIDTH_STEPS = (1, 2, 4, 8, 16, 32)


def verify_widths(k_max: int) -> tuple[int, ...]:
    """The static verify widths for windows of up to `k_max` drafts: ascending, from 1 to k_max + 1."""
    return tuple(sorted({min(w, k_max + 1) for w in _WIDTH_STEPS}))


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall time of a jitted call, after one call that compiles it."""
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@dataclasses.dataclass(frozen=True)
class CycleCosts:
    """verify[T - 1]: a target pass over T positions (T = 1..K_max + 1, each at the width the engine
    runs it at); draft: one drafter step. Both in units of a plain decode step (verify[0] = 1)."""

    verify: tuple[float, ...]
    draft: float

    def describe(self) -> str:
        widths = ", ".join(f"T={t + 1}: {c:.2f}" for t, c in enumerate(self.verify))
        return f"verify {widths}; drafter step {self.draft:.3f} (decode steps)"


def measure_cycle_costs(target_config: ModelConfig, target_params, drafter: Drafter, drafter_params, k_max: int,
                        *, batch: int = 1, context: int = 256, repeats: int = 9) -> CycleCosts:
    """Times jitted target passes at every verify width and a jitted drafter step (batch `batch`, a cache
    with `context` positions filled) -> costs relative to the T = 1 pass."""
    cache_len = context + k_max + 2
    target_cache = llama.init_cache(target_config, batch, cache_len)
    target_cache = target_cache.replace(lengths=jnp.full((batch,), context, jnp.int32))
    forward = jax.jit(lambda p, tokens, c: llama.forward(p, tokens, c, target_config,
                                                         hidden_layers=drafter.feature_layers).logits)
    widths = verify_widths(k_max)
    seconds = {width: median_seconds(forward, target_params, jnp.zeros((batch, width), jnp.int32), target_cache,
                                     repeats=repeats)
               for width in widths}
    draft_cache = drafter.init_cache(batch, cache_len + drafter.cache_margin(k_max))
    draft_cache = draft_cache.replace(kv=draft_cache.kv.replace(lengths=jnp.full((batch,), context, jnp.int32)))
    step = jax.jit(lambda p, tp, c, token: drafter.step(p, tp, c, token)[0])
    draft_seconds = median_seconds(step, drafter_params, target_params, draft_cache, jnp.zeros((batch,), jnp.int32),
                                   repeats=repeats)
    decode = seconds[1]
    verify = tuple(seconds[min(w for w in widths if w >= t)] / decode for t in range(1, k_max + 2))
    return CycleCosts(verify=verify, draft=draft_seconds / decode)
