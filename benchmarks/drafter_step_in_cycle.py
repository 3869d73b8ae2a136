"""What a drafter step costs where the engine runs it: right after a target verify pass.

`costs.measure_cycle_costs` times a drafter step in a loop of drafter steps only (n ranged to 20 ms
of them). The engine runs at most K_max of them per cycle, each cycle after a verify pass, so the
drafter may run colder there. This times programs of n cycles of [a verify pass over 4 positions,
then 0 or 3 drafter steps]; the difference over 3 is a drafter step inside a cycle, in decode
steps, printed next to the ranged loop's figure and the n = 1 loop's (SmolLM2, batch 1, K_max 3).

    python benchmarks/drafter_step_in_cycle.py --rounds 3
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from ppow_jax.drafters.store import load_drafter
from ppow_jax.inference import costs
from ppow_jax.models import llama
from ppow_jax.weights.registry import load_model


def cycle_program(target, drafter, drafts: int):
    """n cycles of [a verify pass, then `drafts` drafter steps], each fed the last one's argmax."""
    def program(target_params, drafter_params, tokens, cache, draft_cache, n):
        def draft(_, token):
            return jnp.argmax(drafter.step(drafter_params, target_params, draft_cache, token)[0], -1).astype(jnp.int32)

        def cycle(_, carry):
            tokens, cache = carry
            out = llama.forward(target_params, tokens, cache, target.config, hidden_layers=drafter.feature_layers)
            token = jax.lax.fori_loop(0, drafts, draft, jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32))
            return jnp.broadcast_to(token[:, None], tokens.shape), out.cache.replace(lengths=cache.lengths)
        return jax.lax.fori_loop(0, n, cycle, (tokens, cache))[0]
    return jax.jit(program)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="checkpoints/smollm2-135m-instruct/kd")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    target = load_model("smollm2-135m-instruct")
    drafter, drafter_params = load_drafter(args.drafter, target.config)
    k_max = 3
    cache, draft_cache = costs.filled_caches(target.config, drafter, k_max)
    cycle_args = (target.params, drafter_params, jnp.zeros((1, 4), jnp.int32), cache, draft_cache)
    looped = costs.looped_cycle_programs(target.config, target.params, drafter, drafter_params, k_max)
    calls = {"verify": (cycle_program(target, drafter, 0), cycle_args),
             "verify+3": (cycle_program(target, drafter, 3), cycle_args),
             1: looped[1], "draft": looped["draft"]}
    for _ in range(args.rounds):
        steps = costs.autorange_loop_steps(calls, costs.MIN_LOOP_SECONDS)
        ranged = costs.interleaved_time_ratios(calls, reference=1, repeats=9, loop_steps=steps)
        once = costs.interleaved_time_ratios(calls, reference=1, repeats=9, loop_steps=1)
        print(f"loop lengths {steps}; drafter step in a cycle: {(ranged['verify+3'] - ranged['verify']) / 3:.3f} "
              f"decode steps; in a loop of drafter steps only: {ranged['draft']:.3f}; verify T=4 {ranged['verify']:.2f}\n"
              f"  at n = 1 for all: in a cycle {(once['verify+3'] - once['verify']) / 3:.3f}; "
              f"in a loop of drafter steps only {once['draft']:.3f}", flush=True)


if __name__ == "__main__":
    main()
