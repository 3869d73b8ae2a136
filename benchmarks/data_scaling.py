"""How much distilled data a drafter would need: a log-linear fit of accept length against data size.

Each `--point RESPONSES:ACCEPT` is one measured drafter: the distinct self-distilled responses it
was trained on and its accept length (drafts accepted per greedy window, as the training runs' dev
probe and `benchmarks/dev_acceptance.py` report it; τ - 1 of an eval works too). The fit is
accept = a + b * log2(RESPONSES), with b's standard error. `--check` points are drafters left out of
the fit; their residuals test it. `--target` is the accept length wanted: the script prints the data
the fit puts there, the data with the slope two standard errors steeper (the fewest the fit allows)
and, with `--seconds-per-response`, what making that data would cost at the given rate.

    python benchmarks/data_scaling.py --point 439:0.846 --point 1997:1.126 --point 3983:1.249 \
        --check 9745:1.419 --target 2.5 --seconds-per-response 1.22
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NamedTuple

import numpy as np


class Measurement(NamedTuple):
    responses: float
    accept_length: float


class LogLinearFit(NamedTuple):
    """accept = mean_accept + per_doubling * (log2(responses) - mean_log2): the least-squares line, held at
    the measurements' centre, where the slope's error does not move the line."""

    mean_log2: float
    mean_accept: float
    per_doubling: float  # accept length gained each time the data doubles
    per_doubling_se: float  # its standard error (nan from two measurements)

    @property
    def intercept(self) -> float:
        return self.mean_accept - self.per_doubling * self.mean_log2

    def predict(self, responses: float) -> float:
        return self.mean_accept + self.per_doubling * (math.log2(responses) - self.mean_log2)

    def responses_for(self, accept_length: float, per_doubling: float | None = None) -> float:
        """The data at which the line (or the line through the centre at another slope) reaches accept_length."""
        slope = self.per_doubling if per_doubling is None else per_doubling
        return 2.0 ** (self.mean_log2 + (accept_length - self.mean_accept) / slope)


def parse_measurement(text: str) -> Measurement:
    """'RESPONSES:ACCEPT' -> Measurement; a clear error for anything else (argparse's type hook)."""
    try:
        responses, accept_length = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RESPONSES:ACCEPT_LENGTH (two numbers)") from None
    if not responses > 0 or not math.isfinite(responses) or not math.isfinite(accept_length):
        raise argparse.ArgumentTypeError(f"{text!r}: RESPONSES must be positive and both numbers finite")
    return Measurement(responses, accept_length)


def fit(points: list[Measurement]) -> LogLinearFit:
    log2_sizes = np.log2([p.responses for p in points])
    accepts = np.array([p.accept_length for p in points])
    if len(set(log2_sizes.tolist())) < 2:
        raise ValueError("a fit needs measurements at two or more data sizes")
    centred = log2_sizes - log2_sizes.mean()
    per_doubling = float(centred @ (accepts - accepts.mean()) / (centred @ centred))
    if per_doubling <= 0:
        raise ValueError(f"accept length does not rise with the data ({per_doubling:+.4f} per doubling): "
                         "no data size reaches a target")
    residuals = accepts - accepts.mean() - per_doubling * centred
    per_doubling_se = (math.sqrt(residuals @ residuals / (len(points) - 2) / (centred @ centred))
                       if len(points) > 2 else math.nan)
    return LogLinearFit(float(log2_sizes.mean()), float(accepts.mean()), per_doubling, per_doubling_se)


def report(points: list[Measurement], checks: list[Measurement], target: float | None,
           seconds_per_response: float | None) -> str:
    line_fit = fit(points)
    lines = [f"fit over {len(points)} drafters: accept length = {line_fit.intercept:+.4f} "
             f"+ {line_fit.per_doubling:.4f} (s.e. {line_fit.per_doubling_se:.4f}) * log2(responses)",
             "", "| responses | measured | fitted | residual | in the fit |", "|---|---|---|---|---|"]
    for point, in_fit in [(p, "yes") for p in points] + [(c, "no (a check)") for c in checks]:
        fitted = line_fit.predict(point.responses)
        lines.append(f"| {point.responses:,.0f} | {point.accept_length:.3f} | {fitted:.3f} | "
                     f"{point.accept_length - fitted:+.3f} | {in_fit} |")
    if target is None:
        return "\n".join(lines)
    largest = max(p.responses for p in points + checks)
    try:
        needed = line_fit.responses_for(target)
        # The slope two standard errors steeper: the fewest responses the fit allows for the target.
        fewest = (line_fit.responses_for(target, line_fit.per_doubling + 2 * line_fit.per_doubling_se)
                  if math.isfinite(line_fit.per_doubling_se) else math.nan)
    except OverflowError:
        raise ValueError(f"the target {target:g} lies beyond any data size a float can hold") from None
    if needed <= largest:
        smallest = min(p.responses for p in points + checks)
        where = "within the data measured" if needed >= smallest else "below the data measured"
        lines += ["", f"accept length {target:g}: the fit puts it at {needed:,.0f} responses, "
                      f"{where} ({smallest:,.0f} to {largest:,.0f})"]
        return "\n".join(lines)
    lines += ["", f"accept length {target:g} at {needed:,.0f} responses: "
                  f"{math.log2(needed / largest):.1f} doublings past the largest measured ({largest:,.0f})"]
    if math.isfinite(fewest):
        lines.append(f"with the slope two standard errors steeper: {fewest:,.0f} responses")
    if seconds_per_response is not None:
        hours = (needed - largest) * seconds_per_response / 3600
        lines.append(f"making the {needed - largest:,.0f} more at {seconds_per_response:g} s each: {hours:,.0f} hours")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", type=parse_measurement, action="append", required=True,
                        help="RESPONSES:ACCEPT_LENGTH of a drafter in the fit (repeat)")
    parser.add_argument("--check", type=parse_measurement, action="append", default=[],
                        help="RESPONSES:ACCEPT_LENGTH of a drafter left out of the fit (repeat)")
    parser.add_argument("--target", type=float, help="the accept length wanted")
    parser.add_argument("--seconds-per-response", type=float, help="what one more response costs to make")
    args = parser.parse_args(argv)
    if args.target is not None and not math.isfinite(args.target):
        parser.error(f"--target must be a finite accept length, not {args.target}")
    if args.seconds_per_response is not None and args.target is None:
        parser.error("--seconds-per-response prices the data a --target needs: give a --target too")
    if args.seconds_per_response is not None and not (args.seconds_per_response > 0 and
                                                      math.isfinite(args.seconds_per_response)):
        parser.error(f"--seconds-per-response must be a positive number of seconds, not {args.seconds_per_response}")
    try:
        print(report(args.point, args.check, args.target, args.seconds_per_response))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
