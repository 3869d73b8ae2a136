"""What one token-level train step of a config costs, before any run: XLA's FLOP count and memory
for the compiled step (random drafter, the config's target, a batch of the config's shapes).

Sizes a run for a machine you do not have at hand: the FLOPs over the accelerator's sustained rate
give a lower bound on the step time, the memory says whether the batch fits. Compiled for this
machine's backend, so the memory figures are the CPU compiler's, a guide to a GPU's.

    python benchmarks/train_step_cost.py --config configs/smollm2_135m_kd_gpu.py
    python benchmarks/train_step_cost.py --config configs/smollm2_135m_kd.py --config.train.unroll_steps=5
"""

from __future__ import annotations

import sys
import time

import jax
import ml_dtypes
import numpy as np

from ppow_jax import multihost
from ppow_jax.cli import run_config_entry_point
from ppow_jax.drafters.eagle import Eagle3Drafter
from ppow_jax.train import optimizer_config
from ppow_jax.training.kd import KDTrainer
from ppow_jax.weights.registry import load_model


def run(config) -> int:
    target = load_model(config.target, param_dtype=config.param_dtype)
    drafter = Eagle3Drafter.for_target(target.config, tuple(config.drafter.feature_layers),
                                       config.drafter.draft_vocab_size, config.drafter.intermediate_size)
    tc, data = config.train, config.data
    trainer = KDTrainer(drafter, target.params, np.arange(config.drafter.draft_vocab_size), optimizer_config(tc),
                        unroll_steps=tc.unroll_steps, loss_positions=tc.loss_positions)
    state = trainer.init_state(jax.random.key(0))
    d, batch_size, seq = target.config.hidden_size, tc.batch_size, data.seq_len
    batch = {"tokens": np.zeros((batch_size, seq), np.int32), "loss_mask": np.ones((batch_size, seq), np.uint8),
             "features": np.zeros((batch_size, seq, len(config.drafter.feature_layers) * d), ml_dtypes.bfloat16),
             "target_hidden": np.zeros((batch_size, seq, d), ml_dtypes.bfloat16)}
    step = trainer.jitted_step(state, batch)  # the program training runs, with its shardings
    started = time.perf_counter()
    with jax.set_mesh(trainer.mesh):
        compiled = step.lower(state, multihost.local_to_global(batch, trainer.mesh), trainer.target).compile()
    compile_s = time.perf_counter() - started
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    flops = float(cost.get("flops", float("nan")))
    positions = batch_size * seq
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {batch_size} x {seq} positions, "
          f"{tc.unroll_steps} unrolled steps, loss positions {tc.loss_positions or positions}; compiled in {compile_s:.1f} s\n")
    print("| figure | value |")
    print("|---|---|")
    print(f"| FLOPs per step (XLA's count) | {flops / 1e12:.2f} T |")
    print(f"| FLOPs per position | {flops / positions / 1e6:.0f} M |")
    for rate in (50, 200):
        print(f"| step time at {rate} TFLOP/s sustained | {1e3 * flops / (rate * 1e12):.1f} ms |")
    if memory is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            print(f"| {name.replace('_in_bytes', '').replace('_', ' ')} | {getattr(memory, name) / 2**30:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(run_config_entry_point(run, sys.argv[1:], doc=__doc__))
