"""PPOW: rewards and advantages on hand-computed cases, the drafter's window chain against the
training forward (itself pinned to the engine), verification against the target, the PPO update on a
toy policy, a tiny end-to-end run, exact resume, the adaptive window, bad settings."""

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO_ROOT, load_config, tiny_config, tiny_params
from ppow_jax.data.features import feature_shards
from ppow_jax.data.pipeline import feature_dataset
from ppow_jax.drafters.eagle import Eagle3Drafter, unrolled_hidden
from ppow_jax.drafters.store import load_drafter
from ppow_jax.errors import InputError
from ppow_jax.inference.autoregressive import AutoregressiveDecoder
from ppow_jax.inference.speculative import SpeculativeDecoder
from ppow_jax.inference.windows import WindowPolicy
from ppow_jax.models import llama
from ppow_jax.training import ppow
from ppow_jax.training.kd import TrainState


# ----- rewards, advantages, criticality, anchors -----

def test_measured_cost_ratio_is_a_drafter_step_over_a_verify_pass():
    config = tiny_config(num_layers=4)
    drafter = Eagle3Drafter.for_target(config, (0, 1, 2), 64, 32)
    gamma = ppow.measure_cost_ratio(drafter, drafter.init_params(jax.random.key(0)), config, tiny_params(config), 4,
                                    context=16, repeats=5)
    # One small decoder layer against four of the target's: cheaper, but not free.
    assert 0.0 < gamma < 2.0


def test_speed_reward_is_tokens_per_unit_cost():
    k = jnp.array([0, 1, 3, 10])
    np.testing.assert_allclose(ppow.speed_reward(k, 0.1), [0.0, 1 / 1.1, 3 / 1.3, 10 / 2.0], rtol=1e-6)
    np.testing.assert_allclose(ppow.speed_reward(k, 0.1, cost_aware=False), [0, 1, 3, 10])
    # A costlier drafter earns less for long windows: the reward saturates at 1/γ.
    assert float(ppow.speed_reward(jnp.array(10), 0.5)) == pytest.approx(10 / 6)


def test_proximity_reward_only_for_close_first_rejections():
    k = jnp.array([0, 0, 0, 1, 2])
    gap = jnp.array([0.5, 1.999, 2.0, 0.1, 5.0])
    np.testing.assert_allclose(ppow.proximity_reward(k, gap, eta=0.7, epsilon=2.0), [0.7, 0.7, 0.0, 0.0, 0.0])


def test_expected_rewards_by_hand():
    """The rewards' mean over k's distribution: under greedy acceptance (0/1 probabilities) R(k) itself."""
    settings = ppow.PPOWSettings(window=3, gamma=0.1, proximity_eta=0.7, proximity_epsilon=2.0)
    greedy = jnp.array([[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]])
    gap = jnp.array([[9.0, 1.0, 1.0]])
    speed, proximity = ppow.expected_rewards(greedy, gap, settings)
    k = jnp.array([[2, 0, 3]])
    np.testing.assert_array_equal(speed, ppow.speed_reward(k, 0.1))
    np.testing.assert_array_equal(proximity, ppow.proximity_reward(k, gap, eta=0.7, epsilon=2.0))
    # Sampling acceptance, probabilities (0.5, 0.4, 1): P(k = 0, 1, 2, 3) = (0.5, 0.3, 0, 0.2).
    probs = jnp.array([[[0.5, 0.4, 1.0]]])
    np.testing.assert_allclose(ppow.accepted_length_distribution(probs), [[[0.5, 0.3, 0.0, 0.2]]], atol=1e-7)
    speed, proximity = ppow.expected_rewards(probs, jnp.array([[1.0]]), settings)
    np.testing.assert_allclose(speed, [[0.3 / 1.1 + 0.2 * 3 / 1.3]], rtol=1e-6)
    np.testing.assert_allclose(proximity, [[0.5 * 0.7]], rtol=1e-6)
    off = dataclasses.replace(settings, proximity_reward=False, cost_aware_reward=False)
    speed, proximity = ppow.expected_rewards(probs, jnp.array([[1.0]]), off)
    np.testing.assert_allclose(speed, [[0.3 + 0.6]], rtol=1e-6)
    assert float(proximity.sum()) == 0.0


def test_expected_reward_is_the_mean_over_the_engines_acceptance_coins():
    """Lossless sampling acceptance draws k; the expected reward from min(1, p/q) is its mean."""
    from ppow_jax.inference.sampling import SamplingParams, processed_logprobs
    from ppow_jax.inference.speculative import accept_sampling, draft_acceptance_logprobs

    rng = np.random.default_rng(0)
    window, vocab = 4, 5
    q = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(3, window, vocab)), jnp.float32), axis=-1)
    target_logits = jnp.asarray(rng.normal(size=(3, window + 1, vocab)), jnp.float32)
    drafts = jax.random.categorical(jax.random.key(1), q, axis=-1).astype(jnp.int32)
    sampling = SamplingParams(temperature=1.0)
    probs = jnp.exp(draft_acceptance_logprobs(drafts, q, processed_logprobs(target_logits, sampling)))
    settings = ppow.PPOWSettings(window=window, gamma=0.1, proximity_eta=0.5, proximity_epsilon=2.0)
    expected, _ = ppow.expected_rewards(probs, jnp.zeros(3), settings)
    trials = 20000
    k = jax.vmap(lambda key: accept_sampling(key, drafts, jnp.full((3,), window), q, target_logits, sampling)[0])(
        jax.random.split(jax.random.key(2), trials))
    rewards = np.asarray(ppow.speed_reward(k, 0.1))  # [trials, 3]
    stderr = rewards.std(axis=0) / math.sqrt(trials)
    assert np.all(np.abs(rewards.mean(axis=0) - np.asarray(expected)) < 4 * stderr + 1e-6)
    assert np.all(stderr > 0)  # the coins matter for these windows


def test_group_advantages_normalise_within_each_group():
    rewards = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    adv = ppow.group_advantages(rewards)
    std = np.std([1, 2, 3, 4])
    np.testing.assert_allclose(adv[0], (np.array([1, 2, 3, 4]) - 2.5) / (std + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(adv[1], 0.0)  # no signal when every window did equally well
    np.testing.assert_allclose(jnp.mean(adv, axis=-1), 0.0, atol=1e-6)


def test_informative_groups_count_valid_groups_with_a_reward_spread():
    rewards = jnp.array([[[0.0, 0.0, 1.0], [2.0, 2.0, 2.0]], [[0.5, 0.0, 0.0], [3.0, 1.0, 3.0]]])
    valid = jnp.array([[True, True], [True, False]])
    # Valid groups: spread, equal, spread -> 2 of 3; the invalid group's spread does not count.
    np.testing.assert_allclose(ppow.informative_group_fraction(rewards, valid), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(ppow.informative_group_fraction(rewards, jnp.zeros_like(valid)), 0.0)


def test_criticality_is_target_confidence_times_divergence():
    p = np.array([0.7, 0.2, 0.1])
    q = np.array([0.2, 0.3, 0.5])
    confidence = 1 + np.sum(p * np.log(p)) / np.log(3)
    expected = confidence * np.sum(p * np.log(p / q))
    got = ppow.criticality(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q)))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # A uniform target (no confidence) or a drafter equal to it (no divergence) are not critical.
    uniform = jnp.log(jnp.full((3,), 1 / 3))
    assert float(ppow.criticality(uniform, jnp.log(jnp.asarray(q)))) == pytest.approx(0.0, abs=1e-6)
    assert float(ppow.criticality(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(p)))) == pytest.approx(0.0, abs=1e-6)


def test_windows_anchors_and_priorities():
    values = jnp.arange(1.0, 7.0)[None]  # [1..6]
    np.testing.assert_allclose(ppow.window_sums(values, 3)[0], [6, 9, 12, 15, 11, 6])
    mask = jnp.array([[0, 1, 1, 1, 1, 0, 0]])
    # Anchors 1 and 2 have 3 response positions after them; anchor 0 never counts.
    np.testing.assert_array_equal(ppow.valid_anchors(mask, 3)[0], [False, True, True, False, False, False, False])
    valid = jnp.array([[False, True, True, True]])
    scores = jnp.array([[100.0, 0.0, math.log(3.0), 0.0]])
    probs = ppow.anchor_priorities(valid, scores, temperature=1.0, floor=0.25)
    np.testing.assert_allclose(probs[0], [0, 0.75 * 0.2 + 0.25 / 3, 0.75 * 0.6 + 0.25 / 3, 0.75 * 0.2 + 0.25 / 3],
                               rtol=1e-5)
    anchors, ok = ppow.sample_anchors(jax.random.key(0), probs, 4)
    assert sorted(np.asarray(anchors[0][np.asarray(ok[0])]).tolist()) == [1, 2, 3] and int(ok.sum()) == 3
    # With priority, the high-score anchor is drawn first far more often than uniform sampling would.
    firsts = [int(ppow.sample_anchors(jax.random.key(s), probs, 1)[0][0, 0]) for s in range(300)]
    assert 0.45 < firsts.count(2) / 300 < 0.65  # expected 0.533


def test_settings_reject_bad_combinations():
    with pytest.raises(InputError, match="sampling acceptance needs"):
        ppow.PPOWSettings(verifier="cache", acceptance="sampling")
    with pytest.raises(InputError, match="group_size"):
        ppow.PPOWSettings(group_size=1)
    with pytest.raises(InputError, match="gamma"):
        ppow.PPOWSettings(gamma=0.0)
    with pytest.raises(InputError, match="verifier"):
        ppow.PPOWSettings(verifier="oracle")
    with pytest.raises(InputError, match="rollout_temperature"):
        ppow.PPOWSettings(rollout_temperature=0.0)
    for weight in (-1.0, float("inf")):
        with pytest.raises(InputError, match="context_kl_beta"):
            ppow.PPOWSettings(context_kl_beta=weight)
    with pytest.raises(InputError, match="estimator"):
        ppow.PPOWSettings(estimator="analytic")
    with pytest.raises(InputError, match="needs ppow.verifier='cache'"):
        ppow.PPOWSettings(estimator="exact", verifier="target")


@functools.cache
def _benchmark_module(name: str):
    """A script of benchmarks/ as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_noise_control_refuses_the_exact_estimator(monkeypatch):
    """`benchmarks/ppow_noise_control.py` shuffles the sampled estimator's group advantages; the exact
    estimator (the SmolLM2 config's default) has none, so the control must refuse it, not run unshuffled."""
    noise_control = _benchmark_module("ppow_noise_control")
    monkeypatch.setattr(ppow, "group_advantages", ppow.group_advantages)  # restored after the test
    config = load_config("smollm2_135m_ppow")
    config.ppow.estimator = "exact"
    with pytest.raises(InputError, match="--config.ppow.estimator=sampled"):
        noise_control.run_control(config)  # refused before any work
    assert ppow.group_advantages is not noise_control.shuffled_group_advantages
    config.ppow.estimator = "sampled"
    noise_control.check_sampled_estimator(config)


# ----- the window chain is the engine's drafting path -----

def _tiny_pair(vocab=64, draft_vocab=64, seed=3):
    config = tiny_config(vocab_size=vocab)
    params = tiny_params(config)
    drafter = Eagle3Drafter.for_target(config, (0, 1, 2), draft_vocab, intermediate_size=32)
    d2t = np.random.default_rng(0).permutation(vocab)[:draft_vocab]
    return config, params, drafter, drafter.init_params(jax.random.key(seed), d2t=d2t, std=0.3)


def test_forced_windows_equal_the_unrolled_training_forward():
    """Teacher-forced on the data, window step j at anchor a == unrolled step j at position a + j,
    which tests/test_training.py pins to the engine's prefill/step."""
    config, params, drafter, dparams = _tiny_pair()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 14)), jnp.int32)
    out = llama.forward(params, tokens, llama.init_cache(config, 2, 14), config, hidden_layers=(0, 1, 2))
    features = out.hidden_states.transpose(1, 2, 0, 3).reshape(2, 14, -1)
    window = 4
    unrolled = unrolled_hidden(drafter, dparams, params["embed"], tokens, features, window)
    expected = jax.nn.log_softmax(drafter.draft_logits(dparams, unrolled), axis=-1)  # [S, B, L, N]
    context = ppow.context_pass(drafter, dparams, params["embed"], tokens, features)
    anchors = jnp.array([[0, 3, 7], [2, 5, 9]], jnp.int32)
    t2d = np.zeros(64, np.int32)
    t2d[np.asarray(dparams["d2t"])] = np.arange(64)
    data_tokens = jnp.stack([tokens[b][anchors[b][:, None] + jnp.arange(1, window + 1)] for b in range(2)])
    forced = jnp.asarray(t2d)[data_tokens]  # the draft ids of the data's next tokens
    drafts, logprobs = ppow.draft_windows(drafter, dparams, params["embed"], context, anchors, window, forced=forced)
    np.testing.assert_array_equal(drafts, forced)
    for b in range(2):
        for w, a in enumerate(np.asarray(anchors[b])):
            for j in range(window):
                np.testing.assert_allclose(logprobs[b, w, j], expected[j, b, a + j], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_windows_follow_the_drafter_distribution(temperature):
    config, params, drafter, dparams = _tiny_pair(draft_vocab=40)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (1, 10)), jnp.int32)
    out = llama.forward(params, tokens, llama.init_cache(config, 1, 10), config, hidden_layers=(0, 1, 2))
    features = out.hidden_states.transpose(1, 2, 0, 3).reshape(1, 10, -1)
    context = ppow.context_pass(drafter, dparams, params["embed"], tokens, features)
    anchors = jnp.full((1, 4000), 4, jnp.int32)
    drafts, logprobs = ppow.draft_windows(drafter, dparams, params["embed"], context, anchors, 2, key=jax.random.key(1),
                                          temperature=temperature)
    # The first draft of every window comes from the same distribution, Q^(1/τ) renormalised: its
    # frequencies match it.
    counts = np.bincount(np.asarray(drafts[0, :, 0]), minlength=40)
    probs = np.exp(np.asarray(ppow.tempered(logprobs, temperature)[0, 0, 0]))
    if temperature != 1.0:  # the tempered policy is sharper than the drafter itself
        assert probs.max() > np.exp(np.asarray(logprobs[0, 0, 0])).max()
    expected = 4000 * probs
    big = expected > 20
    chi2 = np.sum((counts[big] - expected[big]) ** 2 / expected[big])
    assert chi2 < 2 * big.sum() + 30, chi2
    greedy, _ = ppow.draft_windows(drafter, dparams, params["embed"], context, anchors[:, :1], 2)
    assert int(greedy[0, 0, 0]) == int(np.argmax(probs))


# ----- verification -----

@pytest.fixture(scope="session")
def kd_run(distilled, tiny_target, tmp_path_factory):
    """A tiny token-level run: its exported drafter and its feature cache (PPOW starts from them)."""
    from ppow_jax.train import run_training

    config, _, _ = distilled
    config = config.copy_and_resolve_references()
    config.workdir = str(tmp_path_factory.mktemp("kd"))
    config.train.steps = 40
    run_training(config, tiny_target, progress=False)
    return pathlib.Path(config.workdir)


def _frozen(target_params, d2t):
    return ppow.PPOWTarget.from_target(target_params, d2t)


def _first_batch(kd_run, size=4):
    return next(iter(feature_dataset(feature_shards(kd_run / "features"), batch_size=size, seed=0)))


def test_the_pipeline_prepares_only_its_read_ahead_in_the_background(kd_run, monkeypatch):
    from ppow_jax.data import features, pipeline

    shards = feature_shards(kd_run / "features")
    decoded = []
    monkeypatch.setattr(pipeline, "decode_example", lambda record: decoded.append(1) or features.decode_example(record))
    iterator = iter(feature_dataset(shards, batch_size=2, seed=0, read_ahead=2))
    first = next(iterator)
    time.sleep(1.0)  # time for the background threads to run as far ahead as they may
    assert len(decoded) <= 2 * (1 + 2)  # the batch returned and two ahead (Grain's default: 500 ahead)
    # The read-ahead changes nothing in the batches.
    again = itertools.islice(iter(feature_dataset(shards, batch_size=2, seed=0, read_ahead=1)), 5)
    for a, b in zip(itertools.chain([first], itertools.islice(iterator, 4)), again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_target_verification_equals_plain_forwards_and_the_cache(kd_run, tiny_target):
    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}
    window = 4
    valid = ppow.valid_anchors(batch["loss_mask"], window)
    probs = ppow.anchor_priorities(valid, None, 1.0, 1.0)
    chosen, ok = ppow.sample_anchors(jax.random.key(0), probs, 3)
    assert bool(ok.all())
    anchors = jnp.repeat(chosen, 4, axis=1)  # 4 windows per anchor
    context = ppow.context_pass(drafter, dparams, frozen.constants.embed, batch["tokens"], batch["features"])
    drafts, logprobs = ppow.draft_windows(drafter, dparams, frozen.constants.embed, context, anchors, window,
                                          key=jax.random.key(1))
    live = ppow.verify_with_target(tiny_target.config, tiny_target.params, frozen, batch["tokens"], anchors, drafts,
                                   logprobs, jax.random.key(2), "greedy")
    cached = ppow.verify_from_cache(batch, frozen, anchors, drafts, window)
    ids = np.asarray(jnp.take(frozen.constants.d2t, drafts))
    tokens = np.asarray(batch["tokens"])
    for b, w in itertools.product(range(anchors.shape[0]), range(anchors.shape[1])):
        a = int(anchors[b, w])
        sequence = np.concatenate([tokens[b, :a + 1], ids[b, w]])[None]
        logits = llama.forward(tiny_target.params, jnp.asarray(sequence), llama.init_cache(
            tiny_target.config, 1, sequence.shape[1]), tiny_target.config).logits[0]
        choice = np.asarray(jnp.argmax(logits[a:a + window], axis=-1))
        expected_k = int(np.cumprod(choice == ids[b, w]).sum())
        assert int(live.accepted[b, w]) == expected_k, (b, w)
    # The self-distilled data are the tiny target's greedy answers: the cache verifies identically.
    np.testing.assert_array_equal(cached.accepted, live.accepted)
    # Both give 0/1 acceptance probabilities whose leading ones are k, the same where the prefix matched,
    # and so the rewards and policy mask the rollout had before it took them in expectation: R(k), j <= k.
    for verified in (live, cached):
        np.testing.assert_array_equal(ppow.leading_matches(verified.accept_probs > 0), verified.accepted)
        settings = ppow.PPOWSettings(window=window, gamma=0.1)
        speed, proximity = ppow.expected_rewards(verified.accept_probs, verified.gap, settings)
        np.testing.assert_array_equal(speed, ppow.speed_reward(verified.accepted, 0.1))
        np.testing.assert_array_equal(proximity, ppow.proximity_reward(verified.accepted, verified.gap, 1.0, 2.0))
        np.testing.assert_array_equal(ppow.reach_probabilities(verified.accept_probs)[..., :-1] > 0,
                                      np.arange(window) <= np.asarray(verified.accepted)[..., None])
    known = np.asarray(cached.target_known)
    np.testing.assert_array_equal(np.asarray(cached.accept_probs)[known], np.asarray(live.accept_probs)[known])
    assert 0 < float(jnp.mean(live.accepted)) < window  # both accepted and rejected drafts occur
    # Where the drafted prefix matched, the cached target distribution is the live one.
    np.testing.assert_allclose(np.asarray(cached.target_logprobs)[known], np.asarray(live.target_logprobs)[known],
                               atol=0.05)  # bf16-cached hidden states


def test_rollout_accepted_lengths_equal_the_engines_on_the_same_windows(kd_run, tiny_target):
    """Prompted with x_0..x_{a-1}, the engine emits x_a, then drafts greedily the window the rollout
    drafts at anchor a, and its one verify cycle (a 2-token budget) accepts the same k."""
    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}
    window = 4
    # Anchors whose token x_a is itself a greedy response token (so the engine's prefill emits it).
    ok = np.asarray(ppow.valid_anchors(batch["loss_mask"], window)) & np.roll(np.asarray(batch["loss_mask"]), 1, axis=1)
    picks = [(b, int(a)) for b in range(ok.shape[0]) for a in np.flatnonzero(ok[b])[::5][:2]]
    anchors = jnp.asarray([[a for bb, a in picks if bb == b] for b in range(ok.shape[0])], jnp.int32)
    context = ppow.context_pass(drafter, dparams, frozen.constants.embed, batch["tokens"], batch["features"])
    drafts, logprobs = ppow.draft_windows(drafter, dparams, frozen.constants.embed, context, anchors, window)
    live = ppow.verify_with_target(tiny_target.config, tiny_target.params, frozen, batch["tokens"], anchors, drafts,
                                   logprobs, jax.random.key(0), "greedy")
    prompts = [np.asarray(batch["tokens"][b, :a]).tolist() for b, a in picks]
    engine = SpeculativeDecoder(tiny_target.config, tiny_target.params, drafter, dparams, eos_token_ids=(),
                                pad_token_id=tiny_target.tokenizer.pad_token_id or 0)
    result = engine.generate(prompts, 2, window=WindowPolicy("fixed", window))
    assert [t[0] for t in result.tokens] == [int(batch["tokens"][b, a]) for b, a in picks]
    assert result.cycles == [1] * len(picks)
    expected = np.bincount(np.asarray(live.accepted).reshape(-1), minlength=window + 1)
    np.testing.assert_array_equal(result.accept_hist, expected)
    assert expected[0] < len(picks)  # some windows are (partly) accepted


def test_replayed_cycles_are_the_greedy_engine_cycles(kd_run, tiny_target):
    """`benchmarks/eval_set_acceptance.py` walks a greedy engine's cycles along a cached answer from
    the window records at every position: the engine, prompted with the same prompt and a budget of
    exactly the tokens the walked cycles emit (plus the prefill's), runs exactly those cycles."""
    replay = _benchmark_module("eval_set_acceptance")
    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}
    window = 3
    tokens, masks = np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"])
    span = int(masks.sum(axis=-1).max())  # the windows from each answer's start on, as the benchmark's
    records = jax.jit(functools.partial(ppow.greedy_window_records, drafter, window=window, stride=1, span=span))
    _, accepted, reached = jax.device_get(records(dparams, frozen, batch))
    engine = SpeculativeDecoder(tiny_target.config, tiny_target.params, drafter, dparams, eos_token_ids=(),
                                pad_token_id=tiny_target.tokenizer.pad_token_id or 0)
    walked_cycles = accepted_drafts = 0
    for row, mask in enumerate(masks):
        start, length = int(np.argmax(mask)) + 1, int(mask.sum())  # the answer: tokens[start:start + length]
        if start + length >= len(mask):
            continue  # the sequence may have been cut to seq_len on the left
        accepts = replay.replay_cycles(accepted[row].sum(axis=-1), reached[row, :, 0])
        budget = 1 + sum(a + 1 for a in accepts)
        assert length - budget < window  # the walk leaves fewer than K answer tokens
        result = engine.generate([tokens[row, :start].tolist()], budget, window=WindowPolicy("fixed", window))
        assert result.cycles == [len(accepts)]
        assert result.accept_hist == np.bincount(accepts, minlength=window + 1).tolist()
        overlap = min(budget, length)  # the last cycle's bonus token may lie past the answer
        assert result.tokens[0][:overlap] == tokens[row, start:start + overlap].tolist()
        walked_cycles, accepted_drafts = walked_cycles + len(accepts), accepted_drafts + sum(accepts)
    assert walked_cycles >= 20 and accepted_drafts > 0


def test_spanned_window_records_are_the_full_ones_from_the_first_valid_anchor(kd_run, tiny_target):
    """With a span, the window records start at each row's first valid anchor: they equal the records
    at every position there, and anchors past the sequence's end are invalid."""
    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}
    window = 3

    def records(span):
        return jax.device_get(jax.jit(functools.partial(ppow.greedy_window_records, drafter, window=window,
                                                        stride=1, span=span))(dparams, frozen, batch))

    full = records(None)
    seq = full[2].shape[1]
    firsts = np.argmax(full[2][..., 0], axis=-1)
    assert full[2][..., 0].any(axis=-1).all() and len(set(firsts)) > 1  # the rows start apart
    for span in (8, seq):  # a span inside every row, and one past the end of rows that start late
        spanned = records(span)
        assert spanned[2].shape[1] == span
        for row, first in enumerate(firsts):
            positions = first + np.arange(span)
            inside = positions < seq
            np.testing.assert_allclose(spanned[0][row][inside], full[0][row][positions[inside]], rtol=1e-6)
            for part in (1, 2):
                np.testing.assert_array_equal(spanned[part][row][inside], full[part][row][positions[inside]])
            assert not spanned[2][row][~inside].any()
    # `spanned` is the last span's, `seq`: it holds every valid anchor
    assert (spanned[2][..., 0].sum(axis=-1) == full[2][..., 0].sum(axis=-1)).all()


def test_the_replay_refuses_a_span_that_cuts_an_answer_off():
    """The replay's records span each answer from its first valid anchor; a span that ends inside an
    answer (its last anchor still valid) would stop the walk short, so it is refused."""
    replay = _benchmark_module("eval_set_acceptance")
    answer_windows, window = 6, 3

    def records(span):
        reached = np.zeros((1, span, window), bool)
        reached[0, :answer_windows, 0] = True
        return lambda params, frozen, batch: (None, np.zeros_like(reached), reached)

    replayed = replay.replay_drafter(records(answer_windows + 1), {}, None, [{}])
    assert replayed.cycles.tolist() == [answer_windows - 1] and replayed.windows.tolist() == [answer_windows]
    with pytest.raises(ValueError, match="span ends inside an answer"):
        replay.replay_drafter(records(answer_windows), {}, None, [{}])


def test_replayed_tau_and_its_paired_error():
    """The replay's τ is a ratio of sums over questions. With as many cycles in every question for
    both drafters, its change's standard error is the plain paired one over questions."""
    replay = _benchmark_module("eval_set_acceptance")
    valid = np.array([False, True, True, True, True, True, True, False, False])
    lengths = np.array([9, 9, 2, 9, 9, 0, 1, 9, 9])  # the walk reads positions 2, 5, 6 only
    assert replay.replay_cycles(lengths, valid) == [2, 0, 1]
    assert replay.replay_cycles(lengths, np.zeros(9, bool)) == []
    cycles = np.full(4, 20)
    base = replay.ReplayedCycles(cycles=cycles, emitted=np.array([30, 26, 42, 33]), windows=np.full(4, 60),
                                 accepted_drafts=np.ones(4))
    other = base._replace(emitted=np.array([34, 27, 47, 31]))
    assert base.tau() == pytest.approx(131 / 80) and other.tau() == pytest.approx(139 / 80)
    difference, error = other.tau_difference(base)
    per_question = (other.emitted - base.emitted) / cycles
    assert difference == pytest.approx(per_question.mean())
    assert error == pytest.approx(per_question.std(ddof=1) / np.sqrt(4))
    with pytest.raises(ValueError, match="same questions"):
        other.tau_difference(base._replace(windows=np.full(4, 61)))
    with pytest.raises(InputError, match="no cycles"):
        base._replace(cycles=np.zeros(4, int)).tau()


def test_greedy_acceptance_counts_the_verified_windows(kd_run, tiny_target):
    """The dev probe's figures are the mean k and the first-draft accept rate of greedy windows at
    every stride-th valid anchor, as the live target verifies them."""
    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}
    window, stride = 4, 3
    records = jax.jit(functools.partial(ppow.greedy_window_records, drafter, window=window, stride=stride))
    counts = ppow.greedy_acceptance(records, dparams, frozen, [batch])
    measured = counts.means()
    valid = np.asarray(ppow.valid_anchors(batch["loss_mask"], window))
    seq = valid.shape[1]
    anchors = np.arange(0, seq, stride)
    context = ppow.context_pass(drafter, dparams, frozen.constants.embed, batch["tokens"], batch["features"])
    per_row = jnp.asarray(np.broadcast_to(np.minimum(anchors, seq - window - 1), (valid.shape[0], len(anchors))))
    drafts, logprobs = ppow.draft_windows(drafter, dparams, frozen.constants.embed, context, per_row, window)
    live = np.asarray(ppow.verify_with_target(tiny_target.config, tiny_target.params, frozen, batch["tokens"],
                                              per_row, drafts, logprobs, jax.random.key(0), "greedy").accepted)
    k = live[valid[:, anchors]]
    assert measured["accept_length"] == pytest.approx(k.mean())
    assert measured["first_accept"] == pytest.approx((k > 0).mean())
    assert 0 < measured["first_accept"] < 1
    # Per sequence, as the paired comparison of benchmarks/dev_acceptance.py reads them.
    np.testing.assert_array_equal(counts.windows, valid[:, anchors].sum(axis=1))
    np.testing.assert_array_equal(counts.accepted_drafts, np.where(valid[:, anchors], live, 0).sum(axis=1))


def test_accept_length_difference_takes_the_sequence_as_its_unit():
    """Hand-computed: windows (2, 4), accepted drafts (1, 2) against (2, 2): a change of 1/6 per
    window; residuals 1 - 2/6 and 0 - 4/6, so the standard error is sqrt(2 · 8/9) / 6 = 2/9."""
    baseline = ppow.AcceptanceCounts(np.array([2, 4]), np.array([1.0, 2.0]), np.array([1, 2]))
    other = ppow.AcceptanceCounts(np.array([2, 4]), np.array([2.0, 2.0]), np.array([1, 2]))
    difference, error = other.accept_length_difference(baseline)
    assert difference == pytest.approx(1 / 6) and error == pytest.approx(2 / 9)
    assert other.accept_length_difference(other) == (0.0, 0.0)
    with pytest.raises(InputError, match="same windows"):
        other.accept_length_difference(ppow.AcceptanceCounts(np.array([3, 3]), np.array([1.0, 2.0]), np.array([1, 2])))
    empty = ppow.AcceptanceCounts(np.array([0]), np.array([0.0]), np.array([0]))
    with pytest.raises(InputError, match="no valid windows"):
        empty.accept_length_difference(empty)


def test_exact_estimator_is_the_mean_over_sampled_windows(kd_run, tiny_target, temperature=0.5):
    """At each anchor, the closed form's P(k >= j), near-miss probability and reward mean and spread
    equal those of 1,600 windows sampled from the drafter at τ (tempered, as the SmolLM2 config's
    0.3) and verified from the cache, as the rollout does (within 4 standard errors)."""
    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    # A confident drafter (its head scaled), whose greedy windows are written into the data below, so
    # that windows are accepted often and at every depth: the identity holds for any data.
    dparams = {**dparams, "lm_head": dparams["lm_head"] * 8.0}
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run, size=2).items()}
    window, gamma, epsilon = 4, 0.1, 8.5  # ε near the tiny target's median first-token gap
    valid = np.asarray(ppow.valid_anchors(batch["loss_mask"], window))
    anchors = np.stack([np.flatnonzero(ok)[0] + np.array([0, 6, 12]) for ok in valid])  # more than K apart
    assert valid[np.arange(len(valid))[:, None], anchors].all()
    embed = frozen.constants.embed
    for column in range(anchors.shape[1]):  # left to right: each window sees the ones before it
        context = ppow.context_pass(drafter, dparams, embed, batch["tokens"], batch["features"])
        greedy, _ = ppow.draft_windows(drafter, dparams, embed, context, jnp.asarray(anchors[:, column:column + 1]),
                                       window)
        for b in range(anchors.shape[0]):
            a = int(anchors[b, column])
            batch["tokens"] = batch["tokens"].at[b, a + 1:a + 1 + window].set(frozen.constants.d2t[greedy[b, 0]])
    settings = ppow.PPOWSettings(window=window, gamma=gamma, rollout_temperature=temperature, estimator="exact",
                                 proximity_epsilon=epsilon)
    windows = ppow.exact_windows(dparams, frozen, batch, drafter=drafter, settings=settings)
    accept_probs, near_miss = windows.accept_probs, windows.near_miss
    mean, spread = ppow.reward_moments(accept_probs, near_miss, settings)

    context = ppow.context_pass(drafter, dparams, embed, batch["tokens"], batch["features"])
    chunk, chunks = 400, 4  # samples per anchor and call (the cache verifier's gap spans the full vocabulary)
    repeated = jnp.asarray(np.repeat(anchors, chunk, axis=1), jnp.int32)
    accepted, gaps = [], []
    for c in range(chunks):
        drafts, _ = ppow.draft_windows(drafter, dparams, embed, context, repeated, window,
                                       key=jax.random.key(c), temperature=temperature)
        verified = ppow.verify_from_cache(batch, frozen, repeated, drafts, window)
        accepted.append(np.asarray(verified.accepted).reshape(*anchors.shape, chunk))
        gaps.append(np.asarray(verified.gap).reshape(*anchors.shape, chunk))
    k, gap = np.concatenate(accepted, -1), np.concatenate(gaps, -1)
    samples = k.shape[-1]
    near = (k == 0) & (gap < epsilon)
    rewards = np.asarray(ppow.speed_reward(jnp.asarray(k), gamma)) + settings.proximity_eta * near
    rows = np.arange(anchors.shape[0])[:, None]

    def close(sampled, exact):
        error = np.sqrt(np.maximum(exact * (1 - exact), 1e-4) / samples)  # a Bernoulli frequency's
        assert np.all(np.abs(sampled.mean(-1) - exact) <= 4 * error + 1e-4), (sampled.mean(-1), exact)

    reach = np.asarray(ppow.reach_probabilities(accept_probs))[rows, anchors]
    for j in range(1, window + 1):
        close(k >= j, reach[..., j])
    close(near, np.asarray(near_miss)[rows, anchors])
    exact_mean, exact_spread = np.asarray(mean)[rows, anchors], np.asarray(spread)[rows, anchors]
    for moment, exact in ((rewards, exact_mean), (rewards ** 2, exact_spread ** 2 + exact_mean ** 2)):
        error = moment.std(-1) / np.sqrt(samples)
        assert np.all(np.abs(moment.mean(-1) - exact) <= 4 * error + 1e-4), (moment.mean(-1), exact)
    # Not vacuous: whole windows are accepted, and both kinds of first rejection occur.
    assert reach[..., window].max() > 0.05 and 0.05 < near.mean() < 0.95, (reach, near.mean())


def _exact_case(kd_run, tiny_target, **overrides):
    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}
    settings = ppow.PPOWSettings(**{**dict(window=4, gamma=0.1, estimator="exact", proximity_epsilon=8.5), **overrides})
    trainable = {k: v for k, v in dparams.items() if k != "d2t"}
    loss = functools.partial(ppow.exact_loss, target=frozen, batch=batch, drafter=drafter, settings=settings)
    return trainable, loss, functools.partial(ppow.exact_windows, target=frozen, batch=batch, drafter=drafter,
                                              settings=settings), batch, dparams["d2t"]


def test_exact_policy_term_ascends_the_expected_reward(kd_run, tiny_target, adaw=True):
    """Without the KL term, a small step against the exact loss's gradient raises the anchors'
    weighted mean reward on the batch (each anchor's term is ∇μ times a positive weight)."""
    trainable, loss, _, _, _ = _exact_case(kd_run, tiny_target, kl_beta=0.0, adaw=adaw)
    (_, before), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    norm = float(optax.tree.norm(grads))
    stepped = jax.tree_util.tree_map(lambda w, g: w - 1e-3 / norm * g, trainable, grads)
    _, after = loss(stepped)
    assert float(after["reward"]) > float(before["reward"]) + 1e-5, (before["reward"], after["reward"])


def test_the_adaw_diagnostic_reads_the_exact_estimator(kd_run, tiny_target):
    """`benchmarks/adaw_scores.py`: its scores and E[k] are the ones `exact_loss` weights and reports,
    and its learning signal at each anchor is ‖∂μ_a/∂z‖/σ_a of that anchor's μ alone (K = 2, with
    the proximity reward, whose near-miss probability the gradient must go through)."""
    trainable, loss, _, batch, d2t = _exact_case(kd_run, tiny_target, window=2, adaw=True,
                                                 rollout_temperature=0.5)
    drafter, frozen, settings = (loss.keywords[k] for k in ("drafter", "target", "settings"))
    dparams = {**trainable, "d2t": d2t}
    table = _benchmark_module("adaw_scores").anchor_table(drafter, dparams, frozen, batch, settings)
    weights = ppow.anchor_priorities(table["valid"], table["score"], settings.priority_temperature,
                                     settings.priority_floor)
    _, metrics = loss(trainable)
    np.testing.assert_allclose(ppow.masked_mean(table["score"], weights), metrics["window_score"], rtol=1e-5)
    np.testing.assert_allclose(ppow.masked_mean(table["expected_k"], weights), metrics["accepted"], rtol=1e-5)

    logits = ppow.unrolled_logits(dparams, frozen, batch, drafter=drafter, window=settings.window)

    def moments(z):
        w = ppow.windows_from_logits(z, frozen, batch, settings=settings)
        return ppow.reward_moments(w.accept_probs, w.near_miss, settings), w.near_miss

    (mean, spread), near_miss = moments(logits)
    candidates = np.argwhere(np.asarray(table["valid"]) & (np.asarray(mean) > 0.05) & (np.asarray(near_miss) > 0.05))
    assert len(candidates) >= 3  # not vacuous: anchors with some reward and a near-miss path
    for b, a in candidates[:: max(1, len(candidates) // 5)]:
        alone = jax.grad(lambda z: moments(z)[0][0][b, a])(logits)
        expected = float(jnp.sqrt(jnp.sum(alone ** 2)) / (spread[b, a] + 1e-6))
        np.testing.assert_allclose(table["signal"][b, a], expected, rtol=1e-4)


def test_the_adaw_diagnostic_signal_of_one_draft_has_its_closed_form(kd_run, tiny_target, tau=0.5):
    """K = 1 without the proximity reward: μ = a·R(1), σ = R(1)·sqrt(a(1 - a)), ∂a/∂z_x = a(1[x = y] - Q(x))/τ,
    so the signal is (a/τ)·sqrt((1 - a)² + Σ_{x≠y} Q(x)²)/sqrt(a(1 - a)), Q the tempered policy."""
    trainable, loss, windows_of, batch, d2t = _exact_case(kd_run, tiny_target, window=1, proximity_reward=False,
                                                          rollout_temperature=tau)
    drafter, frozen, settings = (loss.keywords[k] for k in ("drafter", "target", "settings"))
    dparams = {**trainable, "d2t": d2t}
    table = _benchmark_module("adaw_scores").anchor_table(drafter, dparams, frozen, batch, settings)
    windows = windows_of(dparams)
    q = np.exp(np.asarray(ppow.tempered(windows.logprobs[0], tau), np.float64))  # [B, L, N]
    a = np.asarray(windows.accept_probs[..., 0], np.float64)
    others = np.sum(q ** 2, axis=-1) - a ** 2  # Σ_{x≠y} Q(x)² (a = Q(y); 0 where y is outside the draft vocabulary)
    expected = (a / tau) * np.sqrt((1 - a) ** 2 + others) / np.maximum(np.sqrt(a * (1 - a)), 1e-12)
    check = np.asarray(table["valid"]) & (a > 1e-3) & (a < 1 - 1e-3)
    assert check.sum() >= 10
    np.testing.assert_allclose(np.asarray(table["signal"])[check], expected[check], rtol=2e-3)


def test_exact_kl_term_weights_each_window_draft_by_its_reach(kd_run, tiny_target):
    """β·E[KL]: at each valid anchor a (uniform weights without ADAW), draft j+1's KL(P_{a+j} ‖ Q_j)
    counts with P(k >= j), as the sampled estimator's mask j <= k does; checked by a plain loop."""
    trainable, loss, windows_of, batch, d2t = _exact_case(kd_run, tiny_target, adaw=False, kl_direction="forward")
    _, metrics = loss(trainable)
    windows = windows_of({**trainable, "d2t": d2t})
    q, p = np.asarray(windows.logprobs, np.float64), np.asarray(windows.target_logprobs, np.float64)
    reach = np.asarray(ppow.reach_probabilities(windows.accept_probs), np.float64)
    valid = np.asarray(ppow.valid_anchors(batch["loss_mask"], 4))
    total = weight = 0.0
    for b in range(valid.shape[0]):
        anchors = np.flatnonzero(valid[b])
        for a in anchors:
            for j in range(4):
                kl = np.sum(np.exp(p[b, a + j]) * (p[b, a + j] - q[j, b, a + j]))
                total += reach[b, a, j] * kl / len(anchors)
                weight += reach[b, a, j] / len(anchors)
    assert float(metrics["kl_to_target"]) == pytest.approx(total / weight, rel=1e-4)


def _plain_logprobs(target, sequence):
    """The target's T = 1 log-probs at every position of one sequence (a plain forward)."""
    sequence = jnp.asarray(sequence)[None]
    logits = llama.forward(target.params, sequence, llama.init_cache(target.config, 1, sequence.shape[1]),
                           target.config).logits[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def test_sampling_acceptance_probabilities_by_hand(kd_run, tiny_target):
    """Under sampling acceptance each draft's probability is min(1, p/q) of the drafted token, p from a
    plain target forward over the prefix and the drafts before it, q the drafter's own."""
    from ppow_jax.drafters.eagle import to_target_vocabulary

    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}
    window = 3
    valid = ppow.valid_anchors(batch["loss_mask"], window)
    anchors, _ = ppow.sample_anchors(jax.random.key(0), ppow.anchor_priorities(valid, None, 1.0, 1.0), 2)
    context = ppow.context_pass(drafter, dparams, frozen.constants.embed, batch["tokens"], batch["features"])
    drafts, logprobs = ppow.draft_windows(drafter, dparams, frozen.constants.embed, context, anchors, window,
                                          key=jax.random.key(1))
    live = ppow.verify_with_target(tiny_target.config, tiny_target.params, frozen, batch["tokens"], anchors, drafts,
                                   logprobs, jax.random.key(2), "sampling")
    full_q = np.asarray(to_target_vocabulary(logprobs, frozen.constants.d2t, tiny_target.config.vocab_size))
    ids = np.asarray(jnp.take(frozen.constants.d2t, drafts))
    tokens = np.asarray(batch["tokens"])
    for b, w in itertools.product(range(anchors.shape[0]), range(anchors.shape[1])):
        a = int(anchors[b, w])
        p = _plain_logprobs(tiny_target, np.concatenate([tokens[b, :a + 1], ids[b, w]]))[a:a + window]
        drafted = ids[b, w]
        by_hand = np.minimum(1.0, np.exp(p[np.arange(window), drafted] - full_q[b, w, np.arange(window), drafted]))
        np.testing.assert_allclose(np.asarray(live.accept_probs[b, w]), by_hand, rtol=2e-4, atol=1e-6)
    probs = np.asarray(live.accept_probs)
    assert 0 < probs.min() and probs.max() <= 1 and probs.mean() < 1


def test_sampled_probe_first_draft_rate_is_one_minus_total_variation(kd_run, tiny_target):
    """Over the drafts sampled at T = 1, the first draft's expected acceptance is Σ min(p, q) at the
    anchor (one minus the total-variation distance): the probe's mean against the exact values."""
    from ppow_jax.drafters.eagle import to_target_vocabulary

    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batches = [{k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}]
    window = 3
    records = jax.jit(functools.partial(ppow.sampled_window_records, drafter, window=window, stride=1,
                                        target_config=tiny_target.config))
    measured = [ppow.sampled_acceptance(records, dparams, frozen, tiny_target.params, batches,
                                        jax.random.key(seed)).means() for seed in range(8)]
    first = np.mean([m["first_accept"] for m in measured])
    batch = batches[0]
    context = ppow.context_pass(drafter, dparams, frozen.constants.embed, batch["tokens"], batch["features"])
    q = np.exp(np.asarray(to_target_vocabulary(jax.nn.log_softmax(drafter.draft_logits(dparams, context.hidden), -1),
                                               frozen.constants.d2t, tiny_target.config.vocab_size)))
    valid = np.asarray(ppow.valid_anchors(batch["loss_mask"], window))
    exact = []
    for b in range(valid.shape[0]):
        p = np.exp(_plain_logprobs(tiny_target, np.asarray(batch["tokens"][b])))
        exact += [np.minimum(p[a], q[b, a]).sum() for a in np.flatnonzero(valid[b])]
    windows = len(exact) * len(measured)
    # Each window's first-draft probability is a draw in [0, 1] with mean m = Σ min(p, q), so its
    # variance is at most m(1 - m): 4 standard errors.
    mean = np.mean(exact)
    assert abs(first - mean) < 4 * math.sqrt(mean * (1 - mean) / windows)


def test_dev_probe_at_t1_is_deterministic_per_seed(kd_run, distilled, tiny_target):
    """`benchmarks/dev_acceptance.py --acceptance sampling`: the same figures for the same seed, other
    draws for another, a first-draft rate at most the accept length; unknown acceptance is refused."""
    from ppow_jax.train import DevProbe

    config = distilled[0].copy_and_resolve_references()
    config.workdir = str(kd_run)
    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    first, again = (DevProbe(config, tiny_target, False, acceptance="sampling")(drafter, dparams) for _ in range(2))
    other = DevProbe(config, tiny_target, False, acceptance="sampling", seed=1)(drafter, dparams)
    assert first == again and other != first
    probe = DevProbe(config, tiny_target, False, acceptance="sampling")
    records = jax.jit(functools.partial(ppow.sampled_window_records, drafter, window=config.train.eval_window,
                                        stride=config.train.eval_stride, target_config=tiny_target.config))
    direct = ppow.sampled_acceptance(records, dparams, _frozen(tiny_target.params, np.asarray(dparams["d2t"])),
                                     tiny_target.params, probe.batches, jax.random.key(0))
    assert first == {f"dev/{name}": value for name, value in direct.means().items()}
    with pytest.raises(InputError, match="acceptance"):
        DevProbe(config, tiny_target, False, acceptance="typical")


# ----- the PPO update -----

def _toy_policy(seed: int):
    """A tiny target and drafter, two random sequences and their target features."""
    config, params, drafter, dparams = _tiny_pair(draft_vocab=40)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 12)), jnp.int32)
    out = llama.forward(params, tokens, llama.init_cache(config, 2, 12), config, hidden_layers=(0, 1, 2))
    features = out.hidden_states.transpose(1, 2, 0, 3).reshape(2, 12, -1)
    return params, drafter, dparams, _frozen(params, np.asarray(dparams["d2t"])), tokens, features


def _updated(state, data, frozen, drafter, settings, optimizer, iterations):
    for i in range(iterations):
        state, metrics = ppow.ppo_update(state, data, frozen, jax.random.key(i), drafter=drafter, settings=settings,
                                         optimizer=optimizer, schedule=optax.constant_schedule(1e-2))
    return state, metrics


def _fresh_state(dparams, optimizer):
    trainable = {k: v for k, v in dparams.items() if k != "d2t"}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=optimizer.init(trainable),
                      rng=jax.random.key_data(jax.random.key(0)))


def test_ppo_update_moves_a_toy_policy_towards_the_advantaged_window():
    params, drafter, dparams, frozen, tokens, features = _toy_policy(5)
    window = 3
    anchors = jnp.full((2, 2), 4, jnp.int32)
    good, bad = jnp.full((window,), 7), jnp.full((window,), 11)
    drafts = jnp.broadcast_to(jnp.stack([good, bad]), (2, 2, window)).astype(jnp.int32)
    context = ppow.context_pass(drafter, dparams, params["embed"], tokens, features)
    _, logprobs = ppow.draft_windows(drafter, dparams, params["embed"], context, anchors, window, forced=drafts)
    old = jnp.take_along_axis(logprobs, drafts[..., None], axis=-1)[..., 0]
    data = ppow.Rollout(tokens=tokens, features=features, anchors=anchors, drafts=drafts, old_logprobs=old,
                        advantages=jnp.array([[1.0, -1.0], [1.0, -1.0]]), policy_mask=jnp.ones((2, 2, window), bool),
                        target_logprobs=jnp.zeros((2, 2, window, 40)), kl_mask=jnp.zeros((2, 2, window), bool))
    settings = ppow.PPOWSettings(group_size=2, window=window, anchors_per_sequence=1, epochs=2, minibatches=2,
                                 kl_beta=0.0)
    optimizer = optax.adam(1e-2)
    state, metrics = _updated(_fresh_state(dparams, optimizer), data, frozen, drafter, settings, optimizer, 3)
    new_params = {**state.params, "d2t": dparams["d2t"]}
    context = ppow.context_pass(drafter, new_params, params["embed"], tokens, features)
    _, logprobs = ppow.draft_windows(drafter, new_params, params["embed"], context, anchors, window, forced=drafts)
    new = jnp.take_along_axis(logprobs, drafts[..., None], axis=-1)[..., 0]
    assert bool(jnp.all(new[:, 0] > old[:, 0])), "the positively advantaged window became less likely"
    assert bool(jnp.all(new[:, 1] < old[:, 1])), "the negatively advantaged window became more likely"
    assert 0.0 <= float(metrics["clip_fraction"]) <= 1.0 and int(state.step) == 3


def test_kl_term_pulls_the_policy_to_the_target():
    params, drafter, dparams, frozen, tokens, features = _toy_policy(6)
    window, anchors = 2, jnp.full((2, 2), 5, jnp.int32)
    drafts = jnp.zeros((2, 2, window), jnp.int32)
    target_logprobs = jnp.broadcast_to(jax.nn.log_softmax(jnp.arange(40.0) / 4), (2, 2, window, 40))
    data = ppow.Rollout(tokens=tokens, features=features, anchors=anchors, drafts=drafts,
                        old_logprobs=jnp.zeros((2, 2, window)), advantages=jnp.zeros((2, 2)),
                        policy_mask=jnp.ones((2, 2, window), bool), target_logprobs=target_logprobs,
                        kl_mask=jnp.ones((2, 2, window), bool))
    settings = ppow.PPOWSettings(group_size=2, window=window, anchors_per_sequence=1, epochs=1, minibatches=1,
                                 kl_beta=1.0)
    trainable = {k: v for k, v in dparams.items() if k != "d2t"}
    before, _ = ppow.ppo_loss(trainable, dparams["d2t"], params["embed"], data, drafter=drafter, settings=settings)
    optimizer = optax.adam(1e-2)
    state, _ = _updated(_fresh_state(dparams, optimizer), data, frozen, drafter, settings, optimizer, 5)
    after, _ = ppow.ppo_loss(state.params, dparams["d2t"], params["embed"], data, drafter=drafter, settings=settings)
    assert float(after) < 0.8 * float(before)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_context_anchor_pulls_the_teacher_forced_drafts_to_the_target_where_masked(direction):
    params, drafter, dparams, frozen, tokens, features = _toy_policy(7)
    window, anchors = 2, jnp.full((2, 2), 5, jnp.int32)
    target = np.asarray(jax.nn.log_softmax(jnp.arange(40.0) / 4))
    mask = jnp.zeros((2, 12), bool).at[:, 6:].set(True)
    data = ppow.Rollout(tokens=tokens, features=features, anchors=anchors, drafts=jnp.zeros((2, 2, window), jnp.int32),
                        old_logprobs=jnp.zeros((2, 2, window)), advantages=jnp.zeros((2, 2)),
                        policy_mask=jnp.zeros((2, 2, window), bool), target_logprobs=jnp.zeros((2, 2, window, 40)),
                        kl_mask=jnp.zeros((2, 2, window), bool),
                        context_target_logprobs=jnp.broadcast_to(jnp.asarray(target), (2, 12, 40)), context_kl_mask=mask)
    settings = ppow.PPOWSettings(group_size=2, window=window, anchors_per_sequence=1, epochs=1, minibatches=2,
                                 kl_beta=0.0, kl_direction=direction, context_kl_beta=1.0)

    def context_kl(trainable):  # [2, 12], by hand
        full = {**trainable, "d2t": dparams["d2t"]}
        context = ppow.context_pass(drafter, full, params["embed"], tokens, features)
        q = np.asarray(jax.nn.log_softmax(drafter.draft_logits(full, context.hidden), axis=-1), np.float64)
        p = np.broadcast_to(target, q.shape)
        return np.sum(np.exp(p) * (p - q), -1) if direction == "forward" else np.sum(np.exp(q) * (q - p), -1)

    trainable = {k: v for k, v in dparams.items() if k != "d2t"}
    before = context_kl(trainable)
    loss, metrics = ppow.ppo_loss(trainable, dparams["d2t"], params["embed"], data, drafter=drafter, settings=settings)
    # With no policy term and no window anchor the loss is the masked positions' mean KL.
    assert float(loss) == pytest.approx(before[:, 6:].mean(), rel=1e-4)
    assert float(metrics["context_kl"]) == pytest.approx(before[:, 6:].mean(), rel=1e-4)
    optimizer = optax.adam(1e-2)
    state, _ = _updated(_fresh_state(dparams, optimizer), data, frozen, drafter, settings, optimizer, 5)
    after = context_kl(state.params)
    assert after[:, 6:].mean() < 0.8 * before[:, 6:].mean()


def test_context_anchor_is_the_token_level_loss_first_step_kl(kd_run, tiny_target):
    """On a real batch the rollout's context anchor (forward) equals KD's step-0 KL over the same
    positions: the target's distribution and the mask are aligned as in token-level training."""
    from ppow_jax.training.kd import kd_loss

    drafter, dparams = load_drafter(kd_run / "drafter", tiny_target.config)
    frozen = _frozen(tiny_target.params, np.asarray(dparams["d2t"]))
    batch = {k: jnp.asarray(v) for k, v in _first_batch(kd_run).items()}
    settings = ppow.PPOWSettings(group_size=2, window=4, anchors_per_sequence=2, epochs=1, minibatches=1,
                                 kl_beta=0.0, kl_direction="forward", adaw=False, context_kl_beta=1.0)
    data, _ = ppow.rollout(dparams, frozen, batch, jax.random.key(0), None, drafter=drafter, settings=settings)
    np.testing.assert_array_equal(data.context_kl_mask, batch["loss_mask"].astype(bool))
    trainable = {k: v for k, v in dparams.items() if k != "d2t"}
    _, metrics = ppow.ppo_loss(trainable, dparams["d2t"], frozen.constants.embed, data, drafter=drafter,
                               settings=settings)
    _, kd_metrics = kd_loss(trainable, frozen.constants, batch, drafter=drafter, unroll_steps=1)
    assert float(metrics["context_kl"]) == pytest.approx(float(kd_metrics["kl"]), rel=1e-4)
    without, _ = ppow.rollout(dparams, frozen, batch, jax.random.key(0), None, drafter=drafter,
                              settings=dataclasses.replace(settings, context_kl_beta=0.0))
    assert without.context_target_logprobs is None and without.context_kl_mask is None


# ----- end to end -----

def _ppow(kd_run, distilled, tiny_target, workdir, steps, stop_at=None, **overrides):
    from ppow_jax.train import run_ppow_training

    kd_config, _, _ = distilled
    config = load_config("tiny_ppow")
    config.target = ""
    config.data.cache_dir = kd_config.data.cache_dir
    config.data.dev_cache_dir = kd_config.data.dev_cache_dir
    config.data.dev_features_dir = str(kd_run / "features-dev")
    config.data.features_dir = str(kd_run / "features")
    config.init_from = str(kd_run / "drafter")
    config.workdir = str(workdir)
    config.train.steps = steps
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return run_ppow_training(config, tiny_target, progress=False, stop_at=stop_at)


def _history(workdir: pathlib.Path, metric: str = "reward") -> list[dict]:
    """The metrics.jsonl rows that carry `metric` (training rows; the dev probe writes its own)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if metric in row]


def test_tiny_ppow_run_raises_the_reward_and_serves_losslessly(kd_run, distilled, tiny_target, tmp_path):
    _ppow(kd_run, distilled, tiny_target, tmp_path / "run", 30, train__log_every=1, train__learning_rate=3e-3,
          ppow__anchors_per_sequence=8, ppow__group_size=8, ppow__proximity_epsilon=8.5)
    history = _history(tmp_path / "run")
    # The tiny drafter rarely matches the random target (k is almost always 0), so the proximity
    # reward, with ε near the median gap, is the dense signal here. Measured: mean reward over the
    # first / last 10 iterations 0.520 -> 0.577, first-token gap 8.45 -> 8.07 nats.
    first, last = history[:10], history[-10:]
    reward = [np.mean([h["reward"] for h in part]) for part in (first, last)]
    gap = [np.mean([h["first_gap"] for h in part]) for part in (first, last)]
    assert reward[1] > reward[0] + 0.025, reward
    assert gap[1] < gap[0] - 0.1, gap
    assert {"accepted", "kl_to_target", "clip_fraction", "approx_kl", "gamma"} <= set(history[-1])
    probes = _history(tmp_path / "run", "dev/accept_length")
    assert [row["step"] for row in probes] == [0, 10, 20, 30]
    assert all(0 <= row["dev/first_accept"] <= row["dev/accept_length"] <= 4 for row in probes)
    drafter, params = load_drafter(tmp_path / "run" / "drafter", tiny_target.config)
    description = json.loads((tmp_path / "run" / "drafter" / "drafter.json").read_text())
    assert description["stage"] == "ppow" and len(description["window_calibration"]["weights"]) == 4
    tok = tiny_target.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in ("Add 2 and 3.", "Hi")]
    reference = AutoregressiveDecoder(tiny_target.config, tiny_target.params, eos_token_ids=tok.eos_token_ids,
                                      pad_token_id=0).generate(prompts, 16).tokens
    adaptive = WindowPolicy("adaptive", 4, threshold=0.3, calibration=tuple(description["window_calibration"]["weights"]))
    for window in (WindowPolicy("fixed", 4), adaptive):
        result = SpeculativeDecoder(tiny_target.config, tiny_target.params, drafter, params,
                                    eos_token_ids=tok.eos_token_ids).generate(prompts, 16, window=window)
        assert result.tokens == reference


def test_resumed_ppow_run_equals_an_uninterrupted_one(kd_run, distilled, tiny_target, tmp_path):
    _ppow(kd_run, distilled, tiny_target, tmp_path / "straight", 10)
    _ppow(kd_run, distilled, tiny_target, tmp_path / "resumed", 10, stop_at=5)
    _ppow(kd_run, distilled, tiny_target, tmp_path / "resumed", 10)
    straight, resumed = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert [h["step"] for h in resumed] == [h["step"] for h in straight]
    for a, b in zip(straight, resumed):
        assert a["reward"] == b["reward"] and a["loss"] == b["loss"], (a, b)


def test_exact_estimator_run_raises_the_expected_reward_and_resumes_exactly(kd_run, distilled, tiny_target, tmp_path):
    exact = dict(ppow__estimator="exact", ppow__proximity_epsilon=8.5, train__log_every=1, train__eval_every=0)
    _ppow(kd_run, distilled, tiny_target, tmp_path / "run", 30, train__learning_rate=3e-3, **exact)
    history = _history(tmp_path / "run")
    # Every valid anchor of the batch in expectation, so the reward is that of all windows drafted at
    # τ = 1 from these sequences. Measured: mean over the first / last 10 iterations 0.496 -> 0.620.
    reward = [np.mean([h["reward"] for h in part]) for part in (history[:10], history[-10:])]
    assert reward[1] > reward[0] + 0.05, reward
    assert {"accepted", "kl_to_target", "first_rejected", "proximity_hits", "grad_norm"} <= set(history[-1])
    _ppow(kd_run, distilled, tiny_target, tmp_path / "straight", 6, **exact)
    _ppow(kd_run, distilled, tiny_target, tmp_path / "resumed", 6, stop_at=3, **exact)
    _ppow(kd_run, distilled, tiny_target, tmp_path / "resumed", 6, **exact)
    straight, resumed = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert [h["step"] for h in resumed] == [h["step"] for h in straight] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert a["reward"] == b["reward"] and a["loss"] == b["loss"], (a, b)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_the_update_starts_from_the_rollout_policy(kd_run, distilled, tiny_target, tmp_path, temperature):
    """With one minibatch, the update's first (and only) loss sees the parameters the rollout
    sampled with: the PPO ratio is exactly 1, at any rollout temperature."""
    metrics = _ppow(kd_run, distilled, tiny_target, tmp_path / "run", 1, ppow__epochs=1, ppow__minibatches=1,
                    ppow__rollout_temperature=temperature, train__eval_every=0)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-6) and metrics["clip_fraction"] == 0.0


@pytest.mark.parametrize("context_kl_beta", [0.0, 0.5])
def test_target_verifier_with_sampling_acceptance_trains(kd_run, distilled, tiny_target, tmp_path, context_kl_beta):
    # With ADAW off, the context anchor is what needs the target's distribution at every position.
    metrics = _ppow(kd_run, distilled, tiny_target, tmp_path / "run", 2, ppow__verifier="target",
                    ppow__acceptance="sampling", ppow__adaw=False, ppow__proximity_reward=False,
                    ppow__context_kl_beta=context_kl_beta)
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accepted"] <= 4
    assert (metrics["context_kl"] > 0) == (context_kl_beta > 0)


def test_ppow_needs_a_drafter_to_start_from(kd_run, distilled, tiny_target, tmp_path):
    from ppow_jax.train import run_ppow_training

    config = load_config("tiny_ppow")
    config.workdir = str(tmp_path)
    with pytest.raises(InputError, match="init_from"):
        run_ppow_training(config, tiny_target, progress=False)


@pytest.mark.parametrize("stage", ["kd", "ppow"])
def test_a_drafter_on_other_layers_is_refused_before_the_feature_cache(kd_run, distilled, tiny_target, tmp_path,
                                                                        stage):
    """init_from reading other target layers than the config caches would train on one set and draft from another
    (continued token-level training and PPOW alike)."""
    import shutil

    from ppow_jax.train import run_ppow_training, run_training

    moved = tmp_path / "moved-layers"
    shutil.copytree(kd_run / "drafter", moved)
    description = json.loads((moved / "drafter.json").read_text())
    layers = description["feature_layers"]
    description["feature_layers"] = [layers[0]] * len(layers)
    assert description["feature_layers"] != layers
    (moved / "drafter.json").write_text(json.dumps(description))
    config = load_config("tiny_ppow") if stage == "ppow" else distilled[0].copy_and_resolve_references()
    config.init_from, config.workdir = str(moved), str(tmp_path / "run")
    config.data.cache_dir = distilled[0].data.cache_dir
    with pytest.raises(InputError, match="reads the target's layers"):
        (run_ppow_training if stage == "ppow" else run_training)(config, tiny_target, progress=False)
    assert not (tmp_path / "run").exists()


# ----- the adaptive window -----

def test_logistic_fit_recovers_known_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 3))
    w = np.array([0.5, 1.5, -2.0, 0.3])
    y = rng.random(20000) < 1 / (1 + np.exp(-(w[0] + x @ w[1:])))
    np.testing.assert_allclose(ppow.fit_logistic(x, y), w, atol=0.1)


def test_adaptive_window_stops_when_the_predicted_acceptance_falls():
    # Weights that predict acceptance from the top log-prob alone: p = sigmoid(10 + 10 * top_logprob).
    policy = WindowPolicy("adaptive", 5, threshold=0.5, calibration=(10.0, 10.0, 0.0, 0.0))
    confident = jnp.log(jnp.array([[0.99, 0.01]]))  # p ≈ sigmoid(9.9)
    unsure = jnp.log(jnp.array([[0.5, 0.5]]))  # p ≈ sigmoid(3.1) ≈ 0.957
    state = policy.init(1)
    keep, state = policy.keep_drafting(0, confident, state)
    assert bool(keep[0])
    for step in range(1, 20):  # the product of ≈0.957s falls under 0.5 after about 16 drafts
        keep, state = policy.keep_drafting(step, unsure, state)
        if not bool(keep[0]):
            break
    assert 14 <= step <= 17
    with pytest.raises(InputError, match="calibration"):
        WindowPolicy("adaptive", 5)


@pytest.mark.parametrize("accepted", [False, True])
def test_a_drafter_that_cannot_be_calibrated_is_exported_for_fixed_windows_only(kd_run, distilled, tiny_target,
                                                                                tmp_path, monkeypatch, accepted):
    """A barely trained drafter (every calibration draft rejected), or one whose calibration drafts are
    all accepted, still gets exported; only the adaptive window, which needs the calibration, refuses it."""
    from ppow_jax.drafters.specs import window_calibration
    from ppow_jax.train import export_drafter

    def all_the_same(drafter, params, target, batch, window):
        return jnp.zeros((2, window, 3)), jnp.full((2, window), accepted), jnp.ones((2, window), bool)

    monkeypatch.setattr(ppow, "greedy_window_records", all_the_same)
    config = distilled[0].copy_and_resolve_references()
    config.workdir = str(tmp_path)
    drafter, params = load_drafter(kd_run / "drafter", tiny_target.config)
    exported = export_drafter(config, tiny_target, drafter, params, [kd_run / "features"], {"stage": "kd"})
    description = json.loads((exported / "drafter.json").read_text())
    drafts = config.calibration.batches * 2 * config.calibration.window
    verdict = "accepted: raise calibration.window" if accepted else "rejected: train the drafter further"
    assert description["window_calibration_skipped"].startswith(f"all {drafts} calibration drafts were {verdict}")
    assert "window_calibration" not in description
    load_drafter(exported, tiny_target.config)  # serves fixed windows
    with pytest.raises(InputError, match="serves fixed windows only: .*use --window fixed"):
        window_calibration(str(exported))
    with pytest.raises(ppow.NothingToCalibrate, match="no draft positions"):
        ppow.fit_window_calibration(drafter, params, None, [], window=3)
