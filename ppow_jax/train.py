"""`python -m ppow_jax.train --config configs/X.py [--config.KEY=VALUE ...]`: drafter training.

`config.stage` picks what runs:
  - "kd" (token level, METHOD.md §2): the target's features and distributions for every
    self-distilled sequence are cached once (`python -m ppow_jax.distill` must have produced the
    responses); the draft vocabulary is the responses' most frequent tokens; the drafter trains from
    scratch, or from `init_from` (continued token-level training, the CST baseline);
  - "ppow" (window-level RL, METHOD.md §3): fine-tunes the drafter in `init_from` with grouped
    rollouts, rewards and PPO on the same feature cache.
Both checkpoint (train state, data-iterator state, RNG) every `train.checkpoint_every` steps,
keeping the last `train.keep_checkpoints`; a rerun resumes from the latest one exactly (and is
refused if its training caches changed since). A run ends after `train.steps` steps,
`train.max_seconds` of training time, `train.max_wall_seconds` of this run's wall clock or
`data.num_epochs` of the data, whichever comes first, and exports the drafter, with the calibration of its
adaptive window, to `WORKDIR/drafter` for `python -m ppow_jax.eval --drafter`. Metrics go to
TensorBoard logs in `WORKDIR/logs`, `WORKDIR/metrics.jsonl` and a console progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Callable, Optional, Sequence

from ppow_jax.cli import run_config_entry_point


def token_counts(distill_dir: pathlib.Path, vocab_size: int):
    import numpy as np

    from ppow_jax.data.distill import read_records, shard_paths

    counts = np.zeros((vocab_size,), np.int64)
    for record in read_records(shard_paths(distill_dir)):
        np.add.at(counts, np.asarray(record["response"], np.int64), 1)
    return counts


class MetricsLog:
    """Scalars to TensorBoard (`WORKDIR/logs`) and, for scripts, to `WORKDIR/metrics.jsonl`; written by
    the primary process only."""

    def __init__(self, workdir: pathlib.Path):
        from tensorboardX import SummaryWriter

        from ppow_jax import multihost

        self.writer = SummaryWriter(str(workdir / "logs")) if multihost.is_primary() else None
        self.path = workdir / "metrics.jsonl"

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        with open(self.path, "a") as history:
            history.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def feature_cache(config, target, progress: bool, split: str = "train") -> pathlib.Path:
    """Builds (or resumes, or just checks) the target-feature cache of a split (of `data.cache_dir` for
    "train"); -> its directory."""
    data = config.data
    if split == "train":
        distill_dir, directory, setting = data.cache_dir, data.get("features_dir"), "data.cache_dir"
    else:
        distill_dir, directory, setting = data.dev_cache_dir, data.get("dev_features_dir"), "data.dev_cache_dir"
    directory = pathlib.Path(directory or pathlib.Path(config.workdir) / ("features" if split == "train" else "features-dev"))
    return build_features(config, target, progress, pathlib.Path(distill_dir), directory, split, setting)


def build_features(config, target, progress: bool, distill_dir: pathlib.Path, directory: pathlib.Path, label: str,
                   setting: str) -> pathlib.Path:
    """The feature cache in `directory` of the self-distilled data in `distill_dir` (named by the config
    entry `setting` in errors), built on first use; with several processes they share the work on the
    shared workdir, each on its own devices."""
    import jax

    from ppow_jax import multihost
    from ppow_jax.data.distill import cache_settings
    from ppow_jax.data.features import build_feature_cache
    from ppow_jax.data.process_share import ProcessShare
    from ppow_jax.errors import InputError

    data = config.data
    # The drafter learns the target from its own responses: another model's (a wrong cache_dir) would
    # train it on text this target does not write, with no other sign.
    answered_by = cache_settings(distill_dir).get("model")
    if answered_by is not None and answered_by != str(config.target):
        raise InputError(f"{distill_dir} holds the responses of {answered_by!r}, not of this config's target "
                         f"{str(config.target)!r}: point {setting} at a distillation of this target "
                         "(python -m ppow_jax.distill with this config)")
    started = time.perf_counter()
    manifest = build_feature_cache(target.config, target.params, distill_dir, directory,
                                   feature_layers=tuple(config.drafter.feature_layers), seq_len=data.seq_len,
                                   batch_size=data.feature_batch_size, pad_token_id=target.tokenizer.pad_token_id or 0,
                                   progress=progress, devices=jax.local_devices(),
                                   share=ProcessShare(jax.process_index(), jax.process_count(), multihost.gather_ints))
    loss_tokens = sum(s["loss_tokens"] for s in manifest["shards"])
    multihost.log(f"feature cache {directory} ({label}): {sum(s['examples'] for s in manifest['shards'])} sequences, "
                  f"{loss_tokens} response tokens (built or checked in {time.perf_counter() - started:.1f} s)")
    return directory


# What a self-distilled cache's answers must share with data.cache_dir's to be trained on beside them.
SHARED_DISTILL_SETTINGS = ("model", "temperature", "top_p", "responses")


def extra_caches(data) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """`data.extra_caches` (of a config's `data`, or of a checkpoint's saved one): more self-distilled
    caches of the target to train on beside `data.cache_dir`, as comma-separated DISTILL_DIR:FEATURES_DIR
    pairs; -> [(distill_dir, features_dir)]."""
    from ppow_jax.distill import comma_separated
    from ppow_jax.errors import InputError

    pairs = []
    for item in comma_separated(data, "extra_caches"):
        distill_dir, colon, features_dir = item.partition(":")
        if not colon or not distill_dir or not features_dir or ":" in features_dir:
            raise InputError(f"data.extra_caches entry {item!r} is not DISTILL_DIR:FEATURES_DIR")
        pairs.append((pathlib.Path(distill_dir), pathlib.Path(features_dir)))
    return pairs


def training_caches(data) -> list[str]:
    """The self-distilled caches a run trains on, in the order their sequences are numbered (what a
    checkpoint's data-iterator position indexes), as absolute paths."""
    distill_dirs = [pathlib.Path(data.get("cache_dir", ""))] + [d for d, _ in extra_caches(data)]
    return [str(d.resolve()) for d in distill_dirs]


def check_training_caches(config) -> None:
    """Refuses extra caches answered under other settings than `data.cache_dir` (another temperature would
    mix two targets' text), or that share prompts with it, with each other or with the dev split (a
    prompt twice would weigh double; one in the dev split would leak into the probe)."""
    from ppow_jax.data.distill import MANIFEST, cache_settings, read_manifest
    from ppow_jax.errors import InputError

    pairs = extra_caches(config.data)
    if not pairs:
        return
    main = pathlib.Path(config.data.cache_dir)
    features_dirs = [pathlib.Path(config.data.get("features_dir") or pathlib.Path(config.workdir) / "features")]
    features_dirs += [f for _, f in pairs]
    if len({str(f.resolve()) for f in features_dirs}) < len(features_dirs):
        raise InputError(f"data.extra_caches gives a FEATURES_DIR twice, or data.features_dir's "
                         f"({', '.join(map(str, features_dirs))}): each cache needs a feature directory of its own")
    caches = [main] + [distill_dir for distill_dir, _ in pairs]
    # (a missing data.cache_dir is reported where it is read)
    missing = [str(c) for c in caches[1:] if not (c / MANIFEST).is_file()]
    if missing:
        raise InputError(f"no self-distilled cache in {', '.join(missing)} (python -m ppow_jax.distill makes one); "
                         "data.extra_caches names caches that are already distilled")

    def shared(cache: pathlib.Path) -> dict:
        settings = {"responses": "target", **cache_settings(cache)}  # caches from before the setting: the target's
        return {k: settings.get(k) for k in SHARED_DISTILL_SETTINGS}

    reference = shared(main)
    for distill_dir in caches[1:]:
        if (settings := shared(distill_dir)) != reference:
            raise InputError(f"{distill_dir} was distilled with {settings}, data.cache_dir {main} with {reference}: "
                             "the caches trained on together must share these settings")
    # Also with the probe off (dev_prompts 0): benchmarks/dev_acceptance.py measures drafters on that split.
    if config.data.get("dev_cache_dir") and (pathlib.Path(config.data.dev_cache_dir) / MANIFEST).is_file():
        caches.append(pathlib.Path(config.data.dev_cache_dir))
    owner: dict[str, int] = {}  # prompt key -> the index of the cache that holds it
    for index, cache in enumerate(caches):  # the same directory twice counts as two caches
        for key in (key for shard in read_manifest(cache)["shards"] for key in shard["keys"]):
            if owner.setdefault(key, index) != index:
                raise InputError(f"prompt {key!r} is in both {caches[owner[key]]} and {cache}: the caches in "
                                 "data.cache_dir, data.extra_caches and data.dev_cache_dir must hold different "
                                 "prompts (distill new ones with data.skip_prompts or data.exclude_caches)")


def training_features(config, target, progress: bool) -> list[pathlib.Path]:
    """The feature caches of `data.cache_dir` and of each of `data.extra_caches`, built on first use."""
    directories = [feature_cache(config, target, progress)]
    for distill_dir, features_dir in extra_caches(config.data):
        directories.append(build_features(config, target, progress, distill_dir, features_dir, "train, extra",
                                          "data.extra_caches"))
    return directories


def training_shards(features_dirs: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    from ppow_jax.data.features import feature_shards

    return [shard for directory in features_dirs for shard in feature_shards(directory)]


class DevProbe:
    """Acceptance of the drafter's greedy windows on the held-out dev split (`data.dev_prompts`):
    the learning curve both stages log every `train.eval_every` steps, comparable across runs
    (PPOW's own reward is measured on its sampled, priority-chosen windows).

    With acceptance="sampling" (benchmarks/dev_acceptance.py's --acceptance; not logged in training,
    it needs the live target): windows sampled at T = 1 and verified by the live target under
    lossless sampling acceptance, the T = 1 engine's; expected lengths, drafts sampled with the key of
    `seed` (fixed, so that drafters compare on the same draws).
    """

    BATCH_SIZE = 4

    def __init__(self, config, target, progress: bool, acceptance: str = "greedy", seed: int = 0):
        from ppow_jax.data.features import MANIFEST, feature_shards
        from ppow_jax.data.pipeline import feature_dataset
        from ppow_jax.errors import InputError

        if acceptance not in ("greedy", "sampling"):
            raise InputError(f"dev probe acceptance must be 'greedy' or 'sampling', got {acceptance!r}")

        directory = feature_cache(config, target, progress, split="dev")
        sequences = sum(s["examples"] for s in json.loads((directory / MANIFEST).read_text())["shards"])
        dataset = feature_dataset(feature_shards(directory), batch_size=min(self.BATCH_SIZE, sequences), seed=0,
                                  num_epochs=1)
        self.batches = list(dataset)
        self.target_params, self.target_config, self.acceptance = target.params, target.config, acceptance
        self.seed = seed
        self.window, self.stride = config.train.eval_window, config.train.eval_stride
        self._records = None

    @classmethod
    def of_train_state(cls, config, target, progress: bool, drafter,
                       drafter_params: Callable[[Any], dict]) -> Optional[Callable[[Any], dict[str, float]]]:
        """The probe of a training state's drafter, or None when the config names no dev split."""
        if not config.data.get("dev_prompts"):
            return None
        probe = cls(config, target, progress)
        return lambda state: probe(drafter, drafter_params(state))

    def __call__(self, drafter, params: dict) -> dict[str, float]:
        return {f"dev/{name}": value for name, value in self.counts(drafter, params).means().items()}

    def counts(self, drafter, params: dict):
        """-> `AcceptanceCounts` per dev sequence."""
        import functools

        import jax

        from ppow_jax import multihost
        from ppow_jax.training.ppow import (PPOWTarget, greedy_acceptance, greedy_window_records, sampled_acceptance,
                                            sampled_window_records)

        params = multihost.to_host(params)  # every process measures the whole dev split on its own
        frozen = PPOWTarget.from_target(self.target_params, params["d2t"])
        if self.acceptance == "sampling":
            if self._records is None:
                self._records = jax.jit(functools.partial(sampled_window_records, drafter, window=self.window,
                                                          stride=self.stride, target_config=self.target_config))
            return sampled_acceptance(self._records, params, frozen, self.target_params, self.batches,
                                      jax.random.key(self.seed))
        if self._records is None:  # compiled once per run
            self._records = jax.jit(functools.partial(greedy_window_records, drafter, window=self.window,
                                                      stride=self.stride))
        return greedy_acceptance(self._records, params, frozen, self.batches)


def check_shared_storage(config) -> None:
    """With several processes: refuses directories of the run that the hosts do not all see (they
    would build the feature caches, or train, on different files)."""
    from ppow_jax import multihost

    data = config.data
    extra = extra_caches(config.data)
    read = [data.cache_dir] + [d for d, _ in extra] + ([data.dev_cache_dir] if data.get("dev_prompts") else [])
    for directory in read:  # a missing one is reported where it is read
        if multihost.agree(pathlib.Path(directory).is_dir()):
            multihost.check_shared_directory(pathlib.Path(directory))
    for directory in filter(None, [config.workdir, data.get("features_dir"), data.get("dev_features_dir"),
                                   *(f for _, f in extra)]):
        multihost.check_shared_directory(pathlib.Path(directory))  # made by the primary if missing


def check_loop_settings(config) -> None:
    """Refuses loop settings the loop would fail on later (a zero divisor, no steps), before any work."""
    from ppow_jax.errors import InputError

    tc = config.train
    for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "batch_size"):
        if name in tc and not (isinstance(tc[name], int) and tc[name] >= 1):
            raise InputError(f"train.{name} must be an integer >= 1, got {tc[name]!r}")
    for name in ("eval_every", "max_seconds", "max_wall_seconds"):
        if tc.get(name, 0) < 0:
            raise InputError(f"train.{name} must be >= 0 (0: off), got {tc[name]!r}")
    read_ahead = config.data.read_ahead
    if not (isinstance(read_ahead, int) and not isinstance(read_ahead, bool) and read_ahead >= 1):
        raise InputError(f"data.read_ahead must be an integer >= 1, got {read_ahead!r}")


def check_feature_layers(config, target) -> None:
    """`drafter.feature_layers` must be layers of the loaded target (the defaults are SmolLM2's)."""
    from ppow_jax.errors import InputError

    layers, count = tuple(config.drafter.feature_layers), target.config.num_layers
    if not layers or not all(isinstance(layer, int) and 0 <= layer < count for layer in layers):
        low_middle_high = sorted({min(2, count - 1), count // 2, max(count - 3, 0)})
        raise InputError(f"drafter.feature_layers {layers} must be layers of the target, which has {count} "
                         f"(0..{count - 1}); EAGLE-3 reads a low, a middle and a high one, e.g. "
                         f"--config.drafter.feature_layers=\"{tuple(low_middle_high)}\"")


def load_init_drafter(config, target):
    """The drafter in `config.init_from`; refused when it reads other target layers than the feature
    cache of this config holds (it would train on one set of layers and draft from another)."""
    from ppow_jax.drafters.store import load_drafter
    from ppow_jax.errors import InputError

    drafter, params = load_drafter(config.init_from, target.config)
    cached = tuple(int(i) for i in config.drafter.feature_layers)
    if tuple(drafter.feature_layers) != cached:
        raise InputError(f"{config.init_from} reads the target's layers {list(drafter.feature_layers)}, but this "
                         f"config caches layers {list(cached)}: set --config.drafter.feature_layers to match")
    return drafter, params


def training_mesh(spec: str):
    """The mesh of `train.mesh`; when it is empty, one device, or with several processes data
    parallelism over every host's devices (each host must feed its own)."""
    import jax

    from ppow_jax import sharding
    from ppow_jax.generate import parse_mesh

    mesh = parse_mesh(spec)
    if mesh is None and jax.process_count() > 1:  # devices by host, so that each host's rows are contiguous
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        mesh = sharding.make_mesh(data=len(devices), devices=devices, keep_order=True)
    return mesh


def optimizer_config(tc):
    from ppow_jax.training.kd import OptimConfig

    return OptimConfig(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                       end_learning_rate_factor=tc.end_learning_rate_factor, b1=tc.b1, b2=tc.b2,
                       weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)


def training_responses(config) -> str:
    """Who answered the training cache `config.data.cache_dir`: "target" (also for a cache from before
    the setting, or none yet) or "reference" (the records' own answers, not the target's continuations)."""
    from ppow_jax.data.distill import cache_settings

    return cache_settings(config.data.cache_dir).get("responses", "target")


def export_drafter(config, target, drafter, params, features_dirs: Sequence[pathlib.Path], extra: dict) -> pathlib.Path:
    """Fits the adaptive window's calibration on greedy windows of the training data, then saves the drafter
    (every process fits it on host copies of the parameters; the primary saves)."""
    import itertools

    from ppow_jax import multihost
    from ppow_jax.data.pipeline import feature_dataset
    from ppow_jax.drafters.store import save_drafter
    from ppow_jax.training.ppow import NothingToCalibrate, PPOWTarget, fit_window_calibration

    cc = config.calibration
    params = multihost.to_host(params)
    frozen = PPOWTarget.from_target(target.params, params["d2t"])
    batches = itertools.islice(iter(feature_dataset(training_shards(features_dirs), batch_size=cc.batch_size,
                                                    seed=config.seed + 1)), cc.batches)
    try:
        if training_responses(config) != "target":  # its greedy windows would be checked against another text
            raise NothingToCalibrate("the training responses are the data's own answers, not the target's")
        calibration = fit_window_calibration(drafter, params, frozen, batches, cc.window)
    except NothingToCalibrate as reason:  # a drafter that is barely trained still serves fixed windows
        multihost.log(f"warning: no adaptive-window calibration ({reason}); the drafter is exported for fixed "
                      "windows only")
        extra = {**extra, "window_calibration_skipped": str(reason)}
    else:
        multihost.log(f"adaptive-window calibration: {calibration['drafts']} greedy drafts, accept rate "
            f"{calibration['accept_rate']:.3f}, log loss {calibration['log_loss']:.3f}")
        extra = {**extra, "window_calibration": calibration}
    exported = pathlib.Path(config.workdir) / "drafter"
    if multihost.is_primary():
        save_drafter(exported, drafter, params, target_name=str(config.target), dtype=config.export_dtype,
                     extra=extra)
        multihost.log(f"drafter exported to {exported}")
    multihost.barrier("drafter exported")
    return exported


@dataclasses.dataclass
class LoopOutcome:
    state: Any
    metrics: dict  # the last step's metrics, on the host
    train_seconds: float
    finished: bool  # train.steps, a time budget or the end of data.num_epochs reached: the caller exports


def train_loop(config, *, state, update: Callable, iterator, checkpointer, train_seconds: float, metrics_log: MetricsLog,
               scalars: Callable[[dict], dict[str, float]], postfix: Callable[[dict[str, float]], dict[str, str]],
               probe: Optional[Callable[[Any], dict[str, float]]], unit: str, progress: bool,
               stop_at: Optional[int], checkpoint_meta: Optional[dict] = None,
               step_tokens: Optional[Callable[[dict], Any]] = None) -> LoopOutcome:
    """The loop both stages share: `state, metrics = update(state, batch)` until `train.steps`, the
    time budgets `train.max_seconds` (update time, summed over resumes) and `train.max_wall_seconds`
    (this run's wall clock from the loop's start: data waits, probes and checkpoints included; for
    leased machines), the end of `data.num_epochs` or `stop_at`; metrics every `train.log_every`
    steps (with tokens/s when `step_tokens(metrics)` counts a step's trained tokens), a checkpoint every
    `train.checkpoint_every`, the dev `probe(state)` every `train.eval_every`."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from ppow_jax import multihost

    tc = config.train
    start_step = int(state.step)
    loop_start = time.perf_counter()  # train.max_wall_seconds counts from here, the first probe included
    if probe and start_step == 0:
        metrics_log.write(0, probe(state))
    bar = tqdm(total=tc.steps, initial=start_step, desc=str(config.get("stage", "kd")), unit=unit,
               disable=not (progress and multihost.is_primary()))
    end_step = tc.steps if stop_at is None else min(stop_at, tc.steps)
    metrics, out_of_time, exhausted = {}, False, False
    budgeted = bool(tc.get("max_seconds", 0) or tc.get("max_wall_seconds", 0))
    window_tokens, window_start = [], time.perf_counter()
    logged_at = probed_at = start_step  # the last steps whose metrics and dev probe were written

    def log_metrics(done: int, wall_seconds: float) -> None:
        nonlocal metrics, window_tokens, window_start, logged_at
        metrics = multihost.to_host(metrics)
        logged = scalars(metrics)
        if not np.isfinite(logged["loss"]):
            raise FloatingPointError(f"loss is {logged['loss']} at {unit} {done}; last good checkpoint: "
                                     f"{checkpointer.latest_step()}")
        logged["train_seconds"] = train_seconds
        logged["wall_seconds"] = wall_seconds
        if step_tokens:
            tokens = float(sum(multihost.to_host(window_tokens)))
            logged["tokens_per_s"] = tokens / (time.perf_counter() - window_start)
        metrics_log.write(done, logged)
        bar.set_postfix(postfix(logged))
        window_tokens, window_start, logged_at = [], time.perf_counter(), done

    def save(done: int) -> None:
        checkpointer.save(done, state, {"data_iterator": iterator.get_state(), "train_seconds": train_seconds,
                                        "config": config.to_dict(), **(checkpoint_meta or {})})

    def run_probe(done: int) -> None:
        nonlocal probed_at
        metrics_log.write(done, probe(state))
        probed_at = done

    for step in range(start_step, end_step):
        try:
            batch = next(iterator)
        except StopIteration:
            multihost.log(f"data exhausted after {config.data.num_epochs} epochs at {unit} {step}")
            exhausted = True
            break
        step_start = time.perf_counter()
        state, metrics = update(state, batch)
        jax.block_until_ready(state.step)
        train_seconds += time.perf_counter() - step_start
        if step_tokens:  # device scalars over the global batch, read at the next log
            window_tokens.append(step_tokens(metrics))
        done = step + 1
        wall_seconds = time.perf_counter() - loop_start
        spent = ((tc.get("max_seconds", 0) and train_seconds >= tc.max_seconds)
                 or (tc.get("max_wall_seconds", 0) and wall_seconds >= tc.max_wall_seconds))
        # Each host's clock differs: all follow the primary's, so all stop after the same step.
        out_of_time = budgeted and multihost.agree(bool(spent))
        if done % tc.log_every == 0 or done == tc.steps or out_of_time:
            log_metrics(done, wall_seconds)
        if done % tc.checkpoint_every == 0 or done == end_step or out_of_time:
            save(done)
        if probe and (done == end_step or out_of_time or (tc.eval_every and done % tc.eval_every == 0)):
            run_probe(done)
        bar.update(1)
        if out_of_time:
            multihost.log(f"time budget reached at {unit} {done}: {train_seconds:.0f} s of updates "
                          f"(train.max_seconds {tc.get('max_seconds', 0)}), {wall_seconds:.0f} s of wall clock "
                          f"(train.max_wall_seconds {tc.get('max_wall_seconds', 0)})")
            break
    done = int(state.step)
    if exhausted and done > start_step:  # the end of data.num_epochs ends the run as train.steps would
        if logged_at != done:
            log_metrics(done, time.perf_counter() - loop_start)
        if checkpointer.latest_step() != done:
            save(done)
        if probe and probed_at != done:
            run_probe(done)
    bar.close()
    metrics_log.close()
    checkpointer.close()
    finished = int(state.step) >= tc.steps or out_of_time or exhausted
    if not finished:
        multihost.log(f"stopped at {unit} {int(state.step)} of {tc.steps}; rerun to resume")
    return LoopOutcome(state, multihost.to_host(metrics), train_seconds, finished)


@dataclasses.dataclass
class RunInputs:
    workdir: pathlib.Path
    features_dirs: list[pathlib.Path]  # the training feature caches, data.cache_dir's first
    checkpointer: Any
    data_meta: dict  # what the data-iterator position indexes, saved with every checkpoint


def open_run(config, target, progress: bool, batch_size: int) -> RunInputs:
    """What both training stages start from: the work directory, the target's feature caches (built
    on first use) and the run's checkpointer. A run resumed on other training data than its
    checkpoint's is refused: the saved data-iterator position would index other sequences."""
    from ppow_jax import multihost
    from ppow_jax.data.features import MANIFEST
    from ppow_jax.errors import InputError
    from ppow_jax.training.checkpoints import Checkpointer

    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_shared_storage(config)
    check_training_caches(config)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    resume_step, caches = checkpointer.latest_step(), training_caches(config.data)
    saved = {} if resume_step is None else checkpointer.restore_meta(resume_step)
    advice = ("resume with the data settings it was trained with, or train on in a new workdir "
              "(init_from an exported drafter)")
    # Checkpoints from before training_caches was saved name theirs in their config.
    saved_caches = saved.get("training_caches") or ("config" in saved and training_caches(saved["config"]["data"]))
    if saved_caches and saved_caches != caches:  # checked before any feature is computed
        raise InputError(f"the checkpoint at step {resume_step} in {checkpointer.directory} trained on the caches "
                         f"{saved_caches}, this run names {caches}: {advice}")
    features_dirs = training_features(config, target, progress)
    sequences = sum(s["examples"] for d in features_dirs for s in json.loads((d / MANIFEST).read_text())["shards"])
    if saved.get("training_sequences", sequences) != sequences:
        raise InputError(f"the checkpoint at step {resume_step} in {checkpointer.directory} trained on "
                         f"{saved['training_sequences']} sequences, its caches now hold {sequences} (one grew or "
                         f"shrank since): {advice}")
    epochs = config.data.num_epochs
    if epochs and epochs * (sequences // batch_size) < config.train.steps:
        multihost.log(f"warning: data.num_epochs={epochs} gives {epochs * (sequences // batch_size)} steps of "
                      f"{batch_size} of the {sequences} sequences, fewer than train.steps={config.train.steps}: "
                      "the run ends there, its learning-rate schedule unfinished")
    return RunInputs(workdir, features_dirs, checkpointer, {"training_caches": caches, "training_sequences": sequences})


def resume(checkpointer, state, iterator, unit: str) -> tuple[Any, float]:
    """Restores the latest checkpoint's state and data-iterator position; -> (state, train_seconds)."""
    from ppow_jax import multihost

    _, state, meta = checkpointer.restore(state)
    iterator.set_state(meta["data_iterator"])
    multihost.log(f"resumed from {unit} {int(state.step)} ({checkpointer.directory})")
    return state, meta["train_seconds"]


def run_training(config, target, *, progress: bool = True, stop_at: Optional[int] = None) -> dict:
    """Token-level training of the configured drafter for `target` (a `LoadedModel`); returns the last metrics.

    `stop_at` ends this run early after that step's checkpoint (a scheduled interruption; the
    learning-rate schedule still follows `train.steps`), without exporting the drafter (unless the
    data's `data.num_epochs` end first).
    """
    import jax
    import numpy as np

    from ppow_jax import files, multihost
    from ppow_jax.data.pipeline import feature_dataset
    from ppow_jax.drafters.eagle import Eagle3Drafter
    from ppow_jax.errors import InputError
    from ppow_jax.training.kd import KDTrainer, draft_vocabulary, split_params

    if config.drafter.kind != "eagle3":
        raise InputError(f"unknown drafter kind {config.drafter.kind!r} (supported: eagle3)")
    tc = config.train
    mesh = training_mesh(tc.mesh)
    rows = multihost.batch_rows(mesh, tc.batch_size)  # this process's share of every batch
    initial = None
    if config.get("init_from"):  # continued token-level training (CST) of a trained drafter
        drafter, initial = load_init_drafter(config, target)
    run = open_run(config, target, progress, tc.batch_size)
    workdir, features_dirs, checkpointer = run.workdir, run.features_dirs, run.checkpointer
    resume_step = checkpointer.latest_step()
    if initial is not None:
        d2t = np.asarray(initial["d2t"])
    else:
        drafter = Eagle3Drafter.for_target(target.config, tuple(config.drafter.feature_layers),
                                           config.drafter.draft_vocab_size, config.drafter.intermediate_size)
        if resume_step is not None:
            d2t = np.asarray(json.loads((workdir / "d2t.json").read_text()), np.int32)
        else:
            d2t = draft_vocabulary(sum(token_counts(pathlib.Path(d), target.config.vocab_size)
                                       for d in training_caches(config.data)),
                                   config.drafter.draft_vocab_size)
    if resume_step is None and multihost.is_primary():  # a resumed run's other processes are reading it
        files.write_atomically(workdir / "d2t.json", json.dumps(np.asarray(d2t).tolist()))
    trainer = KDTrainer(drafter, target.params, d2t, optimizer_config(tc), unroll_steps=tc.unroll_steps,
                        loss_positions=tc.loss_positions, mesh=mesh)
    state = trainer.init_state(jax.random.key(config.seed), params=None if initial is None else split_params(initial)[0])
    iterator = iter(feature_dataset(training_shards(features_dirs), batch_size=tc.batch_size, seed=config.seed,
                                    num_epochs=config.data.num_epochs, rows=rows, read_ahead=config.data.read_ahead))
    train_seconds = 0.0
    if resume_step is not None:
        state, train_seconds = resume(checkpointer, state, iterator, "step")

    def scalars(metrics: dict) -> dict[str, float]:
        logged = {name: float(metrics[name]) for name in ("loss", "kl", "learning_rate", "grad_norm")}
        logged.update({f"agreement/step{j}": float(a) for j, a in enumerate(metrics["agreement"])})
        logged.update({f"loss/step{j}": float(x) for j, x in enumerate(metrics["step_loss"])})
        return logged

    outcome = train_loop(
        config, state=state, update=trainer.step, iterator=iterator, checkpointer=checkpointer,
        train_seconds=train_seconds, metrics_log=MetricsLog(workdir), scalars=scalars,
        postfix=lambda s: {"loss": f"{s['loss']:.3f}", "agree0": f"{s['agreement/step0']:.3f}",
                           "tok_s": f"{s['tokens_per_s']:.0f}"},
        probe=DevProbe.of_train_state(config, target, progress, drafter, trainer.drafter_params),
        unit="step", progress=progress, stop_at=stop_at, checkpoint_meta=run.data_meta,
        step_tokens=lambda metrics: metrics["loss_tokens"])  # response tokens that got the loss
    if outcome.finished:
        export_drafter(config, target, drafter, trainer.drafter_params(outcome.state), features_dirs,
                       {"stage": "kd", "train_steps": int(outcome.state.step), "train_seconds": outcome.train_seconds,
                        "init_from": config.get("init_from") or None})
    return {k: np.asarray(v).tolist() for k, v in outcome.metrics.items()}


def run_ppow_training(config, target, *, progress: bool = True, stop_at: Optional[int] = None) -> dict:
    """PPOW fine-tuning of the drafter in `config.init_from` for `target`; returns the last metrics.

    γ is measured once on this machine when `ppow.gamma` <= 0 and saved with the checkpoints, so a
    resumed run keeps its reward. `stop_at` works as in `run_training`.
    """
    import jax
    import numpy as np

    from ppow_jax import multihost
    from ppow_jax.data.pipeline import feature_dataset
    from ppow_jax.errors import InputError
    from ppow_jax.training.kd import learning_rate_schedule, make_optimizer
    from ppow_jax.training.ppow import PPOWTrainer, measure_cost_ratio, settings_from_config

    if not config.get("init_from"):
        raise InputError("PPOW fine-tunes a trained drafter: set init_from to a drafter directory "
                         "(python -m ppow_jax.train --config configs/smollm2_135m_kd.py exports one)")
    pc, tc = config.ppow, config.train
    if pc.verifier == "cache" and (config.data.temperature != 0 or training_responses(config) != "target"):
        raise InputError("ppow.verifier='cache' needs the target's greedy responses (data.temperature=0, "
                         "data.responses='target'); use ppow.verifier='target'")
    settings_from_config(pc, gamma=pc.gamma if pc.gamma > 0 else 1.0)  # its checks, before any work
    mesh = training_mesh(tc.mesh)
    rows = multihost.batch_rows(mesh, pc.sequences_per_iteration)  # this process's share of every batch
    drafter, initial = load_init_drafter(config, target)
    run = open_run(config, target, progress, pc.sequences_per_iteration)
    workdir, features_dirs, checkpointer = run.workdir, run.features_dirs, run.checkpointer
    resume_step = checkpointer.latest_step()
    if resume_step is not None:  # a resumed run keeps the γ its rewards were computed with
        gamma = checkpointer.restore_meta(resume_step)["gamma"]
    elif pc.gamma > 0:
        gamma = pc.gamma
    else:  # timed on the primary; every process computes its rewards with that value
        gamma = multihost.broadcast_from_primary(
            measure_cost_ratio(drafter, initial, target.config, target.params, pc.window) if multihost.is_primary()
            else 0.0)
        multihost.log(f"measured cost ratio γ = {gamma:.4f} (drafter step / target verify of {pc.window + 1} tokens)")
    optim = optimizer_config(tc)
    trainer = PPOWTrainer(drafter, target.config, target.params, np.asarray(initial["d2t"]),
                          settings_from_config(pc, gamma), make_optimizer(optim), learning_rate_schedule(optim),
                          mesh=mesh)
    state = trainer.init_state(initial, jax.random.key(config.seed))
    iterator = iter(feature_dataset(training_shards(features_dirs), batch_size=pc.sequences_per_iteration,
                                    seed=config.seed, num_epochs=config.data.num_epochs, rows=rows, read_ahead=config.data.read_ahead))
    train_seconds = 0.0
    if resume_step is not None:
        state, train_seconds = resume(checkpointer, state, iterator, "iteration")

    outcome = train_loop(
        config, state=state, update=trainer.iteration, iterator=iterator, checkpointer=checkpointer,
        train_seconds=train_seconds, metrics_log=MetricsLog(workdir),
        scalars=lambda metrics: {**{k: float(v) for k, v in metrics.items()}, "gamma": gamma},
        postfix=lambda s: {"reward": f"{s['reward']:.3f}", "k": f"{s['accepted']:.2f}",
                           "kl": f"{s['kl_to_target']:.3f}"},
        probe=DevProbe.of_train_state(config, target, progress, drafter, trainer.drafter_params),
        unit="iteration", progress=progress, stop_at=stop_at, checkpoint_meta={"gamma": gamma, **run.data_meta})
    if outcome.finished:
        export_drafter(config, target, drafter, trainer.drafter_params(outcome.state), features_dirs,
                       {"stage": "ppow", "train_steps": int(outcome.state.step), "train_seconds": outcome.train_seconds,
                        "gamma": gamma, "init_from": str(config.init_from), "ppow": pc.to_dict()})
    return {k: float(v) for k, v in outcome.metrics.items()}


def run(config) -> int:
    from ppow_jax import multihost
    from ppow_jax.errors import InputError
    from ppow_jax.weights.registry import load_model

    stage = config.get("stage", "kd")
    trainers = {"kd": run_training, "ppow": run_ppow_training}
    if stage not in trainers:
        raise InputError(f"unknown stage {stage!r}; choose one of {', '.join(trainers)}")
    check_loop_settings(config)
    multihost.initialize(config.get("distributed") or {})
    target = load_model(config.target, param_dtype=config.param_dtype)
    check_feature_layers(config, target)
    metrics = trainers[stage](config, target)
    multihost.log(json.dumps({"final_metrics": metrics}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_config_entry_point(run, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
