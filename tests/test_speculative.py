"""Speculative decoding: greedy equality with autoregressive decoding, lossless sampling, one compile."""

import itertools
import math
import time

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from conftest import tiny_config, tiny_params
from ppow_jax.drafters.eagle import Eagle3Drafter, to_target_vocabulary
from ppow_jax.drafters.lm import LMDrafter, self_speculative
from ppow_jax.errors import InputError
from ppow_jax.inference.autoregressive import AutoregressiveDecoder
from ppow_jax.inference import costs as costs_module
from ppow_jax.inference.costs import autorange_loop_steps, interleaved_time_ratios, measure_cycle_costs, verify_widths
from ppow_jax.inference.sampling import SamplingParams, processed_logprobs
from ppow_jax.inference.speculative import (SpeculativeDecoder, _move_into_chain_slots, accept_greedy,
                                            accept_greedy_tree, accept_sampling, tree_layout)
from ppow_jax.inference.windows import WindowPolicy
from ppow_jax.models import llama

CONFIG = tiny_config(vocab_size=32)
PARAMS = tiny_params(CONFIG)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [3]]
SMALL = tiny_config(vocab_size=32, num_layers=1)


def drafters():
    return {
        "self:1": self_speculative(CONFIG, PARAMS, 1),  # disagrees often: rejection paths
        "self:2": self_speculative(CONFIG, PARAMS, 2),
        "independent": (LMDrafter(SMALL), tiny_params(SMALL, seed=7)),  # random: almost always rejected
        "target-itself": (LMDrafter(CONFIG), PARAMS),  # always accepted: bonus tokens, 2-token catch-up
        "eagle3": eagle_drafter(CONFIG, draft_vocab=20),  # reduced vocabulary: some target tokens undraftable
        "eagle3-full-vocab": eagle_drafter(CONFIG, draft_vocab=CONFIG.vocab_size, feature_layers=(0, 2)),
    }


def eagle_drafter(config, draft_vocab, feature_layers=(0, 1, 2), seed=5, std=0.3):
    drafter = Eagle3Drafter.for_target(config, feature_layers, draft_vocab, intermediate_size=64)
    d2t = np.random.default_rng(seed).permutation(config.vocab_size)[:draft_vocab]
    return drafter, drafter.init_params(jax.random.key(seed), d2t=d2t, std=std)


@pytest.fixture(scope="module")
def autoregressive_reference():
    return AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[]).generate(PROMPTS, 24).tokens


@pytest.mark.parametrize("drafter_name", list(drafters()))
@pytest.mark.parametrize("window", [WindowPolicy("fixed", 1), WindowPolicy("fixed", 4),
                                    WindowPolicy("confidence", 6, 0.6), WindowPolicy("divergence", 5, 0.3),
                                    WindowPolicy("fixed", 1, branches=4), WindowPolicy("fixed", 3, branches=3),
                                    WindowPolicy("fixed", 3, branches=(2, 2))],
                         ids=["fixed1", "fixed4", "conf6", "div5", "tree4", "tree3-k3", "tree2,2-k3"])
def test_greedy_equals_autoregressive(drafter_name, window, autoregressive_reference):
    drafter, drafter_params = drafters()[drafter_name]
    decoder = SpeculativeDecoder(CONFIG, PARAMS, drafter, drafter_params, eos_token_ids=[])
    result = decoder.generate(PROMPTS, 24, window=window)
    assert result.tokens == autoregressive_reference
    assert sum(result.accept_hist) == sum(result.cycles)
    if drafter_name == "target-itself" and window.kind == "fixed":
        assert result.tau == window.k_max + 1 or result.accept_hist[:-1] == [0] * window.k_max


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_batch_sizes_and_eos_inside_a_window(batch, autoregressive_reference):
    eos = autoregressive_reference[1][6]  # row 1 produces it mid-generation
    prompts = PROMPTS[:batch] if batch > 1 else PROMPTS[1:2]
    expected = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[eos]).generate(prompts, 24).tokens
    for drafter, drafter_params in (drafters()["target-itself"], drafters()["self:2"], drafters()["eagle3"]):
        decoder = SpeculativeDecoder(CONFIG, PARAMS, drafter, drafter_params, eos_token_ids=[eos])
        result = decoder.generate(prompts, 24, window=WindowPolicy("fixed", 5))
        assert result.tokens == expected
        forced = decoder.generate(prompts, 24, window=WindowPolicy("fixed", 5), ignore_eos=True)
        assert all(len(row) == 24 for row in forced.tokens)


def test_draft_vocabulary_values_land_on_their_target_ids():
    d2t = jnp.asarray([7, 2, 30, 11], jnp.int32)
    values = jax.random.normal(jax.random.key(0), (2, 3, 4))
    full = np.asarray(to_target_vocabulary(values, d2t, 32))
    expected = np.full((2, 3, 32), -np.inf, np.float32)
    expected[..., np.asarray(d2t)] = np.asarray(values)
    np.testing.assert_array_equal(full, expected)


def test_tree_layout_by_hand():
    two_chains = tree_layout((2, 1))  # [pending, a1, b1, a2, b2]
    assert two_chains.ancestors.astype(int).tolist() == [[1, 0, 0, 0, 0],
                                                         [1, 1, 0, 0, 0],
                                                         [1, 0, 1, 0, 0],
                                                         [1, 1, 0, 1, 0],
                                                         [1, 0, 1, 0, 1]]
    assert two_chains.depths.tolist() == [0, 1, 1, 2, 2]
    assert two_chains.parents.tolist() == [0, 0, 0, 1, 2]
    assert two_chains.paths.tolist() == [[0, 1, 3], [0, 1, 3], [0, 2, 4], [0, 1, 3], [0, 2, 4]]
    binary = tree_layout((2, 2, 1))  # depth 1: 1-2, depth 2: 3-6, depth 3: 7-10
    assert binary.parents.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6]
    assert binary.paths[2].tolist() == [0, 2, 5, 9] and binary.paths[10].tolist() == [0, 2, 6, 10]
    assert np.flatnonzero(binary.ancestors[8]).tolist() == [0, 1, 4, 8]


def test_a_tree_pass_gives_each_path_what_it_gets_verified_alone():
    """Peer logits: the target's pass over a (2, 2) tree under the tree mask against one pass per
    root-to-leaf path; rows with different context lengths. The path moved into place leaves the
    cache a lone pass over it leaves."""
    layout = tree_layout((2, 2))
    prompts = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 12, 0, 0, 0]], np.int32)
    lengths = jnp.asarray([6, 3], jnp.int32)
    context = llama.prefill(PARAMS, jnp.asarray(prompts), 32, CONFIG, num_valid=lengths).cache
    tree_tokens = np.array([[13, 3, 4, 20, 21, 7, 7], [14, 1, 2, 30, 31, 9, 8]], np.int32)
    tree = llama.forward(PARAMS, jnp.asarray(tree_tokens), context, CONFIG,
                         positions=lengths[:, None] + layout.depths[None], hidden_layers=(1,),
                         tree_ancestors=layout.ancestors)
    for leaf in range(3, 7):
        path = layout.paths[leaf]
        alone = llama.forward(PARAMS, jnp.asarray(tree_tokens[:, path]), context, CONFIG, hidden_layers=(1,))
        np.testing.assert_allclose(tree.logits[:, path], alone.logits, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(tree.hidden_states[:, :, path], alone.hidden_states, rtol=1e-5, atol=1e-4)
        moved = _move_into_chain_slots(tree.cache, lengths, jnp.asarray([path, path], jnp.int32))
        for row, length in enumerate([6, 3]):
            for layer in range(CONFIG.num_layers):
                for got, want in ((moved.k[layer], alone.cache.k[layer]), (moved.v[layer], alone.cache.v[layer])):
                    np.testing.assert_allclose(got[row, :, :length + len(path)], want[row, :, :length + len(path)],
                                               rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(tree_tokens=hnp.arrays(np.int32, (3, 10), elements=st.integers(0, 2)),
       logits=hnp.arrays(np.float32, (3, 10, 3), elements=st.floats(-3, 3, width=32, allow_subnormal=False)))
def test_tree_greedy_acceptance_properties(tree_tokens, logits):
    """Every root-to-leaf path is checked as a lone chain would be; the first path with the most
    accepted drafts is kept, so a tree never accepts less than its first path."""
    layout = tree_layout((3, 2))  # depth 1: 1-3, depth 2: 4-9
    k, token, path = accept_greedy_tree(jnp.asarray(tree_tokens), jnp.asarray(logits), layout)
    for row in range(3):
        lone = []
        for leaf in range(4, 10):
            nodes = layout.paths[leaf]
            lone_k, lone_token = accept_greedy(jnp.asarray(tree_tokens[row:row + 1, nodes[1:]]), jnp.asarray([2]),
                                               jnp.asarray(logits[row:row + 1, nodes]))
            lone.append((int(lone_k[0]), int(lone_token[0]), nodes))
        best_k = max(entry[0] for entry in lone)
        first_best = next(entry for entry in lone if entry[0] == best_k)
        assert (int(k[row]), int(token[row])) == first_best[:2]
        assert path[row, :best_k + 1].tolist() == first_best[2][:best_k + 1].tolist()
        assert int(k[row]) >= lone[0][0]


def test_tree_stops_at_eos_and_budget_like_a_chain(autoregressive_reference):
    eos = autoregressive_reference[1][6]
    expected = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[eos]).generate(PROMPTS, 24).tokens
    for drafter, drafter_params in (drafters()["target-itself"], drafters()["self:2"], drafters()["eagle3"]):
        decoder = SpeculativeDecoder(CONFIG, PARAMS, drafter, drafter_params, eos_token_ids=[eos])
        result = decoder.generate(PROMPTS, 24, window=WindowPolicy("fixed", 5, branches=(2, 1, 2)))
        assert result.tokens == expected


def test_compiles_once_across_varying_acceptance():
    drafter, drafter_params = drafters()["self:2"]
    decoder = SpeculativeDecoder(CONFIG, PARAMS, drafter, drafter_params, eos_token_ids=[])
    window = WindowPolicy("confidence", 5, 0.5)
    histograms = [decoder.generate([p], 20, window=window).accept_hist for p in ([1, 2, 3], [9, 8, 7, 6], [4])]
    assert len({tuple(h) for h in histograms}) > 1  # acceptance really varied
    loops = [fn for key, fn in decoder._compiled.items() if key[0] == "loop"]
    assert len(loops) == 1 and loops[0]._cache_size() == 1
    tree = WindowPolicy("fixed", 3, branches=3)  # a wider cache margin: prompts of one cache bucket
    histograms = [decoder.generate([p], 20, window=tree).accept_hist for p in ([1, 2, 3], [9, 8, 7, 6], [4, 5, 6, 7])]
    assert len({tuple(h) for h in histograms}) > 1
    loops = [fn for key, fn in decoder._compiled.items() if key[0] == "loop" and key[-1] == tree]
    assert len(loops) == 1 and loops[0]._cache_size() == 1


def exact_joint(params_sampling: SamplingParams, prompt: list[int], length: int) -> np.ndarray:
    """P(t_1..t_length | prompt) under the target's sampling distribution, by enumeration."""
    vocab = CONFIG.vocab_size
    sequences = np.array([prompt + list(seq) for seq in itertools.product(range(vocab), repeat=length - 1)])
    cache = llama.init_cache(CONFIG, len(sequences), sequences.shape[1])
    logits = jax.jit(lambda p, t, c: llama.forward(p, t, c, CONFIG).logits)(PARAMS, jnp.asarray(sequences), cache)
    logp = np.asarray(processed_logprobs(logits[:, len(prompt) - 1:], params_sampling), np.float64)
    joint = np.zeros((vocab,) * length)
    for row, seq in enumerate(itertools.product(range(vocab), repeat=length - 1)):
        prefix_logp = sum(logp[row, i, seq[i]] for i in range(length - 1))
        joint[seq] = np.exp(prefix_logp + logp[row, length - 1])
    return joint


@pytest.mark.parametrize("sampling,drafter_kind,window", [
    (SamplingParams(temperature=1.0), "lm", WindowPolicy("fixed", 2)),
    (SamplingParams(temperature=0.8, top_k=4), "lm", WindowPolicy("fixed", 2)),
    (SamplingParams(temperature=1.2, top_p=0.7), "lm", WindowPolicy("fixed", 2)),
    (SamplingParams(temperature=1.0), "eagle3", WindowPolicy("fixed", 2)),
    (SamplingParams(temperature=1.0), "eagle3", WindowPolicy("cost", 2, calibration=(2.5, 3.0, 0.0, 0.0),
                                                              verify_costs=(1.0, 1.5, 1.5), draft_cost=0.0))],
    ids=["T1", "topk", "topp", "T1-eagle3", "T1-eagle3-cost-window"])
def test_speculative_sampling_is_lossless(sampling, drafter_kind, window):
    """Chi-square: the joint law of 3 generated tokens equals the target's (tiny vocabulary)."""
    config = tiny_config(vocab_size=6)
    global CONFIG, PARAMS
    saved = CONFIG, PARAMS
    CONFIG, PARAMS = config, tiny_params(config, std=0.5)
    try:
        small = tiny_config(vocab_size=6, num_layers=1)
        # The EAGLE-3 drafter can only propose 4 of the 6 tokens (q = 0 on the others).
        drafter, drafter_params = ((LMDrafter(small), tiny_params(small, seed=3, std=0.5)) if drafter_kind == "lm"
                                   else eagle_drafter(CONFIG, draft_vocab=4, std=0.5))
        decoder = SpeculativeDecoder(CONFIG, PARAMS, drafter, drafter_params, eos_token_ids=[])
        prompt, n = [1, 2, 3], 6000
        result = decoder.generate([prompt] * n, 3, sampling, window=window, seed=11)
        assert result.accept_hist[0] > 0 and sum(result.accept_hist[1:]) > 0  # both paths taken
        if window.kind == "cost":  # some cycles drafted nothing, others verified drafts
            assert 0 < sum(result.empty_windows) < sum(result.cycles) - result.accept_hist[0]
        samples = np.array(result.tokens)
        observed = np.zeros((6,) * 3)
        np.add.at(observed, tuple(samples.T), 1)
        expected = exact_joint(sampling, prompt, 3) * n
        assert observed[expected == 0].sum() == 0, "sampled a sequence outside the target's support"
        # Pool cells with small expectation so the chi-square approximation holds.
        big = expected >= 5
        obs, exp = observed[big], expected[big]
        if expected[~big].sum() > 0:
            obs, exp = np.append(obs, observed[~big].sum()), np.append(exp, expected[~big].sum())
        exp *= obs.sum() / exp.sum()
        _, p_value = stats.chisquare(obs, exp)
        assert p_value > 1e-3, p_value
    finally:
        CONFIG, PARAMS = saved


@settings(max_examples=40, deadline=None)  # XLA on CPU flushes subnormals to zero: keep them out
@given(drafts=hnp.arrays(np.int32, (3, 4), elements=st.integers(0, 4)),
       window=hnp.arrays(np.int32, (3,), elements=st.integers(1, 4)),
       logits=hnp.arrays(np.float32, (3, 5, 5), elements=st.floats(-3, 3, width=32, allow_subnormal=False)))
def test_greedy_acceptance_properties(drafts, window, logits):
    k, token = accept_greedy(jnp.asarray(drafts), jnp.asarray(window), jnp.asarray(logits))
    choice = logits.argmax(-1)
    for row in range(3):
        expected = 0
        while expected < window[row] and drafts[row, expected] == choice[row, expected]:
            expected += 1
        assert int(k[row]) == expected
        assert int(token[row]) == choice[row, expected]


@settings(max_examples=40, deadline=None)  # XLA on CPU flushes subnormals to zero: keep them out
@given(logits=hnp.arrays(np.float32, (2, 4, 6), elements=st.floats(-4, 4, width=32, allow_subnormal=False), unique=True),
       seed=st.integers(0, 2**16), window=st.integers(1, 3))
def test_sampling_acceptance_properties(logits, seed, window):
    sampling = SamplingParams(temperature=1.0, top_k=4)
    target = jnp.asarray(logits)
    q = processed_logprobs(target[:, :3], sampling)  # drafter == target: ratio 1, all accepted
    key_draft, key_accept = jax.random.split(jax.random.key(seed))
    drafts = jax.random.categorical(key_draft, q, axis=-1).astype(jnp.int32)
    windows = jnp.full((2,), window, jnp.int32)
    k, token = accept_sampling(key_accept, drafts, windows, q, target, sampling)
    assert (np.asarray(k) == window).all()
    p = np.exp(np.asarray(processed_logprobs(target, sampling)))
    assert all(p[r, window, int(token[r])] > 0 for r in range(2))  # bonus token in the target's support
    # A drafter that proposes a token the target rules out (p = 0 after top-k) is always rejected.
    outside = jnp.asarray(p[:, :3].argmin(-1), jnp.int32)
    assert all(p[r, i, int(outside[r, i])] == 0 for r in range(2) for i in range(3))  # unique logits: no ties
    uniform_q = jnp.full((2, 3, 6), -np.log(6.0), jnp.float32)
    k, token = accept_sampling(key_accept, outside, windows, uniform_q, target, sampling)
    assert (np.asarray(k) == 0).all()
    assert all(p[r, 0, int(token[r])] > 0 for r in range(2))


def cost_window(accept_probability: float, k_max: int = 2, verify_costs=(1.0, 1.5, 1.5), draft_cost=0.0):
    """A cost window whose calibrated model predicts the same acceptance probability for every draft."""
    bias = float(np.log(accept_probability / (1 - accept_probability)))
    return WindowPolicy("cost", k_max, calibration=(bias, 0.0, 0.0, 0.0), verify_costs=verify_costs,
                        draft_cost=draft_cost)


@pytest.mark.parametrize("p,expected", [(0.30, [False, False]), (0.40, [True, True]), (0.60, [True, True])])
def test_cost_window_decisions_by_hand(p, expected):
    """verify costs (1, 1.5, 1.5), free drafts: at step 0, stopping emits 1 token per step; a window of 1
    emits (1 + p)/1.5 and of 2 (1 + p + p^2)/1.5, which pays once p^2 + p >= 0.5, i.e. p >= 0.366."""
    window = cost_window(p)
    logprobs = jnp.log(jnp.full((2, 5), 0.2))
    keep, state = window.keep_drafting(0, logprobs, window.init(2))
    assert keep.tolist() == expected
    np.testing.assert_allclose(np.asarray(state), [[np.log(p), p]] * 2, rtol=1e-5)
    # Step 1 of a kept window: (1 + p + p^2)/1.5 against (1 + p)/1.5 always pays (same verify cost).
    keep, state = window.keep_drafting(1, logprobs, state)
    assert keep.tolist() == [True, True]
    np.testing.assert_allclose(np.asarray(state), [[2 * np.log(p), p + p * p]] * 2, rtol=1e-5)


def test_cost_window_on_flat_costs_keeps_every_draft_and_prices_drafting():
    logprobs = jnp.log(jnp.full((1, 5), 0.2))
    flat = cost_window(0.05, k_max=3, verify_costs=(1.0, 1.0, 1.0, 1.0))  # an accelerator: verifying is free
    assert flat.keep_drafting(0, logprobs, flat.init(1))[0].tolist() == [True]
    # Drafter steps that cost 0.5 decode steps each: a window of one at p = 0.3 emits 1.3 tokens for
    # 1 + 2 * 0.5 = 2 steps, stopping 1 token for 1.5 steps.
    dear = cost_window(0.3, k_max=3, verify_costs=(1.0, 1.0, 1.0, 1.0), draft_cost=0.5)
    assert dear.keep_drafting(0, logprobs, dear.init(1))[0].tolist() == [False]


@pytest.mark.parametrize("drafter_name,p", [("self:1", 0.01), ("eagle3", 0.40), ("self:1", 0.40),
                                            ("target-itself", 0.99)])
def test_cost_window_greedy_equals_autoregressive(drafter_name, p, autoregressive_reference):
    drafter, drafter_params = drafters()[drafter_name]
    decoder = SpeculativeDecoder(CONFIG, PARAMS, drafter, drafter_params, eos_token_ids=[])
    result = decoder.generate(PROMPTS, 24, window=cost_window(p, k_max=4, verify_costs=(1.0, 1.5, 1.5, 1.6, 1.7)))
    assert result.tokens == autoregressive_reference
    if p == 0.01:  # nothing pays: every cycle is a plain decode step
        assert result.empty_windows == result.cycles and result.tau == 1.0
    else:
        assert sum(result.empty_windows) == 0
    if p == 0.99 and drafter_name == "target-itself":
        assert result.accept_hist[:-1] == [0] * 4  # whole windows, as a fixed window of 4


def test_cost_window_without_costs_is_refused_until_measured():
    drafter, drafter_params = drafters()["eagle3"]
    decoder = SpeculativeDecoder(CONFIG, PARAMS, drafter, drafter_params, eos_token_ids=[])
    unmeasured = WindowPolicy("cost", 3, calibration=(0.0, 1.0, 0.0, 0.0))
    with pytest.raises(InputError, match="cycle costs"):
        decoder.generate(PROMPTS, 4, window=unmeasured)
    costs = measure_cycle_costs(CONFIG, PARAMS, drafter, drafter_params, 3, context=16, repeats=5)
    assert len(costs.verify) == 4 and costs.verify[0] == 1.0 and all(c > 0 for c in costs.verify) and costs.draft > 0
    assert verify_widths(3) == (1, 2, 4) and verify_widths(10) == (1, 2, 4, 8, 11)
    assert verify_widths(1) == (1, 2)
    with pytest.raises(InputError, match="verify costs for T = 1..4"):
        WindowPolicy("cost", 3, calibration=(0.0, 1.0, 0.0, 0.0), verify_costs=(1.0, 1.4))
    with pytest.raises(InputError, match="finite"):
        WindowPolicy("cost", 1, calibration=(0.0, 1.0, 0.0, 0.0), verify_costs=(1.0, float("nan")))
    with pytest.raises(InputError, match="calibration weights"):
        WindowPolicy("cost", 1, verify_costs=(1.0, 1.4))


@pytest.mark.parametrize("drafter_name", ["self:1", "independent", "eagle3"])
def test_cycle_costs_are_measured_for_every_kind_of_drafter(drafter_name):
    drafter, drafter_params = drafters()[drafter_name]
    costs = measure_cycle_costs(CONFIG, PARAMS, drafter, drafter_params, 2, context=16, repeats=5)
    assert len(costs.verify) == 3 and costs.verify[0] == 1.0 and all(math.isfinite(c) and c > 0 for c in costs.verify)
    assert math.isfinite(costs.draft) and costs.draft > 0


def test_looped_time_ratios_cancel_what_a_program_costs_once_per_launch():
    """Calls of 20 and 60 ms inside programs that each cost 80 ms to launch: 3x, not the 1.7x of whole
    programs. (Sleeps long enough that a loaded machine's millisecond of oversleep stays noise.)"""
    def looped(per_call):
        def program(x, n):
            time.sleep(0.08 + n * per_call)
            return x
        return program

    x = jnp.zeros(())
    ratios = interleaved_time_ratios({"short": (looped(0.02), (x,)), "long": (looped(0.06), (x,))},
                                     reference="short", repeats=5, loop_steps=2)
    assert ratios["short"] == 1.0 and 2.5 < ratios["long"] < 3.5
    with pytest.raises(ValueError, match="loop_steps"):
        interleaved_time_ratios({"short": (looped(0.005), (x,))}, reference="short", repeats=1, loop_steps=0)
    with pytest.raises(ValueError, match="loop_steps"):
        interleaved_time_ratios({"short": (looped(0.005), (x,))}, reference="short", repeats=1,
                                loop_steps={"short": 0})


def test_loop_lengths_are_ranged_per_program_and_each_call_is_timed_at_its_own(monkeypatch):
    """A fake clock: a program of n calls takes 1 ms to launch plus n times its per-call time."""
    runs = []

    def fake_seconds(fn, args):
        runs.append((fn.__name__, args[-1]))
        return fn(*args)

    def program(name, per_call):
        def run(x, n):
            return 0.001 + n * per_call
        run.__name__ = name
        return run

    monkeypatch.setattr(costs_module, "_seconds", fake_seconds)
    calls = {"slow": (program("slow", 0.005), (None,)), "fast": (program("fast", 0.0005), (None,))}
    # 40 ms: 5 ms calls reach it at n = 8 (41 ms), 0.5 ms calls at n = 128 (65 ms; 64 gives 33 ms).
    steps = autorange_loop_steps(calls, min_seconds=0.04)
    assert steps == {"slow": 8, "fast": 128}
    assert autorange_loop_steps(calls, min_seconds=10.0, max_steps=100) == {"slow": 100, "fast": 100}
    runs.clear()
    ratios = interleaved_time_ratios(calls, reference="slow", repeats=3, loop_steps=steps)
    assert ratios == pytest.approx({"slow": 1.0, "fast": 0.1})  # the launch cancels, each over its own n
    assert set(runs) == {("slow", 8), ("slow", 16), ("fast", 128), ("fast", 256)}
    with pytest.raises(ValueError, match="loop_steps names"):
        interleaved_time_ratios(calls, reference="slow", repeats=1, loop_steps={"slow": 8})


def test_cycle_costs_range_their_loop_lengths(monkeypatch):
    ranged = []
    autorange = costs_module.autorange_loop_steps

    def spy(calls, min_seconds):
        ranged.append(min_seconds)
        return autorange(calls, min_seconds)  # a fixed n would be the fragile case this guards against

    monkeypatch.setattr(costs_module, "autorange_loop_steps", spy)
    drafter, drafter_params = drafters()["self:1"]
    measure_cycle_costs(CONFIG, PARAMS, drafter, drafter_params, 1, context=16, repeats=3)
    assert ranged == [costs_module.MIN_LOOP_SECONDS]


def test_interleaved_time_ratios_are_relative_wall_times():
    def sleeping(seconds):
        def call(x):
            time.sleep(seconds)
            return x
        return call

    x = jnp.zeros(())
    # Sleeps long enough that the scheduler's overshoot (a millisecond or so on a loaded 2-core CI host) stays small.
    ratios = interleaved_time_ratios({"short": (sleeping(0.01), (x,)), "long": (sleeping(0.03), (x,))},
                                     reference="short", repeats=5)
    assert ratios["short"] == 1.0 and 2.5 < ratios["long"] < 3.5


def test_bad_input():
    with pytest.raises(InputError, match="vocabulary"):
        SpeculativeDecoder(CONFIG, PARAMS, LMDrafter(tiny_config(vocab_size=33, num_layers=1)),
                           tiny_params(tiny_config(vocab_size=33, num_layers=1)), eos_token_ids=[])
    with pytest.raises(InputError, match="k_max"):
        WindowPolicy("fixed", 0)
    with pytest.raises(InputError, match="k_max"):
        WindowPolicy("fixed", 99)
    with pytest.raises(InputError, match="feature layers"):
        Eagle3Drafter.for_target(CONFIG, (0, CONFIG.num_layers), 8)
    with pytest.raises(InputError, match="draft vocabulary"):
        Eagle3Drafter.for_target(CONFIG, (0,), CONFIG.vocab_size + 1)
    with pytest.raises(InputError, match="distinct"):
        Eagle3Drafter.for_target(CONFIG, (0,), 4).init_params(jax.random.key(0), d2t=np.array([1, 1, 2, 3]))
    with pytest.raises(InputError, match="unknown window policy"):
        WindowPolicy("telepathic", 4)
    for branches in (0, True, (2, 0), (2, 1, 1, 1, 1)):
        with pytest.raises(InputError, match="branches must be at most k_max = 4 counts of at least 1"):
            WindowPolicy("fixed", 4, branches=branches)
    with pytest.raises(InputError, match="verifies 1097 tokens per cycle, more than 1024"):
        WindowPolicy("fixed", 4, branches=(8, 8, 8))
    assert WindowPolicy("fixed", 3, branches=(4,)).branches == (4, 1, 1) and WindowPolicy("fixed", 3).tree_tokens == 4
    with pytest.raises(InputError, match="needs the fixed window"):
        WindowPolicy("confidence", 4, branches=2)
    decoder = SpeculativeDecoder(CONFIG, PARAMS, *drafters()["self:1"], eos_token_ids=[])
    with pytest.raises(InputError, match="greedy only"):
        decoder.generate(PROMPTS[:1], 4, SamplingParams(temperature=1.0), WindowPolicy("fixed", 2, branches=2))
    with pytest.raises(InputError, match="self-speculative"):
        self_speculative(CONFIG, PARAMS, CONFIG.num_layers)


def test_self_speculative_smollm2_equals_greedy_autoregressive():
    """Real weights: SmolLM2 with its first 8 layers as drafter, batch of 2 chat prompts."""
    from ppow_jax.weights.registry import DEFAULT_MODEL, load_model

    model = load_model(DEFAULT_MODEL)
    tok = model.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
               for q in ("Name three primary colors.", "What is 12 times 7?")]
    reference = AutoregressiveDecoder(model.config, model.params, eos_token_ids=tok.eos_token_ids,
                                      pad_token_id=tok.pad_token_id).generate(prompts, 32)
    drafter, drafter_params = self_speculative(model.config, model.params, 8)
    decoder = SpeculativeDecoder(model.config, model.params, drafter, drafter_params,
                                 eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    result = decoder.generate(prompts, 32, window=WindowPolicy("fixed", 4))
    assert result.tokens == reference.tokens
    assert result.tau > 1.0  # the truncated target does agree with the full one sometimes
