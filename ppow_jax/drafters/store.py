"""Trained drafters on disk: `drafter.json` (what it is, which target it serves) + orbax parameters.

This is what `python -m ppow_jax.eval --drafter PATH` loads and what training exports (training
checkpoints, with optimiser and data state, live elsewhere: `ppow_jax.training.checkpoints`).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ppow_jax.drafters.eagle import Eagle3Drafter
from ppow_jax.errors import CheckpointError
from ppow_jax.models.config import ModelConfig

DESCRIPTION = "drafter.json"
PARAMS = "params"
REQUIRED_KEYS = ("target", "feature_layers", "draft_vocab_size", "intermediate_size")  # what load_drafter reads


def _this_process_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer that runs on the calling process alone: a drafter is a small file that one process
    of a multi-host run writes (the primary) or that each reads for itself, with no barrier between them."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def save_drafter(path: str | pathlib.Path, drafter: Eagle3Drafter, params: dict, *, target_name: str,
                 dtype: str = "float32", extra: dict | None = None) -> pathlib.Path:
    """Writes the drafter to `path` (replaced atomically: written beside it, then renamed)."""
    path = pathlib.Path(path).absolute()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cast = jax.tree_util.tree_map(
        lambda x: np.asarray(x if jnp.issubdtype(x.dtype, jnp.integer) else jnp.asarray(x, dtype)), params)
    with _this_process_checkpointer() as checkpointer:
        checkpointer.save(tmp / PARAMS, cast)
    c = drafter.layer_config
    description = {"kind": "eagle3", "name": drafter.name, "feature_layers": list(drafter.feature_layers),
                   "draft_vocab_size": drafter.draft_vocab_size, "intermediate_size": c.intermediate_size,
                   "dtype": dtype, "target": {"name": target_name, "hidden_size": c.hidden_size,
                                              "vocab_size": c.vocab_size, "num_heads": c.num_heads,
                                              "num_kv_heads": c.num_kv_heads}, **(extra or {})}
    (tmp / DESCRIPTION).write_text(json.dumps(description, indent=1))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def is_drafter_dir(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / DESCRIPTION).is_file()


def read_description(path: str | pathlib.Path) -> dict[str, Any]:
    """A drafter directory's `drafter.json`: what it is, which target it serves, how it was trained."""
    path = pathlib.Path(path).absolute()
    try:
        description = json.loads((path / DESCRIPTION).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / DESCRIPTION}: not a readable drafter description ({err})") from None
    if not isinstance(description, dict):
        raise CheckpointError(f"{path / DESCRIPTION}: not a drafter description (a JSON object), "
                              f"but a JSON {type(description).__name__}")
    return description


def _checked_fields(file: pathlib.Path, description: dict[str, Any]) -> jnp.dtype:
    """Refuses a description whose fields `load_drafter` reads are missing or of the wrong type;
    -> the stored parameters' dtype."""
    if missing := [key for key in REQUIRED_KEYS if key not in description]:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}")
    if not isinstance(description["target"], dict):
        raise CheckpointError(f"{file}: 'target' must describe the target model (a JSON object)")
    layers = description["feature_layers"]
    if not (isinstance(layers, list) and layers and all(isinstance(i, int) for i in layers)):
        raise CheckpointError(f"{file}: feature_layers must be a list of layer indices, got {layers!r}")
    for key in ("draft_vocab_size", "intermediate_size"):
        if not (isinstance(description[key], int) and description[key] >= 1):
            raise CheckpointError(f"{file}: {key} must be a positive integer, got {description[key]!r}")
    try:
        return jnp.dtype(description.get("dtype", "float32"))
    except TypeError:
        raise CheckpointError(f"{file}: unknown dtype {description.get('dtype')!r}") from None


def load_drafter(path: str | pathlib.Path, target_config: ModelConfig) -> tuple[Eagle3Drafter, dict[str, Any]]:
    """-> (drafter, params in the target's compute dtype). Errors name the file and the mismatch."""
    path = pathlib.Path(path).absolute()
    description = read_description(path)
    if description.get("kind") != "eagle3":
        raise CheckpointError(f"{path}: unsupported drafter kind {description.get('kind')!r}")
    stored = _checked_fields(path / DESCRIPTION, description)
    target = description["target"]
    mine = {"hidden_size": target_config.hidden_size, "vocab_size": target_config.vocab_size,
            "num_heads": target_config.num_heads, "num_kv_heads": target_config.num_kv_heads}
    different = {k: (target.get(k), v) for k, v in mine.items() if target.get(k) != v}
    if different:
        raise CheckpointError(f"{path} was trained for another target ({target.get('name')}): "
                              + ", ".join(f"{k} {a} != {b}" for k, (a, b) in different.items())
                              + "; load it with the target it was trained for")
    drafter = Eagle3Drafter.for_target(target_config, tuple(description["feature_layers"]),
                                       description["draft_vocab_size"], description["intermediate_size"],
                                       name=description.get("name", path.name))
    abstract = jax.eval_shape(lambda: drafter.init_params(jax.random.key(0)))
    abstract = jax.tree_util.tree_map(
        lambda x: x if jnp.issubdtype(x.dtype, jnp.integer) else jax.ShapeDtypeStruct(x.shape, stored), abstract)
    try:
        with _this_process_checkpointer() as checkpointer:
            params = checkpointer.restore(path / PARAMS, abstract)
    except Exception as err:  # orbax raises many types for missing or corrupt files
        raise CheckpointError(f"{path / PARAMS}: cannot restore the drafter parameters "
                              f"({type(err).__name__}: {str(err)[:300]})") from err
    compute = target_config.params_jnp_dtype
    params = jax.tree_util.tree_map(
        lambda x: x if jnp.issubdtype(x.dtype, jnp.integer) else jnp.asarray(x, compute), params)
    drafter.check_d2t(np.asarray(params["d2t"]))
    return drafter, params
