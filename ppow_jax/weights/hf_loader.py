"""Loads Hugging Face checkpoint directories (config.json + safetensors) into the `llama` pytree.

Safetensors files are parsed here directly (an 8-byte header length, a JSON header, raw data) and
memory-mapped, so bfloat16 checkpoints need neither torch nor a framework-specific reader, and
tensors are converted one at a time.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional, Union

import ml_dtypes
import numpy as np

from ppow_jax.errors import CheckpointError, InputError
from ppow_jax.models.config import ModelConfig, RopeScaling
from ppow_jax.weights.layout import HF_NAMES, assemble_params

_PARAM_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
# model_type -> our architecture (Mistral is Llama without biases, as long as there is no sliding window).
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def check_param_dtype(dtype: str, what: str = "param_dtype") -> None:
    if dtype not in _PARAM_DTYPES:
        raise InputError(f"{what}={dtype!r}; expected one of {sorted(_PARAM_DTYPES)}")


def cast_array(array: np.ndarray, param_dtype: str) -> np.ndarray:
    """A C-contiguous copy in the parameter dtype (never a view into a memory-mapped file)."""
    return np.array(array, dtype=_PARAM_DTYPES[param_dtype], order="C", copy=True)


class SafetensorsFile:
    """Read-only, memory-mapped view of one .safetensors file."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 0 < header_len <= size - 8:
                    raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
                raise ValueError("the header is not a JSON object of tensor entries")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
        header.pop("__metadata__", None)
        self._header: dict[str, dict] = header
        self._data_start = 8 + header_len
        self._size = size
        self._data = np.memmap(path, mode="r")

    def keys(self) -> list[str]:
        return list(self._header)

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                    f"{self.path}: tensor {name!r} has dtype {info.get('dtype')!r}; supported: "
                    f"{', '.join(_SAFETENSORS_DTYPES)}")
        try:
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry: {e}") from e
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if end - begin != expected or begin < 0 or self._data_start + end > self._size:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated or has inconsistent offsets")
        return self._data[self._data_start + begin:self._data_start + end].view(dtype).reshape(shape)


def _open_tensors(path: pathlib.Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file that holds it, for a single or sharded checkpoint."""
    index_path = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {e}") from e
        files: dict[str, SafetensorsFile] = {}
        for filename in sorted(set(weight_map.values())):
            shard = path / filename
            if not shard.is_file():
                raise CheckpointError(f"{index_path} lists shard {filename}, which is missing")
            files[filename] = SafetensorsFile(shard)
        return {name: files[filename] for name, filename in weight_map.items()}
    if single.is_file():
        file = SafetensorsFile(single)
        return {name: file for name in file.keys()}
    raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _rope(cfg: dict) -> tuple[float, Optional[RopeScaling]]:
    # transformers 5 writes `rope_parameters` (theta included); older configs `rope_theta` + `rope_scaling`.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"RoPE scaling type {rope_type!r} is not supported (only 'default' and 'llama3')")
    try:
        return theta, RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                                  high_freq_factor=float(rope["high_freq_factor"]),
                                  original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
        raise CheckpointError(f"llama3 RoPE scaling is missing {e.args[0]!r}") from e


def config_from_hf(cfg: dict, has_lm_head: bool) -> ModelConfig:
    """ModelConfig from a parsed config.json; rejects features the model does not implement."""
    model_type = cfg.get("model_type")
    arch = _MODEL_TYPES.get(model_type)
    if arch is None:
        raise CheckpointError(f"model_type {model_type!r} is not supported (supported: {', '.join(_MODEL_TYPES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true is not supported")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError("partial rotary embeddings are not supported")
    if cfg.get("use_sliding_window") or (model_type == "mistral" and cfg.get("sliding_window") is not None
                                         and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0)):
        raise CheckpointError("sliding-window attention is not supported")
    if any(t != "full_attention" for t in cfg.get("layer_types") or ()):
        raise CheckpointError("only full attention in every layer is supported")
    if arch != "qwen2" and cfg.get("attention_bias"):
        # Llama/Qwen3 attention_bias also puts a bias on the output projection, which the model lacks.
        raise CheckpointError(f"attention_bias=true is not supported for model_type {model_type!r}")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        theta, scaling = _rope(cfg)
        tie = cfg.get("tie_word_embeddings")
        return ModelConfig(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rope_theta=theta,
                rope_scaling=scaling,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                # Unspecified: tied exactly when the checkpoint has no separate head.
                tie_word_embeddings=bool(tie) if tie is not None else not has_lm_head,
                # Qwen2 always has q/k/v biases (its config has no switch for them).
                attention_bias=arch == "qwen2",
                qk_norm=arch == "qwen3",
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)))
    except KeyError as e:
        raise CheckpointError(f"config.json is missing {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:  # malformed values, or ModelConfig's own validation
        raise CheckpointError(f"config.json describes an invalid model: {e}") from e


def load_hf_directory(path: Union[str, pathlib.Path], param_dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Reads a Hugging Face checkpoint directory into (config, params), matrices stored [in, out]."""
    check_param_dtype(param_dtype)
    path = pathlib.Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint directory: config.json is missing")
    try:
        cfg = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    tensors = _open_tensors(path)
    config = config_from_hf(cfg, "lm_head.weight" in tensors).with_dtypes(param_dtype)

    def get(name: str, shape: tuple[int, ...], transpose: bool, heads: int) -> np.ndarray:
        file = tensors.get(name)
        if file is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        array = file.get(name)
        if transpose:
            array = array.T  # torch Linear stores [out, in]
        if array.shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {array.shape}, expected {shape}")
        return cast_array(array, param_dtype)

    params = assemble_params(config, get, HF_NAMES)
    return config, params
