"""Internal consistency of the decoder: full forward, prefill + decode, prefill + chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_params
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

# Jitted once per shape: op-by-op dispatch of a whole transformer is slow.
forward = jax.jit(llama.forward, static_argnames=("config", "hidden_layers", "logits_at"))

# Two paths to the same logits (other cache lengths, chunkings or batch rows) reduce in another
# order: f32 logits of magnitude ~10 then differ by up to ~3e-5, depending on the CPU's vector
# width (AVX-512 vs AVX2). A cache, position or mask bug moves them by O(1).
PATH_TOLERANCE = dict(atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("architecture,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)])
def test_full_forward_equals_prefill_plus_decode_and_chunk(architecture, tied):
    config = tiny_config(architecture, tie_word_embeddings=tied)
    params = tiny_params(config)
    tokens = jax.random.randint(jax.random.key(1), (3, 20), 0, config.vocab_size)
    full = forward(params, tokens, llama.init_cache(config, 3, 20), config).logits
    assert full.shape == (3, 20, config.vocab_size)

    # Prefill 7 tokens, then one token at a time, into a larger cache.
    out = forward(params, tokens[:, :7], llama.init_cache(config, 3, 32), config)
    pieces, cache = [out.logits], out.cache
    for t in range(7, 20):
        out = forward(params, tokens[:, t:t + 1], cache, config)
        pieces.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, **PATH_TOLERANCE)
    assert cache.lengths.tolist() == [20, 20, 20]

    # Prefill 9 tokens, then an 11-token chunk (the speculative verify step).
    out = forward(params, tokens[:, :9], llama.init_cache(config, 3, 32), config)
    chunk = forward(params, tokens[:, 9:], out.cache, config)
    np.testing.assert_allclose(chunk.logits, full[:, 9:], **PATH_TOLERANCE)


def test_per_row_lengths_padding_and_rollback():
    """Rows of different lengths in one batch; a rolled-back (shorter) length hides stale slots."""
    config = tiny_config()
    params = tiny_params(config)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, config.vocab_size, n) for n in (5, 12, 9)]
    padded = np.zeros((3, 16), np.int32)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    lengths = jnp.array([len(s) for s in seqs], jnp.int32)
    out = forward(params, jnp.asarray(padded), llama.init_cache(config, 3, 32), config, num_valid=lengths,
                        logits_at="last")
    for i, s in enumerate(seqs):
        alone = forward(params, jnp.asarray(s)[None], llama.init_cache(config, 1, len(s)), config).logits
        np.testing.assert_allclose(out.logits[i], alone[0, -1], **PATH_TOLERANCE)
    assert out.cache.lengths.tolist() == [5, 12, 9]

    # Append a 4-token "draft" to every row, then roll back to keep only 1 token of row 0.
    draft = jnp.asarray(rng.integers(0, config.vocab_size, (3, 4)), jnp.int32)
    after = forward(params, draft, out.cache, config)
    rolled = after.cache.replace(lengths=out.cache.lengths + jnp.array([1, 4, 0]))
    nxt = jnp.asarray(rng.integers(0, config.vocab_size, (3, 1)), jnp.int32)
    got = forward(params, nxt, rolled, config).logits[:, 0]
    kept = [1, 4, 0]
    for i, s in enumerate(seqs):
        seq = np.concatenate([s, np.asarray(draft[i, :kept[i]]), np.asarray(nxt[i])])
        ref = forward(params, jnp.asarray(seq)[None], llama.init_cache(config, 1, len(seq)), config).logits
        np.testing.assert_allclose(got[i], ref[0, -1], **PATH_TOLERANCE)


def test_batched_decode_attention_form_equals_the_full_forward():
    """From MULTIPLY_REDUCE_MIN_BATCH rows, one-token decode steps take the multiply-reduce attention;
    over rows of different lengths, one of them rolled back, they give the full forward's logits."""
    config = tiny_config()
    params = tiny_params(config)
    batch = llama.MULTIPLY_REDUCE_MIN_BATCH
    assert llama.multiply_reduce_attention(batch, 1) and not llama.multiply_reduce_attention(batch - 1, 1)
    assert not llama.multiply_reduce_attention(batch, 2)  # verify chunks and prefill keep the dot products
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, 18)), jnp.int32)
    prompt_lengths = jnp.asarray(rng.integers(3, 10, batch), jnp.int32)
    out = forward(params, tokens[:, :10], llama.init_cache(config, batch, 24), config, num_valid=prompt_lengths,
                  logits_at="last")
    cache = out.cache.replace(lengths=out.cache.lengths.at[0].add(-2))  # row 0 rolls back two tokens
    lengths = np.asarray(cache.lengths)
    steps = []
    for step in range(6):
        next_tokens = tokens[jnp.arange(batch), jnp.asarray(lengths) + step][:, None]
        out = forward(params, next_tokens, cache, config)
        steps.append(out.logits[:, 0])
        cache = out.cache
    for row in range(batch):
        n = int(lengths[row]) + 6
        alone = forward(params, tokens[row:row + 1, :n], llama.init_cache(config, 1, n), config).logits[0]
        np.testing.assert_allclose(jnp.stack([s[row] for s in steps]), alone[-6:], **PATH_TOLERANCE)


def test_prefill_into_a_longer_cache_equals_forward():
    """`llama.prefill` attends within the prompt and pads the cache: the same logits, hidden states
    and cached keys/values as a forward into the long cache, and the same next decode step."""
    config = tiny_config()
    params = tiny_params(config)
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 12)), jnp.int32)
    lengths = jnp.asarray([12, 5, 9], jnp.int32)
    prefill = jax.jit(llama.prefill, static_argnames=("cache_len", "config", "hidden_layers", "logits_at"))
    fast = prefill(params, tokens, cache_len=40, config=config, num_valid=lengths, hidden_layers=(0, 1))
    slow = forward(params, tokens, llama.init_cache(config, 3, 40), config, num_valid=lengths, hidden_layers=(0, 1),
                   logits_at="last")
    assert fast.cache.max_len == 40 and fast.cache.lengths.tolist() == [12, 5, 9]
    np.testing.assert_allclose(fast.logits, slow.logits, **PATH_TOLERANCE)
    np.testing.assert_allclose(fast.hidden_states, slow.hidden_states, **PATH_TOLERANCE)
    for got, want in zip(fast.cache.k + fast.cache.v, slow.cache.k + slow.cache.v):
        np.testing.assert_allclose(got, want, **PATH_TOLERANCE)
    step = jnp.asarray(rng.integers(0, config.vocab_size, (3, 1)), jnp.int32)
    np.testing.assert_allclose(forward(params, step, fast.cache, config).logits,
                               forward(params, step, slow.cache, config).logits, **PATH_TOLERANCE)
    with pytest.raises(ValueError, match="shorter than"):
        llama.prefill(params, tokens, 8, config)


def test_hidden_states_of_chosen_layers():
    config = tiny_config()
    params = tiny_params(config)
    tokens = jnp.arange(10)[None] % config.vocab_size
    out = forward(params, tokens, llama.init_cache(config, 1, 10), config, hidden_layers=(0, 2))
    assert out.hidden_states.shape == (2, 1, 10, config.hidden_size)
    # The last layer's output, final-normed and projected, gives the logits.
    last = forward(params, tokens, llama.init_cache(config, 1, 10), config, hidden_layers=(2,)).hidden_states[0]
    normed = llama.rms_norm(last, params["final_norm"], config.rms_norm_eps)
    np.testing.assert_allclose(llama.lm_head(params, normed, config), out.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        forward(params, tokens, llama.init_cache(config, 1, 10), config, hidden_layers=(3,))


def test_bfloat16_close_to_float32():
    config = tiny_config()
    params = tiny_params(config, std=0.05)
    tokens = jnp.arange(12)[None] % config.vocab_size
    ref = forward(params, tokens, llama.init_cache(config, 1, 12), config).logits
    bf16 = config.with_dtypes("bfloat16")
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    got = forward(params16, tokens, llama.init_cache(bf16, 1, 12), bf16).logits
    assert got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) < 0.05


def test_rope_llama3_scaling_changes_only_low_frequencies():
    plain = tiny_config(rope_scaling=None)
    scaled = tiny_config()
    a, b = llama.rope_inverse_frequencies(plain), llama.rope_inverse_frequencies(scaled)
    assert a[0] == b[0]  # highest frequency untouched
    np.testing.assert_allclose(b[-1], a[-1] / 8.0, rtol=1e-6)  # lowest divided by the factor


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny_config("mamba")
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(num_heads=5, num_kv_heads=2)
    with pytest.raises(ValueError, match="param_dtype"):
        tiny_config(param_dtype="int8")
    assert isinstance(hash(tiny_config()), int)
    assert tiny_config().num_params() == sum(x.size for x in jax.tree.leaves(tiny_params(tiny_config())))
    assert isinstance(tiny_config(), ModelConfig)
