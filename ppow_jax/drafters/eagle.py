"""EAGLE-3-style feature drafter (METHOD.md §2).

At drafter position i the input is the token x_i and a feature g_{i-1} describing the context up
to x_{i-1}: for context the target has verified, g is `fc` applied to the target's hidden states
from three layers (low, middle, high) at position i-1; for the drafter's own proposals it is the
drafter's output hidden state from the previous step (training unrolls exactly this, the
"training-time test"). The token embedding (the target's own, frozen) and g are normed separately,
concatenated to 2D, and run through one Llama decoder layer whose residual stream starts at g; a
head over a reduced draft vocabulary (the N most frequent target tokens) predicts x_{i+1}, and
`d2t` maps draft ids back to target ids.

Parameters: {"fc": [n*D, D], "layer": {embed_norm, hidden_norm, wqkv [2D, ...], wo, mlp_norm,
w_gate_up, w_down}, "final_norm": [D], "lm_head": [D, N], "d2t": [N] int32}. `d2t` is data, not
trained (see `trainable_mask`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppow_jax.drafters.interface import Chunk, DraftCache
from ppow_jax.errors import InputError
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

Params = dict


@dataclasses.dataclass(frozen=True)
class Eagle3Drafter:
    """Static description; `layer_config` is the one decoder layer's (target width and heads)."""

    layer_config: ModelConfig
    feature_layers: tuple[int, ...]
    draft_vocab_size: int
    name: str = "eagle3"

    @classmethod
    def for_target(cls, target: ModelConfig, feature_layers: tuple[int, ...], draft_vocab_size: int,
                   intermediate_size: int = 0, name: str = "eagle3") -> "Eagle3Drafter":
        feature_layers = tuple(int(i) for i in feature_layers)
        if not feature_layers or any(not 0 <= i < target.num_layers for i in feature_layers):
            raise InputError(f"feature layers {feature_layers} must be non-empty and within the target's "
                             f"{target.num_layers} layers")
        if not 1 <= draft_vocab_size <= target.vocab_size:
            raise InputError(f"draft vocabulary size must be in [1, {target.vocab_size}], got {draft_vocab_size}")
        layer = dataclasses.replace(target, num_layers=1, intermediate_size=intermediate_size or target.intermediate_size,
                                    tie_word_embeddings=False)
        return cls(layer_config=layer, feature_layers=feature_layers, draft_vocab_size=draft_vocab_size, name=name)

    @property
    def vocab_size(self) -> int:
        return self.layer_config.vocab_size

    @property
    def feature_width(self) -> int:
        return len(self.feature_layers) * self.layer_config.hidden_size

    # ----- the network -----

    def init_params(self, key: jax.Array, d2t: Optional[np.ndarray] = None, std: float = 0.02) -> Params:
        """Random parameters; `d2t` defaults to the first N target ids."""
        c = self.layer_config
        d, f, hd, h, kv = c.hidden_size, c.intermediate_size, c.head_dim, c.num_heads, c.num_kv_heads
        dtype = c.params_jnp_dtype
        keys = iter(jax.random.split(key, 10))
        normal = lambda shape: (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)
        ones = lambda n: jnp.ones((n,), dtype)
        layer = llama.fuse_projections({"wq": normal((2 * d, h * hd)), "wk": normal((2 * d, kv * hd)),
                                        "wv": normal((2 * d, kv * hd)), "wo": normal((h * hd, d)),
                                        "mlp_norm": ones(d), "w_gate": normal((d, f)), "w_up": normal((d, f)),
                                        "w_down": normal((f, d))}, c)
        layer.update(embed_norm=ones(d), hidden_norm=ones(d))
        if d2t is None:
            d2t = np.arange(self.draft_vocab_size)
        return {"fc": normal((self.feature_width, d)), "layer": layer, "final_norm": ones(d),
                "lm_head": normal((d, self.draft_vocab_size)), "d2t": jnp.asarray(self.check_d2t(d2t))}

    def check_d2t(self, d2t) -> np.ndarray:
        d2t = np.asarray(d2t)
        if d2t.shape != (self.draft_vocab_size,) or not np.issubdtype(d2t.dtype, np.integer):
            raise InputError(f"d2t must be {self.draft_vocab_size} integer target ids, got {d2t.dtype}{d2t.shape}")
        if d2t.min() < 0 or d2t.max() >= self.vocab_size or len(np.unique(d2t)) != len(d2t):
            raise InputError(f"d2t must hold distinct target ids in [0, {self.vocab_size})")
        return d2t.astype(np.int32)

    def project_features(self, params: Params, target_features: jax.Array) -> jax.Array:
        """Target features [..., n*D] -> g [..., D]."""
        dtype = self.layer_config.compute_jnp_dtype
        return target_features.astype(dtype) @ params["fc"].astype(dtype)

    def apply(self, params: Params, embed_table: jax.Array, tokens: jax.Array, g: jax.Array, kv: llama.KVCache, *,
              num_valid: Optional[jax.Array] = None) -> tuple[jax.Array, llama.KVCache]:
        """One decoder layer over tokens [B, T] with features g [B, T, D] -> (hidden [B, T, D], cache)."""
        c = self.layer_config
        batch, seq = tokens.shape
        if num_valid is None:
            num_valid = jnp.full((batch,), seq, jnp.int32)
        dtype = c.compute_jnp_dtype
        positions = kv.lengths[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
        rope = llama.rope_angles(positions, llama.rope_inverse_frequencies(c))
        layer = params["layer"]
        g = g.astype(dtype)
        embedded = jnp.take(embed_table, tokens, axis=0).astype(dtype)
        x = jnp.concatenate([llama.rms_norm(embedded, layer["embed_norm"], c.rms_norm_eps),
                             llama.rms_norm(g, layer["hidden_norm"], c.rms_norm_eps)], axis=-1)
        attn_out, k, v = llama.attention(layer, x, positions, rope, kv.k[0], kv.v[0], c)
        hidden = g + attn_out
        hidden = hidden + llama.mlp(layer, llama.rms_norm(hidden, layer["mlp_norm"], c.rms_norm_eps))
        return hidden, llama.KVCache(k=(k,), v=(v,), lengths=kv.lengths + num_valid.astype(jnp.int32))

    def draft_logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        """Hidden [..., D] -> float32 logits over the draft vocabulary [..., N]."""
        c = self.layer_config
        x = llama.rms_norm(hidden, params["final_norm"], c.rms_norm_eps)
        return jnp.einsum("...d,dn->...n", x, params["lm_head"].astype(x.dtype), preferred_element_type=jnp.float32)

    def target_logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        """Logits over the target vocabulary [..., V]: -inf outside the draft vocabulary."""
        return to_target_vocabulary(self.draft_logits(params, hidden), params["d2t"], self.vocab_size)

    # ----- the engine interface (ppow_jax.drafters.interface.Drafter) -----

    def chunk_width(self, k_max: int) -> int:
        return k_max + 1  # every cycle re-reads its accepted tokens with the target's features

    def cache_margin(self, k_max: int) -> int:
        return 2 * k_max + 2  # the chunk (up to K+1) then up to K-1 drafted tokens

    def init_cache(self, batch: int, cache_len: int) -> DraftCache:
        return DraftCache(kv=llama.init_cache(self.layer_config, batch, cache_len),
                          hidden=jnp.zeros((batch, self.layer_config.hidden_size), self.layer_config.compute_jnp_dtype))

    def _run(self, params, target_params, cache: DraftCache, tokens, g, num_valid) -> tuple[jax.Array, DraftCache]:
        hidden, kv = self.apply(params, target_params["embed"], tokens, g, cache.kv, num_valid=num_valid)
        last = jnp.take_along_axis(hidden, (num_valid - 1)[:, None, None], axis=1)[:, 0]
        return self.target_logits(params, last), DraftCache(kv=kv, hidden=last)

    def prefill(self, params, target_params, cache: DraftCache, tokens: jax.Array, lengths: jax.Array,
                target_features: Optional[jax.Array]) -> tuple[jax.Array, DraftCache]:
        # Position i reads the target's feature at i-1; position 0 has no context and reads zeros.
        g = self.project_features(params, target_features)
        g = jnp.pad(g, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        return self._run(params, target_params, cache, tokens, g, lengths)

    def start_chunk(self, first_token: jax.Array, target_features: Optional[jax.Array], lengths: jax.Array,
                    pad_token_id: int, k_max: int) -> Chunk:
        batch, width = first_token.shape[0], self.chunk_width(k_max)
        last_feature = jnp.take_along_axis(target_features, (lengths - 1)[:, None, None], axis=1)  # [B, 1, F]
        tokens = jnp.full((batch, width), pad_token_id, jnp.int32).at[:, 0].set(first_token)
        features = jnp.pad(last_feature, ((0, 0), (0, width - 1), (0, 0)))
        return Chunk(tokens=tokens, features=features, length=jnp.ones((batch,), jnp.int32))

    def consume(self, params, target_params, cache: DraftCache, chunk: Chunk) -> tuple[jax.Array, DraftCache]:
        return self._run(params, target_params, cache, chunk.tokens, self.project_features(params, chunk.features),
                         chunk.length)

    def step(self, params, target_params, cache: DraftCache, token: jax.Array) -> tuple[jax.Array, DraftCache]:
        return self._run(params, target_params, cache, token[:, None], cache.hidden[:, None],
                         jnp.ones(token.shape, jnp.int32))

    def after_verify(self, cache_at_start: DraftCache, cache: DraftCache, chunk: Chunk, drafts: jax.Array,
                     accepted: jax.Array, steps: jax.Array, next_token: jax.Array,
                     verify_features: Optional[jax.Array], active: jax.Array,
                     pad_token_id: int) -> tuple[DraftCache, Chunk]:
        # Drop every drafted position: the accepted drafts are re-read with the target's features
        # (F_p .. F_{p+k} from the verify pass), followed by the target's own token.
        lengths = jnp.where(active, cache_at_start.kv.lengths + chunk.length, cache_at_start.kv.lengths)
        width = verify_features.shape[1]
        positions = jnp.arange(width)[None, :]
        padded_drafts = jnp.pad(drafts, ((0, 0), (0, width - drafts.shape[1])), constant_values=pad_token_id)
        tokens = jnp.where(positions < accepted[:, None], padded_drafts,
                           jnp.where(positions == accepted[:, None], next_token[:, None], pad_token_id))
        next_chunk = Chunk(tokens=jnp.where(active[:, None], tokens, chunk.tokens),
                           features=jnp.where(active[:, None, None], verify_features.astype(chunk.features.dtype),
                                              chunk.features),
                           length=jnp.where(active, accepted + 1, chunk.length).astype(jnp.int32))
        return cache.replace(kv=cache.kv.replace(lengths=lengths)), next_chunk


def to_target_vocabulary(draft_values: jax.Array, d2t: jax.Array, vocab_size: int) -> jax.Array:
    """Values over the draft vocabulary [..., N] -> over the target's [..., V], -inf outside it.

    A gather through the inverse map rather than a scatter into a [..., V] array of -inf: XLA:CPU
    fuses the head's matrix product into such a scatter, and from two rows on that step took about
    8 ms instead of 0.8 (SmolLM2's drafter; BENCHMARKS.md, "Tree drafting").
    """
    draft_of = jnp.full((vocab_size,), -1, jnp.int32).at[d2t].set(jnp.arange(d2t.shape[0], dtype=jnp.int32))
    gathered = jnp.take(draft_values, jnp.maximum(draft_of, 0), axis=-1)
    return jnp.where(draft_of >= 0, gathered, -jnp.inf).astype(jnp.float32)


def trainable_mask(params: Params) -> Params:
    """True for trained leaves; `d2t` (the vocabulary map) is data."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key != "d2t", params)


def layer_qkv(drafter: Eagle3Drafter, layer: Params, embedded_normed: jax.Array, g: jax.Array, cos: jax.Array,
              sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The decoder layer's roped queries [..., KV, G, hd], keys and values [..., KV, hd] for inputs [..., D]."""
    c = drafter.layer_config
    groups = c.num_heads // c.num_kv_heads
    wqkv = layer["wqkv"].astype(g.dtype)
    x = jnp.concatenate([embedded_normed, llama.rms_norm(g, layer["hidden_norm"], c.rms_norm_eps)], axis=-1)
    qkv = (x @ wqkv.reshape(wqkv.shape[0], -1)).reshape(*x.shape[:-1], *wqkv.shape[1:])
    q = llama.apply_rope(qkv[..., :groups, :].reshape(*x.shape[:-1], c.num_heads, c.head_dim), cos, sin)
    k = llama.apply_rope(qkv[..., groups, :], cos, sin)
    return q.reshape(*x.shape[:-1], c.num_kv_heads, groups, c.head_dim), k, qkv[..., groups + 1, :]


def layer_output(drafter: Eagle3Drafter, layer: Params, g: jax.Array, attended: jax.Array) -> jax.Array:
    """The decoder layer's output hidden [..., D] from its input feature g and the attended values [..., KV, G, hd]."""
    c = drafter.layer_config
    attended = attended.reshape(*attended.shape[:-3], c.num_heads * c.head_dim)
    hidden = g + attended @ layer["wo"].astype(g.dtype)
    return hidden + llama.mlp(layer, llama.rms_norm(hidden, layer["mlp_norm"], c.rms_norm_eps))


def unrolled_hidden(drafter: Eagle3Drafter, params: Params, embed_table: jax.Array, tokens: jax.Array,
                    target_features: jax.Array, steps: int) -> jax.Array:
    """The "training-time test" forward: hidden states of `steps` unrolled drafter steps [S, B, L, D].

    Step 0 is the teacher-forced pass (position i reads x_i and the target's feature at i-1). At
    step j, position i continues the chain anchored at a = i - j exactly as inference would after
    the target verified up to a: it reads x_i and the drafter's own step-(j-1) hidden at i-1, and
    attends to the step-0 keys at positions <= a plus the chain's own keys of steps 1..j (one per
    step, at positions a+1..i). The tokens fed are the data's (the path on which every earlier
    draft was accepted).
    """
    c = drafter.layer_config
    batch, seq = tokens.shape
    hd = c.head_dim
    dtype = c.compute_jnp_dtype
    layer = params["layer"]
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    cos, sin = llama.rope_angles(positions, llama.rope_inverse_frequencies(c))
    embedded = llama.rms_norm(jnp.take(embed_table, tokens, axis=0).astype(dtype), layer["embed_norm"], c.rms_norm_eps)
    g = drafter.project_features(params, target_features)
    g = jnp.pad(g, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # position i reads the feature of i-1

    keys, values, hiddens = [], [], []
    scale = 1.0 / math.sqrt(hd)
    for step in range(steps):
        q, k, v = layer_qkv(drafter, layer, embedded, g, cos, sin)
        keys.append(k)
        values.append(v)
        # Step-0 keys: causal, up to the anchor a = i - step.
        scores0 = jnp.einsum("bikgd,bskd->bkgis", q, keys[0], preferred_element_type=jnp.float32) * scale
        visible = jnp.arange(seq)[None, :] <= (jnp.arange(seq) - step)[:, None]  # [L(i), L(s)]
        scores0 = jnp.where(visible, scores0, jnp.finfo(jnp.float32).min)
        # The chain's own keys of steps 1..step sit at positions i - (step - m): shift them to i.
        shifted = [jnp.pad(keys[m], ((0, 0), (step - m, 0), (0, 0), (0, 0)))[:, :seq] for m in range(1, step + 1)]
        diagonal = [jnp.einsum("bikgd,bikd->bkgi", q, k, preferred_element_type=jnp.float32)[..., None] * scale
                    for k in shifted]
        probs = jax.nn.softmax(jnp.concatenate([scores0, *diagonal], axis=-1), axis=-1).astype(dtype)
        out = jnp.einsum("bkgis,bskd->bikgd", probs[..., :seq], values[0])
        for m in range(1, step + 1):
            v = jnp.pad(values[m], ((0, 0), (step - m, 0), (0, 0), (0, 0)))[:, :seq]
            out = out + probs[..., seq + m - 1].transpose(0, 3, 1, 2)[..., None] * v[:, :, :, None, :]
        hidden = layer_output(drafter, layer, g, out)
        hiddens.append(hidden)
        g = jnp.pad(hidden, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # the next step reads its own hidden at i-1
    return jnp.stack(hiddens)
