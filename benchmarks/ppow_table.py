"""The PPOW results table: τ per question set and wall-clock speedup, one row per drafter.

Reads the `results.json` that `benchmarks/eval_sets.py` (or `python -m ppow_jax.eval`) wrote for
each drafter and window, and prints one markdown table per (temperature, window):

    python benchmarks/ppow_table.py --run "token-level=runs/bench/kd" --run "PPOW full=runs/bench/ppow" ...

Each `--run NAME=DIR` points at an eval_sets output directory (`DIR/<window>/T0/results.json`, ...).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from ppow_jax.evaluation.questions import EVAL_SETS


def set_metrics(results: dict) -> dict[str, dict]:
    """Per question set (the category's first path component) and overall: τ, speedup, greedy match."""
    from ppow_jax.eval import summarize

    greedy = results["config"]["temperature"] == 0
    groups: dict[str, list] = {}
    for record in results["turns"]:
        groups.setdefault(record["category"].split("/")[0], []).append(record)
    metrics = {name: summarize(records, greedy) for name, records in groups.items()}
    metrics["overall"] = results["overall"]
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True,
                        help="NAME=DIR, DIR holding one eval_sets --out directory per window (DIR/<window>/T0/results.json)")
    args = parser.parse_args()
    runs = []
    for spec in args.run:
        name, _, directory = spec.partition("=")
        if not directory:
            parser.error(f"--run {spec!r}: expected NAME=DIR")
        runs.append((name, pathlib.Path(directory)))

    from ppow_jax.eval import format_tau

    tables: dict[tuple[str, str], list[str]] = {}
    for name, directory in runs:
        found = sorted(directory.glob("*/T*/results.json"))
        if not found:  # a run without results must not silently drop its row
            print(f"error: --run {name!r}: no results.json under {str(directory)!r}/<window>/T*/ "
                  "(NAME=DIR splits at the first '=')", file=sys.stderr)
            return 2
        for path in found:
            results = json.loads(path.read_text())
            config = results["config"]
            key = (f"T = {config['temperature']:g}", f"{config['window']} window, K_max {config['k_max']}")
            m = set_metrics(results)
            cells = [format_tau(m[s]["tau"]) if s in m else "-" for s in EVAL_SETS]
            match = m["overall"]["greedy_match"]
            tables.setdefault(key, []).append(
                f"| {name} | " + " | ".join(cells) + f" | **{format_tau(m['overall']['tau'])}** | "
                f"{m['overall']['speedup']:.2f}x | "
                + ("-" if match is None else ("yes" if match else "**NO**")) + " |")
    # Greedy before sampled; within each, the fixed window first.
    for (temperature, window), rows in sorted(tables.items(), key=lambda item: (item[0][0], not item[0][1].startswith("fixed"))):
        print(f"\n#### {temperature}, {window}\n")
        print("| drafter | " + " | ".join(f"τ {s}" for s in EVAL_SETS) + " | τ overall | speedup | greedy match |")
        print("|---" * (len(EVAL_SETS) + 4) + "|")
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
