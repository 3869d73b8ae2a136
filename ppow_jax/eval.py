"""`python -m ppow_jax.eval`: speculative vs plain decoding on question sets, measured the field's way.

For every turn of every question, the target answers twice from the same prompt with the same
token budget and seed: plain autoregressive decoding, then speculative decoding. Per category and
overall it reports τ (tokens per target verify pass), the acceptance-length histogram, tokens/s of
both and the speedup, and, for greedy runs, whether every output equals the autoregressive one.
Multi-turn questions ask the next turn after the model's own answer (the autoregressive one).
Programs are compiled on the first use of each shape bucket, untimed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

from ppow_jax.cli import add_matmul_precision_argument, matmul_precision, run_entry_point
from ppow_jax.drafters.specs import (DRAFTER_HELP, add_window_arguments, check_drafter_spec, load_drafter,
                                     target_for, window_policy, with_cycle_costs)
from ppow_jax.errors import InputError
from ppow_jax.weights.registry import DEFAULT_MODEL

METRIC_KEYS = ("tau", "speedup", "tokens_per_s", "ar_tokens_per_s", "greedy_match", "n_questions", "new_tokens",
               "accept_hist", "empty_window_share")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ppow_jax.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="registered name, .gguf file or HF directory (default: the target a "
                        f"trained --drafter records, else {DEFAULT_MODEL})")
    parser.add_argument("--drafter", required=True, help=DRAFTER_HELP)
    parser.add_argument("--questions", nargs="+", required=True, help="JSONL question files (MT-bench format)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    add_window_arguments(parser, k_max=5)
    parser.add_argument("--limit", type=int, default=0, help="questions per file (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_matmul_precision_argument(parser)
    parser.add_argument("--out", required=True, help="output directory for results.json, results.md and plots")
    return parser


def summarize(records: list[dict], greedy: bool) -> dict:
    """Aggregates per-turn records into the metrics of one category (or all)."""
    hist = [sum(r["accept_hist"][k] for r in records) for k in range(len(records[0]["accept_hist"]))]
    cycles = sum(hist)
    spec_tokens = sum(r["spec_new_tokens"] for r in records)
    ar_tokens = sum(r["ar_new_tokens"] for r in records)
    spec_rate = spec_tokens / sum(r["spec_seconds"] for r in records)
    ar_rate = ar_tokens / sum(r["ar_seconds"] for r in records)
    return {"tau": sum((k + 1) * n for k, n in enumerate(hist)) / cycles if cycles else None,
            "speedup": spec_rate / ar_rate, "tokens_per_s": spec_rate, "ar_tokens_per_s": ar_rate,
            "greedy_match": all(r["match"] for r in records) if greedy else None,
            "n_questions": len({(r["category"], r["question_id"]) for r in records}), "new_tokens": spec_tokens,
            "accept_hist": hist,
            "empty_window_share": sum(r["empty_windows"] for r in records) / cycles if cycles else None}


def format_tau(tau: Optional[float]) -> str:
    """τ to two decimals; '-' when no verify cycle ran (every answer ended at its first token): `summarize`
    gives None then, `SpeculativeResult.tau` NaN."""
    return "-" if tau is None or math.isnan(tau) else f"{tau:.2f}"


def write_report(out: pathlib.Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = list(results["categories"].items()) + [("overall", results["overall"])]
    branches = results["config"]["branches"]
    shape = f"tree {','.join(map(str, branches))}" if any(b > 1 for b in branches) else "chain"
    lines = [f"# {results['config']['drafter']} on {results['config']['target']}", "",
             f"window {results['config']['window']} (k_max {results['config']['k_max']}, {shape}), temperature "
             f"{results['config']['temperature']}, {results['config']['max_new_tokens']} new tokens, {results['config']['dtype']}, "
             f"matmul precision {results['config']['matmul_precision']}; {results['machine']}",
             "", "| category | questions | τ | tokens/s | AR tokens/s | speedup | greedy match |", "|---|---|---|---|---|---|---|"]
    for name, m in rows:
        match = "-" if m["greedy_match"] is None else ("yes" if m["greedy_match"] else "**NO**")
        lines.append(f"| {name} | {m['n_questions']} | {format_tau(m['tau'])} | {m['tokens_per_s']:.1f} "
                     f"| {m['ar_tokens_per_s']:.1f} | {m['speedup']:.2f}x | {match} |")
    if results["overall"]["empty_window_share"]:
        lines += ["", f"cycles that verified no draft (a plain decode step): "
                      f"{100 * results['overall']['empty_window_share']:.1f}%"]
    if results["overall"]["greedy_match"] is None:
        lines += ["", "greedy match: '-' when sampling (T > 0): outputs are draws, not checked for equality"]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    names = [n for n, _ in rows]
    for key, filename, label in (("tau", "tau.png", "τ (tokens per verify pass)"),
                                 ("speedup", "speedup.png", "speedup over autoregressive")):
        fig, ax = plt.subplots(figsize=(max(5, len(names) * 0.8), 3.5))
        ax.bar(names, [m[key] or 0 for _, m in rows], color="tab:blue")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
    hist = results["overall"]["accept_hist"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(k) for k in range(len(hist))], hist, color="tab:green")
    ax.set_xlabel("accepted drafts per cycle")
    ax.set_ylabel("cycles")
    fig.tight_layout()
    fig.savefig(out / "accept_hist.png", dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    with matmul_precision(args.matmul_precision):
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from ppow_jax.evaluation.questions import load_questions
    from ppow_jax.inference.autoregressive import AutoregressiveDecoder, bucket
    from ppow_jax.inference.sampling import SamplingParams
    from ppow_jax.inference.speculative import SpeculativeDecoder, cache_margin
    from ppow_jax.weights.registry import load_model

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    window = window_policy(args)
    window.check_sampling(sampling.greedy)
    check_drafter_spec(args.drafter)
    args.target = target_for(args.drafter, args.target)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit < 0:
        raise InputError(f"--limit must be >= 0, got {args.limit}")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():  # --out is checked and made before the run, not after it
        raise InputError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out}: cannot create the directory ({err.strerror})") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"--out {out}: the directory is not writable")
    questions = [q for path in args.questions for q in load_questions(path, args.limit)]

    target = load_model(args.target, param_dtype=args.dtype)
    tok = target.tokenizer
    drafter, drafter_params = load_drafter(args.drafter, target)
    window = with_cycle_costs(window, target, drafter, drafter_params, batch=1)
    ar = AutoregressiveDecoder(target.config, target.params, eos_token_ids=tok.eos_token_ids,
                               pad_token_id=tok.pad_token_id)
    spec = SpeculativeDecoder(target.config, target.params, drafter, drafter_params, eos_token_ids=tok.eos_token_ids,
                              pad_token_id=tok.pad_token_id)
    compiled: set = set()
    records = []
    for question in tqdm(questions, desc="questions", file=sys.stderr):
        messages = []
        for turn_index, turn in enumerate(question.turns):
            messages.append({"role": "user", "content": turn})
            prompt = tok.encode(tok.apply_chat_template(messages))
            n = args.max_new_tokens
            shape_key = (bucket(len(prompt)), bucket(len(prompt) + n), bucket(len(prompt) + n + cache_margin(drafter, window)))
            if shape_key not in compiled:  # compile both programs for this bucket, untimed
                ar.generate([prompt], n, sampling, seed=args.seed)
                spec.generate([prompt], n, sampling, window, seed=args.seed)
                compiled.add(shape_key)
            start = time.perf_counter()
            plain = ar.generate([prompt], n, sampling, seed=args.seed)
            ar_seconds = time.perf_counter() - start
            start = time.perf_counter()
            fast = spec.generate([prompt], n, sampling, window, seed=args.seed)
            spec_seconds = time.perf_counter() - start
            # Only greedy outputs must be equal; sampled ones are different draws of the same distribution.
            match = plain.tokens[0] == fast.tokens[0] if sampling.greedy else None
            if match is False:
                print(f"error: greedy speculative output differs from autoregressive output on question "
                      f"{question.question_id} turn {turn_index + 1}", file=sys.stderr)
            records.append({"category": question.category, "question_id": question.question_id, "turn": turn_index,
                            "ar_new_tokens": len(plain.tokens[0]), "spec_new_tokens": len(fast.tokens[0]),
                            "ar_seconds": ar_seconds, "spec_seconds": spec_seconds,
                            "accept_hist": fast.accept_hist, "empty_windows": sum(fast.empty_windows),
                            "match": match})
            messages.append({"role": "assistant", "content": tok.decode(plain.tokens[0])})

    categories = {}
    for record in records:
        categories.setdefault(record["category"], []).append(record)
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    results = {"categories": {name: summarize(recs, sampling.greedy) for name, recs in categories.items()},
               "overall": summarize(records, sampling.greedy),
               "config": {"target": args.target, "drafter": args.drafter, "window": args.window, "k_max": args.k_max,
                          "threshold": args.threshold, "branches": list(window.branches),
                          "cycle_costs": list(window.verify_costs) + [window.draft_cost] if window.kind == "cost" else None,
                          "temperature": args.temperature, "top_k": args.top_k,
                          "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "limit": args.limit,
                          "seed": args.seed, "dtype": args.dtype, "matmul_precision": args.matmul_precision,
                          "questions": args.questions},
               "machine": f"jax {jax.__version__} on {devices}", "turns": records}
    write_report(out, results)
    overall = results["overall"]
    print((out / "results.md").read_text())
    print(f"overall: tau {format_tau(overall['tau'])}, speedup {overall['speedup']:.2f}x; results in {out}",
          file=sys.stderr)
    if sampling.greedy and not overall["greedy_match"]:
        print("error: greedy speculative outputs differ from autoregressive outputs (see results.json)",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
