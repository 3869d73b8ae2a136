"""Sampling distributions: temperature, top-k, top-p, and statistical checks of the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ppow_jax.errors import InputError
from ppow_jax.inference.sampling import SamplingParams, processed_logprobs, sample_tokens

LOGITS = jnp.log(jnp.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02]))


def probs(params):
    return np.asarray(jnp.exp(processed_logprobs(LOGITS, params)), np.float64)


def test_temperature_top_k_top_p_by_hand():
    np.testing.assert_allclose(probs(SamplingParams(temperature=1.0)), np.exp(np.asarray(LOGITS)), rtol=1e-5)
    p_hot = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02]) ** 0.5
    np.testing.assert_allclose(probs(SamplingParams(temperature=2.0)), p_hot / p_hot.sum(), rtol=1e-5)
    top3 = np.array([0.30, 0.20, 0.15, 0, 0, 0, 0, 0]) / 0.65
    np.testing.assert_allclose(probs(SamplingParams(temperature=1.0, top_k=3)), top3, rtol=1e-5, atol=1e-7)
    # top_p=0.6: 0.30 + 0.20 = 0.50 < 0.6, so the third token is needed to reach 0.6.
    np.testing.assert_allclose(probs(SamplingParams(temperature=1.0, top_p=0.6)), top3, rtol=1e-5, atol=1e-7)
    # top_p=0.5 exactly reached by two tokens.
    top2 = np.array([0.6, 0.4, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(probs(SamplingParams(temperature=1.0, top_p=0.5)), top2, rtol=1e-5, atol=1e-7)
    # top-k then top-p: of the renormalised top-4 (0.3/.77, .2/.77, ...), 0.39+0.26 >= 0.6.
    np.testing.assert_allclose(probs(SamplingParams(temperature=1.0, top_k=4, top_p=0.6)), top2, rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
                                    SamplingParams(temperature=1.3, top_p=0.8)])
def test_sampler_matches_distribution_chi_square(params):
    n = 40_000
    keys = jax.random.split(jax.random.key(123), n)
    draws = jax.jit(jax.vmap(lambda k: sample_tokens(k, LOGITS[None], params)[0]))(keys)
    counts = np.bincount(np.asarray(draws), minlength=8)
    expected = probs(params)
    expected = expected / expected.sum() * n  # float32 probabilities, renormalised in float64
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token outside top-k/top-p"
    _, p_value = stats.chisquare(counts[support], expected[support])
    assert p_value > 1e-3


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    np.testing.assert_array_equal(sample_tokens(jax.random.key(1), logits, SamplingParams()), jnp.argmax(logits, -1))
    with pytest.raises(ValueError):
        processed_logprobs(logits, SamplingParams())


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs)
