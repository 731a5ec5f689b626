"""Checkpoints: atomic writes, weights-only loads.

A training checkpoint holds the model and optimizer state, the epoch just
finished and the global step, so a killed run resumes at the next epoch. A
final model artifact holds the weights only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from shieldbench.errors import UserError
from shieldbench.fileio import temp_beside


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename over ``path``."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: str | Path) -> Any:
    """torch.load with weights_only=True; a corrupt file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"corrupt checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
