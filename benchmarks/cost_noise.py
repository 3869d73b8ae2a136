"""How much the start-up cycle costs of `--window cost` vary between measurements on this machine.

Measures the SmolLM2 costs (a verify pass over 2 and over 3-4 positions, and a drafter step, in
decode steps; batch 1) `--measurements` times four ways, and prints each measurement and the
spread (max - min) of each cost:

- back to back: one call per program, each call's repeats back to back, the ratio of the medians
  (the engine's way before session 22);
- interleaved: one call per program, every call once per round, the median of the rounds' ratios
  (sessions 22-26);
- looped, n = 1: as interleaved, but each program runs n dependent calls in one loop and is timed
  at n and 2n, so that the cost of launching a program drops out (session 27);
- looped, ranged: the same with n ranged per program so that a run takes at least 20 ms
  (`costs.measure_cycle_costs` since session 28).

    python benchmarks/cost_noise.py --drafter checkpoints/smollm2-135m-instruct/kd
    python benchmarks/cost_noise.py --busy-processes 2     # the same while 2 processes spin on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.drafters.store import load_drafter
from ppow_jax.inference import costs
from ppow_jax.models import llama
from ppow_jax.weights.registry import load_model

WIDTHS = (1, 2, 4)  # the verify widths of k_max 3


def one_call_programs(target, drafter, drafter_params, k_max: int, context: int = 256) -> dict:
    """name -> (jitted program of one call, its arguments): the target at each verify width, a drafter step."""
    target_cache, draft_cache = costs.filled_caches(target.config, drafter, k_max, context=context)
    forward = jax.jit(lambda p, t, c: llama.forward(p, t, c, target.config, hidden_layers=drafter.feature_layers).logits)
    calls = {width: (forward, (target.params, jnp.zeros((1, width), jnp.int32), target_cache)) for width in WIDTHS}
    step = jax.jit(lambda p, tp, c, t: drafter.step(p, tp, c, t)[0])
    calls["draft"] = (step, (drafter_params, target.params, draft_cache, jnp.zeros((1,), jnp.int32)))
    return calls


@contextlib.contextmanager
def busy_processes(count: int):
    """`count` processes that keep a core busy each: a loaded host, reproducibly."""
    workers = []
    try:
        for _ in range(count):
            workers.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        yield
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="checkpoints/smollm2-135m-instruct/kd")
    parser.add_argument("--measurements", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=21, help="timed calls (or rounds) per measurement")
    parser.add_argument("--busy-processes", type=int, default=0, help="processes spinning on the CPU meanwhile")
    args = parser.parse_args()
    print(f"cost_noise: {vars(args)}")
    k_max = 3
    target = load_model("smollm2-135m-instruct")
    drafter, drafter_params = load_drafter(args.drafter, target.config)
    calls = one_call_programs(target, drafter, drafter_params, k_max)

    def back_to_back() -> list[float]:
        seconds = {name: costs.median_seconds(fn, *call_args, repeats=args.repeats)
                   for name, (fn, call_args) in calls.items()}
        return [seconds[2] / seconds[1], seconds[4] / seconds[1], seconds["draft"] / seconds[1]]

    def interleaved() -> list[float]:
        ratios = costs.interleaved_time_ratios(calls, reference=1, repeats=args.repeats)
        return [ratios[2], ratios[4], ratios["draft"]]

    looped_programs = costs.looped_cycle_programs(target.config, target.params, drafter, drafter_params, k_max)

    def looped_once() -> list[float]:
        ratios = costs.interleaved_time_ratios(looped_programs, reference=1, repeats=args.repeats, loop_steps=1)
        return [ratios[2], ratios[4], ratios["draft"]]

    def looped_ranged() -> list[float]:
        c = costs.measure_cycle_costs(target.config, target.params, drafter, drafter_params, k_max,
                                      repeats=args.repeats)
        return [c.verify[1], c.verify[2], c.draft]

    ways = (("back to back", back_to_back), ("interleaved", interleaved), ("looped, n = 1", looped_once),
            ("looped, ranged", looped_ranged))
    with busy_processes(args.busy_processes):
        print(f"ranged loop lengths: {costs.autorange_loop_steps(looped_programs, costs.MIN_LOOP_SECONDS)}")
        for name, measure in ways:
            start = time.perf_counter()
            runs = np.array([measure() for _ in range(args.measurements)])
            seconds = (time.perf_counter() - start) / args.measurements
            print(f"{name}: {seconds:.1f} s per measurement (compiles included); T=2, T=3-4, drafter step per "
                  f"measurement\n{np.round(runs, 3)}")
            spread = runs.max(0) - runs.min(0)
            print(f"{name}: spread T=2 {spread[0]:.3f}, T=3-4 {spread[1]:.3f}, drafter step {spread[2]:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
