"""Autoregressive decoding: equality with a naive loop, per-row stops, no recompilation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_params
from ppow_jax.errors import InputError
from ppow_jax.inference.autoregressive import AutoregressiveDecoder, bucket
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
