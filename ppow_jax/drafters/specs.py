"""The drafter and window flags that `python -m ppow_jax.eval` and `python -m ppow_jax.generate` share.

A drafter SPEC is `self:N` (the target's first N layers), a trained drafter directory
(`python -m ppow_jax.train` exports one) or a small LM checkpoint sharing the target's vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Optional

from ppow_jax.errors import CheckpointError, InputError

DRAFTER_HELP = ("self:N (the target's first N layers), a trained drafter directory (python -m ppow_jax.train), "
                "or a drafter LM checkpoint sharing the vocabulary")


def add_window_arguments(parser: argparse.ArgumentParser, *, k_max: int) -> None:
    parser.add_argument("--window", default="fixed",
                        help="window policy: fixed | confidence | divergence | adaptive (a trained drafter's "
                             "calibrated acceptance model) | cost (that model and this machine's cycle costs: "
                             "drafts only what is expected to pay for its verification, possibly nothing)")
    parser.add_argument("--k-max", type=int, default=k_max, help="largest window (drafted tokens per cycle)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="confidence window: least top probability; divergence window: largest mean criticality; "
                             "adaptive window: least predicted probability that the whole window is accepted")
    parser.add_argument("--branches", default="1",
                        help="fixed window, greedy: draft a tree, each draft at depth d having the drafter's top b_d "
                             "next drafts as children, for 'b_1,b_2,..' (missing depths: 1; '4': four chains from "
                             "the top four first drafts), verified in one target pass; the deepest accepted path is kept")
    parser.add_argument("--cycle-costs", default="auto",
                        help="cost window: 'auto' (measured at start-up on this machine, printed to stderr) or "
                             "k_max + 2 comma-separated numbers, the verify pass over T = 1..k_max + 1 positions "
                             "then one drafter step, in units of a decode step (T = 1)")


def window_policy(args: argparse.Namespace):
    """The `WindowPolicy` of the parsed window flags (`add_window_arguments`) for `--drafter`."""
    from ppow_jax.inference.windows import CALIBRATED, WindowPolicy

    calibration = window_calibration(args.drafter, args.window) if args.window in CALIBRATED else ()
    verify_costs, draft_cost = parse_cycle_costs(args.cycle_costs, args.k_max) if args.window == "cost" else ((), 0.0)
    return WindowPolicy(kind=args.window, k_max=args.k_max, threshold=args.threshold, calibration=calibration,
                        verify_costs=verify_costs, draft_cost=draft_cost, branches=parse_branches(args.branches))


def parse_branches(text: str) -> tuple[int, ...]:
    """`--branches 4,2` -> (4, 2)."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise InputError(f"--branches {text!r}: expected comma-separated counts of children per depth, "
                         "such as 4 or 4,2") from None


def parse_cycle_costs(text: str, k_max: int) -> tuple[tuple[float, ...], float]:
    """`--cycle-costs` -> (verify costs for T = 1..k_max + 1, drafter step); ((), 0.0) for 'auto'."""
    if text.strip() == "auto":
        return (), 0.0
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--cycle-costs {text!r}: expected 'auto' or comma-separated numbers") from None
    if len(values) != k_max + 2:
        raise InputError(f"--cycle-costs takes k_max + 2 = {k_max + 2} numbers (verify passes over T = 1..{k_max + 1} "
                         f"positions, then a drafter step), got {len(values)}")
    return tuple(values[:-1]), values[-1]


def with_cycle_costs(window, target, drafter, drafter_params, batch: int):
    """The window, with this machine's cycle costs measured when a cost window asks for them."""
    from ppow_jax.inference.costs import measure_cycle_costs

    if not window.needs_costs:
        return window
    costs = measure_cycle_costs(target.config, target.params, drafter, drafter_params, window.k_max, batch=batch)
    print(f"cycle costs on this machine (batch {batch}): {costs.describe()}", file=sys.stderr)
    return dataclasses.replace(window, verify_costs=costs.verify, draft_cost=costs.draft)


def check_drafter_spec(spec: str) -> None:
    """What can be told of a drafter SPEC before the target loads: its form, and that its path exists."""
    if spec.startswith("self:"):
        if not spec[len("self:"):].isdigit():
            raise InputError(f"drafter spec {spec!r}: expected self:N with N a number of layers")
    elif not pathlib.Path(spec).exists():
        raise InputError(f"drafter {spec!r} does not exist: expected self:N or a path to a drafter checkpoint")
    elif (pathlib.Path(spec) / "drafter" / "drafter.json").is_file():
        raise InputError(f"{spec} is a training workdir; its exported drafter is {pathlib.Path(spec) / 'drafter'}")


def target_for(drafter_spec: str, target: Optional[str]) -> str:
    """The target to load: `target` when given, else the one a trained drafter records, else the default."""
    from ppow_jax.drafters.store import is_drafter_dir, read_description
    from ppow_jax.weights.registry import DEFAULT_MODEL

    if target:
        return target
    if drafter_spec and is_drafter_dir(drafter_spec):
        recorded = read_description(drafter_spec).get("target")
        if isinstance(recorded, dict) and isinstance(recorded.get("name"), str) and recorded["name"]:
            return recorded["name"]
    return DEFAULT_MODEL


def load_drafter(spec: str, target):
    """A drafter SPEC and the target (a `LoadedModel`) -> (drafter, params)."""
    from ppow_jax.drafters.lm import LMDrafter, self_speculative
    from ppow_jax.drafters.store import is_drafter_dir, load_drafter as load_trained_drafter
    from ppow_jax.weights.registry import load_model

    check_drafter_spec(spec)
    if spec.startswith("self:"):
        return self_speculative(target.config, target.params, int(spec[len("self:"):]))
    if is_drafter_dir(spec):  # a trained feature drafter (python -m ppow_jax.train)
        return load_trained_drafter(spec, target.config)
    drafter = load_model(spec, param_dtype=target.config.param_dtype)
    return LMDrafter(config=drafter.config, name=spec), drafter.params


def window_calibration(spec: str, kind: str = "adaptive") -> tuple[float, ...]:
    """The calibration weights of the adaptive and cost windows, stored with a trained drafter."""
    from ppow_jax.drafters.store import is_drafter_dir, read_description

    if not is_drafter_dir(spec):
        raise InputError(f"--window {kind} needs a trained drafter directory (its calibrated acceptance model); "
                         f"got {spec!r}")
    description = read_description(spec)
    calibration = description.get("window_calibration")
    if skipped := description.get("window_calibration_skipped"):
        raise InputError(f"{spec} serves fixed windows only: its training could not calibrate the {kind} "
                         f"window ({skipped}); use --window fixed")
    if not calibration:
        raise InputError(f"{spec}: drafter.json has no window_calibration; re-export the drafter with "
                         "python -m ppow_jax.train (a rerun of a finished run only re-exports)")
    weights = calibration.get("weights") if isinstance(calibration, dict) else None
    if not (isinstance(weights, list) and all(isinstance(w, (int, float)) for w in weights)):
        raise CheckpointError(f"{spec}: drafter.json's window_calibration has no list of weights")
    return tuple(float(w) for w in weights)
