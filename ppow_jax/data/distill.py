"""Self-distillation: the target answers the training prompts; the answers are cached on disk.

Drafters learn to predict the target, so they are trained on the target's own responses (EAGLE and
Medusa do the same). The answers are written as ArrayRecord shards, one per planned batch, each
renamed into place only when complete; `manifest.json` lists the finished shards. A rerun after an
interruption skips the prompts already answered, and refuses to mix settings (model, budget,
sampling) with a cache made under different ones.

The batches are planned before any is answered, and the plan is kept in the manifest: batch i is
shard i. Generation does not wait batch by batch: the prompts stream through `batch_size` rows
(continuous batching, `AutoregressiveDecoder.generate_continuously`), and shard i is written once
its last prompt is answered. Prompt j of batch i samples with the key fold_in(key(seed + i), j),
whichever prompts share the rows. A run that is interrupted and rerun with the same settings and
sizes writes the shards an uninterrupted one writes, however many processes share it: each process
(a host of a pod) answers every N-th planned batch (`process_share` says how they share the cache
and its manifest, and how an error on one reaches all). One caveat: prompts are prefilled in groups
padded to the longest of the group, and which prompts form a group depends on where a run starts,
so an answer can differ in the last bits of its logits, and rarely by a token where two are all but tied.

A record is JSON: {"key", "prompt": [ids], "response": [ids], "eos": bool}.

With `responses="reference"` the cache holds the records' own answers instead (Alpaca outputs,
GSM8K answers, the rest of a web text), tokenised and cut like a generation, in the same format:
no generation, so a cache of thousands of responses takes seconds. The target still labels every
position when the features are computed; only the text it is teacher-forced on is not its own
(EAGLE trains on fixed ShareGPT answers the same way). Prompts without a reference are skipped and listed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
from typing import Collection, Iterable, Iterator, Mapping, Optional, Sequence

from array_record.python import array_record_module

from ppow_jax.data.process_share import (ProcessShare, ShardListing, fold_in_process_manifests,
                                         unmerged_process_manifests, write_manifest)
from ppow_jax.data.sources import Prompt
from ppow_jax.errors import InputError
from ppow_jax.files import write_array_record
from ppow_jax.inference.autoregressive import AutoregressiveDecoder, Request
from ppow_jax.inference.sampling import SamplingParams
from ppow_jax.text.tokenizer import Tokenizer

MANIFEST = "manifest.json"
RESPONSE_SOURCES = ("target", "reference")  # who answers: the target (self-distillation), or the data's own answers


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """Everything that decides a cached response; a cache is only extended under equal settings."""

    model: str
    max_prompt_tokens: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    responses: str = "target"  # one of RESPONSE_SOURCES


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True))


def turn_end_token(tokenizer: Tokenizer) -> int:
    """The stop token the chat template closes an assistant turn with (SmolLM2: <|im_end|>), which is
    what ends the target's answers; the first stop token if the template writes none."""
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}],
                                         add_generation_prompt=False)
    ends = [i for i in tokenizer.encode(turn) if i in tokenizer.eos_token_ids]
    return ends[-1] if ends else tokenizer.eos_token_ids[0]


def reference_response(tokenizer: Tokenizer, prompt: Prompt, max_new_tokens: int, turn_end: int) -> tuple[list[int], bool]:
    """The prompt's reference answer as a generation would give it -> (ids ending in `turn_end`
    unless cut at `max_new_tokens`, whether it ended so)."""
    ids = tokenizer.encode(prompt.reference, add_bos=False) + [turn_end]
    return ids[:max_new_tokens], len(ids) <= max_new_tokens


def check_responses(responses: str) -> None:
    if responses not in RESPONSE_SOURCES:
        raise InputError(f"data.responses must be one of {', '.join(RESPONSE_SOURCES)}, got {responses!r}")


def read_manifest(cache_dir: pathlib.Path) -> dict:
    path = cache_dir / MANIFEST
    if not path.exists():
        return {"settings": None, "shards": [], "skipped_too_long": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is corrupt ({err}); delete the cache directory to regenerate it") from None


def cache_settings(cache_dir: str | pathlib.Path) -> dict:
    """The settings a cache was made under (`DistillSettings` as a dict; {} for no cache yet)."""
    return read_manifest(pathlib.Path(cache_dir))["settings"] or {}


def cached_prompt_keys(cache_dirs: Sequence[str | pathlib.Path]) -> set[str]:
    """The keys of every prompt some caches answered or plan to answer (`data.exclude_caches`).
    Prompts a cache skipped (too long, no reference) are not among them: under the same limits
    they are skipped again."""
    if isinstance(cache_dirs, (str, os.PathLike)):
        raise TypeError(f"cache_dirs is a sequence of cache directories, not one: {cache_dirs!r}")
    keys: set[str] = set()
    for cache_dir in map(pathlib.Path, cache_dirs):
        if not (cache_dir / MANIFEST).exists():
            raise InputError(f"data.exclude_caches names {cache_dir}, which holds no distillation ({MANIFEST} is missing)")
        manifest = read_manifest(cache_dir)
        entries = [*manifest.get("shards", []), *_planned(manifest)]
        if "skipped_too_long" not in manifest or any("keys" not in entry for entry in entries):
            raise InputError(f"data.exclude_caches names {cache_dir}, which is not a distillation cache "
                             "(a feature cache?)")
        keys.update(key for entry in entries for key in entry["keys"])
    return keys


def _fingerprint(keys: Collection[str]) -> dict:
    """What a cache's place records of the prompts it passed over: their count and a digest, so that
    a rerun after an excluded cache has grown or changed is refused rather than silently reordered."""
    return {"count": len(keys), "sha256": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()}


def _shard_index(shard: dict) -> int:
    return int(re.fullmatch(r"shard-(\d+)\.array_record", shard["file"]).group(1))


def _fold_in_process_manifests(cache_dir: pathlib.Path) -> None:
    fold_in_process_manifests(cache_dir, read_manifest(cache_dir), order=_shard_index, finish=_without_answered_plans)


def _planned(manifest: dict) -> list[dict]:
    """The batches of the manifest's plan, {"index", "keys"} each, answered or not."""
    return manifest.get("plan", {}).get("batches", [])


def _without_answered_plans(manifest: dict) -> dict:
    """The manifest with only the planned batches that no listed shard has answered yet (no plan
    once all are: a finished cache's manifest is as it was before plans existed)."""
    answered = {_shard_index(shard) for shard in manifest["shards"]}
    batches = [batch for batch in _planned(manifest) if batch["index"] not in answered]
    rest = {k: v for k, v in manifest.items() if k != "plan"}
    return {**rest, "plan": {**manifest["plan"], "batches": batches}} if batches else rest


def shard_paths(cache_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """The finished shards of a cache, in order; an empty or missing cache is an error, and so is one
    that an interrupted multi-process run left with shards `manifest.json` does not list yet."""
    cache_dir = pathlib.Path(cache_dir)
    shards = read_manifest(cache_dir)["shards"]
    if not shards:
        raise InputError(f"no self-distilled data in {cache_dir}: run `python -m ppow_jax.distill` first")
    if unmerged := unmerged_process_manifests(cache_dir):
        raise InputError(f"cache {cache_dir} holds shards of an interrupted multi-process distillation "
                         f"({', '.join(unmerged)}): rerun `python -m ppow_jax.distill` to finish it")
    paths = [cache_dir / s["file"] for s in shards]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(f"cache {cache_dir} lists shards that are missing: {', '.join(missing[:3])}")
    return paths


def _batches(items: Sequence, batch_size: int, sort_window: int) -> Iterable[list]:
    """Batches of similar prompt length (less padding), sorted within windows of `sort_window`."""
    for start in range(0, len(items), sort_window):
        window = sorted(items[start:start + sort_window], key=lambda item: len(item[1]))
        for i in range(0, len(window), batch_size):
            yield window[i:i + batch_size]


def _checked_caps(source_caps: Optional[Mapping[str, int]]) -> dict[str, int]:
    """The caps in force (zeros dropped); anything but a count of at least 0 is an error."""
    items = (source_caps or {}).items()
    bad = [f"{source}={cap!r}" for source, cap in items if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0]
    if bad:
        raise InputError(f"source_caps must be counts of at least 0 (0: no cap), not {', '.join(bad)}")
    return {source: cap for source, cap in items if cap}


def select_prompts(prompts: Sequence[Prompt], seed: int, *, max_prompts: int = 0, dev_prompts: int = 0,
                   split: str = "train", source_caps: Optional[Mapping[str, int]] = None,
                   skip_prompts: int = 0, exclude_keys: Collection[str] = ()) -> list[Prompt]:
    """The prompts of one split, in answering order: a seeded shuffle of all prompts, whose first
    `max_prompts` (0: all but the dev split) are "train" and whose last `dev_prompts` are "dev", a
    held-out split for measuring drafters during training. Raising `max_prompts` later extends
    "train" without touching "dev"; the two never overlap.

    `skip_prompts` passes over the first n prompts of "train", counted after the caps: "train" is
    then the next `max_prompts`, prompts a cache of the first n under the same caps never answered,
    for fine-tuning a drafter on data it has not seen.

    `source_caps` ({source: n}, 0 or absent: no cap) rebalances "train": once a source has
    contributed n prompts, its later prompts in the shuffle are passed over. The dev split is the
    same with or without caps. A cap no lower than what a source has in a cache's prefix leaves
    that prefix as it was, so a cache built without caps can be extended with them.

    `exclude_keys` (prompt keys, e.g. those earlier caches answered) are passed over in "train"
    before the caps and the skip are counted: a pool of prompts no earlier cache holds, whatever
    caps and skips those caches were made under. The dev split is the same with or without them.
    """
    caps = _checked_caps(source_caps)
    if caps:
        known = {prompt.source for prompt in prompts}
        if unknown := sorted(set(caps) - known):
            raise InputError(f"source_caps names {', '.join(unknown)}, not among the prompt sources "
                             f"({', '.join(sorted(known))})")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    if split == "dev":
        return order[len(order) - dev_prompts:] if dev_prompts else []
    if split != "train":
        raise InputError(f"unknown prompt split {split!r} (train or dev)")
    available = order[:len(order) - dev_prompts]
    if exclude_keys:
        excluded = frozenset(exclude_keys)
        available = [prompt for prompt in available if prompt.key not in excluded]
    if caps:
        taken: collections.Counter[str] = collections.Counter()
        capped: list[Prompt] = []
        for prompt in available:
            if prompt.source not in caps or taken[prompt.source] < caps[prompt.source]:
                taken[prompt.source] += 1
                capped.append(prompt)
        available = capped
    left = (f"only {len(available)} of {len(order)} prompts are left for training"
            + (" under source_caps" if caps else "") + (" without the excluded prompts" if exclude_keys else ""))
    if skip_prompts and skip_prompts >= len(available):
        raise InputError(f"skip_prompts={skip_prompts} leaves no training prompts: {left}")
    if skip_prompts + max_prompts > len(available):
        wanted = f"skip_prompts={skip_prompts} and max_prompts={max_prompts}" if skip_prompts else f"max_prompts={max_prompts}"
        raise InputError(f"{wanted} would overlap the {dev_prompts} dev prompts: {left}")
    available = available[skip_prompts:]
    return available[:max_prompts or len(available)]


def check_sizes(*, batch_size: int, max_prompts: int, dev_prompts: int, skip_prompts: int = 0) -> None:
    """The `config.data` sizes of a self-distillation, refused before any work when out of range."""
    for name, value, least in (("batch_size", batch_size, 1), ("max_prompts", max_prompts, 0),
                               ("dev_prompts", dev_prompts, 0), ("skip_prompts", skip_prompts, 0)):
        if not isinstance(value, int) or value < least:
            raise InputError(f"data.{name} must be an integer >= {least}, got {value!r}")


def self_distill(decoder: Optional[AutoregressiveDecoder], tokenizer: Tokenizer, prompts: Sequence[Prompt],
                 cache_dir: str | pathlib.Path, settings: DistillSettings, *, batch_size: int,
                 max_prompts: int = 0, dev_prompts: int = 0, split: str = "train",
                 source_caps: Optional[Mapping[str, int]] = None, skip_prompts: int = 0,
                 exclude_caches: Sequence[str | pathlib.Path] = (), progress: bool = True,
                 share: ProcessShare = ProcessShare()) -> dict:
    """Answers the prompts of `split` (see `select_prompts`) into `cache_dir`, this process the
    planned batches of its `share`: with `decoder` (the target), or with the prompts' reference
    answers when `settings.responses` is "reference" (no decoder needed). The prompts that
    `exclude_caches` hold are passed over in "train" (`select_prompts`' `exclude_keys`).

    Returns the manifest. Prompts longer than `settings.max_prompt_tokens` are skipped and listed.
    """
    check_sizes(batch_size=batch_size, max_prompts=max_prompts, dev_prompts=dev_prompts, skip_prompts=skip_prompts)
    check_responses(settings.responses)
    if decoder is None and settings.responses == "target":
        raise ValueError("self-distillation needs the target's decoder")
    cache_dir = pathlib.Path(cache_dir)
    # Process 0 alone plans (and writes manifest.json); the split's size is known to it only.
    split_prompts = share.on_primary(
        lambda: _plan(tokenizer, prompts, cache_dir, settings, batch_size=batch_size, max_prompts=max_prompts,
                      dev_prompts=dev_prompts, split=split, source_caps=source_caps, skip_prompts=skip_prompts,
                      exclude_caches=exclude_caches),
        f"process 0 could not plan the distillation into {cache_dir}")
    manifest = share.read_agreed(lambda: read_manifest(cache_dir), str(cache_dir / MANIFEST))
    planned = _planned(manifest)

    by_key = {prompt.key: prompt for prompt in prompts}
    turn_end = turn_end_token(tokenizer) if settings.responses == "reference" else None
    mine = planned[share.index::share.count]
    sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p)
    bar = share.progress_bar(total=split_prompts, to_do=sum(len(b["keys"]) for b in planned),
                             mine=sum(len(b["keys"]) for b in mine), desc=f"self-distill ({split})", unit="prompt",
                             progress=progress)
    listing = ShardListing(cache_dir, share, manifest, order=_shard_index, finish=_without_answered_plans)
    problem: Optional[BaseException] = None
    try:  # from here on a failure must reach `finish`, where the other processes wait
        prompt_ids = {key: encode_prompt(tokenizer, by_key[key]) for batch in mine for key in batch["keys"]}
        if settings.responses == "reference":
            answered = ((batch, [reference_response(tokenizer, by_key[key], settings.max_new_tokens, turn_end)
                                 for key in batch["keys"]]) for batch in mine)
        else:
            answered = _generated_batches(decoder, mine, prompt_ids, settings, sampling, slots=batch_size,
                                          on_answer=lambda: bar.update(1))
        for batch, answers in answered:
            records = [{"key": key, "prompt": prompt_ids[key], "response": out, "eos": eos}
                       for key, (out, eos) in zip(batch["keys"], answers)]
            name = f"shard-{batch['index']:05d}.array_record"
            write_array_record(cache_dir / name, (json.dumps(record).encode() for record in records))
            listing.add({"file": name, "keys": batch["keys"],
                         "response_tokens": sum(len(r["response"]) for r in records)})
            if settings.responses == "reference":
                bar.update(len(batch["keys"]))
            bar.set_postfix(tokens=sum(s["response_tokens"] for s in listing.listed()))
    except BaseException as err:  # noqa: BLE001 (raised by `finish`, once every process knows)
        problem = err
    bar.close()
    share.finish(problem, lambda: _fold_in_process_manifests(cache_dir), cache_dir)
    return read_manifest(cache_dir)


def _generated_batches(decoder: AutoregressiveDecoder, batches: Sequence[dict], prompt_ids: Mapping[str, list[int]],
                       settings: DistillSettings, sampling: SamplingParams, *, slots: int,
                       on_answer) -> Iterator[tuple[dict, list[tuple[list[int], bool]]]]:
    """(batch, [(response, ended by EOS)] in key order) for each planned batch, as its last prompt is
    answered; all prompts stream through `slots` rows in plan order."""
    requests = (Request((batch["index"], row), prompt_ids[key], seed=settings.seed + batch["index"], stream=row)
                for batch in batches for row, key in enumerate(batch["keys"]))
    by_index = {batch["index"]: batch for batch in batches}
    answers: dict[int, list] = {batch["index"]: [None] * len(batch["keys"]) for batch in batches}
    missing = {batch["index"]: len(batch["keys"]) for batch in batches}
    # Rows sized for the longest prompt here, not the setting's limit: attention reads every slot.
    longest = max(map(len, prompt_ids.values()), default=1)
    for answer in decoder.generate_continuously(requests, settings.max_new_tokens, sampling, max_prompt_len=longest,
                                                slots=slots):
        index, row = answer.request.id
        answers[index][row] = (answer.tokens, answer.finished_by_eos)
        missing[index] -= 1
        on_answer()
        if not missing[index]:
            yield by_index[index], answers.pop(index)
    if answers:
        raise RuntimeError(f"the decoder never answered every prompt of planned batches {sorted(answers)}")


def _where(start: dict) -> str:
    """A cache's place in the training order, for errors."""
    if not start:
        return "at the start of the shuffle"
    where = f"after its first {start['skip_prompts']} prompts" if start["skip_prompts"] else "at the start of the shuffle"
    where += f" under source_caps {start['source_caps'] or 'none'}"
    if excluded := start.get("excluded_prompts"):
        where += f", passing over {excluded['count']} prompts of earlier caches (sha256 {excluded['sha256'][:12]})"
    return where


def _plan(tokenizer: Tokenizer, prompts: Sequence[Prompt], cache_dir: pathlib.Path, settings: DistillSettings, *,
          batch_size: int, max_prompts: int, dev_prompts: int, split: str,
          source_caps: Optional[Mapping[str, int]], skip_prompts: int,
          exclude_caches: Sequence[str | pathlib.Path]) -> int:
    """Process 0's part before any answering: merges what an interrupted run finished, checks the
    settings and caps, lists the skipped prompts and writes the plan (`plan`: the batch size and the
    batches, each with its shard index) into manifest.json. A plan already there for the same batch
    size is kept, so a rerun answers the same batches. -> the number of prompts in the split."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    _fold_in_process_manifests(cache_dir)
    manifest = read_manifest(cache_dir)
    wanted = dataclasses.asdict(settings)
    stored = manifest["settings"]
    # A cache from before `responses` existed holds the target's answers; its settings stay as written,
    # so the feature caches that name them stay valid.
    if stored is not None and {"responses": "target", **stored} != wanted:
        raise InputError(f"cache {cache_dir} was made with settings {stored}, not {wanted}; "
                         "use another cache directory")
    if stored is None:
        manifest["settings"] = wanted
    # Where "train" starts in the shuffle is part of what a cache holds (absent: 0, as before it
    # existed), and so are the caps it was counted under and the prompts it passed over.
    skip = skip_prompts if split == "train" else 0
    caps = _checked_caps(source_caps)
    if split == "train" and any(pathlib.Path(path).resolve() == cache_dir.resolve() for path in exclude_caches):
        raise InputError(f"data.exclude_caches names the cache being made, {cache_dir}")
    excluded = cached_prompt_keys(exclude_caches) if split == "train" else set()
    place = {"skip_prompts": skip, "source_caps": caps} if skip or excluded else {}
    if excluded:
        place["excluded_prompts"] = _fingerprint(excluded)
    if manifest.get("start", {}) != place and (manifest["shards"] or _planned(manifest)):
        raise InputError(f"cache {cache_dir} starts {_where(manifest.get('start', {}))}, not {_where(place)} "
                         "(data.skip_prompts, data.source_caps, data.exclude_caches: an excluded cache that has "
                         "grown or changed moves it); use another cache directory")
    manifest.pop("start", None)
    if place:
        manifest["start"] = place

    order = select_prompts(prompts, settings.seed, max_prompts=max_prompts, dev_prompts=dev_prompts, split=split,
                           source_caps=source_caps, skip_prompts=skip, exclude_keys=excluded)
    answered = [key for shard in manifest["shards"] for key in shard["keys"]]
    done = set(answered) | set(manifest["skipped_too_long"]) | set(manifest.get("skipped_no_reference", []))
    if split == "train" and caps:
        # A cache keeps what it has answered: a cap below a source's count in it cannot hold.
        source_of = {prompt.key: prompt.source for prompt in prompts}
        cached = collections.Counter(source_of[key] for key in answered if key in source_of)
        over = [f"{source} has {cached[source]} (cap {cap})" for source, cap in caps.items() if cached[source] > cap]
        if over:
            raise InputError(f"cache {cache_dir} already holds more answered prompts than source_caps allow: "
                             f"{'; '.join(over)}; raise the caps to at least those counts or use another cache")
    todo = []
    for prompt in order:
        if prompt.key in done:
            continue
        if settings.responses == "reference" and not prompt.reference:
            manifest.setdefault("skipped_no_reference", []).append(prompt.key)
            continue
        ids = encode_prompt(tokenizer, prompt)
        if len(ids) > settings.max_prompt_tokens:
            manifest["skipped_too_long"].append(prompt.key)
        else:
            todo.append((prompt, ids))

    # Batches planned by an interrupted run keep their place and shard index; prompts that are new
    # to the plan (a raised max_prompts, a new batch size, a cache from before plans) are batched after.
    wanted_keys = {prompt.key for prompt, _ in todo}
    same_size = manifest.get("plan", {}).get("batch_size") == batch_size
    kept = [batch for batch in _planned(_without_answered_plans(manifest))
            if same_size and set(batch["keys"]) <= wanted_keys]
    in_plan = {key for batch in kept for key in batch["keys"]}
    new = [(prompt, ids) for prompt, ids in todo if prompt.key not in in_plan]
    next_index = 1 + max([_shard_index(shard) for shard in manifest["shards"]] + [b["index"] for b in kept], default=-1)
    fresh = _batches(new, batch_size, sort_window=batch_size * 16)
    manifest["plan"] = {"batch_size": batch_size, "batches": kept + [
        {"index": next_index + number, "keys": [prompt.key for prompt, _ in batch]} for number, batch in enumerate(fresh)]}
    write_manifest(cache_dir, _without_answered_plans(manifest))
    return len(order)


def read_records(paths: Sequence[pathlib.Path], limit: Optional[int] = None) -> list[dict]:
    """All records of some shards (tests and small tools; training reads through Grain)."""
    records = []
    for path in paths:
        reader = array_record_module.ArrayRecordReader(str(path))
        records.extend(json.loads(b) for b in reader.read_all())
        reader.close()
        if limit is not None and len(records) >= limit:
            return records[:limit]
    return records
