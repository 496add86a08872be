"""Exclusive inter-process locks on a file (fcntl.flock): released by the OS when the holder dies.

One helper for the model registry, the training job runner, the Label Studio template builder and the
demo. POSIX only. Kept free of torch so that light callers (backend/lsserver.py) can use it.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created with its parent dirs) for the `with` block.

    blocking=False raises BlockingIOError at once when another open file holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
