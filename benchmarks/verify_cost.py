"""What one speculative cycle costs on this machine: a target forward over T tokens against a KV cache
(T = 1 is a decode step, T = K+1 a verify pass) and one EAGLE-3 drafter step, median of jitted calls.

Random weights of SmolLM2-135M's shapes (speed does not depend on the values), batch 1, a cache of
`--cache` slots with 200 filled. This is what γ in PPOW's reward measures, and why a verify pass of
K+1 tokens is not free on a CPU. `--dtype` is the dtype of weights and computation, as in
`python -m ppow_jax.eval --dtype`. `--untied-head` computes the tied output head from a separate
[D, V] copy of the embedding. With YNNPACK's dot fusion off (the second command), XLA:CPU's own dot
emitter runs the head in that layout, and the tied [V, D] one about ten times slower.

    taskset -c 0 python benchmarks/verify_cost.py --tokens 1 4 11
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce \
        python benchmarks/verify_cost.py --tokens 1 2 3 4 --untied-head

`benchmarks/eval_untied_head.py` measures the same setting end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp

from ppow_jax.drafters.eagle import Eagle3Drafter
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig
from ppow_jax.inference.costs import median_seconds

SMOLLM2_135M = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)


def untie_head(config: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """The same model, its tied output head computed from a separate [D, V] copy of the embedding."""
    return dataclasses.replace(config, tie_word_embeddings=False), {**params, "lm_head": jnp.transpose(params["embed"])}


def median_ms(fn, *args, repeats: int) -> float:
    return 1e3 * median_seconds(fn, *args, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 11])
    parser.add_argument("--cache", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--untied-head", action="store_true", help="output head from a [D, V] copy of the embedding")
    args = parser.parse_args()

    config = SMOLLM2_135M.with_dtypes(args.dtype)
    params = llama.init_params(config, jax.random.key(0))
    if args.untied_head:
        config, params = untie_head(config, params)
    cache = llama.init_cache(config, 1, args.cache).replace(lengths=jnp.array([200], jnp.int32))
    forward = jax.jit(lambda p, tokens, c: llama.forward(p, tokens, c, config).logits)
    rows = []
    for t in args.tokens:
        rows.append((f"target forward, T = {t}", median_ms(forward, params, jnp.ones((1, t), jnp.int32), cache,
                                                           repeats=args.repeats)))
    drafter = Eagle3Drafter.for_target(config, (2, 15, 27), 8192, 1536)
    drafter_params = drafter.init_params(jax.random.key(1))
    draft_cache = drafter.init_cache(1, args.cache)
    draft_cache = draft_cache.replace(kv=draft_cache.kv.replace(lengths=jnp.array([200], jnp.int32)))
    step = jax.jit(lambda p, tp, c, token: drafter.step(p, tp, c, token)[0])
    rows.append(("EAGLE-3 drafter step (N = 8192)", median_ms(step, drafter_params, params, draft_cache,
                                                              jnp.ones((1,), jnp.int32), repeats=args.repeats)))
    base = rows[0][1]
    head = "untied [D, V] head" if args.untied_head else "tied head"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.dtype}; {head}; cache {args.cache} slots, "
          f"batch 1; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
    print(f"| call | ms | × {rows[0][0]} |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
