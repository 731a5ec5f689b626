"""Checkpoints: atomic writes, weights-only loads.

A training checkpoint holds the model and optimizer state, the epoch just
finished and the global step, so a killed run resumes at the next epoch. A
final model artifact holds the weights only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shieldbench.errors import UserError
from shieldbench.fileio import atomic_write


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename over ``path`` (see :func:`atomic_write`).

    Through a Python file object, not a path: torch's own writer reports a
    full disk as "unexpected pos N vs M", a file object raises ``ENOSPC``,
    which becomes one line naming ``path``.
    """
    atomic_write(path, lambda fh: torch.save(obj, fh))


def safe_load(path: str | Path) -> Any:
    """torch.load with weights_only=True; a corrupt file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"corrupt checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
