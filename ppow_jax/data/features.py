"""What the frozen target gives, computed once per self-distilled sequence and cached.

For each sequence (prompt + the target's response, the last `seq_len` tokens kept) the target runs
one teacher-forced forward and the cache stores:
  - `tokens` [L] int32, right-padded;
  - `loss_mask` [L] uint8: 1 where position i predicts a response token x_{i+1};
  - `features` [L, n*D] bfloat16: the outputs of the drafter's feature layers, concatenated;
  - `target_hidden` [L, D] bfloat16: the final-normed last hidden state, from which the target's
    next-token logits over any vocabulary subset are one product with its output head.
Examples are ArrayRecord shards (one per batch, renamed into place when complete) in the order of
the self-distilled records; the manifest lists each shard's first record and a digest of the records
it holds, and pins the settings. A rerun after an interruption computes only the records no shard
holds (and again those that have since moved in the self-distilled data). Several processes (the hosts
of a pod) share the work: each computes every N-th missing batch (`process_share` says how they
share the cache and its manifest), and the cache is the one a single process would have made.
"""

from __future__ import annotations

import functools
import io
import json
import pathlib
import threading
import zlib
from typing import Callable, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ppow_jax import multihost, sharding
from ppow_jax.data.distill import read_manifest, shard_paths
from ppow_jax.data.process_share import (ProcessShare, ShardListing, fold_in_process_manifests,
                                         unmerged_process_manifests, write_manifest)
from ppow_jax.drafters.interface import concat_features
from ppow_jax.errors import InputError
from ppow_jax.files import write_array_record
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

MANIFEST = "manifest.json"
FIELDS = ("tokens", "loss_mask", "features", "target_hidden")
# Uncompressed: bfloat16 activations barely compress (ArrayRecord's default, zstd level 3, saves 20% of
# SmolLM2's), and without it a training sequence is written and read about 4x faster (BENCHMARKS.md,
# "Feature shards"); every step reads its batch, so the read bounds an accelerator's steps per second.
SHARD_OPTIONS = "group_size:1,uncompressed"


def encode_example(example: dict[str, np.ndarray]) -> bytes:
    """npz bytes; bfloat16 arrays travel as uint16 (npz has no bfloat16 without pickle)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: (v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in example.items()})
    return buffer.getvalue()


# NumPy parses .npy headers with ast.literal_eval, which CPython 3.11 can fail on when Grain's reader
# threads call it at once ("SystemError: AST constructor recursion depth mismatch", CPython gh-106905,
# seen once in a long run); decoding is a memory copy next to a training step, so it is serialised.
_DECODE_LOCK = threading.Lock()


def decode_example(data: bytes) -> dict[str, np.ndarray]:
    with _DECODE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as npz:
        out = {k: npz[k] for k in npz.files}
    for k in ("features", "target_hidden"):
        out[k] = out[k].view(ml_dtypes.bfloat16)
    return out


def sequence_example(record: dict, seq_len: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (tokens [L], loss_mask [L], valid length) for one self-distilled record."""
    ids = list(record["prompt"]) + list(record["response"])
    first_response = len(record["prompt"])
    cut = max(0, len(ids) - seq_len)
    ids = ids[cut:]
    tokens = np.full((seq_len,), pad_token_id, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros((seq_len,), np.uint8)
    # Position i predicts x_{i+1}: a response token when i + 1 >= first_response (after the cut).
    mask[max(first_response - cut - 1, 0):len(ids) - 1] = 1
    return tokens, mask, len(ids)


def build_feature_cache(target_config: ModelConfig, target_params: llama.Params, distill_dir: str | pathlib.Path,
                        out_dir: str | pathlib.Path, *, feature_layers: Sequence[int], seq_len: int,
                        batch_size: int, pad_token_id: int, progress: bool = True, share: ProcessShare = ProcessShare(),
                        devices: Optional[Sequence[jax.Device]] = None) -> dict:
    """Runs the target over every self-distilled record that no shard holds yet (this process: every
    N-th missing batch of its `share`), each batch split over as many of `devices` (default: this
    process's first device) as divide it; returns the manifest."""
    out_dir = pathlib.Path(out_dir)
    settings = _settings(target_config, distill_dir, feature_layers, seq_len)
    share.on_primary(lambda: _prepare(out_dir, settings, _distilled(distill_dir)),
                     f"process 0 could not prepare the feature cache {out_dir}")
    # What the processes divide must be the same on each: the cache's shards and the records to cover.
    state = share.read_agreed(lambda: {"manifest": _read_manifest(out_dir), "distilled": _distilled(distill_dir)},
                              f"{out_dir / MANIFEST} and the self-distilled data {distill_dir}")
    manifest, distilled = state["manifest"], state["distilled"]
    keys = distilled["keys"]
    missing = _missing_batches(manifest["shards"], len(keys), batch_size)
    mine = missing[share.index::share.count]
    bar = share.progress_bar(total=len(keys), to_do=sum(count for _, count in missing),
                             mine=sum(count for _, count in mine), desc="target features", unit="seq", progress=progress)
    listing = ShardListing(out_dir, share, manifest, order=_first_record)
    problem: Optional[BaseException] = None
    try:  # from here on a failure must reach `finish`, where the other processes wait
        if settings != manifest["settings"]:  # checked by process 0 against its own config only
            raise InputError(f"process {share.index} would add features made with {settings} to the cache "
                             f"{out_dir}, built with {manifest['settings']}: every host must run the same config")
        if mine:  # a finished cache is only checked: no target replicas, no reads
            responses = grain.sources.ArrayRecordDataSource([str(p) for p in shard_paths(distill_dir)])
            forward = _teacher_forced_on(devices or jax.local_devices()[:1], target_config, target_params,
                                         tuple(feature_layers), batch_size, seq_len)
        for first, count in mine:
            records = [json.loads(r) for r in responses.__getitems__(range(first, first + count))]
            if [r["key"] for r in records] != keys[first:first + count]:
                raise InputError(f"the self-distilled records {first}..{first + count - 1} of {distill_dir} are not "
                                 "the ones its manifest lists: the cache changed while the features were computed")
            examples = [sequence_example(r, seq_len, pad_token_id) for r in records]
            tokens = np.stack([e[0] for e in examples])
            if count < batch_size:  # one static shape: pad the last batch with copies
                tokens = np.concatenate([tokens, np.repeat(tokens[-1:], batch_size - count, axis=0)])
            features, hidden = forward(tokens)
            name = f"records-{first:07d}.array_record"  # named by its first record: unique at any batch size
            write_array_record(out_dir / name, (
                encode_example({"tokens": row_tokens, "loss_mask": mask, "features": features[row],
                                "target_hidden": hidden[row]})  # bfloat16 from the device
                for row, (row_tokens, mask, _) in enumerate(examples)), options=SHARD_OPTIONS)
            listing.add({"file": name, "first": first, "examples": count,
                         "records": _records_digest(distilled, first, first + count),
                         "loss_tokens": int(sum(int(e[1].sum()) for e in examples))})
            bar.update(count)
    except BaseException as err:  # noqa: BLE001 (raised by `finish`, once every process knows)
        problem = err
    bar.close()
    share.finish(problem, lambda: fold_in_process_manifests(out_dir, _read_manifest(out_dir), order=_first_record),
                 out_dir)
    return share.read_agreed(lambda: _read_manifest(out_dir), str(out_dir / MANIFEST))


def _settings(target_config: ModelConfig, distill_dir: str | pathlib.Path, feature_layers: Sequence[int],
              seq_len: int) -> dict:
    """What decides a cached example; a cache is only extended under equal settings."""
    return {"distill_dir": str(pathlib.Path(distill_dir).absolute()), "feature_layers": list(feature_layers),
            "seq_len": seq_len, "hidden_size": target_config.hidden_size}


def _distilled(distill_dir: str | pathlib.Path) -> dict:
    """What the self-distilled data holds, in record order: {"settings": what made it, "keys": the
    prompt keys}."""
    shard_paths(distill_dir)  # refuses a missing, empty or half-merged cache
    manifest = read_manifest(pathlib.Path(distill_dir))
    return {"settings": manifest["settings"], "keys": [key for shard in manifest["shards"] for key in shard["keys"]]}


def _records_digest(distilled: dict, first: int, end: int) -> int:
    """Names the self-distilled records first..end-1: their prompt keys and the settings that answered them."""
    return zlib.crc32(json.dumps([distilled["settings"], distilled["keys"][first:end]]).encode())


def _prepare(out_dir: pathlib.Path, settings: dict, distilled: dict) -> None:
    """Process 0's part before any computing: folds in what the processes of an interrupted run
    finished, refuses a cache made under other settings or with more records than the self-distilled
    data holds, and drops the shards whose records are no longer the ones at their place there
    (the distillation was made again, or a rerun filled batches an interrupted one had left out):
    they are computed again. The manifest it leaves is the one all processes read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out_dir)
    if manifest["settings"] is not None and manifest["settings"] != settings:
        raise InputError(f"feature cache {out_dir} was built with {manifest['settings']}, not {settings}; "
                         "use another directory")
    fold_in_process_manifests(out_dir, {**manifest, "settings": settings}, order=_first_record)
    manifest = _read_manifest(out_dir)
    records = len(distilled["keys"])
    if (end := max((s["first"] + s["examples"] for s in manifest["shards"]), default=0)) > records:
        raise InputError(f"feature cache {out_dir} holds features of {end} sequences but the self-distilled data "
                         f"only {records}: it was built from other data; delete it or use another directory")

    def in_place(shard: dict) -> bool:  # shards from before the digest was kept: only the count is checked
        digest = _records_digest(distilled, shard["first"], shard["first"] + shard["examples"])
        return shard.get("records", digest) == digest

    moved = [shard for shard in manifest["shards"] if not in_place(shard)]
    if moved:
        multihost.log(f"feature cache {out_dir}: {len(moved)} shards hold records that are no longer at their "
                      f"place in {settings['distill_dir']}; they are computed again")
    wanted = {"settings": settings, "shards": [s for s in manifest["shards"] if s not in moved]}
    if not (out_dir / MANIFEST).exists() or json.loads((out_dir / MANIFEST).read_text()) != wanted:
        write_manifest(out_dir, wanted)  # only when it changes: a finished cache may sit on read-only storage
    for shard in moved:  # once the manifest no longer lists them
        (out_dir / shard["file"]).unlink(missing_ok=True)


def _read_manifest(out_dir: pathlib.Path) -> dict:
    path = out_dir / MANIFEST
    if not path.exists():
        return {"settings": None, "shards": []}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is corrupt ({err}); delete the feature cache to rebuild it") from None
    # Caches built before shards were named by their first record hold them in record order, without gaps.
    first = 0
    for shard in manifest["shards"]:
        first = shard.setdefault("first", first) + shard["examples"]
    return manifest


def _first_record(shard: dict) -> int:
    return shard["first"]


def _missing_batches(shards: Sequence[dict], records: int, batch_size: int) -> list[tuple[int, int]]:
    """(first record, count) of the batches that cover the records no shard holds, in record order."""
    batches, start = [], 0
    for first, end in sorted((s["first"], s["first"] + s["examples"]) for s in shards) + [(records, records)]:
        batches += [(i, min(batch_size, first - i)) for i in range(start, first, batch_size)]
        start = max(start, end)
    return batches


def _teacher_forced_on(devices: Sequence[jax.Device], config: ModelConfig, params: llama.Params,
                       feature_layers: tuple[int, ...], batch_size: int,
                       seq_len: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """tokens [batch_size, seq_len] -> (features, final hidden) on the host, computed on a data-parallel
    mesh of as many of `devices` as divide the batch (the target replicated on each)."""
    mesh = sharding.data_parallel_mesh(batch_size, devices)
    param_shardings = sharding.param_shardings(params, mesh)
    params = jax.device_put(params, param_shardings)
    forward = jax.jit(functools.partial(_teacher_forced, config=config, feature_layers=feature_layers),
                      in_shardings=(param_shardings, sharding.batch_sharding(mesh, (batch_size, seq_len))))

    def run(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with jax.set_mesh(mesh):
            return jax.device_get(forward(params, tokens))

    return run


def _teacher_forced(params, tokens, config: ModelConfig, feature_layers: tuple[int, ...]):
    batch, seq = tokens.shape
    out = llama.forward(params, tokens, llama.init_cache(config, batch, seq), config,
                        hidden_layers=feature_layers + (config.num_layers - 1,), logits_at="last")
    # The final-normed hidden is recomputed from the last layer's output (forward returns logits only).
    final = llama.rms_norm(out.hidden_states[-1], params["final_norm"], config.rms_norm_eps)
    # Cast to the cache's bfloat16 on the device: half the bytes to copy to the host (an accelerator's
    # transfer is most of a batch's time there) and no host-side conversion.
    return concat_features(out.hidden_states[:-1]).astype(jnp.bfloat16), final.astype(jnp.bfloat16)


def feature_shards(cache_dir: str | pathlib.Path) -> list[pathlib.Path]:
    cache_dir = pathlib.Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.exists():
        raise InputError(f"no target feature cache in {cache_dir}")
    if unmerged := unmerged_process_manifests(cache_dir):
        raise InputError(f"feature cache {cache_dir} holds shards of an interrupted multi-process build "
                         f"({', '.join(unmerged)}): rerun the training command to finish it")
    return [cache_dir / s["file"] for s in _read_manifest(cache_dir)["shards"]]
