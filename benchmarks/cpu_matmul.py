"""Why a verify pass of a few tokens costs several decode steps on a CPU: SmolLM2-135M's matrix
products alone, at T rows, under XLA (with whatever XLA_FLAGS selects) and under NumPy's BLAS.

A decode step (T = 1) streams the weights once and is memory-bound; at T = 4 or 11 the products
become compute-bound on a small CPU, so the cost grows with T whatever kernel runs them. The
weights are distinct per layer (about 540 MB in float32) so that nothing stays in cache.

    taskset -c 1 python benchmarks/cpu_matmul.py --tokens 1 4 6 11
    XLA_FLAGS=--xla_cpu_use_onednn=true taskset -c 1 python benchmarks/cpu_matmul.py
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Callable

# One BLAS thread, as XLA:CPU runs a jitted call's products on the core taskset gives it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np

HIDDEN, INTERMEDIATE, KV_WIDTH, VOCAB, LAYERS = 576, 1536, 192, 49152, 30  # SmolLM2-135M
# Per layer: q and o (576x576), k and v (576x192), gate and up (576x1536), down (1536x576).
LAYER_SHAPES = [(HIDDEN, HIDDEN)] * 2 + [(HIDDEN, KV_WIDTH)] * 2 + [(HIDDEN, INTERMEDIATE)] * 2 + [(INTERMEDIATE, HIDDEN)]


def chained_products(xp, x, weights):
    """The layer products in order, each input the previous output sliced or tiled to the next width;
    `xp` is jax.numpy (under jit) or numpy."""
    for w in weights:
        x = x[:, :w.shape[0]] if x.shape[1] >= w.shape[0] else xp.tile(x, (1, w.shape[0] // x.shape[1]))
        x = x @ w
    return x


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 6, 11])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # Scaled by 1/sqrt(fan-in) so that the chained products stay finite.
    weights = [(rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])).astype(np.float32)
               for _ in range(LAYERS) for shape in LAYER_SHAPES]
    embedding = rng.standard_normal((VOCAB, HIDDEN), np.float32)  # tied head: logits = x @ embedding.T
    weights_jax, embedding_jax = [jnp.asarray(w) for w in weights], jnp.asarray(embedding)

    xla_layers = jax.jit(functools.partial(chained_products, jnp))
    xla_head = jax.jit(lambda x, e: jnp.einsum("td,vd->tv", x, e))

    print(f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; median of {args.repeats}\n")
    print("| T | XLA layers ms | XLA head ms | XLA GFLOP/s | NumPy layers ms | NumPy head ms | NumPy GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    layer_flops = 2 * sum(a * b for a, b in LAYER_SHAPES) * LAYERS
    head_flops = 2 * VOCAB * HIDDEN
    for t in args.tokens:
        x = rng.standard_normal((t, HIDDEN), np.float32)
        x_jax = jnp.asarray(x)
        xla = (median_ms(lambda: xla_layers(x_jax, weights_jax).block_until_ready(), args.repeats),
               median_ms(lambda: xla_head(x_jax, embedding_jax).block_until_ready(), args.repeats))
        blas = (median_ms(lambda: chained_products(np, x, weights), args.repeats),
                median_ms(lambda: x @ embedding.T, args.repeats))
        flops = t * (layer_flops + head_flops)
        print(f"| {t} | {xla[0]:.1f} | {xla[1]:.1f} | {flops / sum(xla) / 1e6:.1f} "
              f"| {blas[0]:.1f} | {blas[1]:.1f} | {flops / sum(blas) / 1e6:.1f} |")


if __name__ == "__main__":
    main()
