"""Llama-family decoder as pure functions over a parameter pytree.

Parameter layout (matrices are stored [in, out] so that a forward is `x @ w`; G = H / KV is the
number of query heads sharing one KV head):

    {"embed": [V, D],
     "layers": [{"attn_norm": [D],
                 "wqkv": [D, KV, G + 2, hd],    # per KV group: its G query heads, its key, its value
                 "wo": [H*hd, D], "mlp_norm": [D],
                 "w_gate_up": [D, 2, F],        # gate and up projections side by side
                 "w_down": [F, D],
                 # optional: "bqkv": [KV, G + 2, hd] (Qwen2), "q_norm"/"k_norm": [hd] (Qwen3)
                 }, ...],                       # one dict per layer
     "final_norm": [D],
     "lm_head": [D, V]}                         # absent when embeddings are tied

The fused projections make one matrix product where a checkpoint has three (q/k/v) or two
(gate/up): on a CPU this cuts decode time by about a fifth. Grouping them per KV head keeps a
tensor-parallel shard's query heads, key and value together. Checkpoints store the separate
matrices; `fuse_projections` / `split_projections` convert.

Layers are a Python list rather than a stacked array: the forward unrolls them, and each layer
reads its own buffers with no slicing copy, which matters for memory-bound decoding.

The KV cache has a static size and a per-row length. Token t of row b is written at cache slot
`positions[b, t]`, and a query at position p attends to slots 0..p. Slots past a row's length may
hold stale keys (a rejected draft, padding); they are never visible, because any slot a query can
see has been rewritten by the time that query runs. Rolling back a rejected draft is therefore
just a smaller `lengths`.

A tree of drafts (`forward`'s `tree_ancestors`) breaks the slot = position rule: its T tokens are
written at slots `lengths + 0..T-1`, take their depth in the tree as position, and each sees the
verified context (slots below `lengths`) and, among the T, only its own ancestors and itself.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax import sharding
from ppow_jax.models.config import ModelConfig

Params = dict[str, Any]


@flax.struct.dataclass
class KVCache:
    """Static-size key/value cache with one length per batch row."""

    k: tuple[jax.Array, ...]  # per layer: [B, KV, S, hd] (head-major: attention reads it untransposed)
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32: number of valid positions in each row

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


class ForwardOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] (logits_at="all") or [B, V] (logits_at="last"); float32
    hidden_states: Optional[jax.Array]  # [n, B, T, D] outputs of the requested layers, or None
    cache: KVCache


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or config.compute_jnp_dtype
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   lengths=jnp.zeros((batch_size,), jnp.int32))


def init_params(config: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random parameters (unit tests, benchmarks with random weights of the real shapes)."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    h, kv = config.num_heads, config.num_kv_heads
    dtype = config.params_jnp_dtype
    keys = iter(jax.random.split(key, 16 * config.num_layers + 4))

    def normal(shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def norm_weight(n):
        # Not exactly ones, so that tests notice a missing or misplaced norm weight.
        return (1.0 + 0.1 * jax.random.normal(next(keys), (n,), jnp.float32)).astype(dtype)

    layers = []
    for _ in range(config.num_layers):
        layer = {"attn_norm": norm_weight(d), "wq": normal((d, h * hd)), "wk": normal((d, kv * hd)),
                 "wv": normal((d, kv * hd)), "wo": normal((h * hd, d)), "mlp_norm": norm_weight(d),
                 "w_gate": normal((d, f)), "w_up": normal((d, f)), "w_down": normal((f, d))}
        if config.attention_bias:
            layer.update(bq=normal((h * hd,)), bk=normal((kv * hd,)), bv=normal((kv * hd,)))
        if config.qk_norm:
            layer.update(q_norm=norm_weight(hd), k_norm=norm_weight(hd))
        layers.append(fuse_projections(layer, config))
    params = {"embed": normal((config.vocab_size, d)), "layers": layers, "final_norm": norm_weight(d)}
    if not config.tie_word_embeddings:
        params["lm_head"] = normal((d, config.vocab_size))
    return params


def fuse_projections(layer: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Checkpoint layout (wq, wk, wv, bq/bk/bv, w_gate, w_up; [in, out]) -> the model's fused layout.

    Works on numpy and jax arrays alike; other entries pass through unchanged.
    """
    xp = jnp if any(isinstance(layer[k], jax.Array) for k in ("wq", "w_gate")) else np
    kv, groups, hd = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    fused = {k: v for k, v in layer.items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}

    def qkv(q, k, v, lead):
        q = q.reshape(*lead, kv, groups, hd)
        k = k.reshape(*lead, kv, 1, hd)
        v = v.reshape(*lead, kv, 1, hd)
        return xp.concatenate([q, k, v], axis=-2)

    d = layer["wq"].shape[0]
    fused["wqkv"] = qkv(layer["wq"], layer["wk"], layer["wv"], (d,))
    if "bq" in layer:
        fused["bqkv"] = qkv(layer["bq"], layer["bk"], layer["bv"], ())
    fused["w_gate_up"] = xp.stack([layer["w_gate"], layer["w_up"]], axis=1)
    return fused


def split_projections(layer: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Inverse of `fuse_projections` (for writing checkpoints and for tests)."""
    groups = config.num_heads // config.num_kv_heads
    split = {k: v for k, v in layer.items() if k not in ("wqkv", "bqkv", "w_gate_up")}
    for prefix, key in (("w", "wqkv"), ("b", "bqkv")):
        if key in layer:
            fused = layer[key]
            lead = fused.shape[:-3]
            split[prefix + "q"] = fused[..., :groups, :].reshape(*lead, -1)
            split[prefix + "k"] = fused[..., groups, :].reshape(*lead, -1)
            split[prefix + "v"] = fused[..., groups + 1, :].reshape(*lead, -1)
    split["w_gate"], split["w_up"] = layer["w_gate_up"][:, 0], layer["w_gate_up"][:, 1]
    return split


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies, with Llama-3 scaling of the low frequencies when configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, hd/2] of the rotary angles; computed once per forward, used by every layer."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout ([x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin])."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed.astype(x.dtype) * weight.astype(x.dtype))


# Batched decoding on XLA:CPU: from this many rows of one query token, attention is a broadcast
# multiply and a sum instead of two batched dot products. XLA fuses the mask and softmax into it and
# streams the cache once; its batched dot slows down once the batch's cache outgrows the CPU's caches
# (batch 16, cache 1,024: a decode step of SmolLM2-135M takes 148 ms instead of 219 ms;
# BENCHMARKS.md, "Batched decoding"). Below it, and for verify passes and prefill, the dots are faster.
MULTIPLY_REDUCE_MIN_BATCH = 8


def multiply_reduce_attention(batch: int, seq: int) -> bool:
    """Whether `attention` uses the multiply-reduce form for a [batch, seq] chunk of queries."""
    return seq == 1 and batch >= MULTIPLY_REDUCE_MIN_BATCH and jax.default_backend() == "cpu"


def attention(layer: Params, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, jax.Array],
               k_cache: jax.Array, v_cache: jax.Array, config: ModelConfig, *, slots: Optional[jax.Array] = None,
               visible: Optional[jax.Array] = None):
    """One attention layer over x [B, T, D]. The keys and values of token t are written at cache slot
    `slots[:, t]` (default: its position); `visible` [B, T, S] says which slots each token attends
    to (default: the slots up to its position)."""
    batch, seq, _ = x.shape
    h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    dtype = x.dtype
    groups = h // kv
    wqkv = layer["wqkv"].astype(dtype)
    # One 2-D product for q, k and v (XLA's CPU backend runs a 2-D dot faster than a 4-D einsum).
    qkv = (x @ wqkv.reshape(wqkv.shape[0], -1)).reshape(batch, seq, *wqkv.shape[1:])
    if config.attention_bias:
        qkv = qkv + layer["bqkv"].astype(dtype)
    q = qkv[:, :, :, :groups].reshape(batch, seq, h, hd)
    k = qkv[:, :, :, groups]
    v = qkv[:, :, :, groups + 1]
    if config.qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    q = apply_rope(q, *rope)
    k = apply_rope(k, *rope)

    # Write the new keys/values at their positions; positions past the cache are dropped
    # (only padding can land there: callers size the cache for every real token).
    slots = positions if slots is None else slots
    rows = jnp.arange(batch)[:, None, None]
    heads = jnp.arange(kv)[None, :, None]
    k_cache = k_cache.at[rows, heads, slots[:, None, :]].set(k.swapaxes(1, 2).astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, heads, slots[:, None, :]].set(v.swapaxes(1, 2).astype(v_cache.dtype), mode="drop")
    k_cache = sharding.constrain(k_cache, sharding.CACHE_AXES)
    v_cache = sharding.constrain(v_cache, sharding.CACHE_AXES)

    # Queries as [B, KV, G*T, hd]: one batched matrix product per KV head, no transposes of the cache.
    q = q.reshape(batch, seq, kv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(batch, kv, groups * seq, hd)
    multiply_reduce = multiply_reduce_attention(batch, seq)
    if multiply_reduce:
        scores = jnp.sum(q[:, :, :, None, :].astype(jnp.float32) * k_cache[:, :, None].astype(jnp.float32),
                         axis=-1) / math.sqrt(hd)
    else:
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k_cache.astype(dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(hd)
    cache_slots = jnp.arange(k_cache.shape[2])
    if visible is None:
        visible = cache_slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
    visible = jnp.tile(visible, (1, groups, 1))[:, None]  # [B, 1, G*T, S], rows ordered (g, t)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if multiply_reduce:
        out = jnp.sum(probs[..., None] * v_cache[:, :, None].astype(dtype), axis=-2)
    else:
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v_cache.astype(dtype))
    out = out.reshape(batch, kv, groups, seq, hd).transpose(0, 3, 1, 2, 4).reshape(batch, seq, h * hd)
    out = out @ layer["wo"].astype(dtype)
    return out, k_cache, v_cache


def mlp(layer: Params, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    w_gate_up = layer["w_gate_up"].astype(dtype)
    gate_up = (x @ w_gate_up.reshape(w_gate_up.shape[0], -1)).reshape(*x.shape[:-1], *w_gate_up.shape[1:])
    gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
    return hidden @ layer["w_down"].astype(dtype)


def tree_visibility(first_slot: jax.Array, tree_ancestors: np.ndarray, cache_len: int) -> jax.Array:
    """[B, T, S] which cache slots each token of a tree written from `first_slot` [B] attends to: the
    context below it, and its ancestors and itself among the T (`tree_ancestors` [T, T])."""
    size = tree_ancestors.shape[0]
    in_tree = jnp.arange(cache_len)[None, None, :] - first_slot[:, None, None]  # [B, 1, S]; < 0: context
    ancestor = jnp.asarray(tree_ancestors)[jnp.arange(size)[None, :, None], jnp.clip(in_tree, 0, size - 1)]
    return (in_tree < 0) | ((in_tree < size) & ancestor)


def lm_head(params: Params, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
    if config.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", x, params["embed"].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", x, params["lm_head"].astype(x.dtype),
                      preferred_element_type=jnp.float32)


def forward(params: Params, tokens: jax.Array, cache: KVCache, config: ModelConfig, *,
            positions: Optional[jax.Array] = None, num_valid: Optional[jax.Array] = None,
            hidden_layers: Sequence[int] = (), logits_at: str = "all",
            tree_ancestors: Optional[np.ndarray] = None) -> ForwardOutput:
    """Runs tokens [B, T] against the cache and appends them to it.

    Args:
      positions: [B, T] positions of the tokens; default `cache.lengths[:, None] + arange(T)`.
      tree_ancestors: [T, T] bool, for a tree of tokens (speculative tree drafts): token t attends
        to the context and to the tokens u with `tree_ancestors[t, u]` (its ancestors and itself);
        the tokens are written at slots `cache.lengths + arange(T)` and `positions` give their depths.
      num_valid: [B] how many of the T tokens in each row are real (the rest is right padding);
        the row's cache length grows by this much. Default T.
      hidden_layers: indices of decoder layers whose outputs are returned (the drafter features).
      logits_at: "all" for logits at every position, "last" for the last valid token of each row
        only (prefill: avoids a [B, T, V] product).
    """
    batch, seq = tokens.shape
    if num_valid is None:
        num_valid = jnp.full((batch,), seq, jnp.int32)
    in_order = cache.lengths[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    if positions is None:
        positions = in_order
    slots, visible = None, None
    if tree_ancestors is not None:
        if np.shape(tree_ancestors) != (seq, seq):
            raise ValueError(f"tree_ancestors must be [{seq}, {seq}] for {seq} tokens, got {np.shape(tree_ancestors)}")
        slots, visible = in_order, tree_visibility(cache.lengths, np.asarray(tree_ancestors), cache.max_len)
    for index in hidden_layers:
        if not 0 <= index < config.num_layers:
            raise ValueError(f"hidden layer {index} is out of range for a {config.num_layers}-layer model")
    dtype = config.compute_jnp_dtype
    rope = rope_angles(positions, rope_inverse_frequencies(config))

    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    x = sharding.constrain(x, ("batch", "seq", "embed"))
    new_k, new_v, collected = [], [], {}
    for index, layer in enumerate(params["layers"]):
        attn_out, k_layer, v_layer = attention(
            layer, rms_norm(x, layer["attn_norm"], config.rms_norm_eps), positions, rope,
            cache.k[index], cache.v[index], config, slots=slots, visible=visible)
        x = x + attn_out
        x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], config.rms_norm_eps))
        x = sharding.constrain(x, ("batch", "seq", "embed"))
        new_k.append(k_layer)
        new_v.append(v_layer)
        if index in hidden_layers:
            collected[index] = x
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if logits_at == "last":
        last = jnp.take_along_axis(x, (num_valid - 1)[:, None, None], axis=1)[:, 0]
        logits = lm_head(params, last, config)
    elif logits_at == "all":
        logits = lm_head(params, x, config)
    else:
        raise ValueError(f"logits_at must be 'all' or 'last', got {logits_at!r}")
    hidden = jnp.stack([collected[i] for i in hidden_layers]) if hidden_layers else None
    new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths + num_valid.astype(jnp.int32))
    return ForwardOutput(logits=logits, hidden_states=hidden, cache=new_cache)


def prefill(params: Params, tokens: jax.Array, cache_len: int, config: ModelConfig, *,
            num_valid: Optional[jax.Array] = None, hidden_layers: Sequence[int] = (),
            logits_at: str = "last") -> ForwardOutput:
    """`forward` of prompts [B, T] into a fresh cache of `cache_len` >= T positions.

    The prompt attends within a T-position cache, which is then zero-padded to `cache_len`, so the
    attention scores T x T positions instead of T x `cache_len` slots the prompt cannot see.
    """
    seq = tokens.shape[1]
    if cache_len < seq:
        raise ValueError(f"cache_len {cache_len} is shorter than the {seq}-token prompts")
    out = forward(params, tokens, init_cache(config, tokens.shape[0], seq), config, num_valid=num_valid,
                  hidden_layers=hidden_layers, logits_at=logits_at)
    grow = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, cache_len - seq), (0, 0)))
    cache = KVCache(k=tuple(grow(a) for a in out.cache.k), v=tuple(grow(a) for a in out.cache.v),
                    lengths=out.cache.lengths)
    return out._replace(cache=cache)
