"""Loads llama.cpp GGUF checkpoints (Llama/SmolLM, Qwen2, Qwen3) into the `ppow_jax.models.llama` pytree.

Quantized tensors are dequantized to float32 one at a time with gguf-py, then cast to the requested
parameter dtype, so peak memory is about one float32 tensor above the final parameters.
"""

from __future__ import annotations

import logging
import math
import pathlib
from typing import Any, Optional, Union

import gguf
import numpy as np

from ppow_jax.errors import CheckpointError
from ppow_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from ppow_jax.models.llama import rope_inverse_frequencies
from ppow_jax.weights.hf_loader import cast_array, check_param_dtype
from ppow_jax.weights.layout import GGUF_NAMES, assemble_params

logger = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = frozenset({
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
})
_MISSING = object()


def open_gguf(path: Union[str, pathlib.Path]) -> gguf.GGUFReader:
    """A GGUFReader over `path`, with every way a file can be broken reported as a CheckpointError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise CheckpointError(
                f"{path} is not a GGUF file: it starts with {magic!r}, expected the magic bytes {_GGUF_MAGIC!r}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py reports bad files with assorted exception types
        raise CheckpointError(f"GGUF file {path} is corrupt or truncated: {type(e).__name__}: {e}") from e
    size = path.stat().st_size
    for tensor in reader.tensors:
        # The reader builds tensors as memmap views; a cut file yields short views rather than errors.
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(
                    f"GGUF file {path} is truncated: tensor {tensor.name!r} needs bytes up to "
                    f"{tensor.data_offset + tensor.n_bytes}, but the file has {size}")
    return reader


def metadata(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The value of a metadata key (strings decoded, arrays as lists)."""
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"GGUF metadata key {key!r} is missing")
        return default
    try:
        return field.contents()
    except Exception as e:
        raise CheckpointError(f"GGUF metadata key {key!r} is unreadable: {e}") from e


def _int_metadata(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> int:
    value = metadata(reader, key, default)
    if isinstance(value, list):
        # Some architectures store per-layer head counts; the model assumes uniform layers.
        raise CheckpointError(f"GGUF metadata {key!r} varies per layer ({value}); only uniform layers are supported")
    return int(value)


def dequantize_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor as float32 in numpy order (GGUF dims reversed: matrices come out [out, in])."""
    if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
        raise CheckpointError(
                f"tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, which is not supported "
                f"(supported: {supported})")
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(reversed([int(d) for d in tensor.shape])))


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverts llama.cpp's q/k row permutation ([out, ...] or [out] bias).

    convert_hf_to_gguf reorders each head's output rows from the half-split RoPE layout
    (x[:hd/2], x[hd/2:]) into interleaved pairs for llama.cpp's rotation; our RoPE is half-split.
    """
    out = w.shape[0]
    head_dim = out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_scaling_from_factors(factors: np.ndarray, inv_freq: np.ndarray, original_context: int) -> RopeScaling:
    """Recovers Llama-3 RoPE scaling from llama.cpp's `rope_freqs` tensor (per-frequency divisors).

    The divisors depend on (original context, low, high) only through the two wavelength bounds
    original/low and original/high, so `original_context` is kept and low/high are fitted.
    """
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    x = inv_freq.astype(np.float64) / (2 * math.pi)  # 1 / wavelength
    unscaled = np.isclose(factors, 1.0, rtol=1e-5)
    full = np.isclose(factors, factor, rtol=1e-5)
    medium = ~unscaled & ~full
    # Between the bounds, 1/f = (1 - s)/factor + s where s = slope * x + intercept runs from 0
    # (at wavelength original/low) to 1 (at original/high).
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x[medium], smooth, 1)
    else:
        # Underdetermined: take a line through the one medium point (or the middle of the gap) that
        # reaches 0 before the last fully scaled frequency and 1 before the first unscaled one.
        lo = x[full].max() if full.any() else 0.0
        hi = x[unscaled].min() if unscaled.any() else 2 * x.max()
        x_mid, s_mid = (x[medium][0], smooth[0]) if medium.any() else ((lo + hi) / 2, 0.5)
        slope = 2 * max(s_mid / (x_mid - lo), (1 - s_mid) / (hi - x_mid))
        intercept = s_mid - slope * x_mid
    if slope <= 0 or intercept >= 0:
        raise CheckpointError("the rope_freqs tensor does not follow Llama-3 RoPE scaling")
    low_wavelen, high_wavelen = -slope / intercept, slope / (1 - intercept)
    return RopeScaling(factor=factor, low_freq_factor=float(original_context / low_wavelen),
                       high_freq_factor=float(original_context / high_wavelen),
                       original_max_position_embeddings=int(original_context))


def _config_from_metadata(reader: gguf.GGUFReader, path: pathlib.Path, tensors: dict) -> ModelConfig:
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {supported})")
    hidden = _int_metadata(reader, f"{arch}.embedding_length")
    heads = _int_metadata(reader, f"{arch}.attention.head_count")
    kv_heads = _int_metadata(reader, f"{arch}.attention.head_count_kv", heads)
    head_dim = _int_metadata(reader, f"{arch}.attention.key_length", hidden // heads)
    value_dim = _int_metadata(reader, f"{arch}.attention.value_length", head_dim)
    rope_dim = _int_metadata(reader, f"{arch}.rope.dimension_count", head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise CheckpointError(
                f"{path}: key length {head_dim}, value length {value_dim} and RoPE dimension {rope_dim} differ; "
                "only full-head RoPE with equal key/value sizes is supported")
    if "blk.0.attn_output.bias" in tensors:
        raise CheckpointError(f"{path}: a bias on the attention output projection is not supported")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    context = _int_metadata(reader, f"{arch}.context_length", 2048)
    rope_theta = float(metadata(reader, f"{arch}.rope.freq_base", 10000.0))

    # llama.cpp stores Llama-3 scaling as a rope_freqs tensor, not as a scaling type.
    scaling_type = metadata(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "llama3") or (scaling_type == "llama3" and "rope_freqs.weight" not in tensors):
        raise CheckpointError(f"{path}: RoPE scaling type {scaling_type!r} is not supported "
                              "(only Llama-3 scaling given as a rope_freqs tensor)")
    rope_scaling: Optional[RopeScaling] = None
    factors: Optional[np.ndarray] = None
    if "rope_freqs.weight" in tensors:
        factors = dequantize_tensor(tensors["rope_freqs.weight"]).reshape(-1)
        if factors.shape != (head_dim // 2,):
            raise CheckpointError(f"{path}: rope_freqs has {factors.size} entries, expected {head_dim // 2}")
        if not np.allclose(factors, 1.0):
            inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
            original = _int_metadata(reader, f"{arch}.rope.scaling.original_context_length", context)
            rope_scaling = llama3_scaling_from_factors(factors, inv_freq, original)

    config = ModelConfig(
            architecture=arch,
            vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF dims are [D, V]
            hidden_size=hidden,
            intermediate_size=_int_metadata(reader, f"{arch}.feed_forward_length"),
            num_layers=_int_metadata(reader, f"{arch}.block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            qk_norm=arch == "qwen3",
            max_position_embeddings=context)
    if factors is not None and rope_scaling is not None:
        _check_rope_fit(config, factors, path)
    return config


def _check_rope_fit(config: ModelConfig, factors: np.ndarray, path: pathlib.Path) -> None:
    hd = config.head_dim
    expected = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)) / factors
    if not np.allclose(rope_inverse_frequencies(config), expected, rtol=1e-4, atol=0):
        raise CheckpointError(f"{path}: the rope_freqs tensor does not follow Llama-3 RoPE scaling")


def load_gguf(path: Union[str, pathlib.Path], param_dtype: str = "float32",
              reader: Optional[gguf.GGUFReader] = None) -> tuple[ModelConfig, dict]:
    """Reads a GGUF file into (config, params) with matrices stored [in, out] as `llama.forward` expects.

    `reader`: an already opened `open_gguf(path)`, to share its (slow) metadata parse with the tokenizer.
    """
    check_param_dtype(param_dtype)
    path = pathlib.Path(path)
    reader = reader or open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config_from_metadata(reader, path, tensors).with_dtypes(param_dtype)
    permuted = config.architecture == "llama"
    used = {"rope_freqs.weight"}

    def get(name: str, shape: tuple[int, ...], transpose: bool, heads: int) -> np.ndarray:
        tensor = tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        used.add(name)
        array = dequantize_tensor(tensor)
        if permuted and heads:
            array = unpermute_rows(array, heads)
        if transpose:
            array = array.T
        if array.shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {array.shape}, expected {shape}")
        return cast_array(array, param_dtype)

    params = assemble_params(config, get, GGUF_NAMES)
    unused = sorted(set(tensors) - used)
    if unused:
        logger.warning("%s: ignoring %d unexpected tensors, e.g. %s", path, len(unused), unused[:3])
    return config, params
