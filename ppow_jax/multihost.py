"""Training across the hosts of a pod slice: one process per host, each feeding its own devices.

Every process runs the same program. What differs, and why:
  - the input: each process loads only the rows of every global batch that its devices hold
    (`batch_rows`), so a run sees the same batches whatever the number of processes;
  - files: the processes share building the caches (`ppow_jax.data.process_share`); process 0 (the
    primary) alone writes logs, metrics and the exported drafter;
  - host values: arrays spread over several hosts are gathered (`to_host`) before NumPy reads them.
With one process every helper here is the plain single-host operation.
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ppow_jax.errors import InputError
from ppow_jax.sharding import batch_sharding


def initialize(settings: Any) -> None:
    """`jax.distributed.initialize` from a config's `distributed` block, before JAX touches a device.

    Unset fields (an empty address, `num_processes` 0, `process_id` -1) are detected by JAX on Cloud
    TPU, SLURM, Open MPI and Kubernetes. On CPU hosts the collectives go through gloo.
    """
    if not settings.get("enabled", False):
        return
    address = settings.get("coordinator_address") or None
    processes = settings.get("num_processes", 0) or None
    process_id = settings.get("process_id", -1)
    process_id = None if process_id < 0 else process_id
    if processes is not None and process_id is not None and not 0 <= process_id < processes:
        raise InputError(f"distributed.process_id {process_id} is not in [0, {processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=processes, process_id=process_id)
    except ValueError as err:  # nothing to detect the cluster from, and settings missing
        raise InputError(f"distributed.enabled: {err} (no cluster detected here: set distributed.coordinator_address, "
                         "num_processes and process_id)") from None


def is_primary() -> bool:
    return jax.process_index() == 0


def log(message: str) -> None:
    """Progress on stderr, from the primary process only (every process runs the same program)."""
    if is_primary():
        print(message, file=sys.stderr, flush=True)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a collective over all devices)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
    """NumPy copies of a pytree's arrays; those spread over several processes are gathered first.

    Gathering is a collective: with several processes, every one must call this in the same order.
    """

    def fetch(leaf):
        # A replicated array (metrics, the step) has a whole copy on this host: no gathering.
        if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
            return multihost_utils.process_allgather(leaf, tiled=True)
        return np.asarray(jax.device_get(leaf))

    return jax.tree_util.tree_map(fetch, tree)


def gather_ints(value: int) -> list[int]:
    """Every process's `value` (an int32), in process order. A collective: each process waits here
    until all have called it, so it also serves as a barrier that carries a status."""
    if jax.process_count() == 1:
        return [value]
    return [int(v) for v in multihost_utils.process_allgather(np.asarray(value, np.int32))]


def broadcast_from_primary(value: float) -> float:
    """The primary's value on every process (a figure measured on one host, e.g. the cost ratio γ),
    exactly: its float64 bits travel as two uint32 (JAX computes in 32 bits by default)."""
    if jax.process_count() == 1:
        return value
    bits = multihost_utils.broadcast_one_to_all(np.asarray([value], np.float64).view(np.uint32))
    return float(np.asarray(bits, np.uint32).view(np.float64)[0])


def agree(flag: bool) -> bool:
    """The primary's decision on every process, for choices that lead to collectives (stopping on a
    time budget measured by each host's own clock)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def put(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` of host values that every process holds alike (parameters, the target).

    Across processes each host copies in only the pieces its devices hold; `jax.device_put` would
    first check that the hosts agree by gathering every array whole onto every device.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(leaf, leaf_sharding):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, leaf_sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree, shardings)


def check_shared_directory(directory: pathlib.Path) -> None:
    """Refuses a run whose workdir the hosts do not share: the others would wait for files that
    never appear. The primary writes a token there; every process checks it can read it."""
    if jax.process_count() == 1:
        return
    token = np.asarray(time.time_ns() % (1 << 31), np.int32)
    marker = directory / f".shared-by-hosts-{int(multihost_utils.broadcast_one_to_all(token))}"
    problem = ""
    if is_primary():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            marker.write_text("")
        except OSError as err:  # still joins the collectives below, so the others do not hang
            problem = f"process 0 cannot write there ({err})"
    barrier("shared directory marker written")
    seen = multihost_utils.process_allgather(np.asarray(marker.exists(), np.int32))
    barrier("shared directory marker read")
    if is_primary() and not problem:
        marker.unlink()
    if not np.all(seen):
        problem = problem or (f"processes {np.flatnonzero(seen == 0).tolist()} cannot see it: put the workdir and "
                              "the caches on storage every host mounts")
        raise InputError(f"{directory} is not shared by all hosts: {problem}")


def global_batch_shape(local: np.ndarray) -> tuple[int, ...]:
    """The global batch's shape: every process loads an equal share of its rows (`batch_rows`)."""
    return (local.shape[0] * jax.process_count(), *local.shape[1:])


def global_batch_shardings(mesh: Mesh, batch: dict[str, np.ndarray]) -> dict:
    """Shardings of the global batch of which `batch` holds this process's rows."""
    return {k: batch_sharding(mesh, global_batch_shape(v)) for k, v in batch.items()}


def local_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict:
    """With several processes, each host's rows become one global array; with one, the batch as it is."""
    if jax.process_count() == 1:
        return batch
    shardings = global_batch_shardings(mesh, batch)
    return {k: jax.make_array_from_process_local_data(shardings[k], v, global_batch_shape(v))
            for k, v in batch.items()}


def batch_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process's devices hold (`sharding.batch_sharding`).

    Each process must hold an equal, contiguous share: the mesh's batch axes ("data", "fsdp") split
    the batch over the processes, and each process's devices sit next to each other on them. Each
    process then reads that slice of every batch, and `jax.make_array_from_process_local_data`
    puts it in place.
    """
    processes = jax.process_count()
    if processes == 1:
        return slice(0, global_batch)
    if not set(mesh.devices.flat) >= set(jax.devices()):
        raise InputError(f"train.mesh covers {mesh.devices.size} of the {jax.device_count()} devices; with several "
                         "processes it must cover all of them")
    share = global_batch // processes
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    spans = {(index[0].start or 0, global_batch if index[0].stop is None else index[0].stop)
             for index in batch_sharding(mesh, (global_batch,)).addressable_devices_indices_map(
                 (global_batch,)).values()}
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    covered = sum(e - s for s, e in spans)
    if global_batch % split:
        raise InputError(f"a batch of {global_batch} must be a multiple of the mesh's data x fsdp = {split} "
                         f"(train.mesh={dict(mesh.shape)}), so that the hosts split it")
    if stop - start != share or covered != share:
        raise InputError(f"this process's devices hold rows {sorted(spans)} of a batch of {global_batch}, not one "
                         f"contiguous share of {share}: train.mesh={dict(mesh.shape)} must split the batch over the "
                         "hosts along data/fsdp, with each host's devices next to each other")
    return slice(start, stop)
