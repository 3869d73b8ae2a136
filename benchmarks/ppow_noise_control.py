"""A control for PPOW's policy gradient: the same run with each group's advantages shuffled among
its G windows, so the update has the same statistics and no signal.

If the dev probe falls as much under this control as under real advantages, the update merely
drifts the drafter; if it falls only under real advantages, the signal itself moves the drafter the
wrong way for greedy serving (BENCHMARKS.md, PPOW, "Why"). Takes `python -m ppow_jax.train`'s flags,
with the sampled estimator (the exact one has no groups to shuffle):

    python benchmarks/ppow_noise_control.py --config configs/smollm2_135m_ppow.py --config.train.steps=20 \
        --config.ppow.estimator=sampled --config.workdir=runs/ppow2/noise ...
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp

from ppow_jax import train
from ppow_jax.cli import run_config_entry_point
from ppow_jax.errors import InputError
from ppow_jax.training import ppow

real_group_advantages = ppow.group_advantages


def shuffled_group_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    advantages = real_group_advantages(rewards, eps)
    # A key that changes with the batch (the rollout is jitted: no Python-side counter).
    key = jax.random.key(jnp.sum(jnp.abs(rewards * 1000)).astype(jnp.uint32))
    return jax.random.permutation(key, advantages, axis=-1, independent=True)


def check_sampled_estimator(config: Any) -> None:
    """The control shuffles the sampled estimator's group advantages; the exact estimator has none."""
    estimator = config.ppow.get("estimator", "sampled")
    if estimator != "sampled":
        raise InputError(f"the noise control shuffles the sampled estimator's group advantages; ppow.estimator is "
                         f"{estimator!r}, which has none: add --config.ppow.estimator=sampled")


def run_control(config: Any) -> int:
    """`train.run` with each group's advantages shuffled (train.py looks the function up at trace time)."""
    check_sampled_estimator(config)
    ppow.group_advantages = shuffled_group_advantages
    return train.run(config)


if __name__ == "__main__":
    sys.exit(run_config_entry_point(run_control, sys.argv[1:], doc=__doc__))
