"""An exclusive lock between processes on one machine: a lock file held through ``filelock``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock


@contextlib.contextmanager
def exclusive(path: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[float]:
    """Hold the lock on ``path`` (created if missing) for the block; yields the seconds spent
    waiting for it. ``on_wait`` hears once that another holder is being waited for. The lock is
    an OS file lock, which the kernel releases if the holder dies, so a killed process never
    leaves it held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the lock is the process's, whichever thread releases it.
    lock = filelock.FileLock(path, thread_local=False)
    started = time.monotonic()
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        if on_wait is not None:
            on_wait(f"waiting for {path} (held by another process)")
        lock.acquire()
    try:
        yield time.monotonic() - started
    finally:
        lock.release()
