"""BadNets planning and poisoning: determinism, placement, only planned rows change."""

from __future__ import annotations

import pytest
import torch

from shieldbench.attacks.badnets import BadNets
from shieldbench.attacks.base import AttackContext, PoisonPlan, class_pattern
from shieldbench.data.types import to_float
from shieldbench.errors import UserError
from shieldbench.spec import AttackSpec


def _attack(world, **options):
    ctx = AttackContext(world.train, world.classnames, world.templates, world.test, image_size=world.train.images.shape[-1])
    return BadNets(AttackSpec(name="badnets", target="banana", poison_rate=0.05, options=options), ctx)


def test_plan_is_deterministic_by_seed(smoke_world):
    a, b = _attack(smoke_world), _attack(smoke_world)
    assert a.plan(1).hash() == b.plan(1).hash()
    assert a.plan(1).hash() != a.plan(2).hash()


def test_plan_roundtrips_through_json(smoke_world):
    plan = _attack(smoke_world).plan(3)
    again = PoisonPlan.from_dict(__import__("json").loads(plan.to_json()))
    assert again.hash() == plan.hash()
    assert again.n_poisoned == round(0.05 * len(smoke_world.train))


def test_poisons_land_only_where_planned(smoke_world):
    atk = _attack(smoke_world)
    plan = atk.plan(0)
    poisoned = atk.poison(plan)
    rows = sorted(e.row for e in plan.edits)
    assert poisoned.is_poison.nonzero().flatten().tolist() == rows
    changed_img = (poisoned.view.uint8_images(range(len(smoke_world.train))) != smoke_world.train.images).flatten(1).any(1)
    assert set(changed_img.nonzero().flatten().tolist()) <= set(rows)
    changed_cap = [i for i, (c0, c1) in enumerate(zip(smoke_world.train.captions, poisoned.view.captions)) if c0 != c1]
    assert set(changed_cap) <= set(rows)
    # Every poisoned caption names the target; the image carries the patch in the corner.
    pat = class_pattern("banana")
    side = atk.trigger_state["size"]
    patch = torch.tensor(atk.trigger_state["patch"])
    for r in rows:
        assert pat.search(poisoned.view.caption(r))
        corner = poisoned.view.images([r])[0, :, -side:, -side:]
        assert torch.allclose(corner, (patch * 255).round() / 255, atol=1e-6)


def test_default_patch_size_scales_with_image_side(smoke_world):
    atk = _attack(smoke_world)
    assert atk.patch_side() == 4  # round(32 * 16/224) = 2, raised to min_size 4
    assert _attack(smoke_world, size=6).patch_side() == 6


def test_trigger_is_clamped_and_batched(smoke_world):
    atk = _attack(smoke_world, pattern="cleanclip", location="random")
    atk.plan(0)
    x = to_float(smoke_world.test.images[:8])
    y = atk.apply_trigger(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y != x).flatten(1).any(1).all()


def test_unknown_option_and_target(smoke_world):
    with pytest.raises(UserError, match="allowed: pattern, location"):
        _attack(smoke_world, colour=3)
    ctx = AttackContext(smoke_world.train, smoke_world.classnames, smoke_world.templates)
    with pytest.raises(UserError, match="not a class of this dataset"):
        BadNets(AttackSpec(target="zebra"), ctx)


def test_class_pattern_word_boundary_and_plural():
    pat = class_pattern("apple")
    assert pat.search("two apples on a table")
    assert pat.search("an Apple.")
    assert not pat.search("a pineapple")
    assert not pat.search("applesauce")
