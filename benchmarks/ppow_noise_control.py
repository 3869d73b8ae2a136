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
from ppow_jax.errors import InputError
from ppow_jax.training import ppow

real_group_advantages = ppow.group_advantages
real_settings_from_config = ppow.settings_from_config


def shuffled_group_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    advantages = real_group_advantages(rewards, eps)
    # A key that changes with the batch (the rollout is jitted: no Python-side counter).
    key = jax.random.key(jnp.sum(jnp.abs(rewards * 1000)).astype(jnp.uint32))
    return jax.random.permutation(key, advantages, axis=-1, independent=True)


def sampled_settings_only(ppow_config: Any, gamma: float) -> ppow.PPOWSettings:
    settings = real_settings_from_config(ppow_config, gamma)
    if settings.estimator != "sampled":
        raise InputError(f"the noise control shuffles the sampled estimator's group advantages; ppow.estimator is "
                         f"{settings.estimator!r}, which has none: add --config.ppow.estimator=sampled")
    return settings


def install() -> None:
    """Swaps the control into `ppow` (train.py looks both names up when the run starts)."""
    ppow.group_advantages = shuffled_group_advantages
    ppow.settings_from_config = sampled_settings_only


if __name__ == "__main__":
    install()
    sys.exit(train.main(sys.argv[1:]))
