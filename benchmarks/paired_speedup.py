"""Wall-clock speedup of several drafters on the same turns, timed in one process, interleaved.

`benchmarks/eval_sets.py` times one drafter per process, each against its own plain-decoding
baseline: the machine's drift between runs (on this CPU, plain decoding ran anywhere from 34 to 47
tokens/s) then swamps a speedup difference of a few percent between two drafters. Here every turn
is decoded by plain decoding and by each drafter in turn, back to back in one process, the order
rotated from turn to turn, so all of them share one baseline and the same machine state:

  - speedup of a drafter: the plain decode's seconds over its seconds, summed over all turns;
  - paired difference of two drafters' speedups (`--compare A B`), with a 95% interval from a
    bootstrap over questions: the sets' sampling error and the timing noise, both.

Greedy outputs of every drafter must equal plain decoding's (exit 1 otherwise). Programs are
compiled on the first use of each shape bucket, untimed. `--shard I/N` times every N-th question
from the I-th, so that N processes (one per core) share the work; `--report` merges their results.

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

SETS = ("mt_bench", "humaneval", "gsm8k", "alpaca")
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


def time_turns(args: argparse.Namespace) -> dict:
    """Decodes every turn of this shard's questions with plain decoding and each drafter, timed."""
    import jax
    from tqdm import tqdm

    from ppow_jax.drafters.specs import check_drafter_spec, load_drafter, target_for, window_policy, with_cycle_costs
    from ppow_jax.evaluation.questions import load_questions
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder, bucket
    from ppow_jax.inference.sampling import SamplingParams
    from ppow_jax.inference.speculative import SpeculativeDecoder, cache_margin
    from ppow_jax.weights.registry import load_model

    drafters = dict(parse_named(text) for text in args.drafter)
    if len(drafters) != len(args.drafter):
        raise InputError("--drafter: every NAME must differ")
    for spec in drafters.values():
        check_drafter_spec(spec)
    shard_index, shard_count = parse_shard(args.shard)
    sampling = SamplingParams(temperature=args.temperature)
    questions = [q for name in SETS for q in load_questions(pathlib.Path(args.data_root) / "eval" / name / "question.jsonl",
                                                            args.limit)][shard_index::shard_count]

    target = load_model(target_for(next(iter(drafters.values())), args.target))
    tok = target.tokenizer
    decoders = {PLAIN: AutoregressiveDecoder(target.config, target.params, eos_token_ids=tok.eos_token_ids,
                                             pad_token_id=tok.pad_token_id)}
    windows, margin = {}, 0
    for name, spec in drafters.items():
        window = window_policy(argparse.Namespace(**{**vars(args), "drafter": spec}))  # a calibrated window is the drafter's own
        window.check_sampling(sampling.greedy)
        drafter, drafter_params = load_drafter(spec, target)
        windows[name] = with_cycle_costs(window, target, drafter, drafter_params, batch=1)
        margin = max(margin, cache_margin(drafter, windows[name]))
        decoders[name] = SpeculativeDecoder(target.config, target.params, drafter, drafter_params,
                                            eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)

    def decode(name: str, prompt: list[int]):
        if name == PLAIN:
            return decoders[name].generate([prompt], args.max_new_tokens, sampling, seed=args.seed)
        return decoders[name].generate([prompt], args.max_new_tokens, sampling, windows[name], seed=args.seed)

    names = list(decoders)
    compiled: set = set()
    turns = []
    for question in tqdm(questions, desc="questions", file=sys.stderr):
        messages = []
        for turn_index, text in enumerate(question.turns):
            messages.append({"role": "user", "content": text})
            prompt = tok.encode(tok.apply_chat_template(messages))
            n = len(prompt) + args.max_new_tokens
            shape_key = (bucket(len(prompt)), bucket(n), bucket(n + margin))
            if shape_key not in compiled:
                for name in names:
                    decode(name, prompt)
                compiled.add(shape_key)
            shift = len(turns) % len(names)  # each decoder goes first as often as the others
            seconds, outputs = {}, {}
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                outputs[name] = decode(name, prompt)
                seconds[name] = time.perf_counter() - start
            plain_tokens = outputs[PLAIN].tokens[0]
            turns.append({"set": question.category.split("/")[0], "question_id": question.question_id, "turn": turn_index,
                          "seconds": seconds, "new_tokens": {name: len(out.tokens[0]) for name, out in outputs.items()},
                          "accept_hist": {name: outputs[name].accept_hist for name in drafters},
                          "match": ({name: outputs[name].tokens[0] == plain_tokens for name in drafters}
                                    if sampling.greedy else None)})
            messages.append({"role": "assistant", "content": tok.decode(plain_tokens)})
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return {"config": {"drafters": drafters, "window": args.window, "k_max": args.k_max, "temperature": args.temperature,
                       "max_new_tokens": args.max_new_tokens, "limit": args.limit, "shard": args.shard, "seed": args.seed,
                       "matmul_precision": args.matmul_precision},
            "machine": f"jax {jax.__version__} on {devices}, {os.cpu_count()} cores seen, affinity "
                       f"{sorted(os.sched_getaffinity(0))}",
            "turns": turns}


def speedups(turns: list[dict], names: Sequence[str]) -> dict[str, float]:
    """Per drafter, plain decoding's seconds over the drafter's, summed over the turns."""
    plain = sum(t["seconds"][PLAIN] for t in turns)
    return {name: plain / sum(t["seconds"][name] for t in turns) for name in names}


def tau(turns: list[dict], name: str) -> float:
    hist = np.sum([t["accept_hist"][name] for t in turns], axis=0)
    return float(np.sum((np.arange(len(hist)) + 1) * hist) / np.sum(hist))


def bootstrap_difference(turns: list[dict], a: str, b: str, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% interval of speedup(a) - speedup(b), resampling whole questions (a question's turns stay together)."""
    keys = sorted({(t["set"], t["question_id"]) for t in turns})
    index = {key: i for i, key in enumerate(keys)}
    per_question = np.zeros((len(keys), 3))  # seconds of plain, a, b
    for t in turns:
        per_question[index[(t["set"], t["question_id"])]] += [t["seconds"][PLAIN], t["seconds"][a], t["seconds"][b]]
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(resamples, len(keys)))
    totals = per_question[draws].sum(axis=1)
    differences = totals[:, 0] / totals[:, 1] - totals[:, 0] / totals[:, 2]
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def report(directories: Sequence[str], compare: Optional[Sequence[str]]) -> int:
    results = []
    for directory in directories:
        path = pathlib.Path(directory) / "results.json"
        if not path.is_file():
            raise InputError(f"--report {directory}: no results.json there")
        results.append(json.loads(path.read_text()))
    configs = [{k: v for k, v in r["config"].items() if k != "shard"} for r in results]
    if any(c != configs[0] for c in configs):
        raise InputError("--report: the runs differ in their settings other than --shard; merge only shards of one run")
    turns = [t for r in results for t in r["turns"]]
    names = list(configs[0]["drafters"])
    if compare and not set(compare) <= set(names):
        raise InputError(f"--compare {' '.join(compare)}: the drafters are {', '.join(names)}")
    greedy = configs[0]["temperature"] == 0
    config = configs[0]
    print(f"\n{len({(t['set'], t['question_id']) for t in turns})} questions, {len(turns)} turns; window {config['window']} "
          f"(K_max {config['k_max']}), T = {config['temperature']:g}, {config['max_new_tokens']} new tokens; "
          f"{'; '.join(sorted({r['machine'] for r in results}))}\n")
    sets = sorted({t["set"] for t in turns}, key=lambda s: SETS.index(s) if s in SETS else len(SETS))
    lines = ["| drafter | " + " | ".join(f"τ {s}" for s in sets) + " | τ | tokens/s | speedup | "
             + " | ".join(f"speedup {s}" for s in sets) + " | greedy match |"]
    lines.append("|" + "---|" * (len(sets) * 2 + 5))
    plain_rate = sum(t["new_tokens"][PLAIN] for t in turns) / sum(t["seconds"][PLAIN] for t in turns)
    overall = speedups(turns, names)
    for name in names:
        by_set = [[t for t in turns if t["set"] == s] for s in sets]
        rate = sum(t["new_tokens"][name] for t in turns) / sum(t["seconds"][name] for t in turns)
        match = "-" if not greedy else ("yes" if all(t["match"][name] for t in turns) else "**NO**")
        lines.append(f"| {name} | " + " | ".join(f"{tau(g, name):.3f}" for g in by_set) + f" | {tau(turns, name):.3f} | "
                     f"{rate:.1f} | {overall[name]:.3f}x | " + " | ".join(f"{speedups(g, [name])[name]:.3f}x" for g in by_set)
                     + f" | {match} |")
    lines.append(f"\nplain decoding: {plain_rate:.1f} tokens/s")
    if compare:
        a, b = compare
        low, high = bootstrap_difference(turns, a, b)
        lines.append(f"speedup {a} - {b}: {overall[a] - overall[b]:+.3f}x (95% interval {low:+.3f} to {high:+.3f}, "
                     f"bootstrap over questions)")
    print("\n".join(lines))
    if greedy and not all(all(t["match"].values()) for t in turns):
        print("error: a greedy speculative output differs from plain decoding's", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ppow_jax.drafters.specs import add_window_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", action="append", default=[], help="NAME=SPEC, repeated; SPEC as in ppow_jax.eval")
    parser.add_argument("--target", help="default: the target the first drafter records")
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
    if args.report:
        return report(args.report, args.compare)
    if not args.drafter or not args.out:
        raise InputError("--drafter and --out are needed to time a run (or --report DIR... to merge runs)")
    if args.max_new_tokens < 1 or args.limit < 0:
        raise InputError(f"--max-new-tokens must be >= 1 and --limit >= 0, got {args.max_new_tokens} and {args.limit}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with matmul_precision(args.matmul_precision):
        results = time_turns(args)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return report([str(out)], args.compare)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
