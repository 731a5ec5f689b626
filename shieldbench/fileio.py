"""Atomic file writes: a temp file in the same folder, then ``os.replace``.

A reader never sees a half-written record, CSV or plan, and a crash mid-write
leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from shieldbench.errors import UserError


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


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
