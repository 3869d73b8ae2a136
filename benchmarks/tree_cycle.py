"""What a tree cycle costs next to a chain cycle, and where its time goes, in decode steps.

SmolLM2-135M and a trained drafter, batch 1, a real chat prompt as context. Times jitted calls in
interleaved rounds (`costs.interleaved_time_ratios`), each over a decode step (T = 1):
  - the engine's whole cycle up to acceptance (`_chain_cycle`, `_tree_cycle`) for a chain of K and
    for each tree shape (`--branches` as in `python -m ppow_jax.eval`);
  - the target pass alone over K + 1 tokens, over the tree's T tokens under the tree mask, and
    over T tokens causally (what the mask itself costs);
  - one drafter step at the batch of the tree's widest stepped level (a level's drafts are
    stepped side by side).

    python benchmarks/tree_cycle.py --k-max 4 --branches 2 4 8 4,2
"""

from __future__ import annotations

import argparse
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.drafters.specs import load_drafter, parse_branches
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
    parser.add_argument("--branches", nargs="+", default=["2", "4", "8"], help="tree shapes, such as 4 or 4,2")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"arguments: {vars(args)}; jax {jax.__version__} on {jax.devices()[0].device_kind}, {platform.processor()}")

    target = load_model(DEFAULT_MODEL)
    drafter, drafter_params = load_drafter(args.drafter, target)
    tok = target.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    decoder = SpeculativeDecoder(target.config, target.params, drafter, drafter_params,
                                 eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    k_max = args.k_max
    trees = [WindowPolicy("fixed", k_max, branches=parse_branches(text)) for text in args.branches]
    largest = max(trees, key=lambda window: window.tree_tokens)
    state = engine_state(decoder, prompt, largest, max_new_tokens=64)  # caches that hold every tree
    key = jax.random.key(1)
    config = target.config
    cycle_args = (decoder.target_params, decoder.drafter_params, state, key, key)

    def cycle_call(window: WindowPolicy):
        cycle = _tree_cycle if window.is_tree else _chain_cycle
        return jax.jit(functools.partial(cycle, target_config=config, drafter=drafter, sampling=SamplingParams(),
                                         window=window)), cycle_args

    def target_pass(width: int, tree: WindowPolicy | None = None):
        layout = tree_layout(tree.branches) if tree else None

        def run(params, tokens, cache):
            positions = cache.lengths[:, None] + jnp.asarray(layout.depths)[None] if tree else None
            return llama.forward(params, tokens, cache, config, positions=positions, hidden_layers=drafter.feature_layers,
                                 tree_ancestors=layout.ancestors if tree else None).logits
        return jax.jit(run), (decoder.target_params, jnp.zeros((1, width), jnp.int32), state.target_cache)

    def drafter_step(batch: int):
        cache = jax.tree_util.tree_map(lambda a: jnp.repeat(a, batch, axis=0), state.drafter_cache)
        step = jax.jit(lambda params, target_params, cache, token: drafter.step(params, target_params, cache, token)[0])
        return step, (decoder.drafter_params, decoder.target_params, cache, jnp.zeros((batch,), jnp.int32))

    calls = {"decode step": target_pass(1), f"chain cycle K={k_max}": cycle_call(WindowPolicy("fixed", k_max)),
             f"target pass T={k_max + 1}": target_pass(k_max + 1), "drafter step, batch 1": drafter_step(1)}
    for tree, text in zip(trees, args.branches):
        width = tree.tree_tokens
        widest = max(int(np.prod(tree.branches[:depth])) for depth in range(1, k_max))  # stepped levels 1..K-1
        calls[f"tree cycle {text} (K={k_max})"] = cycle_call(tree)
        calls[f"tree pass T={width}"] = target_pass(width, tree)
        calls[f"causal pass T={width}"] = target_pass(width)
        calls[f"drafter step, batch {widest}"] = drafter_step(widest)
    ratios = costs.interleaved_time_ratios(calls, reference="decode step", repeats=args.repeats)
    seconds = costs.median_seconds(calls["decode step"][0], *calls["decode step"][1], repeats=args.repeats)
    print(f"context {len(prompt)} tokens; a decode step: {1000 * seconds:.1f} ms (median of {args.repeats})")
    print("| call | decode steps |\n|---|---|")
    for name, ratio in ratios.items():
        print(f"| {name} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
