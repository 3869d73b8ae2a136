"""Where ADAW's priorities put PPOW's weight: window scores against what the exact estimator can learn.

For a drafter on a feature split, every valid anchor's window (K = `ppow.window` drafts along the
data, the exact estimator's path) gets:
- its ADAW score: the mean criticality v_t = C(P_t)·KL(P_t‖Q_t) over the window, standardised per
  sequence, as training computes it;
- E[k]: the expected accepted length under the rollout policy Q_τ (`ppow.rollout_temperature`);
- its learning signal: ‖∂μ/∂z‖/σ, the size of the exact estimator's policy term at the anchor
  (∇μ/σ; μ and σ are the window reward's mean and spread), taken with respect to the drafter's
  logits z at the window's K steps, through the acceptance path and the near-miss probability.

It prints the anchors by score quintile, Spearman's ρ, and the mean E[k] and signal under uniform
weights and under ADAW's priorities (`anchor_priorities`) at several temperatures and floors. The
quintiles and ρ count every anchor once; the weighted rows average each sequence's weighted mean, as
training's loss does. The question it answers: do the "hard" windows ADAW prefers carry more or less
of what PPOW's objective can move?

The feature split must be a greedy self-distillation of the drafter's target (the windows are
verified against the data, as the exact estimator does).

    python benchmarks/adaw_scores.py --config configs/smollm2_135m_ppow.py \
        --drafter checkpoints/smollm2-135m-instruct/kd --features runs/smollm2-135m-instruct/kd/features-unseen1536
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.cli import load_config_file, run_entry_point
from ppow_jax.data.features import feature_shards
from ppow_jax.data.pipeline import feature_dataset
from ppow_jax.drafters.eagle import Eagle3Drafter
from ppow_jax.drafters.store import load_drafter
from ppow_jax.errors import InputError
from ppow_jax.training.ppow import (Batch, PPOWSettings, PPOWTarget, anchor_priorities, per_anchor,
                                    reach_probabilities, reward_moments, settings_from_config, unrolled_logits,
                                    valid_anchors, window_scores, windows_from_logits)
from ppow_jax.weights.registry import load_model

BATCH_SIZE = 4
QUINTILES = 5
OTHER_PRIORITIES = ((1.0, 0.2), (2.0, 0.2), (4.0, 0.2), (1.0, 0.5))  # (temperature, floor), after the config's own


def learning_signal(mean_and_spread: Callable[[jax.Array], tuple[jax.Array, jax.Array]], logits: jax.Array,
                    eps: float = 1e-6) -> jax.Array:
    """Per anchor [B, L]: ‖∂μ/∂z‖/σ, z the unrolled logits [K, B, L, N] (step j of anchor a at
    position a + j, so each logit belongs to one anchor, and the gradient of the anchors' summed μ
    holds each anchor's own). `mean_and_spread(z)` -> (μ, σ), [B, L] each."""
    def summed(z):
        mean, spread = mean_and_spread(z)
        return jnp.sum(mean), spread

    grads, spread = jax.grad(summed, has_aux=True)(logits)
    norm = jnp.sqrt(jnp.sum(per_anchor(jnp.sum(grads ** 2, axis=-1)), axis=-1))
    return norm / (spread + eps)  # the estimator's own ε


def anchor_table(drafter: Eagle3Drafter, params: dict, target: PPOWTarget, batch: Batch,
                 settings: PPOWSettings) -> dict[str, jax.Array]:
    """Per anchor [B, L]: standardised ADAW score, E[k], learning signal, validity."""
    logits = unrolled_logits(params, target, batch, drafter=drafter, window=settings.window)
    windows = windows_from_logits(logits, target, batch, settings=settings)
    valid = valid_anchors(batch["loss_mask"], settings.window)

    def mean_and_spread(z: jax.Array) -> tuple[jax.Array, jax.Array]:
        w = windows_from_logits(z, target, batch, settings=settings)
        return reward_moments(w.accept_probs, w.near_miss, settings)

    return {"score": window_scores(windows.target_logprobs, windows.logprobs[0], valid, settings.window),
            "expected_k": jnp.sum(reach_probabilities(windows.accept_probs)[..., 1:], axis=-1), "valid": valid,
            "signal": learning_signal(mean_and_spread, logits)}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties given their mean rank (Spearman's ρ with ties)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, groups = np.unique(values, return_inverse=True)
    return (np.bincount(groups, ranks) / np.bincount(groups))[groups]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_ppow.py", help="a PPOW config: target, K, τ, rewards")
    parser.add_argument("--drafter", required=True, help="an exported drafter directory")
    parser.add_argument("--features", required=True,
                        help="the feature cache of a greedy self-distillation of the drafter's target (the split to score)")
    parser.add_argument("--batches", type=int, default=25, help=f"batches of {BATCH_SIZE} sequences to score")
    parser.add_argument("--gamma", type=float, default=0.02,
                        help="γ of R_speed, when the config measures it (the SmolLM2 runs measured 0.018-0.023)")
    return run_entry_point(parser, run)


def run(args: argparse.Namespace) -> int:
    if args.batches < 1:
        raise InputError(f"--batches must be >= 1, got {args.batches}")
    config = load_config_file(args.config)
    target = load_model(config.target, param_dtype=config.param_dtype)
    drafter, params = load_drafter(args.drafter, target.config)
    frozen = PPOWTarget.from_target(target.params, params["d2t"])
    gamma = config.ppow.gamma if config.ppow.gamma > 0 else args.gamma
    settings = dataclasses.replace(settings_from_config(config.ppow, gamma), estimator="exact", verifier="cache",
                                   acceptance="greedy")
    score_batch = jax.jit(lambda p, t, b: anchor_table(drafter, p, t, b, settings))
    batches = itertools.islice(iter(feature_dataset(feature_shards(args.features), batch_size=BATCH_SIZE, seed=0,
                                                    num_epochs=1)), args.batches)
    measured = [jax.device_get(score_batch(params, frozen, {k: jnp.asarray(v) for k, v in b.items()}))
                for b in batches]
    valid = np.concatenate([m["valid"].reshape(-1) for m in measured] or [np.zeros(0, bool)])
    if not valid.any():
        raise InputError(f"no valid anchor (a window of {settings.window} response tokens) in the first "
                         f"{len(measured)} batches of {args.features}")
    flat = {name: np.concatenate([m[name].reshape(-1) for m in measured])[valid]
            for name in ("score", "expected_k", "signal")}
    print(f"{args.drafter} on {args.features}: {valid.sum()} anchors of {sum(len(m['valid']) for m in measured)} "
          f"sequences, K = {settings.window}, τ = {settings.rollout_temperature}, γ = {gamma}, "
          f"proximity reward {'on' if settings.proximity_reward else 'off'}\n")

    print("| score quintile | anchors | mean standardised score | mean E[k] | mean learning signal |")
    print("|---|---|---|---|---|")
    by_score = np.array_split(np.argsort(flat["score"], kind="stable"), QUINTILES)
    for q, chosen in enumerate(by_score):
        print(f"| {q + 1} | {len(chosen)} | {flat['score'][chosen].mean():+.2f} | "
              f"{flat['expected_k'][chosen].mean():.3f} | {flat['signal'][chosen].mean():.4f} |")
    print()
    for name in ("expected_k", "signal"):
        rho = np.corrcoef(average_ranks(flat["score"]), average_ranks(flat[name]))[0, 1]
        print(f"Spearman ρ(score, {name}) = {rho:+.3f}")

    print("\n| anchor weights | weighted mean E[k] | weighted mean learning signal |")
    print("|---|---|---|")
    own = (settings.priority_temperature, settings.priority_floor)
    weightings = [("uniform", None), (f"ADAW, temperature {own[0]}, floor {own[1]} (the config's)", own)]
    weightings += [(f"ADAW, temperature {t}, floor {f}", (t, f)) for t, f in OTHER_PRIORITIES if (t, f) != own]
    for label, priority in weightings:
        totals = np.zeros(3)
        for m in measured:
            rows_valid = jnp.asarray(m["valid"])
            if priority is None:
                weights = anchor_priorities(rows_valid, None, 1.0, 1.0)  # uniform (temperature, floor unused)
            else:
                weights = anchor_priorities(rows_valid, jnp.asarray(m["score"]), *priority)
            weights = np.asarray(weights)
            totals += [np.sum(weights * m["expected_k"]), np.sum(weights * m["signal"]), np.sum(weights)]
        print(f"| {label} | {totals[0] / totals[2]:.3f} | {totals[1] / totals[2]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
