"""Autoregressive decoding: equality with a naive loop, per-row stops, no recompilation, errors;
continuous batching: the same answers, draws that depend only on each request's key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import tiny_config, tiny_params
from ppow_jax.errors import InputError
from ppow_jax.inference.autoregressive import AutoregressiveDecoder, Request, bucket
from ppow_jax.inference.sampling import SamplingParams
from ppow_jax.models import llama

CONFIG = tiny_config()
PARAMS = tiny_params(CONFIG)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
_REFERENCE_LEN = 64
_full_forward = jax.jit(lambda p, t: llama.forward(p, t, llama.init_cache(CONFIG, 1, _REFERENCE_LEN), CONFIG).logits)


def naive_greedy(prompt, n, eos=()):
    """Reference: recompute the whole sequence for every new token, no cache.

    The sequence is right-padded to a fixed length (one compilation); causal attention keeps the
    padding from affecting the logits at the last real position.
    """
    tokens = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, _REFERENCE_LEN), np.int32)
        padded[0, :len(tokens)] = tokens
        token = int(jnp.argmax(_full_forward(PARAMS, jnp.asarray(padded))[0, len(tokens) - 1]))
        tokens.append(token)
        if token in eos:
            break
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def decoder():
    return AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[], pad_token_id=0)


def test_greedy_batch_equals_naive_loop(decoder):
    result = decoder.generate(PROMPTS, 24)
    for prompt, got in zip(PROMPTS, result.tokens):
        assert got == naive_greedy(prompt, 24)


def test_per_row_eos_stops_only_that_row():
    reference = [naive_greedy(p, 16) for p in PROMPTS]
    eos = reference[1][3]  # row 1 stops at its 4th token; other rows stop wherever eos appears
    decoder = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[eos], pad_token_id=0)
    result = decoder.generate(PROMPTS, 16)
    for prompt, got in zip(PROMPTS, result.tokens):
        assert got == naive_greedy(prompt, 16, eos=(eos,))
    assert result.tokens[1][-1] == eos and result.finished_by_eos[1]
    # --ignore-eos generates exactly the budget.
    forced = decoder.generate(PROMPTS, 16, ignore_eos=True)
    assert [len(r) for r in forced.tokens] == [16, 16, 16]
    assert forced.tokens[1] == reference[1]


def test_compiles_once_per_bucket():
    decoder = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[], pad_token_id=0)
    # Prompt, cache and buffer sizes all fall in the same buckets (16, 16, 16).
    decoder.generate([[1, 2, 3]], 12)
    decoder.generate([[4, 5, 6, 7]], 12)
    decoder.generate([[4, 5, 6]], 13, on_tokens=lambda rows: None, stream_every=3)  # streamed in chunks
    key = (1, bucket(4), bucket(4 + 12))
    assert decoder._prefill_fns[key]._cache_size() == 1
    for fn in decoder._decode_fns.values():
        assert fn._cache_size() == 1
    assert len(decoder._decode_fns) == 1


def test_sampling_is_reproducible_and_seed_dependent(decoder):
    params = SamplingParams(temperature=1.0, top_k=20)
    a = decoder.generate(PROMPTS, 12, params, seed=3).tokens
    b = decoder.generate(PROMPTS, 12, params, seed=3).tokens
    c = decoder.generate(PROMPTS, 12, params, seed=4).tokens
    assert a == b and a != c


def test_input_errors(decoder):
    with pytest.raises(InputError, match="empty"):
        decoder.generate([[1, 2], []], 4)
    with pytest.raises(InputError, match="context window"):
        decoder.generate([[1] * 500], 20)
    with pytest.raises(InputError, match="max_new_tokens"):
        decoder.generate([[1, 2]], 0)
    with pytest.raises(InputError, match="vocabulary"):
        decoder.generate([[1, CONFIG.vocab_size]], 4)


def test_nan_logits_are_reported_not_sampled():
    params = jax.tree.map(lambda a: a, PARAMS)
    params["final_norm"] = params["final_norm"].at[0].set(jnp.nan)
    decoder = AutoregressiveDecoder(CONFIG, params, eos_token_ids=[])
    with pytest.raises(FloatingPointError, match="NaN"):
        decoder.generate([[1, 2, 3]], 4)


STREAM = [[int(t) for t in np.random.default_rng(row).integers(1, CONFIG.vocab_size, 1 + row % 13)] for row in range(11)]


def test_continuous_batching_gives_every_request_its_greedy_answer_once():
    reference = [naive_greedy(p, 14) for p in STREAM]
    eos = reference[0][4]  # answers end at different steps, so rows are refilled mid-stream
    decoder = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[eos], pad_token_id=0)
    expected = [naive_greedy(p, 14, eos=(eos,)) for p in STREAM]
    assert len({len(e) for e in expected}) > 2
    answers = list(decoder.generate_continuously((Request(i, p) for i, p in enumerate(STREAM)), 14,
                                                 max_prompt_len=16, slots=3, refill=2))
    assert sorted(a.request.id for a in answers) == list(range(len(STREAM)))
    for answer in answers:
        assert answer.tokens == expected[answer.request.id]
        assert answer.finished_by_eos == (answer.tokens[-1] == eos)
    assert [a.request.id for a in answers] != list(range(len(STREAM)))  # short answers overtake long ones
    # One decode program for the whole stream, and a second stream of the same sizes compiles nothing.
    list(decoder.generate_continuously((Request(i, p) for i, p in enumerate(STREAM[:4])), 14, max_prompt_len=16,
                                       slots=3, refill=2))
    assert len(decoder._decode_fns) == 1 and next(iter(decoder._decode_fns.values()))._cache_size() == 1


def test_continuous_batching_draws_depend_only_on_each_requests_key():
    params = SamplingParams(temperature=1.0, top_k=20)
    eos = naive_greedy(STREAM[0], 14)[4]
    decoder = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[eos], pad_token_id=0)
    run = lambda slots, refill, seed=3: {a.request.id: a.tokens for a in decoder.generate_continuously(
        (Request(i, p, seed=seed, stream=i) for i, p in enumerate(STREAM)), 12, params, max_prompt_len=16,
        slots=slots, refill=refill)}
    first = run(4, 1)
    assert first == run(7, 3) == run(1, 1)
    assert first != run(4, 1, seed=4)
    assert len({tuple(tokens) for tokens in first.values()}) == len(STREAM)
    assert len({len(tokens) for tokens in first.values()}) > 1  # rows at different steps sampled side by side


def test_continuous_batching_samples_the_target_distribution(decoder):
    """Each request's first token, over many requests with their own keys, follows softmax(logits / T)."""
    prompt, temperature, draws = [3, 1, 4, 1, 5], 1.5, 1500
    logits = np.asarray(_full_forward(PARAMS, jnp.asarray([prompt + [0] * (_REFERENCE_LEN - len(prompt))]))[0, 4])
    # float64, so that the rescaled expectations sum to the draws within chisquare's 1.5e-8 check
    expected = np.asarray(jax.nn.softmax(jnp.asarray(logits) / temperature), np.float64) * draws
    answers = decoder.generate_continuously((Request(i, prompt, seed=0, stream=i) for i in range(draws)), 1,
                                            SamplingParams(temperature=temperature), max_prompt_len=8, slots=64)
    counts = np.bincount([a.tokens[0] for a in answers], minlength=CONFIG.vocab_size)
    frequent = expected >= 5
    observed = np.append(counts[frequent], counts[~frequent].sum())
    pooled = np.append(expected[frequent], expected[~frequent].sum())
    _, p_value = stats.chisquare(observed, pooled * observed.sum() / pooled.sum())
    assert p_value > 1e-3


def test_continuous_batching_input_errors(decoder):
    with pytest.raises(InputError, match="request 'long' has 9 prompt tokens, over max_prompt_len=8"):
        list(decoder.generate_continuously([Request("long", [1] * 9)], 4, max_prompt_len=8, slots=2))
    with pytest.raises(InputError, match="slots"):
        list(decoder.generate_continuously([Request(0, [1])], 4, max_prompt_len=8, slots=0))
    with pytest.raises(InputError, match="context window"):
        list(decoder.generate_continuously([Request(0, [1])], 20, max_prompt_len=500, slots=2))
    with pytest.raises(InputError, match="empty"):
        list(decoder.generate_continuously([Request(0, [])], 4, max_prompt_len=8, slots=2))
    with pytest.raises(InputError, match="refill"):
        list(decoder.generate_continuously([Request(0, [1])], 4, max_prompt_len=8, slots=2, refill=-1))
    with pytest.raises(InputError, match=r"seed and stream must be integers in \[0, 2\*\*31\)"):
        list(decoder.generate_continuously([Request(0, [1], seed=2 ** 31)], 4, max_prompt_len=8, slots=2))
    sampled = SamplingParams(temperature=1.0)
    with pytest.raises(InputError, match=r"request 'b' reuses \(seed, stream\) \(0, 0\)"):
        list(decoder.generate_continuously([Request("a", [1]), Request("b", [2])], 4, sampled, max_prompt_len=8,
                                           slots=2))
    # Greedy answers draw nothing: shared keys are fine there.
    assert len(list(decoder.generate_continuously([Request("a", [1]), Request("b", [2])], 4, max_prompt_len=8,
                                                  slots=2))) == 2


def test_continuous_batching_ignore_eos_and_nan_logits():
    eos = naive_greedy(STREAM[1], 8)[2]
    decoder = AutoregressiveDecoder(CONFIG, PARAMS, eos_token_ids=[eos], pad_token_id=0)
    forced = list(decoder.generate_continuously((Request(i, p) for i, p in enumerate(STREAM[:5])), 8,
                                                max_prompt_len=16, slots=2, ignore_eos=True))
    assert all(len(a.tokens) == 8 and not a.finished_by_eos for a in forced)
    assert {a.request.id: a.tokens for a in forced}[1] == naive_greedy(STREAM[1], 8)
    params = jax.tree.map(lambda a: a, PARAMS)
    params["final_norm"] = params["final_norm"].at[0].set(jnp.nan)
    broken = AutoregressiveDecoder(CONFIG, params, eos_token_ids=[])
    with pytest.raises(FloatingPointError, match=r"NaN logits for requests \['x'"):
        list(broken.generate_continuously([Request("x", [1, 2, 3])], 4, max_prompt_len=8, slots=2))
