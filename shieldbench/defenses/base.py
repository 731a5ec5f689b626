"""The defense contract: optional hooks with no-op defaults.

A defense never sees which items are poisoned, the plan, the trigger or the
test split. That is enforced by what it is handed: a
:class:`~shieldbench.data.views.TrainView` (images and captions only) and a
:class:`DefenseContext` that carries the model spec, the training settings and
a knowledge-source factory, nothing about the attack.

Hooks (TrojanZoo / lm-eval style: override what you need):

- ``prepare_data(data, ctx) -> TrainView``: filter, augment, attach knowledge;
- ``objective(ctx) -> Objective``: the training loss (default: CLIP loss);
- ``callbacks(ctx) -> list[Callback]``: epoch/step hooks;
- ``repair(model, clean, ctx) -> model``: post-training fine-tune on clean pairs.

A defense that overrides only ``repair`` is *post-training*: the runner reuses
the checkpoint trained under ``none`` for the same attack and seed.
``needs`` declares extra model outputs (``patches``, ``attention``) so the
plain path pays nothing for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from shieldbench.data.views import TrainView
from shieldbench.models.clip import ClipModel
from shieldbench.spec import DefenseSpec, TrainSpec, validate_options
from shieldbench.training.contracts import Callback, Objective
from shieldbench.training.losses import ClipObjective


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may use: settings and services, no attack information."""

    seed: int
    train: TrainSpec
    device: Any
    knowledge_k: int = 3
    knowledge_source: Callable[[list[str]], list[tuple[str, ...]]] | None = None
    cache_dir: str = ""
    show_progress: bool = True
    extras: dict[str, Any] = field(default_factory=dict)


class Defense:
    """Base class: every hook is a no-op, so ``Defense`` itself is ``none``."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    """Bump when a change moves this defense's results: it is part of its checkpoints' cache keys."""
    paper: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    @dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, spec: DefenseSpec) -> None:
        self.spec = spec
        self.params = validate_options(self.Params, spec.options, "defense")

    # -- hooks -----------------------------------------------------------------------
    def prepare_data(self, data: TrainView, ctx: DefenseContext) -> TrainView:
        return data

    def objective(self, ctx: DefenseContext) -> Objective:
        return ClipObjective()

    def callbacks(self, ctx: DefenseContext) -> list[Callback]:
        return []

    def repair(self, model: ClipModel, clean: TrainView, ctx: DefenseContext) -> ClipModel:
        return model

    # -- derived -----------------------------------------------------------------------
    @classmethod
    def trains(cls) -> bool:
        """True if the defense changes training (so it needs its own checkpoint)."""
        return any(getattr(cls, h) is not getattr(Defense, h) for h in ("prepare_data", "objective", "callbacks"))

    @classmethod
    def repairs(cls) -> bool:
        return cls.repair is not Defense.repair

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""
