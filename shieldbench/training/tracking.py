"""Optional experiment tracking: every training's loss terms and learning rate, per step.

Off by default (``runtime.tracker = "none"``). With ``tensorboard`` the runner
activates a log folder for the cell (``runs/<run id>/tensorboard``) and every
:class:`~shieldbench.training.trainer.Trainer` that runs inside it, including
the ones a defense builds itself (CleanCLIP's repair), writes one TensorBoard
run named after its stage: ``train/<term>`` per step (each logged loss term,
``lr``, ``logit_scale``) and ``epoch/<term>`` per epoch (the epoch means the
record keeps). Only rank 0 writes under DDP. The tracker is a runtime choice:
it is in no cache key, and a cached stage writes nothing.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

from shieldbench.errors import UserError

_LOG_DIR: ContextVar[Path | None] = ContextVar("shieldbench_tracking_dir", default=None)


def check_available(kind: str) -> None:
    """One line if the tracker's package is missing (before any work starts)."""
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("runtime.tracker=tensorboard needs the tensorboard package: "
                            "pip install 'shieldbench[tracking]'") from None
    elif kind != "none":
        raise UserError(f"runtime.tracker={kind!r}: choose none or tensorboard")


@contextmanager
def active(log_dir: str | Path | None) -> Iterator[None]:
    """Trainers started inside the block log under ``log_dir`` (None: no tracking)."""
    token = _LOG_DIR.set(Path(log_dir) if log_dir else None)
    try:
        yield
    finally:
        _LOG_DIR.reset(token)


def open_writer(stage: str) -> Any | None:
    """A TensorBoard ``SummaryWriter`` for one training stage, or None when tracking is off."""
    log_dir = _LOG_DIR.get()
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stage).strip("_") or "train"
    return SummaryWriter(log_dir=str(log_dir / name))


__all__ = ["active", "check_available", "open_writer"]
