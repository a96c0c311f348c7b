"""One writer per output: an exclusive, non-blocking lock on a file beside what is written.

A second writer refuses at once with the caller's typed error instead of interleaving its files
with the first one's. The lock lives as long as the open file, so a killed writer releases it.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".eetb.lock"


@contextmanager
def exclusive(path: Path, refusal: Callable[[], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent); raise ``refusal()`` if another
    process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise refusal() from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
