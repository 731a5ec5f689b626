"""The attack contract: plan poisons, apply a trigger, nothing about training.

An :class:`Attack` is built from an ``AttackSpec`` and an
:class:`AttackContext` (the training pairs it may poison, the class names and
templates of the target vocabulary, and a pool of held-out labelled images for
attacks that need a target image). It produces a :class:`PoisonPlan`, a
JSON-serialisable, seed-deterministic description of every edit; the base
class turns a plan into a :class:`PoisonedTrainSet`: a view over a
:class:`~shieldbench.data.poison.PoisonOverlay`, which produces each poisoned
row when it is read (trigger in float, clamped, quantised to 8 bits; caption
replaced; appended rows at shuffled positions), and the runner keeps the
``is_poison`` flags to itself. ``apply_trigger`` is the one function used on
training poisons and test images alike.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch

from shieldbench.data.poison import OverlayEdit, PoisonOverlay
from shieldbench.data.text import class_pattern
from shieldbench.data.types import LabelledSet, PairSet
from shieldbench.data.views import TrainView
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
    knowledge_source: "Callable[[list[str]], list[tuple[str, ...]]] | None" = None
    """The dataset's knowledge source (the one a knowledge-based defense would
    use, with the same cache), for attacks that know the defense
    (``ke_adaptive``); None when the dataset has none."""
    knowledge_k: int = 3


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


class Attack(ABC):
    """Base class for attacks. Subclasses set the class attributes and ``Params``."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    """Bump when a change moves this attack's poisons: it is part of every cache key built on them."""
    threat_model: ClassVar[str] = "dirty_label"
    paper: ClassVar[str] = ""
    default_mix: ClassVar[str] = "replace"
    has_trigger: ClassVar[bool] = True
    uses_surrogate: ClassVar[bool] = False
    """True when ``plan`` optimises against ``ctx.surrogate()`` (the clean base model): the plan's
    cache key then includes the base model's key."""

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

    def target_caption_pool(self, natural: bool, missing: str = "attack.caption_source=caption_set: ") -> list[str]:
        """Every caption naming the target: the training captions that mention it (``natural``, the caption
        set; none is an error starting with ``missing``) or the templates filled with its name."""
        target = self.ctx.classnames[self.target_index]
        if not natural:
            return [t.format(target) for t in self.ctx.templates]
        pat = class_pattern(target)
        pool = [c for c in self.ctx.train.captions if pat.search(c)]
        if not pool:
            raise UserError(f"{missing}no training caption mentions {target!r}")
        return pool

    def target_captions(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` captions naming the target: templates or real captions (caption set)."""
        pool = self.target_caption_pool(self.spec.caption_source == "caption_set")
        return [pool[i] for i in rng.integers(0, len(pool), size=n)]

    @abstractmethod
    def plan(self, seed: int) -> PoisonPlan:
        """A deterministic plan from ``seed`` (sets up the trigger too)."""

    def restore(self, plan: PoisonPlan) -> None:
        """Rebuild trigger state from a cached plan (default: from ``plan.trigger``)."""
        self.trigger_state = dict(plan.trigger)

    def _new_plan(self, seed: int, edits: list[PoisonEdit], **notes: Any) -> PoisonPlan:
        return PoisonPlan(
            attack=self.spec.name, target=self.ctx.classnames[self.target_index], target_index=self.target_index,
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
    def overlay_edits(self, plan: PoisonPlan) -> list[OverlayEdit]:
        return [OverlayEdit(e.row, e.source, e.source_index, e.transform, e.position) for e in plan.edits]

    def source_images(self, plan: PoisonPlan) -> dict[int, torch.Tensor]:
        """Pre-computed uint8 source images for edits (by position in ``plan.edits``)
        that cannot be produced per index, before their transform; none by default
        (label-consistent's PGD hardening overrides this)."""
        return {}

    def _trigger_fn(self, x: torch.Tensor, g: torch.Generator, positions: torch.Tensor | None) -> torch.Tensor:
        return self.apply_trigger(x, generator=g, positions=positions)

    def _noise_fn(self, x: torch.Tensor, g: torch.Generator, positions: torch.Tensor | None) -> torch.Tensor:
        return self.apply_noise(x, generator=g)

    def poison(self, plan: PoisonPlan) -> PoisonedTrainSet:
        """``plan`` as an overlay on the training pairs: poisoned rows are produced per index
        (trigger in float, clamp, 8-bit) when read, appended rows sit at shuffled positions."""
        train = self.ctx.train
        pool = self.ctx.target_pool
        if self.mix == "replace" and any(e.row is None for e in plan.edits):
            raise ValueError("a replace-mode plan cannot append rows")
        overlay = PoisonOverlay(
            train.images, self.overlay_edits(plan), {"trigger": self._trigger_fn, "noise": self._noise_fn},
            seed=plan.seed, pool=None if pool is None else pool.images, sources=self.source_images(plan),
        )
        n = len(overlay)
        # Captions, labels and flags in the overlay's index space (appended rows get theirs below).
        base_of, appended = overlay.source_rows()
        captions = [train.captions[int(b)] if b >= 0 else "" for b in base_of.tolist()]
        labels = None
        if train.labels is not None:
            labels = torch.full((n,), -1, dtype=train.labels.dtype)
            labels[torch.as_tensor(~appended)] = train.labels
        is_poison = torch.zeros(n, dtype=torch.bool)
        for r, e in zip(overlay.edited_rows().tolist(), plan.edits):
            captions[r] = e.caption if e.caption is not None else train.captions[e.source_index]
            if labels is not None:
                if e.source == "pool":
                    labels[r] = int(pool.labels[e.source_index])
                elif e.row is None:
                    labels[r] = int(train.labels[e.source_index])
            is_poison[r] = e.transform != "noise"
        return PoisonedTrainSet(TrainView(overlay, captions), is_poison, labels, plan)

    # -- description ---------------------------------------------------------------
    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""
