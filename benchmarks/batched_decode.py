"""Batched decoding: the time of one decode step of the target, for each batch size and cache length,
with attention forced to each of its two forms: two batched dot products, and the multiply-reduce
form that `llama.attention` takes for one-token steps from `llama.MULTIPLY_REDUCE_MIN_BATCH` rows
on a CPU (the last column: the form the engine picks).

Self-distillation decodes 32 rows into a cache of up to 640 positions (384 prompt + 256 new), and
PPOW's rollouts decode batches too, so this is where their time goes. Random prompt tokens, EOS
ignored; each figure is the median over `--repeats` runs of `--steps` decode steps after a prefill
(compilation excluded). The two forms run in turn, so the host's drift hits both alike.

    python benchmarks/batched_decode.py --batches 1 8 16 32 --cache-lengths 256 640 1024
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.cli import run_entry_point
from ppow_jax.inference.autoregressive import AutoregressiveDecoder
from ppow_jax.inference.sampling import SamplingParams
from ppow_jax.models import llama
from ppow_jax.weights.registry import load_model

DEFAULT_MIN_BATCH = llama.MULTIPLY_REDUCE_MIN_BATCH
FORMS = {"dot products": 10**9, "multiply-reduce": 1}  # MULTIPLY_REDUCE_MIN_BATCH that forces each form


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--cache-lengths", type=int, nargs="+", default=[256, 640, 1024],
                        help="cache positions; the prompt fills all but the decoded steps")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    return run_entry_point(parser, run)


def prefilled_state(decoder: AutoregressiveDecoder, prompts: list[list[int]], steps: int):
    """The decode state after the prompts' prefill and one decode step (that compiles the loop)."""
    tokens, lengths, cache_len = decoder.prepare(prompts, steps + 1)
    logits, cache = decoder.prefill(tokens, lengths, cache_len)
    state = decoder.init_state(logits, cache, steps + 1, seed=0)
    return decoder.decode(state, SamplingParams(), 1, ignore_eos=True)


def step_seconds(decoder: AutoregressiveDecoder, state, steps: int) -> float:
    """Seconds per decode step over `steps` steps from a copy of `state` (decoding donates it)."""
    state = jax.block_until_ready(jax.tree.map(jnp.copy, state))
    start = time.perf_counter()
    state = decoder.decode(state, SamplingParams(), steps, ignore_eos=True)
    jax.block_until_ready(state.tokens)
    return (time.perf_counter() - start) / steps


def run(args: argparse.Namespace) -> int:
    target = load_model(args.model, param_dtype="float32")
    rng = np.random.default_rng(0)
    print(f"{args.model}, float32, jax {jax.__version__} on {jax.devices()[0].device_kind}; ms per decode step "
          f"(median of {args.repeats} runs of {args.steps} steps)\n")
    print("| batch | cache | dot products | multiply-reduce | ratio | the engine's form |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        for cache_len in args.cache_lengths:
            prompt_len = cache_len - args.steps - 1
            prompts = [rng.integers(100, target.config.vocab_size, prompt_len).tolist() for _ in range(batch)]
            decoders, states = {}, {}
            for form, least_batch in FORMS.items():  # each decoder traces its programs under its form
                llama.MULTIPLY_REDUCE_MIN_BATCH = least_batch
                decoders[form] = AutoregressiveDecoder(target.config, target.params,
                                                       eos_token_ids=target.tokenizer.eos_token_ids)
                states[form] = prefilled_state(decoders[form], prompts, args.steps)
                step_seconds(decoders[form], states[form], args.steps)  # compiles the timed loop
            times = {form: [] for form in FORMS}
            for _ in range(args.repeats):
                for form, decoder in decoders.items():
                    times[form].append(step_seconds(decoder, states[form], args.steps))
            dots, reduce = (1000 * float(np.median(times[form])) for form in FORMS)
            chosen = "multiply-reduce" if batch >= DEFAULT_MIN_BATCH else "dot products"
            print(f"| {batch} | {cache_len} | {dots:.1f} | {reduce:.1f} | {dots / reduce:.2f}x | {chosen} |", flush=True)
    llama.MULTIPLY_REDUCE_MIN_BATCH = DEFAULT_MIN_BATCH
    return 0


if __name__ == "__main__":
    sys.exit(main())
