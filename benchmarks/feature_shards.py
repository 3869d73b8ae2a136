"""What a feature shard's compression costs: the records of a target-feature cache re-written under
several ArrayRecord options, timed per training sequence (write, then read back one at a time), with
their size, and per batch of the training pipeline (`feature_batches`: the shuffled records of a
batch read in one call and decoded, on one thread).

Every training sequence is one record read per step, so the read time bounds the steps per second of
a fast accelerator; the write time is part of building the cache.

    python benchmarks/feature_shards.py --features runs/smollm2-135m-instruct/kd/features --records 64
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

from array_record.python import array_record_module

from ppow_jax.data.features import SHARD_OPTIONS, feature_shards
from ppow_jax.data.pipeline import feature_batches

BATCH = 16

DEFAULT = "group_size:1"  # ArrayRecord's default compression, zstd level 3
OPTIONS = (DEFAULT, "group_size:1,zstd:1", "group_size:1,snappy", "group_size:1,uncompressed")


def read_records(shards: list[pathlib.Path], limit: int) -> list[bytes]:
    records: list[bytes] = []
    for path in shards:
        reader = array_record_module.ArrayRecordReader(str(path))
        records.extend(reader.read_all())
        reader.close()
        if len(records) >= limit:
            break
    return records[:limit]


def time_option(records: list[bytes], options: str, directory: pathlib.Path) -> tuple[float, float, float, float]:
    """-> (write ms, read ms, stored MB), each per record, and ms per pipeline batch of BATCH."""
    path = directory / "shard.array_record"
    start = time.perf_counter()
    writer = array_record_module.ArrayRecordWriter(str(path), options)
    for record in records:
        writer.write(record)
    writer.close()
    write = time.perf_counter() - start
    reader = array_record_module.ArrayRecordReader(str(path))
    start = time.perf_counter()
    for index in range(len(records)):  # one record at a time, as the training pipeline reads them
        reader.read([index])
    read = time.perf_counter() - start
    reader.close()
    batches = feature_batches([path], batch_size=BATCH, seed=0, num_epochs=1)
    start = time.perf_counter()
    for index in range(len(batches)):
        batches[index]
    batch = (time.perf_counter() - start) / len(batches)
    n = len(records)
    return 1e3 * write / n, 1e3 * read / n, path.stat().st_size / n / 1e6, 1e3 * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, help="a target-feature cache (python -m ppow_jax.train builds one)")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many rounds of all options")
    args = parser.parse_args()

    records = read_records(feature_shards(args.features), args.records)
    raw_mb = sum(len(r) for r in records) / len(records) / 1e6
    print(f"{len(records)} records of {args.features}, {raw_mb:.2f} MB each before compression; "
          f"medians of {args.repeats} rounds\n")
    if len(records) < BATCH:
        parser.error(f"--records must be at least one batch ({BATCH})")
    timings: dict[str, list[tuple[float, float, float, float]]] = {options: [] for options in OPTIONS}
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(args.repeats):  # rounds interleave the options, so drifting load hits all alike
            for options in OPTIONS:
                timings[options].append(time_option(records, options, pathlib.Path(directory)))
    print(f"| options | write ms / sequence | read ms / sequence | stored MB / sequence | ms / batch of {BATCH} |")
    print("|---|---|---|---|---|")
    for options, rows in timings.items():
        write, read, size, batch = (statistics.median(column) for column in zip(*rows))
        marker = " (the cache's)" if options == SHARD_OPTIONS else " (default: zstd:3)" if options == DEFAULT else ""
        print(f"| `{options}`{marker} | {write:.2f} | {read:.2f} | {size:.3f} | {batch:.1f} |")


if __name__ == "__main__":
    main()
