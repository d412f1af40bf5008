"""Crash-safe small-file writes on a local filesystem: write a temporary file, fsync it, rename
it over the target (atomic on POSIX), fsync the folder so the rename itself survives a crash.

Every durable JSON document of the project (tenant config and rules, experiments, seeds, record
stores, the snapshot `CURRENT` pointer) is written through here.
"""

from __future__ import annotations

import os
import uuid


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` so a reader (or a crash) sees the old or the new content,
    never a mix; returns once both the content and the rename are on disk."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
