"""What every `python -m ppow_jax.*` entry point shares: errors as one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from ppow_jax.errors import PPOWError


def run_entry_point(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
                    argv: Optional[Sequence[str]] = None) -> int:
    """Parses flags and runs; bad input exits 2, NaN logits exit 1, each with `error: ...` on stderr."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PPOWError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the model produced NaN logits
        print(f"error: {err}", file=sys.stderr)
        return 1
