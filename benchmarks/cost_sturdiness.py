"""How often the looped start-up cycle costs come out unusable (non-positive) on a loaded host, with
fixed loop lengths and with loop lengths ranged per program.

A tiny random target (3 layers, width 48) and its 1-layer self-speculative drafter: its calls take
microseconds, so a program timed at n and at 2n calls differs by little against what load
adds, the regime of a drafter step on an accelerator. Each trial measures the costs (verify over 2
and 3 positions, a drafter step, in decode steps) as `costs.measure_cycle_costs` does, with every
program at n = each of `--loop-steps`, and with n ranged so that a run takes at least
`--min-loop-seconds` (`costs.autorange_loop_steps`, the engine's way since session 28).

    python benchmarks/cost_sturdiness.py --loop-steps 1 32 --busy-processes 2
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from cost_noise import busy_processes
from ppow_jax.drafters.lm import self_speculative
from ppow_jax.inference import costs
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

TINY = ModelConfig(architecture="llama", vocab_size=32, hidden_size=48, intermediate_size=96, num_layers=3,
                   num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=512)
NAMES = (2, 3, "draft")  # the verify widths of k_max 2 past T = 1, and the drafter step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per trial")
    parser.add_argument("--loop-steps", type=int, nargs="*", default=[1, 32], help="fixed loop lengths to compare")
    parser.add_argument("--min-loop-seconds", type=float, default=costs.MIN_LOOP_SECONDS)
    parser.add_argument("--busy-processes", type=int, default=0, help="processes spinning on the CPU meanwhile")
    args = parser.parse_args()
    print(f"cost_sturdiness: {vars(args)}")
    params = llama.init_params(TINY, jax.random.key(0), std=0.3)
    drafter, drafter_params = self_speculative(TINY, params, 1)
    programs = costs.looped_cycle_programs(TINY, params, drafter, drafter_params, 2, context=16)
    with busy_processes(args.busy_processes):
        ranged = costs.autorange_loop_steps(programs, args.min_loop_seconds)
        print(f"ranged loop lengths (a run >= {args.min_loop_seconds} s): {ranged}")
        ways = [(f"n = {n}", n) for n in args.loop_steps] + [("ranged", ranged)]
        for name, loop_steps in ways:
            runs = []
            for _ in range(args.trials):
                ratios = costs.interleaved_time_ratios(programs, reference=1, repeats=args.repeats,
                                                       loop_steps=loop_steps)
                runs.append([ratios[cost] for cost in NAMES])
            runs = np.array(runs)
            unusable = int(np.sum(np.any(~(runs > 0), axis=1)))
            spread = np.percentile(runs, 90, axis=0) - np.percentile(runs, 10, axis=0)
            print(f"{name}: {unusable} of {args.trials} trials non-positive; T=2 / T=3 / drafter step: "
                  f"median {np.round(np.median(runs, axis=0), 3)}, p90 - p10 {np.round(spread, 3)}", flush=True)


if __name__ == "__main__":
    main()
