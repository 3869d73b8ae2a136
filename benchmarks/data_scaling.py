"""How much distilled data a drafter would need: a log-linear fit of accept length against data size.

Each `--point RESPONSES:ACCEPT` is one measured drafter: the self-distilled responses it was
trained on and its dev accept length (drafts accepted per greedy window, as the training runs'
dev probe and `benchmarks/dev_acceptance.py` report it). The fit is accept = a + b * log2(RESPONSES).
`--check` points are drafters left out of the fit; their residuals test it. `--target` is the
accept length wanted; the script prints the data the fit puts there and, with
`--seconds-per-response`, what making that data would cost at the given rate.

    python benchmarks/data_scaling.py --point 439:0.846 --point 1997:1.126 --point 3983:1.249 \
        --check 9745:1.419 --target 2.5 --seconds-per-response 1.19
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
    intercept: float
    per_doubling: float  # accept length gained each time the data doubles

    def predict(self, responses: float) -> float:
        return self.intercept + self.per_doubling * math.log2(responses)

    def responses_for(self, accept_length: float) -> float:
        return 2.0 ** ((accept_length - self.intercept) / self.per_doubling)


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
    sizes = {point.responses for point in points}
    if len(sizes) < 2:
        raise ValueError("a fit needs measurements at two or more data sizes")
    per_doubling, intercept = np.polyfit([math.log2(p.responses) for p in points],
                                         [p.accept_length for p in points], 1)
    if per_doubling <= 0:
        raise ValueError(f"accept length does not rise with the data ({per_doubling:+.4f} per doubling): "
                         "no data size reaches a target")
    return LogLinearFit(float(intercept), float(per_doubling))


def report(points: list[Measurement], checks: list[Measurement], target: float | None,
           seconds_per_response: float | None) -> str:
    line_fit = fit(points)
    lines = [f"fit over {len(points)} drafters: accept length = {line_fit.intercept:+.4f} "
             f"+ {line_fit.per_doubling:.4f} * log2(responses)",
             "", "| responses | measured | fitted | residual | in the fit |", "|---|---|---|---|---|"]
    for point, in_fit in [(p, "yes") for p in points] + [(c, "no (a check)") for c in checks]:
        fitted = line_fit.predict(point.responses)
        lines.append(f"| {point.responses:,.0f} | {point.accept_length:.3f} | {fitted:.3f} | "
                     f"{point.accept_length - fitted:+.3f} | {in_fit} |")
    if target is not None:
        needed = line_fit.responses_for(target)
        largest = max(p.responses for p in points + checks)
        lines += ["", f"accept length {target:g} at {needed:,.0f} responses: "
                      f"{math.log2(needed / largest):.1f} doublings past the largest measured ({largest:,.0f})"]
        if seconds_per_response is not None:
            hours = (needed - largest) * seconds_per_response / 3600
            lines.append(f"making the {needed - largest:,.0f} more at {seconds_per_response:g} s each: "
                         f"{hours:,.0f} hours")
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
    try:
        print(report(args.point, args.check, args.target, args.seconds_per_response))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
