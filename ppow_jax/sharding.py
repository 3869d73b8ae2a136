"""Where every array lives on the device mesh: logical axis names, one rule table, NamedShardings.

Parameters, caches and activations are described by *logical* axis names ("batch", "embed",
"q_heads", ...). `RULES` maps each name to mesh axes of a mesh with axes (data, fsdp, tensor).
A dimension that the mapped mesh axes do not divide evenly is replicated instead (SmolLM2 has
3 KV heads, which a tensor axis of 2 cannot split), so every model runs on every mesh.

Hot paths are `jax.jit` with `in_shardings`/`out_shardings` built here; inside the model,
`constrain` pins activations to their logical layout when a mesh is set (`jax.set_mesh`) and
does nothing otherwise, so the same code runs on one device.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (None: replicated).
RULES: dict[str, Optional[tuple[str, ...]]] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "cache_seq": None,
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
}

CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")

# Logical axes of each parameter, by its name in the pytree (see `ppow_jax.models.llama`).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "attn_norm": ("norm",),
    "mlp_norm": ("norm",),
    "wqkv": ("embed", "kv_heads", None, "head_dim"),
    "bqkv": ("kv_heads", None, "head_dim"),
    "wo": ("q_heads", "embed"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "w_gate_up": ("embed", None, "mlp"),
    "w_down": ("mlp", "embed"),
    # EAGLE-3 drafter (ppow_jax.drafters.eagle)
    "fc": (None, "embed"),
    "embed_norm": ("norm",),
    "hidden_norm": ("norm",),
    "d2t": (None,),
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None, keep_order: bool = False) -> Mesh:
    """A (data, fsdp, tensor) mesh over the first data*fsdp*tensor devices, laid out by
    `jax.make_mesh` for the interconnect, or in the order given when `keep_order`."""
    needed = data * fsdp * tensor
    devices = list(devices if devices is not None else jax.devices())
    if needed > len(devices):
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor} needs {needed} devices, "
                         f"but {len(devices)} are available")
    if keep_order:
        return Mesh(np.asarray(devices[:needed]).reshape(data, fsdp, tensor), MESH_AXES,
                    axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:needed])


def data_parallel_mesh(batch_size: int, devices: Sequence[jax.Device]) -> Mesh:
    """A data mesh over as many of `devices` as divide `batch_size`, in their order (a batch that did
    not split would be computed whole on every device)."""
    data = math.gcd(batch_size, len(devices))
    return make_mesh(data=data, devices=devices[:data], keep_order=True)


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int],
                    mesh_shape: dict[str, int]) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        mesh_axes = tuple(a for a in (RULES.get(name) or ()) if a in mesh_shape and mesh_shape[a] > 1
                          and a not in used) if name else ()
        split = int(np.prod([mesh_shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % split:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, dict(mesh.shape)))


def param_logical_axes(params: Any) -> Any:
    """Pytree of logical-axis tuples with the structure of `params`, matched by leaf name."""

    def axes_for(path, leaf):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if name not in PARAM_AXES:
            raise KeyError(f"no sharding rule for parameter {jax.tree_util.keystr(path)}")
        axes = PARAM_AXES[name]
        if len(axes) != np.ndim(leaf):
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, "
                             f"expected {len(axes)} dims {axes}")
        return axes

    return jax.tree_util.tree_map_with_path(axes_for, params)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    axes = param_logical_axes(params)
    return jax.tree_util.tree_map(lambda leaf, ax: named_sharding(mesh, ax, np.shape(leaf)), params, axes,
                                  is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x))


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """Shardings for a `KVCache`: k/v by CACHE_AXES, lengths by batch."""
    kv = lambda arr: named_sharding(mesh, CACHE_AXES, arr.shape)
    return cache.replace(k=tuple(kv(a) for a in cache.k), v=tuple(kv(a) for a in cache.v),
                         lengths=named_sharding(mesh, ("batch",), cache.lengths.shape))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Arrays whose leading dimension is the batch; the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """Pins an activation to its logical layout on the mesh in context; no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, dict(mesh.shape)))
