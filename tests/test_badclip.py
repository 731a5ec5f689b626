"""BadCLIP and ke_adaptive: the optimisation lowers its own loss, the patch sits at the centre and
changes nothing else, plans restore bit for bit without optimising, seeds determine plans, the
adaptive term raises Semantic Shield's grounding score (checked against the defense's own
functions), the surrogate is the clean base model, and a smoke run through the installed CLI."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cli_helpers import needs_cli, sb
from shieldbench.attacks.badclip import BadCLIP, KEAdaptive, contrast_score, set_alignment
from shieldbench.attacks.base import AttackContext, PoisonPlan, class_pattern
from shieldbench.data.types import to_float
from shieldbench.errors import UserError
from shieldbench.spec import AttackSpec, build_spec


@pytest.fixture(scope="module")
def micro_vit():
    """A seeded random micro-vit: the optimisation has gradients to follow on any model, and this one is cheap."""
    from shieldbench.models import build_model

    torch.manual_seed(0)
    return build_model("micro-vit").eval()


def _ctx(world, surrogate=None, knowledge=True):
    from shieldbench.knowledge import knowledge_source_for

    source = knowledge_source_for(build_spec("smoke").data) if knowledge else None
    return AttackContext(world.train, world.classnames, world.templates, world.test,
                         image_size=world.train.images.shape[-1], surrogate=surrogate,
                         knowledge_source=source, knowledge_k=3)


def make(world, model=None, cls=BadCLIP, **options):
    fields = {k: options.pop(k) for k in ("caption_source", "mix") if k in options}
    # Small pools and batches keep each test to seconds on 2 shared cores.
    for key, value in (("steps", 3), ("n_images", 64), ("n_positives", 32), ("batch_size", 32)):
        options.setdefault(key, value)
    spec = AttackSpec(name="ke_adaptive" if cls is KEAdaptive else "badclip", target="banana",
                      poison_rate=0.05, options=options, **fields)
    surrogate = (lambda: copy.deepcopy(model)) if model is not None else None
    return cls(spec, _ctx(world, surrogate))


def roundtrip(plan: PoisonPlan) -> PoisonPlan:
    return PoisonPlan.from_dict(json.loads(plan.to_json()))


def test_optimisation_lowers_textual_loss(smoke_world, micro_vit):
    # An 8-pixel patch covers one whole token of the micro-vit (patch 8): the textual term alone.
    atk = make(smoke_world, micro_vit, steps=20, lr=0.1, size=8, visual_weight=0.0)
    _, info = atk.optimise(0)
    before, after = info["initial"]["text"], info["final"]["text"]
    # Measured: 5.017 -> 4.888 on this surrogate; the random start (steps=0) leaves them equal.
    assert after < before - 0.05, info
    assert info["steps"] == 20 and info["n_images"] == 64 and info["n_target_captions"] > 0
    _, still = make(smoke_world, micro_vit, steps=0, size=8, visual_weight=0.0).optimise(0)
    assert still["final"] == still["initial"]


def test_visual_term_lowers_its_loss(smoke_world, micro_vit):
    atk = make(smoke_world, micro_vit, steps=20, lr=0.1, text_weight=0.0)
    _, info = atk.optimise(0)
    # Measured: 1.254 -> 1.216 (triplet with margin 1 on unit-sphere distances).
    assert info["final"]["visual"] < info["initial"]["visual"] - 0.02, info


def test_patch_at_centre_only_patch_region_changes(smoke_world, micro_vit):
    atk = make(smoke_world, micro_vit)
    plan = atk.plan(0)
    side = atk.patch_side()
    assert side == 4 and plan.trigger["size"] == 4 and plan.trigger["location"] == "centre"
    x = to_float(smoke_world.test.images[:32])
    y = atk.apply_trigger(x)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[14:18, 14:18] = True  # 32 // 2 - 4 // 2 = 14
    changed = (y != x).any(dim=1)  # (N, H, W)
    assert not changed[:, ~region].any()
    assert torch.equal(y[:, :, 14:18, 14:18], torch.tensor(plan.trigger["patch"]).expand(32, 3, 4, 4))
    # Corner location: bottom-right.
    corner = make(smoke_world, micro_vit, location="corner")
    corner.plan(0)
    yc = corner.apply_trigger(x)
    assert not (yc != x)[:, :, :28, :].any() and not (yc != x)[:, :, :, :28].any()


def test_poisons_land_where_planned_with_natural_captions(smoke_world, micro_vit):
    atk = make(smoke_world, micro_vit)
    plan = atk.plan(0)
    poisoned = atk.poison(plan)
    rows = {e.row for e in plan.edits}
    assert len(rows) == plan.n_poisoned == round(0.05 * len(smoke_world.train))
    assert set(poisoned.is_poison.nonzero().flatten().tolist()) == rows
    new = poisoned.view.uint8_images(torch.arange(len(smoke_world.train)))
    changed = set((new != smoke_world.train.images).flatten(1).any(1).nonzero().flatten().tolist())
    assert changed <= rows
    natural = set(atk.target_caption_pool(natural=True))
    assert all(e.caption in natural for e in plan.edits)  # real training captions naming the target
    templates = make(smoke_world, micro_vit, captions="templates").plan(0)
    assert all(e.caption in {t.format("banana") for t in smoke_world.templates} for e in templates.edits)
    with pytest.raises(UserError, match="contradicts"):
        make(smoke_world, micro_vit, captions="templates", caption_source="caption_set")


def test_restore_gives_bit_identical_triggers_without_optimising(smoke_world, micro_vit):
    atk = make(smoke_world, micro_vit, steps=5)
    plan = atk.plan(3)
    fresh = make(smoke_world, None)  # no surrogate: restore must not optimise
    fresh.restore(roundtrip(plan))
    x = to_float(smoke_world.test.images[:16])
    assert torch.equal(atk.apply_trigger(x), fresh.apply_trigger(x))
    n = torch.arange(len(smoke_world.train))
    assert torch.equal(atk.poison(plan).view.uint8_images(n), fresh.poison(roundtrip(plan)).view.uint8_images(n))
    with pytest.raises(UserError, match="surrogate"):
        fresh.plan(3)


def test_same_seed_same_plan(smoke_world, micro_vit):
    a, b = make(smoke_world, micro_vit, steps=5), make(smoke_world, micro_vit, steps=5)
    p1 = a.plan(1)
    assert p1.hash() == b.plan(1).hash()
    assert p1.hash() != a.plan(2).hash()
    assert roundtrip(p1).hash() == p1.hash()


def test_grounding_matches_semantic_shield(smoke_world):
    """The attack's copy of the defense's score equals the defense's own functions."""
    from shieldbench.defenses.semantic_shield import losses as L

    g = torch.Generator().manual_seed(0)
    patches, table = torch.randn(6, 16, 8, generator=g), torch.randn(20, 8, generator=g)
    ke_index = torch.randint(0, 20, (6, 3), generator=g)
    a = set_alignment(patches, table, ke_index)
    assert torch.allclose(a, L.set_alignment(L.alignment(patches, table), ke_index))
    rows = torch.arange(6)
    others = a.clone()
    others[rows, rows] = float("nan")  # excluded by keep below; the own column is passed separately
    keep = ~torch.eye(6, dtype=torch.bool)
    ours = contrast_score(a[rows, rows], torch.nan_to_num(others), keep)
    # Semantic Shield's contrast z over the full row (own column included once) is the same number.
    assert torch.allclose(ours, L.grounding_from_sets(a, "contrast"), atol=1e-5)


def test_ke_adaptive_raises_the_grounding_score(smoke_world, micro_vit):
    opts = dict(steps=20, lr=0.1)
    plain = make(smoke_world, micro_vit, **opts)
    adaptive = make(smoke_world, micro_vit, cls=KEAdaptive, ke_weight=5.0, **opts)
    p_plain, _ = plain.optimise(0)
    p_adapt, info = adaptive.optimise(0)
    # Both patches scored by the same evaluator on the same images and captions (seed 0 pools).
    pools = adaptive._pools(micro_vit, np.random.default_rng(0))
    score_plain = -adaptive.evaluate_patch(micro_vit, pools, p_plain)["ke"]
    score_adapt = -adaptive.evaluate_patch(micro_vit, pools, p_adapt)["ke"]
    assert score_adapt == pytest.approx(-info["final"]["ke"], abs=1e-5)
    # Measured: mean contrast score 0.093 (badclip's patch) against 0.269 (ke_adaptive's).
    assert score_adapt > score_plain + 0.1, (score_plain, score_adapt)


def test_ke_adaptive_needs_a_knowledge_source(smoke_world, micro_vit):
    spec = AttackSpec(name="ke_adaptive", target="banana", options={"steps": 1})
    atk = KEAdaptive(spec, _ctx(smoke_world, lambda: copy.deepcopy(micro_vit), knowledge=False))
    with pytest.raises(UserError, match="knowledge source"):
        atk.plan(0)


def test_surrogate_is_the_clean_base_model(smoke_world, micro_vit):
    """The runner hands the attack a copy of the base model; planning leaves the base untouched."""
    from shieldbench.benchmark.keys import plan_key
    from shieldbench.benchmark.runner import make_attack

    spec = build_spec("smoke", overrides={"attack": {"name": "badclip", "steps": 3}})
    base = copy.deepcopy(micro_vit)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    grads = [p.requires_grad for p in base.parameters()]
    atk = make_attack(spec, smoke_world, base)
    sur = atk.ctx.surrogate()
    assert sur is not base
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in sur.state_dict().items())
    seen = []
    real = atk.ctx.surrogate
    object.__setattr__(atk.ctx, "surrogate", lambda: seen.append(1) or real())
    atk.plan(0)
    assert seen == [1]
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in base.parameters()] == grads
    # Its plan is keyed by the base model too (other attacks' keys are not).
    other_base = replace(spec, base=replace(spec.base, epochs=spec.base.epochs + 1))
    assert plan_key(spec) != plan_key(other_base)
    badnets = replace(spec, attack=replace(spec.attack, name="badnets", options={}))
    assert plan_key(badnets) == plan_key(replace(badnets, base=other_base.base))


def test_target_class_needs_target_captions(smoke_world, micro_vit):
    atk = make(smoke_world, micro_vit)
    pat = class_pattern("banana")
    assert all(pat.search(c) for c in atk.target_caption_pool(natural=True))


@pytest.mark.slow
@needs_cli
def test_cli_smoke_run_ok(tmp_path):
    proc = sb("run", "-a", "badclip", "-d", "none", "--preset", "smoke", "-q", "-o", "res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = list((tmp_path / "res" / "runs").glob("*/record.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["status"] == "ok", record.get("error")
    assert record["plan"]["notes"]["optimisation"]["final"]["text"] > 0
