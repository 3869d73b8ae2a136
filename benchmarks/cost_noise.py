"""How much the start-up cycle costs of `--window cost` vary between measurements on this machine.

Measures the SmolLM2 costs (a verify pass over 2 and over 3-4 positions, and a drafter step, in
decode steps; batch 1) `--measurements` times two ways: the engine's `measure_cycle_costs`, which
times every call once per round and takes the median ratio, and the way it did before session 22,
each call's repeats back to back and the ratio of the medians. Prints each measurement and the
spread (max - min) of each cost.

    python benchmarks/cost_noise.py --drafter checkpoints/smollm2-135m-instruct/kd
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.drafters.store import load_drafter
from ppow_jax.inference import costs
from ppow_jax.models import llama
from ppow_jax.weights.registry import load_model


def back_to_back_costs(target, drafter, drafter_params, k_max: int, *, repeats: int,
                       context: int = 256) -> list[float]:
    """[T=2, T=3..4, drafter step] from each call's median over back-to-back repeats."""
    cache_len = context + k_max + 2
    target_cache = llama.init_cache(target.config, 1, cache_len).replace(lengths=jnp.full((1,), context, jnp.int32))
    forward = jax.jit(lambda p, t, c: llama.forward(p, t, c, target.config, hidden_layers=drafter.feature_layers).logits)
    seconds = {width: costs.median_seconds(forward, target.params, jnp.zeros((1, width), jnp.int32), target_cache,
                                           repeats=repeats)
               for width in (1, 2, 4)}
    draft_cache = drafter.init_cache(1, cache_len + drafter.cache_margin(k_max))
    draft_cache = draft_cache.replace(kv=draft_cache.kv.replace(lengths=jnp.full((1,), context, jnp.int32)))
    step = jax.jit(lambda p, tp, c, t: drafter.step(p, tp, c, t)[0])
    draft = costs.median_seconds(step, drafter_params, target.params, draft_cache, jnp.zeros((1,), jnp.int32),
                                 repeats=repeats)
    return [seconds[2] / seconds[1], seconds[4] / seconds[1], draft / seconds[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="checkpoints/smollm2-135m-instruct/kd")
    parser.add_argument("--measurements", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=21, help="timed calls (or rounds) per measurement")
    args = parser.parse_args()
    k_max = 3  # verify widths 1, 2, 4
    target = load_model("smollm2-135m-instruct")
    drafter, drafter_params = load_drafter(args.drafter, target.config)

    def interleaved() -> list[float]:
        c = costs.measure_cycle_costs(target.config, target.params, drafter, drafter_params, k_max,
                                      repeats=args.repeats)
        return [c.verify[1], c.verify[2], c.draft]

    for name, measure in (("back to back", lambda: back_to_back_costs(target, drafter, drafter_params, k_max,
                                                                        repeats=args.repeats)),
                          ("interleaved", interleaved)):
        runs = np.array([measure() for _ in range(args.measurements)])
        print(f"{name}: T=2, T=3-4, drafter step per measurement\n{np.round(runs, 3)}")
        spread = runs.max(0) - runs.min(0)
        print(f"{name}: spread T=2 {spread[0]:.3f}, T=3-4 {spread[1]:.3f}, drafter step {spread[2]:.3f}")


if __name__ == "__main__":
    main()
