"""`python -m ppow_jax.distill --config configs/X.py`: the target answers the training prompts.

Reads the prompts of `config.data.folders` under the data root (eval prompts removed, counted),
and caches the target's responses as ArrayRecord shards: first the `config.data.dev_prompts`
held-out ones in `config.data.dev_cache_dir` (training measures drafters on them), then the
training ones in `config.data.cache_dir`. Resumable: rerun the same command after an interruption.
With `--config.data.responses=reference` the training cache holds the data's own answers instead,
written in seconds (`ppow_jax.data.distill`); the dev split is still the target's.

With `--config.distributed.enabled=True` (one process per host, as `launch/tpu_pod.sh` starts it),
the hosts share the work: each answers every N-th batch on its own devices into the shared caches.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Optional, Sequence

from ppow_jax.cli import run_config_entry_point


def data_root(config) -> pathlib.Path:
    """`PPOW_DATA_ROOT` if set, else the config's `data_root`."""
    return pathlib.Path(os.environ.get("PPOW_DATA_ROOT") or config.data_root)


def comma_separated(data, key: str) -> list[str]:
    """The non-empty, stripped entries of a comma-separated `data` setting (absent: none)."""
    return [part.strip() for part in str(data.get(key, "")).split(",") if part.strip()]


def run(config) -> int:
    from ppow_jax import multihost
    from ppow_jax.data.distill import cached_prompt_keys, check_responses, check_sizes
    from ppow_jax.weights.registry import load_model

    # Before the target is loaded:
    check_sizes(batch_size=config.data.batch_size, max_prompts=config.data.max_prompts,
                dev_prompts=config.data.get("dev_prompts", 0), skip_prompts=config.data.get("skip_prompts", 0))
    check_responses(config.data.get("responses", "target"))
    cached_prompt_keys(comma_separated(config.data, "exclude_caches"))
    multihost.initialize(config.get("distributed") or {})
    target = load_model(config.target, param_dtype=config.param_dtype)
    run_distillation(config, target)
    return 0


def run_distillation(config, target, progress: bool = True) -> None:
    """Answers the dev and training prompts of `config` with the loaded `target`."""
    import jax

    from ppow_jax import multihost, sharding
    from ppow_jax.data.distill import DistillSettings, self_distill
    from ppow_jax.data.process_share import ProcessShare
    from ppow_jax.data.sources import read_training_prompts
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder

    dev_prompts = config.data.get("dev_prompts", 0)
    prompts, report = read_training_prompts(data_root(config), config.data.folders, config.data.tfds.to_dict())
    multihost.log(f"training prompts: {report.summary()}")
    splits = ([("dev", config.data.dev_cache_dir)] if dev_prompts else []) + [("train", config.data.cache_dir)]
    for _, cache_dir in splits:
        multihost.check_shared_directory(pathlib.Path(cache_dir))
    # Each process decodes its own batches on its own devices.
    decoder = AutoregressiveDecoder(target.config, target.params, eos_token_ids=target.tokenizer.eos_token_ids,
                                    pad_token_id=target.tokenizer.pad_token_id or 0,
                                    mesh=sharding.data_parallel_mesh(config.data.batch_size, jax.local_devices()))
    settings = DistillSettings(model=str(config.target), max_prompt_tokens=config.data.max_prompt_tokens,
                               max_new_tokens=config.data.max_new_tokens, temperature=config.data.temperature,
                               top_p=config.data.top_p, seed=config.seed)
    # The dev split measures drafters on the target's own answers, whatever the training data is.
    split_settings = {"dev": settings,
                      "train": dataclasses.replace(settings, responses=config.data.get("responses", "target"))}
    source_caps = config.data.source_caps.to_dict() if "source_caps" in config.data else {}
    share = ProcessShare(jax.process_index(), jax.process_count(), multihost.gather_ints)
    for split, cache_dir in splits:
        manifest = self_distill(decoder, target.tokenizer, prompts, cache_dir, split_settings[split],
                                batch_size=config.data.batch_size, max_prompts=config.data.max_prompts,
                                dev_prompts=dev_prompts, split=split, source_caps=source_caps,
                                skip_prompts=config.data.get("skip_prompts", 0),
                                exclude_caches=comma_separated(config.data, "exclude_caches"), progress=progress, share=share)
        tokens = sum(s["response_tokens"] for s in manifest["shards"])
        answered = sum(len(s["keys"]) for s in manifest["shards"])
        no_reference = len(manifest.get("skipped_no_reference", []))
        own_answers = " (the records' own answers)" if split_settings[split].responses == "reference" else ""
        multihost.log(f"{cache_dir} ({split}): {answered} responses{own_answers}, "
                      f"{tokens} response tokens; {len(manifest['skipped_too_long'])} prompts over "
                      f"{config.data.max_prompt_tokens} tokens skipped"
                      + (f"; {no_reference} prompts without a reference answer skipped" if no_reference else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_config_entry_point(run, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
