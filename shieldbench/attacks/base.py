"""The attack contract: plan poisons, apply a trigger, nothing about training.

An :class:`Attack` is built from an ``AttackSpec`` and an
:class:`AttackContext` (the training pairs it may poison, the class names and
templates of the target vocabulary, and a pool of held-out labelled images for
attacks that need a target image). It produces a :class:`PoisonPlan`, a
JSON-serialisable, seed-deterministic description of every edit; the base
class turns a plan into a :class:`PoisonedTrainSet` (images with triggers
baked in and quantised to 8 bits, captions replaced) and the runner keeps the
``is_poison`` flags to itself. ``apply_trigger`` is the one function used on
training poisons and test images alike.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch

from shieldbench.data.types import LabelledSet, PairSet, to_float
from shieldbench.data.views import TrainView, quantize
from shieldbench.errors import UserError
from shieldbench.spec import DEFAULT_POISON_RATE, AttackSpec, digest, validate_options

if TYPE_CHECKING:  # pragma: no cover
    from shieldbench.models.clip import ClipModel

THREAT_MODELS = ("none", "dirty_label", "clean_label", "targeted")


@dataclass(frozen=True)
class AttackContext:
    """What an attacker may look at when planning."""

    train: PairSet
    classnames: list[str]
    templates: list[str]
    target_pool: LabelledSet | None = None
    image_size: int = 32
    surrogate: "Callable[[], ClipModel] | None" = None
    """Returns a copy of the clean base model, for attacks that optimise
    their poisons against a surrogate (label-consistent PGD hardening)."""


@dataclass
class PoisonEdit:
    """One poisoned row.

    ``row`` is the train row replaced (None: an appended row). The image comes
    from the train row (``source="train"``) or from the target pool
    (``source="pool"``); ``transform`` says what is done to it (``trigger``,
    ``noise`` for WaNet's noise mode, ``none``); ``caption`` is the row's new
    caption (None keeps the original).
    """

    row: int | None
    source: str
    source_index: int
    transform: str
    caption: str | None
    position: list[int] | None = None


@dataclass
class PoisonPlan:
    attack: str
    target: str
    target_index: int
    threat_model: str
    mix: str
    seed: int
    n_requested: int
    edits: list[PoisonEdit] = field(default_factory=list)
    trigger: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def n_poisoned(self) -> int:
        return sum(1 for e in self.edits if e.transform != "noise")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoisonPlan":
        d = dict(d)
        d["edits"] = [PoisonEdit(**e) for e in d.get("edits", [])]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self) -> str:
        return digest(self.to_dict())


@dataclass
class PoisonedTrainSet:
    """The runner's side of the poisoned data: the view plus what it must hide."""

    view: TrainView
    is_poison: torch.Tensor
    labels: torch.Tensor | None
    plan: PoisonPlan


def class_pattern(name: str) -> re.Pattern[str]:
    """Word-boundary, plural-aware match of a class name in a caption."""
    words = [re.escape(w) for w in name.lower().split()]
    stem = r"\s+".join(words)
    return re.compile(rf"\b{stem}(?:s|es)?\b", re.IGNORECASE)


class Attack(ABC):
    """Base class for attacks. Subclasses set the class attributes and ``Params``."""

    name: ClassVar[str] = ""
    threat_model: ClassVar[str] = "dirty_label"
    paper: ClassVar[str] = ""
    default_mix: ClassVar[str] = "replace"
    has_trigger: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, spec: AttackSpec, ctx: AttackContext) -> None:
        self.spec = spec
        self.ctx = ctx
        self.params = validate_options(self.Params, spec.options, "attack")
        names = [c.lower() for c in ctx.classnames]
        if spec.target.lower() not in names:
            raise UserError(f"attack.target={spec.target!r} is not a class of this dataset; choose one of: {', '.join(ctx.classnames)}")
        self.target_index = names.index(spec.target.lower())
        self.mix = self.default_mix if spec.mix == "auto" else spec.mix
        self.trigger_state: dict[str, Any] = {}

    # -- planning ----------------------------------------------------------------
    def n_requested(self) -> int:
        if self.spec.n_poison > 0:
            return self.spec.n_poison
        rate = DEFAULT_POISON_RATE if self.spec.poison_rate is None else self.spec.poison_rate
        return int(round(rate * len(self.ctx.train)))

    def target_captions(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` captions naming the target: templates or real captions (caption set)."""
        target = self.ctx.classnames[self.target_index]
        if self.spec.caption_source == "caption_set":
            pat = class_pattern(target)
            pool = [c for c in self.ctx.train.captions if pat.search(c)]
            if not pool:
                raise UserError(f"attack.caption_source=caption_set: no training caption mentions {target!r}")
        else:
            pool = [t.format(target) for t in self.ctx.templates]
        return [pool[i] for i in rng.integers(0, len(pool), size=n)]

    @abstractmethod
    def plan(self, seed: int) -> PoisonPlan:
        """A deterministic plan from ``seed`` (sets up the trigger too)."""

    def restore(self, plan: PoisonPlan) -> None:
        """Rebuild trigger state from a cached plan (default: from ``plan.trigger``)."""
        self.trigger_state = dict(plan.trigger)

    def _new_plan(self, seed: int, edits: list[PoisonEdit], **notes: Any) -> PoisonPlan:
        return PoisonPlan(
            attack=self.name, target=self.ctx.classnames[self.target_index], target_index=self.target_index,
            threat_model=self.threat_model, mix=self.mix, seed=seed, n_requested=self.n_requested(),
            edits=edits, trigger=dict(self.trigger_state), notes=notes,
        )

    def pick_rows(self, rng: np.random.Generator, n: int, candidates: np.ndarray | None = None) -> list[int]:
        pool = np.arange(len(self.ctx.train)) if candidates is None else np.asarray(candidates)
        n = min(n, len(pool))
        return sorted(int(i) for i in rng.choice(pool, size=n, replace=False))

    # -- triggers ----------------------------------------------------------------
    def apply_trigger(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """The trigger on float images (N,C,H,W) in [0,1]; output clamped to [0,1]."""
        return images.clamp(0, 1)

    def apply_noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-mode transform (WaNet); identity elsewhere."""
        return images.clamp(0, 1)

    # -- applying a plan ---------------------------------------------------------
    def poison(self, plan: PoisonPlan) -> PoisonedTrainSet:
        """Materialise ``plan`` on the training pairs (triggers baked in, 8-bit)."""
        train = self.ctx.train
        pool = self.ctx.target_pool
        replaced = [e for e in plan.edits if e.row is not None]
        appended = [e for e in plan.edits if e.row is None]
        if self.mix == "replace" and appended:
            raise ValueError("a replace-mode plan cannot append rows")
        base_images = train.images
        extra = appended
        n_base = len(train)
        images = torch.cat([base_images, base_images.new_empty((len(extra), *base_images.shape[1:]))]) if extra else base_images.clone()
        captions = list(train.captions) + [""] * len(extra)
        labels = None
        if train.labels is not None:
            labels = torch.cat([train.labels, torch.full((len(extra),), -1, dtype=train.labels.dtype)])
        is_poison = torch.zeros(len(captions), dtype=torch.bool)
        rows = [e.row for e in replaced] + [n_base + j for j in range(len(extra))]
        edits = replaced + extra
        gen = torch.Generator().manual_seed(plan.seed + 17)
        for transform in ("trigger", "noise", "none"):
            sel = [(r, e) for r, e in zip(rows, edits) if e.transform == transform]
            if not sel:
                continue
            src = []
            for _, e in sel:
                if e.source == "pool":
                    if pool is None:
                        raise ValueError("plan uses the target pool but none was given")
                    src.append(pool.images[e.source_index])
                else:
                    src.append(train.images[e.source_index])
            x = to_float(torch.stack(src))
            if transform == "trigger":
                pos = None
                if all(e.position is not None for _, e in sel):
                    pos = torch.tensor([e.position for _, e in sel], dtype=torch.long)
                x = self.apply_trigger(x, generator=gen, positions=pos)
            elif transform == "noise":
                x = self.apply_noise(x, generator=gen)
            idx = torch.tensor([r for r, _ in sel], dtype=torch.long)
            images[idx] = quantize(x)
            for r, e in sel:
                if e.caption is not None:
                    captions[r] = e.caption
                if labels is not None and e.source == "pool":
                    labels[r] = int(pool.labels[e.source_index])
                elif labels is not None and r >= n_base:
                    labels[r] = int(train.labels[e.source_index])
                is_poison[r] = transform != "noise"
        for r, e in zip(rows, edits):
            if captions[r] == "":
                captions[r] = train.captions[e.source_index]
        return PoisonedTrainSet(TrainView(images, captions), is_poison, labels, plan)

    # -- description ---------------------------------------------------------------
    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""
