"""Token-level drafter training: readers, self-distillation, feature cache, the unrolled forward,
a tiny end-to-end run, exact resume and checkpoint errors."""

import collections
import dataclasses
import json
import pathlib
import shutil
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python import array_record_module

from conftest import REPO_ROOT, load_config, tiny_config, tiny_distillation, tiny_params
from ppow_jax.data import distill as distill_module
from ppow_jax.data import features as features_module
from ppow_jax.data import sources
from ppow_jax.data.distill import (DistillSettings, cached_prompt_keys, read_manifest, read_records, select_prompts,
                                  self_distill, shard_paths)
from ppow_jax.data.features import build_feature_cache, decode_example, feature_shards
from ppow_jax.data.process_share import ProcessShare
from ppow_jax.drafters.eagle import Eagle3Drafter, unrolled_hidden
from ppow_jax.drafters.store import load_drafter
from ppow_jax.errors import CheckpointError, InputError
from ppow_jax.inference.autoregressive import AutoregressiveDecoder
from ppow_jax.inference.speculative import SpeculativeDecoder
from ppow_jax.inference.windows import WindowPolicy
from ppow_jax.models import llama
from ppow_jax.training.checkpoints import Checkpointer

ALL_FOLDERS = ("sharegpt", "alpaca_cleaned_1k", "alpaca_en_demo", "alpaca_seed_tasks", "gsm8k_train", "c4_demo",
               "wiki_demo")


# ----- readers -----

def test_readers_on_the_real_training_data(shared_data_root):
    prompts, report = sources.read_training_prompts(shared_data_root, ALL_FOLDERS)
    # The two alpaca_en_demo instructions that equal eval/alpaca prompts (data README) are removed.
    assert report.contaminated == {"alpaca_en_demo": 2}
    assert report.kept["gsm8k_train"] == 7473 and report.kept["alpaca_seed_tasks"] == 175
    assert report.kept["c4_demo"] == 300 and report.kept["wiki_demo"] == 30
    assert sum(report.kept.values()) == len(prompts) > 13000
    eval_texts = sources.eval_prompt_texts(shared_data_root)
    assert not any(p.contamination_keys() & eval_texts for p in prompts)
    assert len({p.key for p in prompts}) == len(prompts)
    assert all(p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip() for p in prompts)


@pytest.mark.parametrize("reader,content,kept", [
    (sources.read_sharegpt, '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}, {"id": "b"}, 3,'
                            ' {"id": "c", "conversations": [{"from": "gpt", "value": "x"}]}]', 1),
    (sources.read_alpaca, '[{"instruction": "Do", "input": "x"}, {"instruction": ""}, {"input": "y"}, []]', 1),
    (sources.read_alpaca_seed_tasks, '{"id": "s", "instruction": "I", "instances": [{"input": ""}, {"input": "z"}]}\n'
                                     'not json\n{"instruction": "J", "instances": []}\n', 2),
    (sources.read_gsm8k, '{"question": "q?", "answer": "a"}\n{"answer": "a"}\n[1]\n{"question": "r?"}\n', 2),
    (sources.read_text_jsonl, '{"text": "words here"}\n{"text": 5}\n{bad\n', 1),
])
def test_readers_skip_malformed_records_with_a_count(tmp_path, reader, content, kept):
    path = tmp_path / "data.json"
    path.write_text(content)
    report = sources.ReadReport()
    prompts = list(reader(path, report, "src"))
    assert len(prompts) == kept
    assert report.malformed["src"] >= 1


def test_unreadable_files_are_errors_naming_them(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{not json")
    with pytest.raises(InputError, match="broken.json"):
        list(sources.read_alpaca(path, sources.ReadReport(), "src"))
    with pytest.raises(InputError, match="does not exist"):
        sources.training_files(tmp_path, ["nope"])


def test_a_prepared_tfds_source_adds_prompts_and_is_decontaminated(shared_data_root):
    eval_prompt = next(iter(sources.eval_prompt_texts(shared_data_root)))
    records = [{"text": b"Explain tides."}, {"text": eval_prompt}, {"text": ""}, {"other": "x"}]
    prompts, report = sources.read_training_prompts(
        shared_data_root, ["alpaca_seed_tasks"], {"name": "toy", "split": "train", "field": "text", "data_source": records})
    tfds_prompts = [p for p in prompts if p.key.startswith("tfds:toy/")]
    assert [p.text for p in tfds_prompts] == ["Explain tides."]
    assert report.contaminated["tfds:toy"] == 1 and report.malformed["tfds:toy"] == 2
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="tensorflow-datasets"):
            list(sources.read_tfds_prompts("toy"))


def test_self_distillation_resumes_and_pins_settings(distilled, tiny_target, shared_data_root):
    config, first, second = distilled
    first_keys = [k for s in first["shards"] for k in s["keys"]]
    second_keys = [k for s in second["shards"] for k in s["keys"]]
    assert second_keys[:len(first_keys)] == first_keys  # the first run's shards are kept, not redone
    assert len(second_keys) + len(second["skipped_too_long"]) == 16 and len(set(second_keys)) == len(second_keys)
    records = read_records(shard_paths(config.data.cache_dir))
    assert [r["key"] for r in records] == second_keys
    # Greedy responses are the target's: regenerating one gives the same tokens.
    tok = tiny_target.tokenizer
    decoder = AutoregressiveDecoder(tiny_target.config, tiny_target.params, eos_token_ids=tok.eos_token_ids,
                                    pad_token_id=tok.pad_token_id or 0)
    assert decoder.generate([records[0]["prompt"]], config.data.max_new_tokens).tokens[0] == records[0]["response"]
    prompts, _ = sources.read_training_prompts(shared_data_root, ["alpaca_seed_tasks"])
    other = DistillSettings(model="", max_prompt_tokens=128, max_new_tokens=99, temperature=0.0, top_p=1.0, seed=0)
    with pytest.raises(InputError, match="settings"):
        self_distill(decoder, tok, prompts, config.data.cache_dir, other, batch_size=4, progress=False)
    dev = read_records(shard_paths(config.data.dev_cache_dir))
    assert dev and not {r["key"] for r in dev} & set(second_keys)
    # A cap below what the cache already holds of a source cannot hold: refused, the cache untouched.
    same = DistillSettings(model="", max_prompt_tokens=config.data.max_prompt_tokens,
                           max_new_tokens=config.data.max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
    both, _ = sources.read_training_prompts(shared_data_root, ["alpaca_seed_tasks", "gsm8k_train"])
    cached_gsm8k = sum(key.startswith("gsm8k_train/") for key in second_keys)
    assert cached_gsm8k > 1
    manifest = (pathlib.Path(config.data.cache_dir) / "manifest.json").read_text()
    with pytest.raises(InputError, match=f"gsm8k_train has {cached_gsm8k} \\(cap 1\\)"):
        self_distill(decoder, tok, both, config.data.cache_dir, same, batch_size=4, max_prompts=20,
                     dev_prompts=config.data.dev_prompts, source_caps={"gsm8k_train": 1}, progress=False)
    # So is extending it from another place in the shuffle (data.skip_prompts).
    with pytest.raises(InputError, match="starts at the start of the shuffle, not after its first 4 prompts"):
        self_distill(decoder, tok, prompts, config.data.cache_dir, same, batch_size=4, max_prompts=20,
                     dev_prompts=config.data.dev_prompts, skip_prompts=4, progress=False)
    assert (pathlib.Path(config.data.cache_dir) / "manifest.json").read_text() == manifest
    # A cache of the prompts after the first 16 records its place; rerun from the start it is refused.
    after = pathlib.Path(config.data.cache_dir).parent / "after-16"
    self_distill(decoder, tok, prompts, after, same, batch_size=4, max_prompts=4, skip_prompts=16,
                 dev_prompts=config.data.dev_prompts, progress=False)
    assert read_manifest(after)["start"] == {"skip_prompts": 16, "source_caps": {}}
    assert not {k for s in read_manifest(after)["shards"] for k in s["keys"]} & set(second_keys)
    with pytest.raises(InputError, match="starts after its first 16 prompts under source_caps none, not at the start"):
        self_distill(decoder, tok, prompts, after, same, batch_size=4, max_prompts=4,
                     dev_prompts=config.data.dev_prompts, progress=False)
    # A pool that passes over what both caches hold (data.exclude_caches): none of their prompts, in
    # the order of the rest; the exclusion is part of its place, so a rerun without it is refused.
    pool = pathlib.Path(config.data.cache_dir).parent / "pool"
    held = cached_prompt_keys([config.data.cache_dir, after])
    assert held == set(second_keys) | {k for s in read_manifest(after)["shards"] for k in s["keys"]}
    self_distill(decoder, tok, prompts, pool, same, batch_size=4, max_prompts=4, dev_prompts=config.data.dev_prompts,
                 exclude_caches=[config.data.cache_dir, after], progress=False)
    pool_keys = [k for s in read_manifest(pool)["shards"] for k in s["keys"]]
    rest = select_prompts(prompts, 0, dev_prompts=config.data.dev_prompts, exclude_keys=held)
    assert sorted(pool_keys) == sorted(p.key for p in rest[:4]) and not set(pool_keys) & held
    assert read_manifest(pool)["start"]["excluded_prompts"]["count"] == len(held)
    with pytest.raises(InputError, match=f"passing over {len(held)} prompts of earlier caches .*, not at the start"):
        self_distill(decoder, tok, prompts, pool, same, batch_size=4, max_prompts=4,
                     dev_prompts=config.data.dev_prompts, progress=False)
    # An excluded cache that has grown moves the pool's place: refused, not silently reordered.
    grown = json.loads((after / "manifest.json").read_text())
    grown["plan"] = {"batch_size": 4, "batches": [{"index": 9, "keys": [rest[5].key]}]}
    (after / "manifest.json").write_text(json.dumps(grown))
    with pytest.raises(InputError, match=f"passing over {len(held) + 1} prompts"):
        self_distill(decoder, tok, prompts, pool, same, batch_size=4, max_prompts=4,
                     dev_prompts=config.data.dev_prompts, exclude_caches=[config.data.cache_dir, after], progress=False)
    # The dev split is the same for every pool: it passes over nothing and records no place.
    self_distill(decoder, tok, prompts, config.data.dev_cache_dir, same, batch_size=4, split="dev",
                 dev_prompts=config.data.dev_prompts, exclude_caches=[config.data.cache_dir], progress=False)
    assert "start" not in read_manifest(pathlib.Path(config.data.dev_cache_dir))
    with pytest.raises(InputError, match="no-such-cache, which holds no distillation"):
        self_distill(decoder, tok, prompts, pool.parent / "other", same, batch_size=4, max_prompts=4,
                     exclude_caches=[pool.parent / "no-such-cache"], progress=False)
    with pytest.raises(InputError, match="names the cache being made"):
        self_distill(decoder, tok, prompts, pool, same, batch_size=4, max_prompts=4, exclude_caches=[pool],
                     progress=False)


def test_readers_keep_the_records_own_answers_as_references(shared_data_root):
    prompts, _ = sources.read_training_prompts(shared_data_root, ALL_FOLDERS)
    by_source = collections.defaultdict(list)
    for prompt in prompts:
        by_source[prompt.source].append(prompt)
    gsm8k = json.loads((shared_data_root / "train/gsm8k_train/train.jsonl").read_text().splitlines()[0])
    first = by_source["gsm8k_train"][0]
    assert first.text == gsm8k["question"]
    # Calculator annotations go; the worked answer stays.
    assert first.reference == gsm8k["answer"].replace("<<48/2=24>>", "").replace("<<48+24=72>>", "")
    assert not any("<<" in p.reference for p in by_source["gsm8k_train"])
    alpaca = json.loads((shared_data_root / "train/alpaca_cleaned_1k/alpaca_data_cleaned_1000.json").read_text())
    assert by_source["alpaca_cleaned_1k"][0].reference == alpaca[0]["output"].strip()
    # A web text: the prompt holds its opening words, the reference the rest.
    text = json.loads((shared_data_root / "train/c4_demo/c4_demo.jsonl").read_text().splitlines()[0])["text"]
    c4 = by_source["c4_demo"][0]
    assert " ".join(text.split()) == c4.messages[-1]["content"].split("\n\n", 1)[1] + " " + " ".join(c4.reference.split())
    assert text.rstrip().endswith(c4.reference)  # as written, line breaks kept
    wiki = by_source["wiki_demo"][0]
    assert "\n" not in wiki.reference or wiki.reference in (shared_data_root / "train/wiki_demo/wiki_demo.txt").read_text()
    assert not any(p.reference for p in by_source["sharegpt"])  # the files carry no replies
    assert all(p.reference for p in by_source["alpaca_seed_tasks"] + by_source["wiki_demo"])


def test_a_reference_cache_holds_the_records_answers_and_the_dev_split_stays_the_targets(
        distilled, tiny_target, shared_data_root, tmp_path):
    from ppow_jax.distill import run_distillation

    config = load_config("tiny_kd")
    config.data.folders = ("alpaca_seed_tasks", "gsm8k_train", "sharegpt")
    config.data.cache_dir, config.data.dev_cache_dir = str(tmp_path / "reference"), str(tmp_path / "dev")
    config.data.max_prompts, config.data.dev_prompts, config.data.max_new_tokens = 24, 4, 40
    config.data.responses = "reference"
    run_distillation(config, tiny_target, progress=False)
    manifest = read_manifest(tmp_path / "reference")
    assert manifest["settings"]["responses"] == "reference"
    assert read_manifest(tmp_path / "dev")["settings"]["responses"] == "target"
    prompts, _ = sources.read_training_prompts(shared_data_root, config.data.folders)
    by_key = {p.key: p for p in prompts}
    records = read_records(shard_paths(tmp_path / "reference"))
    skipped = manifest["skipped_no_reference"]
    assert skipped and all(key.startswith("sharegpt/") for key in skipped)
    assert len(records) + len(skipped) + len(manifest["skipped_too_long"]) == 24
    tok = tiny_target.tokenizer
    eos = distill_module.turn_end_token(tok)
    assert tok.decode([eos], skip_special_tokens=False) == "<|im_end|>"  # what ends SmolLM2's chat turns
    for record in records:
        prompt = by_key[record["key"]]
        assert record["prompt"] == distill_module.encode_prompt(tok, prompt)
        whole = tok.encode(prompt.reference) + [eos]  # SmolLM2 adds no BOS
        assert record["response"] == whole[:40] and record["eos"] == (len(whole) <= 40)
    assert {r["eos"] for r in records} == {True, False}  # some answers fit in 40 tokens, some are cut
    # A target cache is never extended with reference answers, nor the other way round.
    target_settings = DistillSettings(**{**manifest["settings"], "responses": "target"})
    decoder = tiny_distillation(tiny_target, shared_data_root)[1]
    with pytest.raises(InputError, match="settings"):
        self_distill(decoder, tok, prompts, tmp_path / "reference", target_settings, batch_size=4, progress=False)
    with pytest.raises(InputError, match="settings"):
        self_distill(None, tok, prompts, distilled[0].data.cache_dir, dataclasses.replace(target_settings, **{
            k: v for k, v in read_manifest(pathlib.Path(distilled[0].data.cache_dir))["settings"].items() if k != "responses"},
            responses="reference"), batch_size=4, max_prompts=16, progress=False)
    # A cache from before `responses` existed is the target's: extended as such, its settings left as written.
    old = tmp_path / "old-target-cache"
    shutil.copytree(distilled[0].data.cache_dir, old)
    old_manifest = json.loads((old / "manifest.json").read_text())
    del old_manifest["settings"]["responses"]
    (old / "manifest.json").write_text(json.dumps(old_manifest))
    self_distill(decoder, tok, prompts, old, DistillSettings(**old_manifest["settings"]), batch_size=4, max_prompts=16,
                 dev_prompts=distilled[0].data.dev_prompts, progress=False)
    assert read_manifest(old)["settings"] == old_manifest["settings"]
    # Resumed with more prompts: the cache grows, nothing is answered or skipped twice.
    config.data.max_prompts = 40
    run_distillation(config, tiny_target, progress=False)
    grown = read_manifest(tmp_path / "reference")
    keys = [k for shard in grown["shards"] for k in shard["keys"]]
    assert keys[:len(records)] == [r["key"] for r in records] and len(keys) > len(records)
    assert len(set(keys)) == len(keys) and len(set(grown["skipped_no_reference"])) == len(grown["skipped_no_reference"])
    assert len(keys) + len(grown["skipped_no_reference"]) + len(grown["skipped_too_long"]) == 40
    # PPOW's cache verifier and the adaptive window's calibration need the target's own answers.
    from ppow_jax.train import run_ppow_training, run_training
    config.workdir, config.train.steps = str(tmp_path / "kd"), 2
    run_training(config, tiny_target, progress=False)
    described = json.loads((tmp_path / "kd" / "drafter" / "drafter.json").read_text())
    assert "data's own answers" in described["window_calibration_skipped"] and "window_calibration" not in described
    ppow = load_config("tiny_ppow")
    ppow.data.cache_dir, ppow.init_from, ppow.workdir = config.data.cache_dir, str(tmp_path / "kd" / "drafter"), str(tmp_path / "p")
    with pytest.raises(InputError, match="ppow.verifier='cache' needs the target's greedy responses"):
        run_ppow_training(ppow, tiny_target, progress=False)
    with pytest.raises(InputError, match="data.responses must be one of target, reference, got 'teacher'"):
        self_distill(None, tok, prompts, tmp_path / "other", dataclasses.replace(target_settings, responses="teacher"),
                     batch_size=4, progress=False)


class _ThreadGather:
    """`ProcessShare.gather` for processes simulated as threads of this one."""

    def __init__(self, processes: int):
        self.barrier = threading.Barrier(processes, timeout=120)
        self.values = [0] * processes

    def of(self, process: int):
        def gather(value: int) -> list[int]:
            self.values[process] = value
            self.barrier.wait()
            values = list(self.values)
            self.barrier.wait()  # nobody overwrites a value before all have read them
            return values

        return gather


def _as_two_threads(run) -> list[Optional[BaseException]]:
    """Runs `run(index, share)` as processes 0 and 1 of a shared distillation -> what each raised."""
    gather, errors = _ThreadGather(2), [None, None]

    def process(index):
        try:
            run(index, ProcessShare(index, 2, gather.of(index)))
        except BaseException as err:  # noqa: BLE001 (KeyboardInterrupt too: it is what is tested)
            errors[index] = err

    threads = [threading.Thread(target=process, args=(index,), name=f"process-{index}") for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a process is still running"
    assert not gather.barrier.broken, "a process was left waiting for the other"
    return errors


class _StoppedDecoder:
    def generate_continuously(self, *args, **kwargs):
        raise RuntimeError("process 0 stopped")


def test_a_shared_distillation_that_fails_on_one_process_resumes_into_the_uninterrupted_cache(
        distilled, tiny_target, shared_data_root, tmp_path):
    config, _, _ = distilled
    prompts, decoder, settings = tiny_distillation(tiny_target, shared_data_root)
    settings = dataclasses.replace(settings, temperature=0.8)  # sampled: each shard's seed shows
    distill = lambda directory, **kwargs: self_distill(
        kwargs.pop("decoder", decoder), tiny_target.tokenizer, prompts, directory, settings, batch_size=4,
        max_prompts=16, dev_prompts=config.data.dev_prompts, progress=False, **kwargs)
    one_shot = distill(tmp_path / "one-shot")
    assert len(one_shot["shards"]) == 4 and "plan" not in one_shot

    # Two processes share the run; process 0 fails before its first batch: both raise, neither hangs.
    errors = _as_two_threads(lambda index, share: distill(tmp_path / "shared", share=share,
                                                          decoder=_StoppedDecoder() if index == 0 else decoder))
    assert "process 0 stopped" in str(errors[0])
    assert isinstance(errors[1], InputError) and "processes [0] failed" in str(errors[1])
    # Process 1's batches (1 and 3) are listed; batches 0 and 2 stay planned.
    partial = read_manifest(tmp_path / "shared")
    assert [s["file"] for s in partial["shards"]] == ["shard-00001.array_record", "shard-00003.array_record"]
    assert [b["index"] for b in partial["plan"]["batches"]] == [0, 2]

    # A rerun at another batch size plans the rest anew, at that size.
    shutil.copytree(tmp_path / "shared", tmp_path / "resized")
    resized = self_distill(decoder, tiny_target.tokenizer, prompts, tmp_path / "resized", settings, batch_size=2,
                           max_prompts=16, dev_prompts=config.data.dev_prompts, progress=False)
    assert resized["shards"][:2] == partial["shards"] and [len(s["keys"]) for s in resized["shards"][2:]] == [2] * 4

    # One process finishes the plan: the shards, their seeds and so the responses are the one-shot run's.
    resumed = distill(tmp_path / "shared")
    strip = lambda manifest: [{k: v for k, v in s.items() if k != "process"} for s in manifest["shards"]]
    assert strip(resumed) == one_shot["shards"] and "plan" not in resumed
    read = lambda directory: read_records(shard_paths(directory))
    assert read(tmp_path / "shared") == read(tmp_path / "one-shot")


class _InterruptedDecoder:
    def generate_continuously(self, *args, **kwargs):
        raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["planning", "answering"])
def test_an_error_on_one_process_is_raised_on_every_process(distilled, tiny_target, shared_data_root, tmp_path,
                                                              monkeypatch, where):
    config, _, _ = distilled
    prompts, decoder, settings = tiny_distillation(tiny_target, shared_data_root)
    if where == "planning":  # process 0 alone plans: a tokenizer or storage error there
        monkeypatch.setattr(distill_module, "select_prompts", _raises(ValueError("no prompts today")))

    def run(index, share):
        self_distill(_InterruptedDecoder() if index == 1 else decoder, tiny_target.tokenizer, prompts, tmp_path,
                     settings, batch_size=4, max_prompts=16, dev_prompts=config.data.dev_prompts, progress=False,
                     share=share)

    errors = _as_two_threads(run)
    if where == "planning":
        assert "no prompts today" in str(errors[0])
        assert "process 0 could not plan" in str(errors[1])
    else:  # Ctrl-C on process 1: process 0 answers its own batches, then stops with the reason
        assert isinstance(errors[1], KeyboardInterrupt)
        assert "processes [1] failed" in str(errors[0])
        assert [s["process"] for s in read_manifest(tmp_path)["shards"]] == [0, 0]


def _raises(error):
    def raise_it(*args, **kwargs):
        raise error
    return raise_it


def test_unmerged_process_manifests_are_refused_until_a_rerun_merges_them(distilled, tiny_target, shared_data_root,
                                                                         tmp_path):
    config, _, _ = distilled
    shutil.copytree(config.data.cache_dir, tmp_path, dirs_exist_ok=True)
    manifest = read_manifest(tmp_path)
    last = manifest["shards"].pop()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "manifest.process-1.json").write_text(json.dumps({"settings": manifest["settings"],
                                                                 "shards": [{**last, "process": 1}]}))
    with pytest.raises(InputError, match="interrupted multi-process distillation .*manifest.process-1.json"):
        shard_paths(tmp_path)
    # A rerun merges them, unless they were made under other settings.
    prompts, decoder, settings = tiny_distillation(tiny_target, shared_data_root)
    rerun = lambda: self_distill(decoder, tiny_target.tokenizer, prompts, tmp_path, settings, batch_size=4,
                                 max_prompts=16, dev_prompts=config.data.dev_prompts, progress=False)
    good = (tmp_path / "manifest.process-1.json").read_text()
    (tmp_path / "manifest.process-1.json").write_text(json.dumps({"settings": {"seed": 7}, "shards": [last]}))
    with pytest.raises(InputError, match="manifest.process-1.json lists shards made with settings"):
        rerun()
    (tmp_path / "manifest.process-1.json").write_text(good)
    assert [s["keys"] for s in rerun()["shards"]] == [s["keys"] for s in manifest["shards"] + [last]]
    assert len(shard_paths(tmp_path)) == len(manifest["shards"]) + 1


def _build_features(target, distill_dir, out_dir, **kwargs) -> dict:
    config = load_config("tiny_kd")
    return build_feature_cache(target.config, target.params, distill_dir, out_dir,
                               feature_layers=tuple(config.drafter.feature_layers), seq_len=config.data.seq_len,
                               batch_size=kwargs.pop("batch_size", 4), pad_token_id=0, progress=False, **kwargs)


def _cached_examples(cache_dir: pathlib.Path) -> list[dict]:
    """Every example of a feature cache, in order, features and hidden states as float32."""
    reader = features_module.grain.sources.ArrayRecordDataSource([str(p) for p in feature_shards(cache_dir)])
    examples = [decode_example(reader[i]) for i in range(len(reader))]
    return [{k: v.astype(np.float32) if k in ("features", "target_hidden") else v for k, v in e.items()}
            for e in examples]


def _assert_same_examples(got: list[dict], want: list[dict], exact: bool) -> None:
    assert len(got) == len(want)
    for row, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys()
        for key in a:
            if exact or key in ("tokens", "loss_mask"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"example {row} {key}")
            else:  # computed in batches of another size: bfloat16 rounding may differ
                np.testing.assert_allclose(a[key], b[key], rtol=2e-2, atol=2e-2, err_msg=f"example {row} {key}")


def _fails_on_process_0_after(calls: int, original):
    """`original`, but raising on the thread standing for process 0 once it has called it `calls` times."""
    made = collections.Counter()

    def wrapped(*args, **kwargs):
        name = threading.current_thread().name
        made[name] += 1
        if name == "process-0" and made[name] > calls:
            raise RuntimeError("process 0 stopped")
        return original(*args, **kwargs)
    return wrapped


def _counting_forwards(monkeypatch) -> list[int]:
    """Makes every feature forward count the rows it computes -> the counts, one per batch."""
    computed, original = [], features_module._teacher_forced_on

    def counted(*args, **kwargs):
        forward = original(*args, **kwargs)
        return lambda tokens: computed.append(len(tokens)) or forward(tokens)
    monkeypatch.setattr(features_module, "_teacher_forced_on", counted)
    return computed


def test_a_feature_cache_shared_by_two_processes_resumes_into_the_one_process_cache(distilled, tiny_target, tmp_path,
                                                                                   monkeypatch):
    config, _, _ = distilled
    distill_dir = config.data.cache_dir
    one_shot = _build_features(tiny_target, distill_dir, tmp_path / "one-shot")
    records = len(read_records(shard_paths(distill_dir)))
    assert [(s["first"], s["examples"]) for s in one_shot["shards"]] == [(i, min(4, records - i))
                                                                          for i in range(0, records, 4)]
    assert records > 12  # at least four batches: each process has two

    # Two processes share the build; process 0 fails on its second batch: both raise, neither hangs.
    with monkeypatch.context() as patch:
        patch.setattr(features_module, "sequence_example",
                      _fails_on_process_0_after(4, features_module.sequence_example))  # one call per record
        errors = _as_two_threads(lambda index, share: _build_features(tiny_target, distill_dir, tmp_path / "shared",
                                                                      share=share))
    assert "process 0 stopped" in str(errors[0])
    assert isinstance(errors[1], InputError) and "processes [0] failed" in str(errors[1])
    # What each finished was merged into manifest.json: process 0's first batch, process 1's (the 2nd, 4th, ...).
    partial = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    expected = [one_shot["shards"][0]] + one_shot["shards"][1::2]
    assert [(s["first"], s["process"]) for s in partial["shards"]] == [(s["first"], 0 if i == 0 else 1)
                                                                        for i, s in enumerate(expected)]
    assert not list((tmp_path / "shared").glob("manifest.process-*"))
    _assert_same_examples([e for s in partial["shards"] for e in _shard_examples(tmp_path / "shared", s)],
                          [e for s in expected for e in _shard_examples(tmp_path / "one-shot", s)], exact=True)

    # As if process 1's manifest had not been merged: refused for training, folded in by a rerun.
    process_1 = [s for s in partial["shards"] if s["process"] == 1]
    (tmp_path / "shared" / "manifest.process-1.json").write_text(json.dumps({**partial, "shards": process_1}))
    (tmp_path / "shared" / "manifest.json").write_text(json.dumps({**partial, "shards": partial["shards"][:1]}))
    with pytest.raises(InputError, match="interrupted multi-process build"):
        feature_shards(tmp_path / "shared")

    # One process computes the rest, at another batch size: only the missing records, and the cache
    # holds the one-shot examples in order.
    computed = _counting_forwards(monkeypatch)
    resumed = _build_features(tiny_target, distill_dir, tmp_path / "shared", batch_size=3)
    done = {s["first"] for s in expected}
    missing = [i for i in range(records) if not any(first <= i < first + 4 for first in done)]
    assert len(computed) == sum(-(-len(run) // 3) for run in _runs(missing))  # batches of 3 over each gap
    assert [s["first"] for s in resumed["shards"]] == sorted(s["first"] for s in resumed["shards"])
    assert sum(s["examples"] for s in resumed["shards"]) == records
    assert sum(s["loss_tokens"] for s in resumed["shards"]) == sum(s["loss_tokens"] for s in one_shot["shards"])
    _assert_same_examples(_cached_examples(tmp_path / "shared"), _cached_examples(tmp_path / "one-shot"), exact=False)


def _runs(indices: list[int]) -> list[list[int]]:
    """Consecutive runs of sorted indices."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def test_a_feature_cache_on_several_devices_equals_one_device(distilled, tiny_target, tmp_path):
    config, _, _ = distilled
    one = _build_features(tiny_target, config.data.cache_dir, tmp_path / "one")
    four = _build_features(tiny_target, config.data.cache_dir, tmp_path / "four", devices=jax.devices()[:4])
    assert four == one
    _assert_same_examples(_cached_examples(tmp_path / "four"), _cached_examples(tmp_path / "one"), exact=True)


def _shard_examples(cache_dir: pathlib.Path, shard: dict) -> list[dict]:
    reader = array_record_module.ArrayRecordReader(str(cache_dir / shard["file"]))
    examples = [decode_example(r) for r in reader.read_all()]
    reader.close()
    return [{k: v.astype(np.float32) if v.dtype == features_module.ml_dtypes.bfloat16 else v for k, v in e.items()}
            for e in examples]


def test_a_feature_cache_from_before_first_records_resumes_and_other_settings_are_refused(distilled, tiny_target,
                                                                                         tmp_path):
    config, _, _ = distilled
    distill_dir = config.data.cache_dir
    one_shot = _build_features(tiny_target, distill_dir, tmp_path / "one-shot")
    # The layout of earlier versions: shards named by their number, without first record or digest;
    # the last one unfinished.
    shutil.copytree(tmp_path / "one-shot", tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    for number, shard in enumerate(manifest["shards"]):
        del shard["first"], shard["records"]
        old_name = f"shard-{number:05d}.array_record"
        (tmp_path / "old" / shard["file"]).rename(tmp_path / "old" / old_name)
        shard["file"] = old_name
    manifest["shards"].pop()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    resumed = _build_features(tiny_target, distill_dir, tmp_path / "old")
    assert [s["first"] for s in resumed["shards"]] == [s["first"] for s in one_shot["shards"]]
    _assert_same_examples(_cached_examples(tmp_path / "old"), _cached_examples(tmp_path / "one-shot"), exact=True)

    with pytest.raises(InputError, match="was built with .*use another directory"):
        build_feature_cache(tiny_target.config, tiny_target.params, distill_dir, tmp_path / "old", feature_layers=(0,),
                            seq_len=16, batch_size=4, pad_token_id=0, progress=False)
    # More examples than the self-distilled data holds: the cache was built from other data.
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    manifest["shards"].append({**manifest["shards"][-1], "first": manifest["shards"][-1]["first"] + 4})
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="built from other data"):
        _build_features(tiny_target, distill_dir, tmp_path / "old")


def test_a_feature_cache_follows_its_distillation_as_it_grows_and_computes_moved_records_again(
        distilled, tiny_target, tmp_path, monkeypatch):
    config, _, _ = distilled
    shutil.copytree(config.data.cache_dir, tmp_path / "distill")
    full = read_manifest(tmp_path / "distill")
    set_distilled = lambda shards: (tmp_path / "distill" / "manifest.json").write_text(json.dumps({**full,
                                                                                                  "shards": shards}))
    build = lambda name: _build_features(tiny_target, tmp_path / "distill", tmp_path / name)
    # Built while the distillation lacked its last batch, then after it was answered: only those records are computed.
    set_distilled(full["shards"][:-1])
    build("cache")
    set_distilled(full["shards"])
    computed = _counting_forwards(monkeypatch)
    build("cache")
    assert len(computed) == 1
    build("fresh")
    _assert_same_examples(_cached_examples(tmp_path / "cache"), _cached_examples(tmp_path / "fresh"), exact=True)

    # The records of the first two batches trade places (as when a rerun of an interrupted multi-process
    # distillation answers batches it had left out before answered ones): they are computed again.
    swapped = [full["shards"][1], full["shards"][0]] + full["shards"][2:]
    set_distilled(swapped)
    computed.clear()
    moved = build("cache")
    keys = lambda shards: [key for shard in shards for key in shard["keys"]]
    changed = [keys(full["shards"])[i:i + 4] != keys(swapped)[i:i + 4] for i in range(0, len(keys(swapped)), 4)]
    assert len(computed) == sum(changed) >= 2 and not all(changed)
    build("moved")
    _assert_same_examples(_cached_examples(tmp_path / "cache"), _cached_examples(tmp_path / "moved"), exact=True)
    assert not set(p.name for p in (tmp_path / "cache").glob("*.array_record")) - {s["file"] for s in moved["shards"]}

    # A finished cache is only checked: no target replicas, no manifest written (it may be read-only).
    made = []
    monkeypatch.setattr(features_module, "_teacher_forced_on", lambda *args, **kwargs: made.append(1))
    written = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    assert build("cache") == moved and made == []
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == written


def test_dev_split_is_held_out_and_stable(shared_data_root):
    prompts, _ = sources.read_training_prompts(shared_data_root, ["alpaca_seed_tasks"])
    dev = select_prompts(prompts, 0, dev_prompts=10, split="dev")
    assert len(dev) == 10
    for max_prompts in (20, 100, 0):
        train = select_prompts(prompts, 0, max_prompts=max_prompts, dev_prompts=10)
        assert not {p.key for p in train} & {p.key for p in dev}
    # Adding a dev split leaves the training order as it was (caches made before it stay valid).
    assert select_prompts(prompts, 0, max_prompts=20, dev_prompts=10) == select_prompts(prompts, 0, max_prompts=20)
    assert len(select_prompts(prompts, 0, dev_prompts=10)) == len(prompts) - 10
    with pytest.raises(InputError, match="overlap the 10 dev prompts"):
        select_prompts(prompts, 0, max_prompts=len(prompts) - 5, dev_prompts=10)
    # skip_prompts: the prompts after a first cache's, none of them in it or in the dev split.
    first = select_prompts(prompts, 0, max_prompts=40, dev_prompts=10)
    after = select_prompts(prompts, 0, max_prompts=30, dev_prompts=10, skip_prompts=40)
    assert after == select_prompts(prompts, 0, max_prompts=70, dev_prompts=10)[40:]
    assert not {p.key for p in after} & ({p.key for p in first} | {p.key for p in dev})
    with pytest.raises(InputError, match="skip_prompts=40 and max_prompts"):
        select_prompts(prompts, 0, max_prompts=len(prompts) - 45, dev_prompts=10, skip_prompts=40)
    assert select_prompts(prompts, 0, dev_prompts=10, skip_prompts=40) == select_prompts(prompts, 0, dev_prompts=10)[40:]
    with pytest.raises(InputError, match="leaves no training prompts"):
        select_prompts(prompts, 0, dev_prompts=10, skip_prompts=len(prompts) - 10)


def test_excluded_keys_leave_the_rest_in_order_whatever_the_caps_of_earlier_caches(shared_data_root):
    prompts, _ = sources.read_training_prompts(shared_data_root, ["gsm8k_train", "alpaca_seed_tasks"])
    first = select_prompts(prompts, 0, max_prompts=40, dev_prompts=10)
    in_first = sum(p.source == "gsm8k_train" for p in first)
    # A second pool under a cap passes over later gsm8k_train prompts: skip_prompts alone cannot reach them.
    capped = select_prompts(prompts, 0, max_prompts=30, dev_prompts=10, skip_prompts=40,
                            source_caps={"gsm8k_train": in_first})
    held = {p.key for p in first + capped}
    everything = select_prompts(prompts, 0, dev_prompts=10)
    rest = select_prompts(prompts, 0, dev_prompts=10, exclude_keys=held)
    assert rest == [p for p in everything if p.key not in held]
    assert any(p.source == "gsm8k_train" for p in rest[:40]) and len(rest) == len(everything) - len(held)
    dev = select_prompts(prompts, 0, dev_prompts=10, split="dev", exclude_keys=held)
    assert dev == select_prompts(prompts, 0, dev_prompts=10, split="dev")
    # Caps and skips count after the exclusion: the cap here admits the GSM8K prompts of `rest` only
    # when those of `first` are passed over first.
    assert select_prompts(prompts, 0, max_prompts=7, dev_prompts=10, skip_prompts=5, exclude_keys=held) == rest[5:12]
    cap = 5
    capped_rest = select_prompts(prompts, 0, dev_prompts=10, exclude_keys=held, source_caps={"gsm8k_train": cap})
    gsm8k_rest = [p for p in rest if p.source == "gsm8k_train"]
    assert [p for p in capped_rest if p.source == "gsm8k_train"] == gsm8k_rest[:cap]
    assert [p for p in capped_rest if p.source != "gsm8k_train"] == [p for p in rest if p.source != "gsm8k_train"]
    with pytest.raises(InputError, match="without the excluded prompts"):
        select_prompts(prompts, 0, max_prompts=len(rest) + 1, dev_prompts=10, exclude_keys=held)


def test_cached_prompt_keys_hold_planned_prompts_and_refuse_what_is_not_a_distillation(tmp_path):
    cache = tmp_path / "distill"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({
        "settings": {}, "skipped_too_long": ["long"], "shards": [{"file": "shard-00000.array_record", "keys": ["a", "b"]}],
        "plan": {"batch_size": 2, "batches": [{"index": 1, "keys": ["c"]}]}}))
    assert cached_prompt_keys([cache]) == {"a", "b", "c"}  # planned, not yet answered: "c" counts too
    features = tmp_path / "features"
    features.mkdir()
    (features / "manifest.json").write_text(json.dumps({"settings": {}, "shards": [{"file": "records-0.array_record",
                                                                                      "examples": 8}]}))
    with pytest.raises(InputError, match="features, which is not a distillation cache"):
        cached_prompt_keys([cache, features])
    with pytest.raises(InputError, match="missing, which holds no distillation"):
        cached_prompt_keys([tmp_path / "missing"])
    with pytest.raises(TypeError, match="not one"):
        cached_prompt_keys(str(cache))


def test_source_caps_rebalance_train_and_extend_an_uncapped_prefix(shared_data_root):
    prompts, _ = sources.read_training_prompts(shared_data_root, ["gsm8k_train", "alpaca_seed_tasks"])
    uncapped = select_prompts(prompts, 0, max_prompts=100, dev_prompts=10)
    in_prefix = sum(p.source == "gsm8k_train" for p in uncapped)
    assert 50 < in_prefix < 100  # gsm8k_train dominates this mix
    capped = select_prompts(prompts, 0, max_prompts=200, dev_prompts=10, source_caps={"gsm8k_train": in_prefix,
                                                                                      "alpaca_seed_tasks": 0})
    # The uncapped prefix stays as it was; every prompt after it comes from the uncapped source.
    assert capped[:100] == uncapped
    assert {p.source for p in capped[100:]} == {"alpaca_seed_tasks"}
    assert sum(p.source == "gsm8k_train" for p in capped) == in_prefix
    # Caps apply after the dev split is set aside: a dev split holding prompts of the uncapped source
    # stays out of "train" (capping the whole shuffle first would pull them in).
    dev = select_prompts(prompts, 0, dev_prompts=300, split="dev")
    assert any(p.source == "alpaca_seed_tasks" for p in dev)
    capped_all = select_prompts(prompts, 0, dev_prompts=300, source_caps={"gsm8k_train": in_prefix})
    assert not {p.key for p in dev} & {p.key for p in capped_all}
    with pytest.raises(InputError, match="source_caps names no_such_source"):
        select_prompts(prompts, 0, max_prompts=10, source_caps={"no_such_source": 5})
    with pytest.raises(InputError, match="not gsm8k_train=-1"):
        select_prompts(prompts, 0, max_prompts=10, source_caps={"gsm8k_train": -1})
    with pytest.raises(InputError, match="under source_caps"):
        select_prompts(prompts, 0, max_prompts=1000, dev_prompts=10, source_caps={"gsm8k_train": 5})


# ----- the drafter's unrolled training forward equals what the engine computes -----

def test_unrolled_forward_equals_the_engine_drafting_path():
    """Step j at position i of the training forward == the engine's j-th draft after verifying up to i - j."""
    config = tiny_config(vocab_size=64)
    params = tiny_params(config)
    drafter = Eagle3Drafter.for_target(config, (0, 1, 2), 40, intermediate_size=32)
    dparams = drafter.init_params(jax.random.key(3), d2t=np.random.default_rng(0).permutation(64)[:40], std=0.3)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    out = llama.forward(params, tokens, llama.init_cache(config, 2, 12), config, hidden_layers=(0, 1, 2))
    features = out.hidden_states.transpose(1, 2, 0, 3).reshape(2, 12, -1)
    steps = 3
    unrolled = unrolled_hidden(drafter, dparams, params["embed"], tokens, features, steps)  # [S, B, L, D]
    expected = drafter.target_logits(dparams, unrolled)
    for anchor in (0, 4, 8):
        # The engine: consume the sequence up to the anchor with target features, then step on the data's tokens.
        cache = drafter.init_cache(2, 32)
        logits, cache = drafter.prefill(dparams, params, cache, tokens[:, :anchor + 1],
                                        jnp.full((2,), anchor + 1, jnp.int32), features[:, :anchor + 1])
        np.testing.assert_allclose(logits, expected[0, :, anchor], rtol=1e-4, atol=1e-4)
        for j in range(1, steps):
            logits, cache = drafter.step(dparams, params, cache, tokens[:, anchor + j])
            np.testing.assert_allclose(logits, expected[j, :, anchor + j], rtol=1e-4, atol=1e-4)


# ----- training end to end, resume, checkpoint errors -----

def _train(config, target, workdir, steps, stop_at=None):
    from ppow_jax.train import run_training

    config = config.copy_and_resolve_references()
    config.workdir = str(workdir)
    config.train.steps = steps
    return run_training(config, target, progress=False, stop_at=stop_at)


def _history(workdir: pathlib.Path, metric: str = "loss") -> list[dict]:
    """The metrics.jsonl rows that carry `metric` (training rows; the dev probe writes its own)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if metric in row]


def test_tiny_training_lowers_the_loss_and_serves(distilled, tiny_target, tmp_path):
    config, _, _ = distilled
    final = _train(config, tiny_target, tmp_path / "run", 40)
    assert list((tmp_path / "run" / "logs").glob("events.*")), "no TensorBoard event file"
    history = _history(tmp_path / "run")
    first, last = history[0], history[-1]
    # 40 steps on 14 sequences of a random target: measured KL 3.08 -> 2.69, agreement 0.01 -> 0.20.
    assert last["kl"] < 0.92 * first["kl"]
    assert last["agreement/step0"] > first["agreement/step0"] + 0.1
    # The dev probe (held-out prompts) runs at steps 0, 20 and 40. (The tiny drafter memorises a
    # random target's answers to 14 prompts and does not generalise: its dev figures stay near 0.
    # test_ppow pins what the probe counts.)
    probes = _history(tmp_path / "run", "dev/accept_length")
    assert [row["step"] for row in probes] == [0, 20, 40]
    # The exported drafter serves in the engine, and greedy output still equals plain decoding.
    drafter, params = load_drafter(tmp_path / "run" / "drafter", tiny_target.config)
    tok = tiny_target.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in ("Add 2 and 3.", "Hi")]
    reference = AutoregressiveDecoder(tiny_target.config, tiny_target.params, eos_token_ids=tok.eos_token_ids,
                                      pad_token_id=0).generate(prompts, 16).tokens
    result = SpeculativeDecoder(tiny_target.config, tiny_target.params, drafter, params,
                                eos_token_ids=tok.eos_token_ids).generate(prompts, 16, window=WindowPolicy("fixed", 4))
    assert result.tokens == reference
    assert final["loss"] == pytest.approx(last["loss"])


def test_resumed_run_equals_an_uninterrupted_one(distilled, tiny_target, tmp_path):
    config, _, _ = distilled
    _train(config, tiny_target, tmp_path / "straight", 20)
    _train(config, tiny_target, tmp_path / "resumed", 20, stop_at=10)  # interrupted after its step-10 checkpoint
    _train(config, tiny_target, tmp_path / "resumed", 20)
    straight, resumed = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert [h["step"] for h in resumed] == [h["step"] for h in straight]
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"] and a["agreement/step0"] == b["agreement/step0"], (a, b)
    (_, p1), (_, p2) = (load_drafter(tmp_path / run / "drafter", tiny_target.config) for run in ("straight", "resumed"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)


def test_a_wall_clock_budget_ends_the_run_with_an_export(distilled, tiny_target, tmp_path):
    # A leased machine's run must end by a deadline: train.max_wall_seconds counts data waits and probes
    # too. Spent after the first step (its compile alone outlasts 1 ms), the run checkpoints, exports
    # and logs both clocks there.
    config, _, _ = distilled
    config = config.copy_and_resolve_references()
    config.train.max_wall_seconds = 1e-3
    _train(config, tiny_target, tmp_path / "run", 40)
    (row,) = _history(tmp_path / "run")
    assert row["step"] == 1 and row["wall_seconds"] >= row["train_seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert json.loads((tmp_path / "run" / "drafter" / "drafter.json").read_text())["train_steps"] == 1


@pytest.fixture(scope="module")
def extra_distilled(distilled, tiny_target, shared_data_root, tmp_path_factory) -> pathlib.Path:
    """A second self-distilled cache of the tiny target: 8 prompts after the 16 of `distilled`'s."""
    config, _, _ = distilled
    prompts, decoder, settings = tiny_distillation(tiny_target, shared_data_root)
    cache = tmp_path_factory.mktemp("distill-extra")
    self_distill(decoder, tiny_target.tokenizer, prompts, cache, settings, batch_size=4, max_prompts=8,
                 skip_prompts=16, dev_prompts=config.data.dev_prompts, progress=False)
    return cache


def test_extra_caches_train_in_one_shuffle_with_the_main_cache(distilled, extra_distilled, tiny_target, tmp_path):
    config, _, _ = distilled
    config = config.copy_and_resolve_references()
    config.data.extra_caches = f"{extra_distilled}:{tmp_path / 'extra-features'}"
    config.data.num_epochs = 1  # the run ends when both caches have been read once
    config.train.log_every = 1
    config.data.dev_prompts = 0
    _train(config, tiny_target, tmp_path / "run", 100)
    sequences = [sum(s["examples"] for s in json.loads((d / "manifest.json").read_text())["shards"])
                 for d in (tmp_path / "run" / "features", tmp_path / "extra-features")]
    assert sequences[1] == len(list(read_records(shard_paths(extra_distilled))))
    # One epoch of batches of 4 over the sequences of both caches, then "data exhausted": the end of the
    # run, checkpointed and exported.
    steps = [row["step"] for row in _history(tmp_path / "run")]
    assert steps == list(range(1, sum(sequences) // config.train.batch_size + 1)), (sequences, steps)
    last = steps[-1]
    assert Checkpointer(tmp_path / "run" / "checkpoints", keep=2).latest_step() == last
    assert json.loads((tmp_path / "run" / "drafter" / "drafter.json").read_text())["train_steps"] == last
    # A rerun finds the data read and only exports again (before, it stopped unexported every time).
    shutil.rmtree(tmp_path / "run" / "drafter")
    _train(config, tiny_target, tmp_path / "run", 100)
    assert json.loads((tmp_path / "run" / "drafter" / "drafter.json").read_text())["train_steps"] == last
    # Resumed without the extra cache, the saved data-iterator position would index other data.
    config.data.extra_caches = ""
    with pytest.raises(InputError, match=r"trained on the caches .*distill-extra.*, this run names"):
        _train(config, tiny_target, tmp_path / "run", 100)


def test_a_run_is_not_resumed_on_a_cache_that_grew(distilled, extra_distilled, tiny_target, shared_data_root,
                                                     tmp_path):
    config, _, _ = distilled
    config = config.copy_and_resolve_references()
    growing = tmp_path / "growing"
    shutil.copytree(extra_distilled, growing)
    config.data.extra_caches = f"{growing}:{tmp_path / 'extra-features'}"
    _train(config, tiny_target, tmp_path / "run", 8, stop_at=4)
    prompts, decoder, settings = tiny_distillation(tiny_target, shared_data_root)
    self_distill(decoder, tiny_target.tokenizer, prompts, growing, settings, batch_size=4, max_prompts=12,
                 skip_prompts=16, dev_prompts=config.data.dev_prompts, progress=False)
    with pytest.raises(InputError, match=r"trained on \d+ sequences, its caches now hold \d+ \(one grew"):
        _train(config, tiny_target, tmp_path / "run", 8)


def _extra_caches_error(config, target, workdir: pathlib.Path, extra: str) -> str:
    config = config.copy_and_resolve_references()
    config.data.extra_caches = extra
    with pytest.raises(InputError) as err:
        _train(config, target, workdir, 4)
    assert not (workdir / "features").exists(), "refused before any feature was computed"
    return str(err.value)


def test_extra_caches_that_do_not_fit_the_main_cache_are_refused(distilled, extra_distilled, tiny_target, tmp_path):
    config, _, _ = distilled
    features = tmp_path / "extra-features"
    assert "is not DISTILL_DIR:FEATURES_DIR" in _extra_caches_error(config, tiny_target, tmp_path / "a",
                                                                    str(extra_distilled))
    assert "no self-distilled cache in /nonexistent" in _extra_caches_error(config, tiny_target, tmp_path / "b",
                                                                           f"/nonexistent:{features}")
    assert "needs a feature directory of its own" in _extra_caches_error(
        config, tiny_target, tmp_path / "b2", f"{extra_distilled}:{features},{extra_distilled}2:{features}")
    # The main cache again: every prompt would weigh double.
    message = _extra_caches_error(config, tiny_target, tmp_path / "c", f"{config.data.cache_dir}:{features}")
    assert "is in both" in message and "must hold different prompts" in message
    # The dev split, also with the probe off: benchmarks/dev_acceptance.py would measure trained prompts.
    no_probe = config.copy_and_resolve_references()
    no_probe.data.dev_prompts = 0
    message = _extra_caches_error(no_probe, tiny_target, tmp_path / "c2", f"{config.data.dev_cache_dir}:{features}")
    assert f"and {config.data.dev_cache_dir}: the caches" in message
    # Answers sampled at another temperature are another text than the main cache's greedy ones.
    sampled = tmp_path / "sampled"
    shutil.copytree(extra_distilled, sampled)
    manifest = json.loads((sampled / "manifest.json").read_text())
    manifest["settings"]["temperature"] = 1.0
    (sampled / "manifest.json").write_text(json.dumps(manifest))
    message = _extra_caches_error(config, tiny_target, tmp_path / "d", f"{sampled}:{features}")
    assert f"{sampled} was distilled with" in message and "'temperature': 1.0" in message


def test_corrupt_or_missing_checkpoints_give_clear_errors(distilled, tiny_target, tmp_path):
    config, _, _ = distilled
    workdir = tmp_path / "run"
    _train(config, tiny_target, workdir, 20)  # checkpoints at steps 10 and 20
    checkpoints = workdir / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [10, 20]
    for path in (checkpoints / "20" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "ocdbt" in str(path):
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step 20.*earlier checkpoints: \\[10\\]"):
        _train(config, tiny_target, workdir, 30)
    # The earlier checkpoint is intact and restores.
    manager = Checkpointer(checkpoints)
    assert 10 in manager.all_steps()
    step, _, meta = manager.restore(_abstract_state(config, tiny_target), step=10)
    assert step == 10 and "data_iterator" in meta
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore({}, step=None)
    with pytest.raises(CheckpointError, match="drafter.json"):
        load_drafter(tmp_path / "missing", tiny_target.config)


def _abstract_state(config, target):
    from ppow_jax.drafters.eagle import Eagle3Drafter
    from ppow_jax.training.kd import KDTrainer, OptimConfig

    drafter = Eagle3Drafter.for_target(target.config, tuple(config.drafter.feature_layers),
                                       config.drafter.draft_vocab_size, config.drafter.intermediate_size)
    trainer = KDTrainer(drafter, target.params, np.arange(config.drafter.draft_vocab_size),
                        OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10), unroll_steps=1)
    return trainer.init_state(jax.random.key(0))


@pytest.mark.parametrize("argv,message", [
    ([], "--config FILE is required"),
    (["--config", "configs/no_such_config.py"], "no config file configs/no_such_config.py"),
    (["--config=README.md"], "--config README.md and its overrides: SyntaxError"),
    (["--config", "configs/tiny_kd.py", "--config.train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
    (["-config", "configs/tiny_kd.py", "--config.train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (["--config", "configs/tiny_kd.py", "--config.no_such_group.key=1"], "unknown config key 'no_such_group.key'"),
    (["--config", "configs/tiny_kd.py", "--config.train.stepz=1"],
     "unknown config key 'train.stepz' (Did you mean \"steps\" instead of \"stepz\"?)"),
    (["--config", "configs/tiny_kd.py", "--config.target=smollm2-135m-instruct", "--config.drafter.feature_layers=(2,15,40)"],
     "drafter.feature_layers (2, 15, 40) must be layers of the target, which has 30 (0..29)"),
    (["--config", "configs/tiny_kd.py", "--config.train.log_every=0"], "train.log_every must be an integer >= 1"),
    (["--config", "configs/tiny_kd.py", "--config.train.checkpoint_every=-2"], "train.checkpoint_every"),
    (["--config", "configs/tiny_kd.py", "--config.train.eval_every=-1"], "train.eval_every must be >= 0"),
    (["--config", "configs/tiny_kd.py", "--config.train.max_wall_seconds=-5"], "train.max_wall_seconds must be >= 0"),
    (["--config", "configs/tiny_kd.py", "--config.data.read_ahead=0"], "data.read_ahead must be an integer >= 1"),
    (["--config", "configs/tiny_kd.py", "--config.distributed.enabled=True", "--config.distributed.num_processes=2",
      "--config.distributed.process_id=2"], "distributed.process_id 2 is not in [0, 2)"),
    (["--config", "configs/tiny_kd.py", "--config.target=smollm2-135m-instruct", "--config.data.cache_dir=/nonexistent",
      "--config.workdir=WORKDIR"], "no self-distilled data"),
])
def test_train_cli_bad_input(argv, message, tmp_path, capsys, monkeypatch):
    from ppow_jax import train

    monkeypatch.chdir(REPO_ROOT)
    code = train.main([a.replace("WORKDIR", str(tmp_path)) for a in argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_training_refuses_the_responses_of_another_model(distilled, tmp_path, capsys, monkeypatch):
    from ppow_jax import train

    config, _, _ = distilled  # answered by the tests' tiny target (the tiny configs' empty target)
    monkeypatch.chdir(REPO_ROOT)
    code = train.main(["--config", "configs/tiny_kd.py", "--config.target=smollm2-135m-instruct",
                       f"--config.data.cache_dir={config.data.cache_dir}", f"--config.workdir={tmp_path}"])
    assert code == 2
    assert f"{config.data.cache_dir} holds the responses of '', not of this config's target" in capsys.readouterr().err


def test_config_files_that_give_no_config_are_errors(tmp_path, capsys):
    from ppow_jax import train

    empty = tmp_path / "empty_config.py"
    empty.write_text("def get_config():\n    return None\n")
    assert train.main(["--config", str(empty)]) == 2
    assert "get_config() returned None" in capsys.readouterr().err
    # config_flags keeps an OSError of get_config() (say, a missing sibling config) for later: still one line.
    failing = tmp_path / "failing_config.py"
    failing.write_text("def get_config():\n    return open('/no/such/sibling_config.py')\n")
    assert train.main(["--config", str(failing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sibling_config.py" in err and "Traceback" not in err


def test_the_distill_cli_refuses_an_unknown_response_source_before_loading_the_target(capsys, monkeypatch):
    from ppow_jax import distill

    monkeypatch.chdir(REPO_ROOT)
    # The target named here does not exist: the refusal must come first.
    assert distill.main(["--config", "configs/tiny_kd.py", "--config.target=/no/such/model",
                         "--config.data.responses=teacher"]) == 2
    assert "data.responses must be one of target, reference, got 'teacher'" in capsys.readouterr().err


def test_the_distill_cli_refuses_a_missing_excluded_cache_before_loading_the_target(capsys, monkeypatch, tmp_path):
    from ppow_jax import distill

    monkeypatch.chdir(REPO_ROOT)
    assert distill.main(["--config", "configs/tiny_kd.py", "--config.target=/no/such/model",
                         f"--config.data.exclude_caches= {tmp_path}/gone ,"]) == 2
    assert f"data.exclude_caches names {tmp_path}/gone, which holds no distillation" in capsys.readouterr().err


def test_distillation_refuses_bad_sizes_before_any_work(tmp_path):
    settings = DistillSettings(model="m", max_prompt_tokens=8, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    for kwargs, message in (({"batch_size": 0}, "data.batch_size"),
                            ({"batch_size": 4, "max_prompts": -3}, "data.max_prompts"),
                            ({"batch_size": 4, "dev_prompts": -1}, "data.dev_prompts")):
        with pytest.raises(InputError, match=message):
            self_distill(None, None, [], tmp_path / "cache", settings, progress=False, **kwargs)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "not a drafter description"),
    ('{"kind": "eagle3"}', "lacks target, feature_layers, draft_vocab_size, intermediate_size"),
    ('{"kind": "eagle3", "target": 3, "feature_layers": [0], "draft_vocab_size": 8, "intermediate_size": 8}',
     "'target' must describe"),
    ('{"kind": "eagle3", "target": {}, "feature_layers": 3, "draft_vocab_size": 8, "intermediate_size": 8}',
     "feature_layers must be a list"),
    ('{"kind": "eagle3", "target": {}, "feature_layers": [0], "draft_vocab_size": "8", "intermediate_size": 8}',
     "draft_vocab_size must be a positive integer"),
])
def test_malformed_drafter_descriptions_name_the_file(tmp_path, tiny_target, content, message):
    (tmp_path / "drafter.json").write_text(content)
    with pytest.raises(CheckpointError, match=message) as raised:
        load_drafter(tmp_path, tiny_target.config)
    assert "drafter.json" in str(raised.value)
