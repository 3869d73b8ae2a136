"""Speculative decoding on the four shared question sets, greedy and sampled, with one drafter.

Runs `python -m ppow_jax.eval` once per temperature over mt_bench, humaneval, gsm8k and alpaca
(`--limit` questions each) and prints one markdown table per temperature: τ, tokens/s of both
decoders and the speedup, per set and overall, all measured in the same run.

    python benchmarks/eval_sets.py --drafter self:8 --limit 10 --out runs/bench/self8
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

from ppow_jax.evaluation.questions import EVAL_SETS, eval_set_path


def per_set_table(results: dict) -> str:
    from ppow_jax.eval import format_tau, summarize

    greedy = results["config"]["temperature"] == 0
    groups: dict[str, list] = {}
    for record in results["turns"]:
        groups.setdefault(record["category"].split("/")[0], []).append(record)
    rows = [(name, summarize(records, greedy)) for name, records in groups.items()] + [("overall", results["overall"])]
    lines = ["| set | questions | τ | tokens/s | AR tokens/s | speedup | greedy match |", "|---|---|---|---|---|---|---|"]
    for name, m in rows:
        match = "-" if m["greedy_match"] is None else ("yes" if m["greedy_match"] else "**NO**")
        lines.append(f"| {name} | {m['n_questions']} | {format_tau(m['tau'])} | {m['tokens_per_s']:.1f} | "
                     f"{m['ar_tokens_per_s']:.1f} | {m['speedup']:.2f}x | {match} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--target", help="default: the target a trained drafter records (see python -m ppow_jax.eval)")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--window", default="fixed")
    parser.add_argument("--k-max", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--branches", default="1", help="children per draft at each depth, as in ppow_jax.eval")
    parser.add_argument("--data-root", default=os.environ.get("PPOW_DATA_ROOT", "../shared/data"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    questions = [str(eval_set_path(args.data_root, name)) for name in EVAL_SETS]
    status = 0
    for temperature in args.temperatures:
        out = pathlib.Path(args.out) / f"T{temperature:g}"
        command = [sys.executable, "-m", "ppow_jax.eval", *(["--target", args.target] if args.target else []),
                   "--drafter", args.drafter, "--questions", *questions, "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens),
                   "--temperature", str(temperature), "--window", args.window, "--k-max", str(args.k_max),
                   "--threshold", str(args.threshold), "--branches", args.branches, "--out", str(out)]
        print("$ " + " ".join(command), file=sys.stderr, flush=True)
        returncode = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
        if not (out / "results.json").exists():
            return returncode or 1
        status = status or returncode
        results = json.loads((out / "results.json").read_text())
        print(f"\n### drafter {args.drafter}, window {args.window} (K_max {args.k_max}, branches {args.branches}), T = {temperature:g}, "
              f"{args.max_new_tokens} new tokens, {args.limit} questions per set; {results['machine']}\n")
        print(per_set_table(results), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
