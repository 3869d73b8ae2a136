"""Small files that other processes, or a rerun after a crash, may read at any moment."""

from __future__ import annotations

import os
import pathlib


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Writes `text` to `path` whole or not at all: a crash midway leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
