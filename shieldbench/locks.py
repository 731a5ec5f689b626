"""Inter-process locks for the results folder: one builder per artifact, one writer per file.

Two workers of one grid, two grids, or two users may share a results folder.
Every stage that builds an artifact (a base model, a plan, a checkpoint, a
cached evaluation) and every cell takes the lock of what it builds, then
looks again for the finished artifact before building it: whoever comes
second waits and reuses instead of building it twice.

The locks are ``filelock.FileLock`` (``fcntl.flock`` on Linux): the kernel
drops a lock when its process dies, so a worker killed with SIGKILL leaves
no stale lock behind (the empty ``.lock`` file stays and is harmless). Where
the filesystem has no ``flock`` (some network mounts), filelock falls back to
a lock file that a killed process can leave behind: delete it by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from shieldbench.fileio import write_all, writing


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the inter-process lock ``path`` (created with its folder) for the block."""
    path = Path(path)
    lock = FileLock(str(path))
    with writing(path):  # the lock file is created: on a full disk, one line naming it
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def note_build(log: str | Path, kind: str, key: str) -> None:
    """Append one line to the store's build log: what was built, by which process, when.

    One ``write`` of a short line to a file opened with O_APPEND is atomic on
    a local filesystem, so concurrent builders never interleave lines. The log
    is an audit trail (a test reads it to prove no artifact is built twice);
    nothing reads it to decide anything.
    """
    line = json.dumps({"kind": kind, "key": key, "pid": os.getpid(), "host": socket.gethostname(),
                       "time": time.time()}) + "\n"
    log = Path(log)
    with writing(log):
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
        try:
            write_all(fd, line.encode("utf-8"))
        finally:
            os.close(fd)


__all__ = ["locked", "note_build"]
