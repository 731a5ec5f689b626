"""The contracts between the trainer and whatever customises training.

The trainer knows *objectives* and *callbacks*; it never imports defenses.
A defense supplies an :class:`Objective` (the loss of one batch) and
:class:`Callback` objects (epoch/step hooks such as RoCLIP's caption pool).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from shieldbench.models.clip import ClipModel
    from shieldbench.training.trainer import Trainer


@dataclass
class Batch:
    """One training batch: float images in [0,1], captions and their tokens.

    ``index`` are row numbers in the TrainView (so callbacks can keep per-row
    state); ``knowledge`` is present when a knowledge source was attached.

    Under ``torch.distributed`` a Batch is this rank's share of the global
    batch: ``global_index`` holds every rank's rows in rank order (equal
    shares) and ``offset`` is where this rank's rows start in it. In one
    process ``global_index`` is ``index`` and ``offset`` is 0. An objective
    that draws random views per batch draws them for the global batch and
    keeps its own share, so the views do not depend on the number of ranks.
    """

    images: torch.Tensor
    captions: list[str]
    tokens: torch.Tensor
    index: torch.Tensor
    knowledge: list[tuple[str, ...]] | None = None
    epoch: int = 0
    step: int = 0
    global_index: torch.Tensor | None = None
    offset: int = 0
    global_captions: list[str] | None = None

    def all_captions(self) -> list[str]:
        """Every rank's captions of this step, in rank order (``captions`` in one process)."""
        return self.captions if self.global_captions is None else self.global_captions

    def all_rows(self) -> torch.Tensor:
        """Every rank's rows of this step, in rank order (``index`` in one process)."""
        return self.index if self.global_index is None else self.global_index

    @property
    def local(self) -> slice:
        """This rank's positions in :meth:`all_rows`."""
        return slice(self.offset, self.offset + int(self.index.numel()))


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """The loss of one batch. ``model`` is in train mode; autocast is active.

    Under DDP an objective whose steps may leave some parameters without a
    gradient (a tower unused on some epochs) sets a class attribute
    ``leaves_parameters_unused = True``; otherwise DDP stops with an error.
    """

    def __call__(self, model: "ClipModel", batch: Batch) -> LossOutput: ...


class Callback:
    """Hooks with no-op defaults, called by the trainer in order.

    A callback with state that must survive a crash (a pool, per-row memory)
    returns it from ``state_dict``; the trainer stores it in each epoch
    checkpoint and hands it back through ``load_state_dict`` after
    ``on_train_start`` when it resumes. Tensors, numbers, strings and lists only
    (checkpoints are loaded with ``weights_only=True``).
    """

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None: ...

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None: ...

    def on_step_end(self, trainer: "Trainer", batch: Batch, out: LossOutput) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None: ...
