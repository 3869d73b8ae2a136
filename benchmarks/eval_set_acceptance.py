"""Greedy acceptance of drafters on all the eval sets' questions, measured on the target's cached
answers instead of by decoding: for telling drafters apart whose τ differ by a few percent, which
the timed eval (`benchmarks/eval_sets.py`) cannot afford to do on more than a few questions per set.

The target answers the first turn of every question of each set greedily, once (a self-distilled
cache per set, resumable, made as `python -m ppow_jax.distill` makes the dev split), and its features
are cached. Each drafter is then measured without decoding, from greedy windows of K drafts at every
response position, verified against the cached answer:
  - **replayed τ**: the cycles a greedy engine with a fixed window of K runs along that answer,
    walked from the window records (a cycle at position p accepts a drafts, and the next one starts
    at p + a + 1; τ is the mean of a + 1 over cycles). This is `ppow_jax.eval`'s τ on the same turns,
    except that the walk stops where fewer than K answer tokens are left (it leaves out up to K - 1
    of the engine's last cycles), the drafter reads the cached bfloat16 features, and the answers
    come from batched decoding (greedy answers equal one-at-a-time ones up to rare near-ties);
  - **accept length**: the mean accepted drafts per window over every response position (the dev
    probe's figure, `benchmarks/dev_acceptance.py`).
Each drafter after the first is also given as its change in replayed τ against the first (and any
pair of `--compare NAME BASELINE`), with its standard error over questions: the sets' sampling error,
not the spread between training runs.

    python benchmarks/eval_set_acceptance.py --config configs/smollm2_135m_kd.py --window 3 \\
        --drafter "token-level=checkpoints/smollm2-135m-instruct/kd" --drafter "PPOW=runs/ppow/full/drafter"

MT-bench's second turns are left out: their context would be the target's first answer, which the
timed eval decodes anew. Answers are cached under `--cache-root`, per set and answer length.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from ppow_jax.cli import load_config_file, run_entry_point
from ppow_jax.evaluation.questions import EVAL_SETS, eval_set_path

if TYPE_CHECKING:
    from ml_collections import ConfigDict

    from ppow_jax.data.sources import Prompt
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder
    from ppow_jax.training.ppow import PPOWTarget
    from ppow_jax.weights.registry import LoadedModel


class ReplayedCycles(NamedTuple):
    """Per question [S each]: the engine cycles walked, the tokens they emitted (accepted drafts + 1
    each), the windows at every position and the drafts accepted in them."""

    cycles: np.ndarray
    emitted: np.ndarray
    windows: np.ndarray
    accepted_drafts: np.ndarray

    @classmethod
    def concatenate(cls, parts: list["ReplayedCycles"]) -> "ReplayedCycles":
        return cls(*(np.concatenate(field) for field in zip(*parts)))

    def tau(self) -> float:
        from ppow_jax.errors import InputError

        if not self.cycles.sum():
            raise InputError("no cycles to replay: every answer is shorter than the window")
        return float(self.emitted.sum() / self.cycles.sum())

    def accept_length(self) -> float:
        return float(self.accepted_drafts.sum() / self.windows.sum())

    def tau_difference(self, baseline: "ReplayedCycles") -> tuple[float, float]:
        """(this τ minus the baseline's on the same questions, its standard error over questions):
        each τ is a ratio of sums, so the error is that of the two ratios' linearised difference."""
        if not np.array_equal(self.windows, baseline.windows):
            raise ValueError("replayed τ compares only on the same questions")
        residuals = ((self.emitted - self.tau() * self.cycles) / self.cycles.sum()
                     - (baseline.emitted - baseline.tau() * baseline.cycles) / baseline.cycles.sum())
        count = np.count_nonzero(self.cycles + baseline.cycles)  # questions without a cycle are not samples
        return self.tau() - baseline.tau(), float(np.sqrt(count / max(count - 1, 1) * np.sum(residuals ** 2)))


def replay_cycles(accepted_lengths: np.ndarray, valid: np.ndarray) -> list[int]:
    """The drafts a greedy engine accepts cycle by cycle along one answer -> [a per cycle].

    `accepted_lengths[p]`: how many drafts of the window anchored at position p (drafts predicting
    tokens p + 1 ...) match the answer; `valid[p]`: that window lies inside the answer. Positions
    count one apart from any origin (the records' span starts at the first valid anchor). The target's
    prefill gives the answer's first token, so the engine's first window is anchored one position
    after the first valid one (which predicts that token)."""
    positions = np.flatnonzero(valid)
    if not len(positions):
        return []
    accepts, position = [], positions[0] + 1
    while position < len(valid) and valid[position]:
        accepts.append(int(accepted_lengths[position]))
        position += accepts[-1] + 1
    return accepts


def question_prompts(data_root: pathlib.Path, set_name: str) -> list["Prompt"]:
    """The first turn of each question of a set, as prompts to answer (keyed "<set>/<question id>")."""
    from ppow_jax.data.sources import Prompt
    from ppow_jax.evaluation.questions import load_questions

    return [Prompt(key=f"{set_name}/{q.question_id}", source=set_name,
                   messages=({"role": "user", "content": q.turns[0]},))
            for q in load_questions(eval_set_path(data_root, set_name))]


def answer_questions(config: "ConfigDict", target: "LoadedModel", decoder: "AutoregressiveDecoder",
                     data_root: pathlib.Path, set_name: str, cache_dir: pathlib.Path, max_new_tokens: int) -> None:
    """The target's greedy answers (with its `decoder`) to a set's first turns, into `cache_dir`
    (resumes; a cache of other settings is refused by `self_distill`)."""
    from ppow_jax.data.distill import DistillSettings, self_distill

    tok = target.tokenizer
    settings = DistillSettings(model=str(config.target), max_prompt_tokens=config.data.max_prompt_tokens,
                               max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=config.seed)
    manifest = self_distill(decoder, tok, question_prompts(data_root, set_name), cache_dir, settings,
                            batch_size=config.data.batch_size, progress=True)
    if skipped := manifest.get("skipped_too_long"):
        print(f"{set_name}: {len(skipped)} questions over {config.data.max_prompt_tokens} prompt tokens left out")


def replay_drafter(records: Callable, params: dict, frozen: "PPOWTarget", batches: list[dict]) -> ReplayedCycles:
    """The replayed cycles and every-position windows of one drafter over a set's answers. `records`
    spans each answer from its first valid anchor on; a span too short for an answer is refused."""
    import jax

    from ppow_jax.training.ppow import greedy_window_counts

    parts = []
    for batch in batches:
        _, accepted, reached = jax.device_get(records(params, frozen, batch))
        if reached[:, -1, 0].any():
            raise ValueError("the window records' span ends inside an answer: the walk would stop short")
        lengths, valid = accepted.sum(axis=-1), reached[..., 0]
        windows, accepted_drafts, _ = greedy_window_counts(accepted, reached)
        for row in range(len(lengths)):
            accepts = replay_cycles(lengths[row], valid[row])
            parts.append((len(accepts), sum(accepts) + len(accepts), int(windows[row]), int(accepted_drafts[row])))
    return ReplayedCycles(*(np.array(column) for column in zip(*parts)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_kd.py",
                        help="a training config: its target, data root, prompt and sequence lengths")
    parser.add_argument("--drafter", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--window", type=int, default=3, help="K: drafts per window (the engine's fixed window)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="answer length (64: as the timed evals of BENCHMARKS.md's PPOW rounds)")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("NAME", "BASELINE"),
                        help="also the change in τ of drafter NAME against drafter BASELINE, on the same questions")
    parser.add_argument("--sets", nargs="+", default=list(EVAL_SETS), choices=EVAL_SETS)
    parser.add_argument("--cache-root", help="where the answers and their features are cached "
                                             "(default: beside the config's dev split)")
    return run_entry_point(parser, run)


def run(args: argparse.Namespace) -> int:
    import jax

    from ppow_jax.data.features import feature_shards
    from ppow_jax.data.pipeline import feature_dataset
    from ppow_jax.distill import data_root
    from ppow_jax.drafters.store import load_drafter
    from ppow_jax.errors import InputError
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder
    from ppow_jax.train import feature_cache
    from ppow_jax.training.ppow import PPOWTarget, greedy_window_records
    from ppow_jax.weights.registry import load_model

    if args.window < 1 or args.max_new_tokens <= args.window:
        raise InputError(f"--window must be >= 1 and below --max-new-tokens, got {args.window} and {args.max_new_tokens}")
    config = load_config_file(args.config)
    root = data_root(config)
    cache_root = pathlib.Path(args.cache_root or pathlib.Path(config.data.dev_cache_dir).parent / "eval-answers")
    target = load_model(config.target, param_dtype=config.param_dtype)
    names = [spec.partition("=")[0] for spec in args.drafter]
    if len(set(names)) < len(names):
        raise InputError(f"--drafter names must differ, got {names}")
    if unknown := sorted({name for pair in args.compare for name in pair} - set(names)):
        raise InputError(f"--compare names {unknown}, not among the --drafter names {names}")
    drafters = []
    for spec in args.drafter:
        name, _, directory = spec.partition("=")
        drafters.append((name, *load_drafter(directory or name, target.config)))

    # One decoder for every set: its compiled programs are reused.
    decoder = AutoregressiveDecoder(target.config, target.params, eos_token_ids=target.tokenizer.eos_token_ids,
                                    pad_token_id=target.tokenizer.pad_token_id or 0)
    batches = {}
    for set_name in args.sets:
        cache_dir = cache_root / f"{set_name}-{args.max_new_tokens}"
        answer_questions(config, target, decoder, root, set_name, cache_dir, args.max_new_tokens)
        set_config = config.copy_and_resolve_references()
        set_config.data.dev_cache_dir = str(cache_dir)
        set_config.data.dev_features_dir = str(cache_dir.with_name(cache_dir.name + "-features"))
        # Room for the longest prompt and answer: the engine's drafter reads the whole prompt.
        set_config.data.seq_len = config.data.max_prompt_tokens + args.max_new_tokens
        # One question per batch: every question is measured (batches drop a remainder).
        batches[set_name] = list(feature_dataset(feature_shards(feature_cache(set_config, target, True, split="dev")),
                                                 batch_size=1, seed=0, num_epochs=1))

    results = {}
    for name, drafter, params in drafters:
        # Windows at the answer's positions only: an answer of at most N tokens has at most N - K + 1
        # valid anchors, and the span ends one past them (so an answer it cut off would be refused).
        records = jax.jit(functools.partial(greedy_window_records, drafter, window=args.window, stride=1,
                                            span=args.max_new_tokens - args.window + 2))
        frozen = PPOWTarget.from_target(target.params, params["d2t"])
        results[name] = {s: replay_drafter(records, params, frozen, batches[s]) for s in args.sets}
        results[name]["overall"] = ReplayedCycles.concatenate([results[name][s] for s in args.sets])
        print(f"measured {name}", file=sys.stderr, flush=True)

    columns = [*args.sets, "overall"]
    first = names[0]
    print(f"\nreplayed greedy τ at a fixed window of K = {args.window}, first turns, {args.max_new_tokens} new tokens; "
          f"questions per set: {', '.join(f'{s} {len(batches[s])}' for s in args.sets)}\n")
    print("| drafter | " + " | ".join(f"τ {c}" for c in columns) + f" | change in τ against {first} ± s.e. "
          "| accept length (every position) |")
    print("|---|" + "---|" * (len(columns) + 2))
    for name, by_set in results.items():
        change = "-"
        if name != first:
            difference, error = by_set["overall"].tau_difference(results[first]["overall"])
            change = f"{difference:+.3f} ± {error:.3f} ({difference / results[first]['overall'].tau():+.2%})"
        print(f"| {name} | " + " | ".join(f"{by_set[c].tau():.3f}" for c in columns)
              + f" | {change} | {by_set['overall'].accept_length():.3f} |")
    if args.compare:
        print("\n| drafter | against | change in τ overall ± s.e. |\n|---|---|---|")
    for name, baseline in args.compare:
        difference, error = results[name]["overall"].tau_difference(results[baseline]["overall"])
        print(f"| {name} | {baseline} | {difference:+.3f} ± {error:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
