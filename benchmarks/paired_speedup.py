"""Wall-clock speedup of several drafters on the same turns, timed in one process, interleaved.

`benchmarks/eval_sets.py` times one drafter per process, each against its own plain-decoding
baseline: the machine's drift between runs (on this CPU, plain decoding ran anywhere from 34 to 45
tokens/s) then swamps a speedup difference of a few percent between two drafters. Here every turn
is decoded by plain decoding and by each drafter in turn, back to back in one process, so all of
them share one baseline and the same machine state:

  - speedup of a drafter: its tokens/s over plain decoding's, each summed over all turns (for
    greedy runs, where the answers are equal, the plain decode's seconds over the drafter's);
  - paired difference of two drafters' speedups (`--compare A B`), with a 95% interval from a
    bootstrap over questions within each set: the sets' sampling error and the timing noise, both.

The order of the decoders changes from turn to turn (a Williams design), so that each goes first,
and right after each other, equally often. Greedy outputs of every drafter must equal plain
decoding's (exit 1 otherwise). Programs are compiled on each decoder's first use of a shape bucket,
untimed. `--shard I/N` times every N-th question from the I-th, so that N processes (one per core)
share the work; `--report` merges their results.

    taskset -c 0 python benchmarks/paired_speedup.py --drafter "CST=runs/cst/drafter" \\
        --drafter "PPOW=checkpoints/smollm2-135m-instruct/ppow" --k-max 3 --shard 0/2 --out runs/bench/paired/0 &
    taskset -c 1 python benchmarks/paired_speedup.py ... --shard 1/2 --out runs/bench/paired/1 &
    wait; python benchmarks/paired_speedup.py --report runs/bench/paired/0 runs/bench/paired/1 --compare PPOW CST
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

import numpy as np

from ppow_jax.cli import add_matmul_precision_argument, matmul_precision, run_entry_point
from ppow_jax.errors import InputError
from ppow_jax.evaluation.questions import EVAL_SETS, eval_set_path

PLAIN = "plain"


def parse_named(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec or name == PLAIN:
        raise InputError(f"--drafter {text!r}: expected NAME=SPEC with NAME other than {PLAIN!r}")
    return name, spec


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise InputError(f"--shard {text!r}: expected I/N with 0 <= I < N")
    return int(index), int(count)


def check_compare(compare: Optional[Sequence[str]], names: Sequence[str]) -> None:
    if compare and (compare[0] == compare[1] or not set(compare) <= set(names)):
        raise InputError(f"--compare {' '.join(compare)}: expected two different drafters of {', '.join(names)}")


def decoder_orders(names: Sequence[str], turns: int) -> list[list[str]]:
    """Per turn, the order to time the decoders in, from a Williams design: over each cycle of its
    rows, every decoder goes first, and right after every other one, equally often (so a decode's
    effect on the next, a warm cache or a clock change, falls on every decoder alike)."""
    n = len(names)
    base, low, high = [0], 1, n - 1
    for position in range(1, n):  # 0, 1, n-1, 2, n-2, ...
        if position % 2:
            base, low = base + [low], low + 1
        else:
            base, high = base + [high], high - 1
    rows = [[(k + shift) % n for k in base] for shift in range(n)]
    if n % 2:  # an odd count also needs the rows reversed
        rows += [row[::-1] for row in rows]
    return [[names[k] for k in rows[turn % len(rows)]] for turn in range(turns)]


def common_target(drafters: dict[str, str], target: Optional[str]) -> str:
    """`--target`, else the one target every drafter records (a drafter trained for another is refused)."""
    from ppow_jax.drafters.specs import target_for

    if target:
        return target
    recorded = {name: target_for(spec, None) for name, spec in drafters.items()}
    if len(set(recorded.values())) > 1:
        raise InputError("the drafters record different targets (" + ", ".join(f"{n}: {t}" for n, t in recorded.items())
                         + "); name one with --target")
    return next(iter(recorded.values()))


def time_turns(args: argparse.Namespace, drafters: dict[str, str]) -> dict:
    """Decodes every turn of this shard's questions with plain decoding and each drafter, timed."""
    import jax
    from tqdm import tqdm

    from ppow_jax.drafters.specs import load_drafter, window_policy, with_cycle_costs
    from ppow_jax.evaluation.questions import load_questions
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder, bucket
    from ppow_jax.inference.sampling import SamplingParams
    from ppow_jax.inference.speculative import SpeculativeDecoder, cache_margin
    from ppow_jax.weights.registry import load_model

    shard_index, shard_count = parse_shard(args.shard)
    sampling = SamplingParams(temperature=args.temperature)
    windows = {}
    for name, spec in drafters.items():  # a calibrated window is each drafter's own
        windows[name] = window_policy(argparse.Namespace(**{**vars(args), "drafter": spec}))
        windows[name].check_sampling(sampling.greedy)
    questions = [q for name in EVAL_SETS
                 for q in load_questions(eval_set_path(args.data_root, name), args.limit)][shard_index::shard_count]
    if not questions:
        raise InputError(f"--shard {args.shard} holds no questions (--limit {args.limit} per set)")

    target_name = common_target(drafters, args.target)
    target = load_model(target_name)
    tok = target.tokenizer
    decoders = {PLAIN: AutoregressiveDecoder(target.config, target.params, eos_token_ids=tok.eos_token_ids,
                                             pad_token_id=tok.pad_token_id)}
    margins = {PLAIN: 0}
    for name, spec in drafters.items():
        drafter, drafter_params = load_drafter(spec, target)
        windows[name] = with_cycle_costs(windows[name], target, drafter, drafter_params, batch=1)
        margins[name] = cache_margin(drafter, windows[name])
        decoders[name] = SpeculativeDecoder(target.config, target.params, drafter, drafter_params,
                                            eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)

    def decode(name: str, prompt: list[int]):
        if name == PLAIN:
            return decoders[name].generate([prompt], args.max_new_tokens, sampling, seed=args.seed)
        return decoders[name].generate([prompt], args.max_new_tokens, sampling, windows[name], seed=args.seed)

    compiled: dict[str, set] = {name: set() for name in decoders}
    turns, mismatches = [], []
    orders = iter(decoder_orders(list(decoders), sum(len(q.turns) for q in questions)))
    for question in tqdm(questions, desc="questions", file=sys.stderr):
        messages = []
        for turn_index, text in enumerate(question.turns):
            messages.append({"role": "user", "content": text})
            prompt = tok.encode(tok.apply_chat_template(messages))
            total = len(prompt) + args.max_new_tokens
            for name in decoders:  # compile each decoder's programs for its own shape buckets, untimed
                shape_key = (bucket(len(prompt)), bucket(total), bucket(total + margins[name]))
                if shape_key not in compiled[name]:
                    decode(name, prompt)
                    compiled[name].add(shape_key)
            seconds, outputs = {}, {}
            for name in next(orders):
                start = time.perf_counter()
                outputs[name] = decode(name, prompt)
                seconds[name] = time.perf_counter() - start
            plain_tokens = outputs[PLAIN].tokens[0]
            match = {name: outputs[name].tokens[0] == plain_tokens for name in drafters} if sampling.greedy else None
            if match and not all(match.values()):
                mismatches.append(f"question {question.question_id} turn {turn_index + 1} "
                                  f"({', '.join(name for name, same in match.items() if not same)})")
            turns.append({"set": question.category.split("/")[0], "question_id": question.question_id, "turn": turn_index,
                          "seconds": seconds, "new_tokens": {name: len(out.tokens[0]) for name, out in outputs.items()},
                          "accept_hist": {name: outputs[name].accept_hist for name in drafters}, "match": match})
            messages.append({"role": "assistant", "content": tok.decode(plain_tokens)})
    for mismatch in mismatches:
        print(f"error: greedy speculative output differs from plain decoding's on {mismatch}", file=sys.stderr)
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return {"config": {"target": target_name, "drafters": drafters, "window": args.window, "k_max": args.k_max,
                       "threshold": args.threshold, "branches": args.branches,
                       "cycle_costs": {name: list(w.verify_costs) + [w.draft_cost] for name, w in windows.items()}
                       if args.window == "cost" else None,
                       "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "limit": args.limit,
                       "shard": args.shard, "seed": args.seed, "matmul_precision": args.matmul_precision,
                       "data_root": str(pathlib.Path(args.data_root).resolve())},
            "machine": f"jax {jax.__version__} on {devices}, {os.cpu_count()} cores seen, affinity "
                       f"{sorted(os.sched_getaffinity(0))}",
            "turns": turns}


def tokens_per_second(turns: list[dict], name: str) -> float:
    """One decoder's new tokens over its seconds, each summed over the turns."""
    return sum(t["new_tokens"][name] for t in turns) / sum(t["seconds"][name] for t in turns)


def speedups(turns: list[dict], names: Sequence[str]) -> dict[str, float]:
    """Per drafter, its tokens/s over plain decoding's."""
    return {name: tokens_per_second(turns, name) / tokens_per_second(turns, PLAIN) for name in names}


def format_tau(turns: list[dict], name: str) -> str:
    """Mean tokens per verify cycle; '-' when no cycle ran (every answer ended at its first token)."""
    hist = np.sum([t["accept_hist"][name] for t in turns], axis=0)
    cycles = np.sum(hist)
    return f"{np.sum((np.arange(len(hist)) + 1) * hist) / cycles:.3f}" if cycles else "-"


def bootstrap_difference(turns: list[dict], a: str, b: str, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% interval of speedup(a) - speedup(b), resampling questions within each set (a question's
    turns stay together; each set keeps its number of questions)."""
    keys = sorted({(t["set"], t["question_id"]) for t in turns})
    index = {key: i for i, key in enumerate(keys)}
    # per question: tokens and seconds of plain, a and b
    sums = np.zeros((len(keys), 6))
    for t in turns:
        sums[index[(t["set"], t["question_id"])]] += [t["new_tokens"][PLAIN], t["new_tokens"][a], t["new_tokens"][b],
                                                      t["seconds"][PLAIN], t["seconds"][a], t["seconds"][b]]
    rng = np.random.default_rng(seed)
    totals = np.zeros((resamples, 6))
    for set_name in sorted({key[0] for key in keys}):
        members = np.array([i for i, key in enumerate(keys) if key[0] == set_name])
        totals += sums[members[rng.integers(0, len(members), size=(resamples, len(members)))]].sum(axis=1)
    rates = totals[:, :3] / totals[:, 3:]
    differences = (rates[:, 1] - rates[:, 2]) / rates[:, 0]
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def load_shards(directories: Sequence[str]) -> tuple[dict, list[dict], list[str]]:
    """The common settings, the turns and the machines of one run's shards; shards of other runs,
    repeated shards or repeated turns are refused."""
    results = []
    for directory in directories:
        path = pathlib.Path(directory) / "results.json"
        if not path.is_file():
            raise InputError(f"--report {directory}: no results.json there")
        results.append(json.loads(path.read_text()))
    configs = [{k: v for k, v in r["config"].items() if k != "shard"} for r in results]
    if any(c != configs[0] for c in configs):
        raise InputError("--report: the runs differ in their settings other than --shard; merge only shards of one run")
    shards = [parse_shard(r["config"]["shard"]) for r in results]
    if len({count for _, count in shards}) > 1 or len(set(shards)) < len(shards):
        raise InputError(f"--report: expected distinct shards I/N of one N, got {', '.join(r['config']['shard'] for r in results)}")
    missing = sorted(set(range(shards[0][1])) - {index for index, _ in shards})
    if missing:
        print(f"warning: shards {', '.join(f'{i}/{shards[0][1]}' for i in missing)} are not merged", file=sys.stderr)
    turns = [t for r in results for t in r["turns"]]
    if not turns:
        raise InputError("--report: the runs hold no turns")
    if len({(t["set"], t["question_id"], t["turn"]) for t in turns}) < len(turns):
        raise InputError("--report: a turn appears twice")
    return configs[0], turns, sorted({r["machine"] for r in results})


def report(directories: Sequence[str], compare: Optional[Sequence[str]]) -> int:
    config, turns, machines = load_shards(directories)
    names = list(config["drafters"])
    check_compare(compare, names)
    greedy = config["temperature"] == 0
    print(f"\n{len({(t['set'], t['question_id']) for t in turns})} questions, {len(turns)} turns; "
          f"{'target ' + config['target'] + '; ' if 'target' in config else ''}"  # cd5ce72's results record no target
          f"window {config['window']} (K_max {config['k_max']}), T = {config['temperature']:g}, "
          f"{config['max_new_tokens']} new tokens; {'; '.join(machines)}\n")
    sets = sorted({t["set"] for t in turns}, key=EVAL_SETS.index)
    by_set = [[t for t in turns if t["set"] == s] for s in sets]
    lines = ["| drafter | " + " | ".join(f"τ {s}" for s in sets) + " | τ | tokens/s | speedup | "
             + " | ".join(f"speedup {s}" for s in sets) + " | greedy match |"]
    lines.append("|" + "---|" * (len(sets) * 2 + 5))
    overall = speedups(turns, names)
    for name in names:
        match = "-" if not greedy else ("yes" if all(t["match"][name] for t in turns) else "**NO**")
        lines.append(f"| {name} | " + " | ".join(format_tau(g, name) for g in by_set) + f" | {format_tau(turns, name)} | "
                     f"{tokens_per_second(turns, name):.1f} | {overall[name]:.3f}x | " + " | ".join(f"{speedups(g, [name])[name]:.3f}x" for g in by_set)
                     + f" | {match} |")
    plain_tokens, plain_seconds = sum(t["new_tokens"][PLAIN] for t in turns), sum(t["seconds"][PLAIN] for t in turns)
    lines.append(f"\nplain decoding: {tokens_per_second(turns, PLAIN):.1f} tokens/s ({plain_tokens} tokens in {plain_seconds:.1f} s)")
    if not greedy:
        lines.append("greedy match: '-' when sampling (T > 0): outputs are draws, not checked for equality")
    if compare:
        a, b = compare
        low, high = bootstrap_difference(turns, a, b)
        lines.append(f"speedup {a} - {b}: {overall[a] - overall[b]:+.3f}x (95% interval {low:+.3f} to {high:+.3f}, "
                     f"bootstrap over questions within each set)")
    print("\n".join(lines))
    if greedy and not all(all(t["match"].values()) for t in turns):
        print("error: a greedy speculative output differs from plain decoding's (see results.json)", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ppow_jax.drafters.specs import add_window_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", action="append", default=[], help="NAME=SPEC, repeated; SPEC as in ppow_jax.eval")
    parser.add_argument("--target", help="default: the target the drafters record")
    parser.add_argument("--limit", type=int, default=0, help="questions per set (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    add_window_arguments(parser, k_max=3)
    add_matmul_precision_argument(parser)
    parser.add_argument("--shard", default="0/1", help="I/N: every N-th question from the I-th")
    parser.add_argument("--data-root", default=os.environ.get("PPOW_DATA_ROOT", "../shared/data"))
    parser.add_argument("--out", help="directory for results.json")
    parser.add_argument("--report", nargs="+", metavar="DIR", help="only merge and print these runs' results")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="the paired speedup difference A - B")
    return parser


def run(args: argparse.Namespace) -> int:
    from ppow_jax.drafters.specs import check_drafter_spec

    if args.report:
        return report(args.report, args.compare)
    if not args.drafter or not args.out:
        raise InputError("--drafter and --out are needed to time a run (or --report DIR... to merge runs)")
    drafters = dict(parse_named(text) for text in args.drafter)
    if len(drafters) != len(args.drafter):
        raise InputError("--drafter: every NAME must differ")
    for spec in drafters.values():
        check_drafter_spec(spec)
    check_compare(args.compare, list(drafters))
    parse_shard(args.shard)
    if args.max_new_tokens < 1 or args.limit < 0:
        raise InputError(f"--max-new-tokens must be >= 1 and --limit >= 0, got {args.max_new_tokens} and {args.limit}")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with matmul_precision(args.matmul_precision):
        results = time_turns(args, drafters)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return report([str(out)], args.compare)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
