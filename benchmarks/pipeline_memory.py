"""Host memory and read speed of the training input pipeline over a target-feature cache.

Takes one batch, waits while the background threads read ahead, then drains batches: prints the
process's resident memory at each point and the time per batch (a drained read-ahead: the reading
speed). `--read-ahead 0` builds the same batches with Grain's default read options (16 threads, 500
elements ahead) for comparison. One setting per run, so that each starts from a fresh process.

    python benchmarks/pipeline_memory.py --features runs/smollm2-135m-instruct/kd/features --batch-size 16 \
        --read-ahead R      # R = 1, 2, 4, 0
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from ppow_jax.cli import run_entry_point
from ppow_jax.data.features import feature_shards
from ppow_jax.data.pipeline import feature_batches, feature_dataset


def resident_mb() -> int:
    status = pathlib.Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, type=pathlib.Path, help="a feature cache directory")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--read-ahead", type=int, required=True,
                        help="batches read ahead; 0: Grain's default read options")
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--batches", type=int, default=20)
    return run_entry_point(parser, run)


def run(args: argparse.Namespace) -> int:
    shards = feature_shards(args.features)
    read_ahead = args.read_ahead
    start = resident_mb()
    if read_ahead:
        dataset = feature_dataset(shards, batch_size=args.batch_size, seed=0, read_ahead=read_ahead)
    else:
        dataset = feature_batches(shards, batch_size=args.batch_size, seed=0).to_iter_dataset()
    iterator = iter(dataset)
    next(iterator)
    time.sleep(args.idle_seconds)  # the consumer is busy (a training step); the threads read ahead
    idle = resident_mb()
    clock = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    per_batch = (time.perf_counter() - clock) / args.batches * 1000
    print(f"| read-ahead | batch | resident MB at start | after one batch and {args.idle_seconds:g} s idle "
          "| ms per batch, drained |")
    print("|---|---|---|---|---|")
    print(f"| {read_ahead or 'Grain default'} | {args.batch_size} | {start} | {idle} | {per_batch:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
