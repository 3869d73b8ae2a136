"""What the frozen target gives, computed once per self-distilled sequence and cached.

For each sequence (prompt + the target's response, the last `seq_len` tokens kept) the target runs
one teacher-forced forward and the cache stores:
  - `tokens` [L] int32, right-padded;
  - `loss_mask` [L] uint8: 1 where position i predicts a response token x_{i+1};
  - `features` [L, n*D] bfloat16: the outputs of the drafter's feature layers, concatenated;
  - `target_hidden` [L, D] bfloat16: the final-normed last hidden state, from which the target's
    next-token logits over any vocabulary subset are one product with its output head.
Examples are ArrayRecord shards (one per batch, renamed into place when complete) with a manifest,
so an interrupted run resumes; the manifest pins the settings.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import threading
from typing import Sequence

import jax
import ml_dtypes
import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from ppow_jax.data.distill import read_manifest, read_records, shard_paths
from ppow_jax.drafters.interface import concat_features
from ppow_jax.errors import InputError
from ppow_jax.files import write_atomically
from ppow_jax.models import llama
from ppow_jax.models.config import ModelConfig

MANIFEST = "manifest.json"
FIELDS = ("tokens", "loss_mask", "features", "target_hidden")


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
                        batch_size: int, pad_token_id: int, progress: bool = True) -> dict:
    """Runs the target over every cached response; returns the manifest."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    manifest = _checked_manifest(target_config, distill_dir, out_dir, feature_layers, seq_len)
    records = read_records(shard_paths(distill_dir))
    done = sum(s["examples"] for s in manifest["shards"])
    _check_not_stale(out_dir, done, len(records))
    forward = jax.jit(lambda params, tokens: _teacher_forced(params, tokens, target_config, tuple(feature_layers)))
    bar = tqdm(total=len(records), initial=done, desc="target features", unit="seq", disable=not progress)
    for start in range(done, len(records), batch_size):
        batch = records[start:start + batch_size]
        examples = [sequence_example(r, seq_len, pad_token_id) for r in batch]
        tokens = np.stack([e[0] for e in examples])
        if len(batch) < batch_size:  # one static shape: pad the last batch with copies
            tokens = np.concatenate([tokens, np.repeat(tokens[-1:], batch_size - len(batch), axis=0)])
        features, hidden = jax.device_get(forward(target_params, tokens))
        name = f"shard-{len(manifest['shards']):05d}.array_record"
        tmp = out_dir / (name + ".tmp")
        writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
        for row, (row_tokens, mask, _) in enumerate(examples):
            writer.write(encode_example({"tokens": row_tokens, "loss_mask": mask,
                                         "features": features[row].astype(ml_dtypes.bfloat16),
                                         "target_hidden": hidden[row].astype(ml_dtypes.bfloat16)}))
        writer.close()
        os.replace(tmp, out_dir / name)
        manifest["shards"].append({"file": name, "examples": len(examples),
                                   "loss_tokens": int(sum(int(e[1].sum()) for e in examples))})
        write_atomically(manifest_path, json.dumps(manifest, indent=1))
        bar.update(len(batch))
    bar.close()
    return manifest


def _checked_manifest(target_config: ModelConfig, distill_dir: str | pathlib.Path, out_dir: pathlib.Path,
                      feature_layers: Sequence[int], seq_len: int) -> dict:
    """The cache's manifest (an empty one when there is none yet); refused when built with other settings."""
    settings = {"distill_dir": str(pathlib.Path(distill_dir).absolute()), "feature_layers": list(feature_layers),
                "seq_len": seq_len, "hidden_size": target_config.hidden_size}
    path = out_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"settings": settings, "shards": []}
    if manifest["settings"] != settings:
        raise InputError(f"feature cache {out_dir} was built with {manifest['settings']}, not {settings}; "
                         "use another directory")
    return manifest


def complete_manifest(target_config: ModelConfig, distill_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                      feature_layers: Sequence[int], seq_len: int) -> dict | None:
    """The manifest of a cache that holds every self-distilled sequence of `distill_dir`, else None
    (what the other processes of a multi-host run wait for while the primary builds it)."""
    out_dir = pathlib.Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        return None
    manifest = _checked_manifest(target_config, distill_dir, out_dir, feature_layers, seq_len)
    distilled = sum(len(shard["keys"]) for shard in read_manifest(pathlib.Path(distill_dir))["shards"])
    cached = sum(s["examples"] for s in manifest["shards"])
    _check_not_stale(out_dir, cached, distilled)
    return manifest if cached == distilled else None


def _check_not_stale(out_dir: pathlib.Path, cached: int, distilled: int) -> None:
    if cached > distilled:
        raise InputError(f"feature cache {out_dir} holds {cached} sequences but the self-distilled data only "
                         f"{distilled}: it was built from other data; delete it or use another directory")


def _teacher_forced(params, tokens, config: ModelConfig, feature_layers: tuple[int, ...]):
    batch, seq = tokens.shape
    out = llama.forward(params, tokens, llama.init_cache(config, batch, seq), config,
                        hidden_layers=feature_layers + (config.num_layers - 1,), logits_at="last")
    # The final-normed hidden is recomputed from the last layer's output (forward returns logits only).
    final = llama.rms_norm(out.hidden_states[-1], params["final_norm"], config.rms_norm_eps)
    return concat_features(out.hidden_states[:-1]), final


def feature_shards(cache_dir: str | pathlib.Path) -> list[pathlib.Path]:
    cache_dir = pathlib.Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.exists():
        raise InputError(f"no target feature cache in {cache_dir}")
    return [cache_dir / s["file"] for s in json.loads(path.read_text())["shards"]]
