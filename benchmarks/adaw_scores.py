"""Where ADAW's priorities put PPOW's weight: window scores against what the exact estimator can learn.

For a drafter on a feature split, every valid anchor's window (K = `ppow.window` drafts along the
data, the exact estimator's path) gets:
- its ADAW score: the mean criticality v_t = C(P_t)·KL(P_t‖Q_t) over the window, standardised per
  sequence as training does;
- E[k]: the expected accepted length under the rollout policy Q_τ (`ppow.rollout_temperature`);
- its learning signal: |∂μ/∂z| / σ, the size of the exact estimator's policy gradient at the anchor
  with respect to the logits z of the tokens the target accepts (μ, σ: the window reward's mean and
  spread; the estimator's term is ∇μ/σ). ∂a_j/∂z_j = a_j(1 - a_j)/τ, ∂μ/∂a_j by autodiff.

It prints the anchors by score quintile, the correlations, and how the priority distributions
(`anchor_priorities` at several temperatures and floors) shift the weighted mean of E[k] and of the
signal against uniform weights. The question it answers: do the "hard" windows ADAW prefers carry
more or less of what PPOW's objective can move?

    python benchmarks/adaw_scores.py --config configs/smollm2_135m_ppow.py \
        --drafter checkpoints/smollm2-135m-instruct/kd --features runs/smollm2-135m-instruct/kd/features-unseen1536
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.cli import load_config_file, run_entry_point
from ppow_jax.data.features import feature_shards
from ppow_jax.data.pipeline import feature_dataset
from ppow_jax.drafters.store import load_drafter
from ppow_jax.training.ppow import (PPOWTarget, anchor_priorities, criticality, exact_windows, reward_moments,
                                    settings_from_config, standardised, valid_anchors, window_sums)
from ppow_jax.weights.registry import load_model

PRIORITIES = ((1.0, 0.2), (2.0, 0.2), (4.0, 0.2), (1.0, 0.5))  # (temperature, floor); the config's is first


def anchor_table(drafter, params: dict, target: PPOWTarget, batch: dict, settings) -> dict[str, jax.Array]:
    """Per anchor [B, L]: standardised score, E[k], learning signal, validity."""
    windows = exact_windows(params, target, batch, drafter=drafter, settings=settings)
    valid = valid_anchors(batch["loss_mask"], settings.window)
    scores = standardised(window_sums(criticality(windows.target_logprobs, windows.logprobs[0]), settings.window)
                          / settings.window, valid)

    expected = jnp.sum(jnp.cumprod(windows.accept_probs, axis=-1), axis=-1)
    return {"score": scores, "expected_k": expected, "valid": valid,
            "signal": learning_signal(windows.accept_probs, windows.near_miss, settings)}


def learning_signal(accept_probs: jax.Array, near_miss: jax.Array, settings) -> jax.Array:
    """[..., K] acceptance probabilities -> [...]: |∂μ/∂z| / σ, z the logits of the accepted tokens
    (for K = 1 without the proximity reward, sqrt(a(1 - a))/τ: largest at a = 1/2, 0 at a = 0 or 1)."""
    def total_mean(a):
        return jnp.sum(reward_moments(a, near_miss, settings)[0])

    a = accept_probs
    d_mean = jax.grad(total_mean)(a)  # each anchor's μ depends on its own row only
    _, spread = reward_moments(a, near_miss, settings)
    sensitivity = jnp.sqrt(jnp.sum((d_mean * a * (1.0 - a) / settings.rollout_temperature) ** 2, axis=-1))
    return sensitivity / (spread + 1e-6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_ppow.py", help="a PPOW config: target, K, τ, rewards")
    parser.add_argument("--drafter", required=True, help="an exported drafter directory")
    parser.add_argument("--features", required=True, help="a feature cache directory (the split to score)")
    parser.add_argument("--batches", type=int, default=25, help="batches of 4 sequences to score")
    return run_entry_point(parser, run)


def run(args: argparse.Namespace) -> int:
    config = load_config_file(args.config)
    target = load_model(config.target, param_dtype=config.param_dtype)
    drafter, params = load_drafter(args.drafter, target.config)
    frozen = PPOWTarget.from_target(target.params, params["d2t"])
    gamma = config.ppow.gamma if config.ppow.gamma > 0 else 0.02  # γ barely matters here: R_speed(k) ≈ k for γ ≪ 1
    settings = dataclasses.replace(settings_from_config(config.ppow, gamma), estimator="exact", verifier="cache",
                                   acceptance="greedy")
    table = jax.jit(lambda batch: anchor_table(drafter, params, frozen, batch, settings))
    batches = itertools.islice(iter(feature_dataset(feature_shards(args.features), batch_size=4, seed=0,
                                                    num_epochs=1)), args.batches)
    rows = {name: [] for name in ("score", "expected_k", "signal", "valid")}
    per_sequence = []  # every sequence's anchors (for the priorities, which normalise per sequence)
    for batch in batches:
        measured = jax.device_get(table({k: jnp.asarray(v) for k, v in batch.items()}))
        for name in rows:
            rows[name].append(measured[name])
        per_sequence.append(measured)
    valid = np.concatenate([r.reshape(-1) for r in rows["valid"]])
    flat = {name: np.concatenate([r.reshape(-1) for r in rows[name]])[valid] for name in ("score", "expected_k", "signal")}
    print(f"{args.drafter} on {args.features}: {valid.sum()} anchors of {len(rows['valid']) * 4} sequences, "
          f"K = {settings.window}, τ = {settings.rollout_temperature}\n")

    edges = np.quantile(flat["score"], np.linspace(0, 1, 6))
    print("| score quintile | mean standardised score | mean E[k] | mean learning signal |")
    print("|---|---|---|---|")
    bins = np.clip(np.searchsorted(edges, flat["score"], side="right") - 1, 0, 4)
    for q in range(5):
        chosen = bins == q
        print(f"| {q + 1} | {flat['score'][chosen].mean():+.2f} | {flat['expected_k'][chosen].mean():.3f} | "
              f"{flat['signal'][chosen].mean():.4f} |")
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731 (Spearman's ρ: Pearson's on ranks)
    for name in ("expected_k", "signal"):
        rho = np.corrcoef(rank(flat["score"]), rank(flat[name]))[0, 1]
        print(f"\nSpearman ρ(score, {name}) = {rho:+.3f}", end="")
    print("\n\n| anchor weights | weighted mean E[k] | weighted mean learning signal |")
    print("|---|---|---|")
    weightings = [("uniform", None)] + [(f"ADAW, temperature {t}, floor {f}", (t, f)) for t, f in PRIORITIES]
    for label, setting in weightings:
        totals = np.zeros(3)
        for m in per_sequence:
            valid_rows = jnp.asarray(m["valid"])
            scores = None if setting is None else jnp.asarray(m["score"])
            weights = np.asarray(anchor_priorities(valid_rows, scores, *(setting or (1.0, 1.0))))
            totals += [np.sum(weights * m["expected_k"]), np.sum(weights * m["signal"]), np.sum(weights)]
        print(f"| {label} | {totals[0] / totals[2]:.3f} | {totals[1] / totals[2]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
