"""Atomic file writes: a temp file in the same folder, then ``os.replace``.

A reader never sees a half-written record, CSV, plan or checkpoint, and a
crash mid-write leaves the previous version intact. Every write goes through
a Python file object (checkpoints included: ``torch.save`` given a path
reports a full disk as "unexpected pos 704 vs 598"), so a full disk is the
kernel's ``ENOSPC``, turned into :class:`DiskFull`: one line naming the file
the project was writing, exit code 2; the temp file is removed.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from shieldbench.errors import UserError

#: The errors of a write that ran out of room, and how the one-line message words them.
NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class DiskFull(UserError):
    """A write failed for want of space or quota: ``no space left on device: PATH`` (exit code 2).

    A user error, not a failed run: nothing about the experiment is wrong,
    so no ``failed`` record is written (there is no room for one either);
    the run stops, and the same command resumes it once there is room.
    """


def no_room(exc: BaseException, path: str | Path | None = None) -> DiskFull | None:
    """The :class:`DiskFull` for ``exc`` if it is a full disk or quota (naming ``path``, else the error's file)."""
    if not isinstance(exc, OSError) or exc.errno not in NO_ROOM:
        return None
    where = path if path is not None else (exc.filename or "a file (the system did not say which)")
    return DiskFull(f"{NO_ROOM[exc.errno]}: {where}")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one :class:`DiskFull` line naming it; other errors pass."""
    try:
        yield
    except OSError as exc:
        full = no_room(exc, path)
        if full is None:
            raise
        raise full from exc


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: a nearly full disk writes part of a line, then raises ENOSPC."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def default_file_mode() -> int:
    """The mode a plain ``open`` would give a new file: 0o666 less the process umask."""
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temp_beside(path: Path) -> tuple[int, str]:
    """A temp file in ``path``'s folder (so ``os.replace`` is atomic) with the umask's mode, not mkstemp's 0600.

    A results folder shared by a group must stay readable to it; the final
    file keeps the temp file's mode through the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, default_file_mode())
    return fd, tmp


def sweep_temps(folder: str | Path, names: tuple[str, ...] = ()) -> int:
    """Remove the temp files :func:`temp_beside` left in ``folder`` (of ``names`` only, if given); how many.

    A write killed between the temp file and the rename (SIGKILL, power loss)
    leaves ``.<name>.<random>.tmp`` behind. Call this only holding the lock
    that every writer of those files holds: then none of them is being
    written by a live process.
    """
    folder = Path(folder)
    patterns = [f".{n}.*.tmp" for n in names] if names else [".*.tmp"]
    n_removed = 0
    for pattern in patterns:
        for tmp in folder.glob(pattern):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                n_removed += 1
    return n_removed


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Have ``write`` fill a temp file beside ``path``, flush it to disk, then rename it over ``path``.

    Any failure (a full disk, an exception in ``write``, a signal) removes
    the temp file and leaves ``path`` as it was; a full disk is raised as
    :class:`DiskFull` naming ``path``. Only SIGKILL or a power loss leave the
    temp file, which :func:`sweep_temps` removes later.
    """
    path = Path(path)
    with writing(path):
        fd, tmp = temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                # Before the rename: otherwise a power loss can leave a renamed, empty file.
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt JSON file {path}: {exc}") from exc
