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

The defender's own model: ``ctx.reference_model()`` (during ``prepare_data``,
``objective`` and ``callbacks``) returns a fresh copy, in eval mode, of the
clean base model the victim starts from (the stand-in for a web-pretrained
CLIP), or None where there is none to give (the repair phase). A defense may
embed, score or fine-tune that copy; it never touches the victim.

Detection: a defense that scores the pairs it was given calls
``ctx.report_suspicion(scores, kept)`` in ``prepare_data``: ``scores`` holds
one number per row of the view it was handed (higher = more suspicious),
``kept`` the rows of that view it trains on (None if it drops nothing). The
runner, which alone holds the poison flags, turns any such report into
detection metrics (AUROC, number dropped, precision / recall of the dropped
rows) in the record; the defense learns nothing back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
from shieldbench.data.views import TrainView
from shieldbench.models.clip import ClipModel
from shieldbench.spec import DefenseSpec, TrainSpec, validate_options
from shieldbench.training.contracts import Callback, Objective
from shieldbench.training.losses import ClipObjective


@dataclass(frozen=True)
class SuspicionReport:
    """Per-row suspicion scores for the view a defense was handed, and the rows it kept.

    ``scores[i]`` belongs to row ``i`` of that view (higher = more likely
    poisoned); ``kept`` holds sorted, distinct row indices into it, or is None
    when the defense scores without dropping anything.
    """

    scores: np.ndarray
    kept: np.ndarray | None = None

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if not np.isfinite(scores).all():
            raise ValueError("suspicion scores must be finite (give unscorable rows the lowest score)")
        object.__setattr__(self, "scores", scores)
        if self.kept is not None:
            kept = np.unique(np.asarray(self.kept, dtype=np.int64).reshape(-1))
            if len(kept) and (kept[0] < 0 or kept[-1] >= len(scores)):
                raise ValueError(f"kept rows must lie in [0, {len(scores)})")
            object.__setattr__(self, "kept", kept)


SUSPICION_KEY = "suspicion"
"""Where :meth:`DefenseContext.report_suspicion` leaves its report in ``extras``."""


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
    reference_model: Callable[[], ClipModel] | None = None
    """A fresh eval-mode copy of the clean base model per call (the defender's pretrained CLIP); None if none."""

    def report_suspicion(self, scores: Any, kept: Any = None) -> SuspicionReport:
        """Leave per-row suspicion scores (and the kept rows) for the runner to score against the truth."""
        report = SuspicionReport(np.asarray(scores), None if kept is None else np.asarray(kept))
        self.extras[SUSPICION_KEY] = report
        return report

    def suspicion(self) -> SuspicionReport | None:
        """The report left by :meth:`report_suspicion`, if any."""
        report = self.extras.get(SUSPICION_KEY)
        return report if isinstance(report, SuspicionReport) else None


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
