"""Small files that other processes, or a rerun after a crash, may read at any moment."""

from __future__ import annotations

import os
import pathlib
from typing import Iterable

from array_record.python import array_record_module


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Writes `text` to `path` whole or not at all: a crash midway leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_array_record(path: pathlib.Path, records: Iterable[bytes], options: str = "group_size:1") -> None:
    """An ArrayRecord shard (by default one record per group, for random access, with ArrayRecord's default
    compression, zstd), renamed into place when complete. Readers detect the compression by themselves."""
    tmp = path.with_name(path.name + ".tmp")
    writer = array_record_module.ArrayRecordWriter(str(tmp), options)
    for record in records:
        writer.write(record)
    writer.close()
    os.replace(tmp, path)
