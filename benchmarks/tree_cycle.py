"""What a tree cycle costs next to a chain cycle, and where its time goes, in decode steps.

SmolLM2-135M and a trained drafter, batch 1, a real chat prompt as context. Times jitted calls in
interleaved rounds (`costs.interleaved_time_ratios`), each over a decode step (T = 1):
  - the engine's whole cycle up to acceptance (`_chain_cycle`, `_tree_cycle`) for a chain of K and
    for trees of N chains of K;
  - the target pass alone over K + 1 tokens, over 1 + N·K tokens under the tree mask, and over
    1 + N·K tokens causally (what the mask itself costs);
  - one drafter step at batch 1 and at batch N (a tree drafts its N chains side by side).

    python benchmarks/tree_cycle.py --k-max 4 --branches 2 4 8
"""

from __future__ import annotations

import argparse
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.drafters.specs import load_drafter
from ppow_jax.inference import costs
from ppow_jax.inference.autoregressive import bucket
from ppow_jax.inference.sampling import SamplingParams
from ppow_jax.inference.speculative import (SpeculativeDecoder, _chain_cycle, _tree_cycle, cache_margin,
                                            tree_layout)
from ppow_jax.inference.windows import WindowPolicy
from ppow_jax.models import llama
from ppow_jax.weights.registry import DEFAULT_MODEL, load_model

PROMPT = "Explain, step by step, how a bill becomes a law in the United States, with one example."


def engine_state(decoder: SpeculativeDecoder, prompt: list[int], window: WindowPolicy, max_new_tokens: int):
    """The engine's state right after prefill, with caches sized for `window`'s cycles."""
    cache_len = bucket(len(prompt) + max_new_tokens + cache_margin(decoder.drafter, window))
    start = decoder._start_fn(1, bucket(len(prompt)), cache_len, bucket(max_new_tokens), SamplingParams(),
                              window.k_max)
    tokens = np.zeros((1, bucket(len(prompt))), np.int32)
    tokens[0, :len(prompt)] = prompt
    with jax.set_mesh(decoder.mesh):
        return start(decoder.target_params, decoder.drafter_params, tokens, np.asarray([len(prompt)], np.int32),
                     np.asarray([max_new_tokens], np.int32), jax.random.key(0), np.asarray(False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="checkpoints/smollm2-135m-instruct/kd")
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--branches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"arguments: {vars(args)}; jax {jax.__version__} on {jax.devices()[0].device_kind}, {platform.processor()}")

    target = load_model(DEFAULT_MODEL)
    drafter, drafter_params = load_drafter(args.drafter, target)
    tok = target.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    decoder = SpeculativeDecoder(target.config, target.params, drafter, drafter_params,
                                 eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    k_max, widest = args.k_max, max(args.branches)
    state = engine_state(decoder, prompt, WindowPolicy("fixed", k_max, branches=widest), max_new_tokens=64)
    key = jax.random.key(1)
    config = target.config
    cycle_args = (decoder.target_params, decoder.drafter_params, state, key, key)

    def cycle_call(window: WindowPolicy):
        cycle = _tree_cycle if window.branches > 1 else _chain_cycle
        return jax.jit(functools.partial(cycle, target_config=config, drafter=drafter, sampling=SamplingParams(),
                                         window=window)), cycle_args

    def target_pass(width: int, tree: bool):
        ancestors, depths, _ = tree_layout((width - 1) // k_max, k_max) if tree else (None, None, None)

        def run(params, tokens, cache):
            positions = cache.lengths[:, None] + jnp.asarray(depths)[None] if tree else None
            return llama.forward(params, tokens, cache, config, positions=positions,
                                 hidden_layers=drafter.feature_layers, tree_ancestors=ancestors).logits
        return jax.jit(run), (decoder.target_params, jnp.zeros((1, width), jnp.int32), state.target_cache)

    def drafter_step(batch: int):
        cache = jax.tree_util.tree_map(lambda a: jnp.repeat(a, batch, axis=0), state.drafter_cache)
        step = jax.jit(lambda params, target_params, cache, token: drafter.step(params, target_params, cache, token)[0])
        return step, (decoder.drafter_params, decoder.target_params, cache, jnp.zeros((batch,), jnp.int32))

    calls = {"decode step": target_pass(1, tree=False), f"chain cycle K={k_max}": cycle_call(WindowPolicy("fixed", k_max)),
             f"target pass T={k_max + 1}": target_pass(k_max + 1, tree=False), "drafter step, batch 1": drafter_step(1)}
    for n in args.branches:
        width = 1 + n * k_max
        calls[f"tree cycle {n}x{k_max}"] = cycle_call(WindowPolicy("fixed", k_max, branches=n))
        calls[f"tree pass T={width}"] = target_pass(width, tree=True)
        calls[f"causal pass T={width}"] = target_pass(width, tree=False)
        calls[f"drafter step, batch {n}"] = drafter_step(n)
    ratios = costs.interleaved_time_ratios(calls, reference="decode step", repeats=args.repeats)
    seconds = costs.median_seconds(calls["decode step"][0], *calls["decode step"][1], repeats=args.repeats)
    print(f"context {len(prompt)} tokens; a decode step: {1000 * seconds:.1f} ms (median of {args.repeats})")
    print("| call | decode steps |\n|---|---|")
    for name, ratio in ratios.items():
        print(f"| {name} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
