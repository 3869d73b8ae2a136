"""Acceptance of exported drafters on the held-out dev split: the probe training logs
(`ppow_jax.train.DevProbe`), for drafters that are already trained.

Greedy windows of `train.eval_window` drafts at every `train.eval_stride`-th position of the dev
responses, verified against the target's own greedy continuation. `accept_length` is the mean
number of drafts accepted per window (a cycle's τ is about 1 + accept_length when the engine's K is
the same), `first_accept` the first draft's accept rate. Each drafter after the first is also given
as its change in accept length against the first, on the same windows, with the standard error of
that change over the dev sequences (the split's sampling error, not the spread between training runs).

`--acceptance sampling`: the same windows sampled from the drafter at T = 1 (the key of `--seed`) and verified
by the live target under lossless sampling acceptance (the T = 1 engine's); both figures are
expectations over the acceptance coins.

    python benchmarks/dev_acceptance.py --config configs/smollm2_135m_ppow.py \
        --drafter "token-level=checkpoints/smollm2-135m-instruct/kd" --drafter "PPOW=runs/ppow/full/drafter"
"""

from __future__ import annotations

import argparse
import sys

from ppow_jax.cli import load_config_file, run_entry_point
from ppow_jax.drafters.store import load_drafter
from ppow_jax.train import DevProbe
from ppow_jax.weights.registry import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_135m_ppow.py",
                        help="a training config: its target, dev split and probe settings")
    parser.add_argument("--drafter", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--acceptance", choices=("greedy", "sampling"), default="greedy",
                        help="greedy windows (T = 0) or windows sampled and verified at T = 1")
    parser.add_argument("--seed", type=int, default=0, help="the draft-sampling key of --acceptance sampling")
    parser.add_argument("--split", nargs=2, metavar=("CACHE_DIR", "FEATURES_DIR"),
                        help="measure on another distilled cache and its feature cache instead of the dev split "
                             "(a training split: how much drafters gained on what they were trained on)")
    return run_entry_point(parser, run)


def run(args: argparse.Namespace) -> int:
    config = load_config_file(args.config)
    if args.split:
        config.data.dev_cache_dir, config.data.dev_features_dir = args.split
    target = load_model(config.target, param_dtype=config.param_dtype)
    probe = DevProbe(config, target, progress=False, acceptance=args.acceptance, seed=args.seed)
    kind = "greedy windows" if args.acceptance == "greedy" else "windows sampled and verified at T = 1"
    print(f"dev split: {sum(len(b['tokens']) for b in probe.batches)} sequences; {kind} of "
          f"{probe.window}, every {probe.stride}th position\n")
    print("| drafter | accept length | first-draft accept rate | change against the first ± its standard error |")
    print("|---|---|---|---|")
    baseline = None
    for spec in args.drafter:
        name, _, directory = spec.partition("=")
        drafter, params = load_drafter(directory or name, target.config)
        counts = probe.counts(drafter, params)
        measured = counts.means()
        change = "-"
        if baseline is None:
            baseline = counts
        else:
            difference, error = counts.accept_length_difference(baseline)
            change = f"{difference:+.3f} ± {error:.3f}"
        print(f"| {name} | {measured['accept_length']:.3f} | {measured['first_accept']:.3f} | {change} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
