"""Defenses see images and captions only: no flags, plan, trigger, labels or test split."""

from __future__ import annotations

import inspect

import torch

from shieldbench.data.views import TrainView
from shieldbench.defenses.base import Defense, DefenseContext
from shieldbench.defenses.none import NoDefense
from shieldbench.spec import DefenseSpec, TrainSpec


def test_trainview_exposes_no_poison_information(smoke_world):
    view = TrainView.from_pairs(smoke_world.train)
    public = {n for n in dir(view) if not n.startswith("_")}
    assert public == {
        "captions", "caption", "captions_at", "image_size", "images", "knowledge", "knowledge_at",
        "subset", "uint8_images", "with_knowledge", "from_pairs", "fetch", "in_memory",
    }
    # __slots__: nothing can be smuggled in as an attribute.
    assert not hasattr(view, "__dict__")
    for forbidden in ("labels", "is_poison", "plan", "trigger", "ids"):
        assert not hasattr(view, forbidden)


def test_defense_context_carries_no_attack_information():
    fields = set(inspect.signature(DefenseContext).parameters)
    assert not fields & {"attack", "plan", "trigger", "is_poison", "test", "target"}


def test_hook_signatures_take_views_not_datasets():
    for hook in ("prepare_data", "repair"):
        params = inspect.signature(getattr(Defense, hook)).parameters
        anns = [str(p.annotation) for p in params.values()]
        assert any("TrainView" in a for a in anns), hook


def test_none_defense_trains_like_clip_and_repairs_nothing(smoke_world):
    d = NoDefense(DefenseSpec())
    ctx = DefenseContext(seed=0, train=TrainSpec(), device=torch.device("cpu"))
    view = TrainView.from_pairs(smoke_world.train)
    assert d.prepare_data(view, ctx) is view
    assert d.callbacks(ctx) == []
    assert not NoDefense.trains() and not NoDefense.repairs()


def test_repair_only_defense_is_detected():
    class RepairOnly(Defense):
        def repair(self, model, clean, ctx):
            return model

    class TrainTime(Defense):
        def objective(self, ctx):
            return None

    assert RepairOnly.repairs() and not RepairOnly.trains()
    assert TrainTime.trains() and not TrainTime.repairs()
