"""The five attacks: trigger math checked against independent computations,
determinism, plan JSON round trips, where poisons land, clean-label and
targeted specifics, and PGD hardening against a micro-vit surrogate."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shieldbench.attacks import triggers as T
from shieldbench.attacks.base import AttackContext, PoisonPlan, class_pattern
from shieldbench.data.types import to_float
from shieldbench.errors import UserError
from shieldbench.registry import ATTACKS
from shieldbench.spec import AttackSpec

ALL = ("badnets", "blended", "wanet", "label_consistent", "targeted")


def _ctx(world, surrogate=None):
    return AttackContext(world.train, world.classnames, world.templates, world.test,
                         image_size=world.train.images.shape[-1], surrogate=surrogate)


def make(world, name, surrogate=None, rate=0.05, **kw):
    fields = {k: kw.pop(k) for k in ("n_poison", "mix", "caption_source") if k in kw}
    spec = AttackSpec(name=name, target="banana", poison_rate=rate, options=kw, **fields)
    return ATTACKS.get(name)(spec, _ctx(world, surrogate))


def roundtrip(plan: PoisonPlan) -> PoisonPlan:
    return PoisonPlan.from_dict(json.loads(plan.to_json()))


def changed_rows(world, poisoned) -> set[int]:
    n = len(world.train)
    new = poisoned.view.uint8_images(torch.arange(n))
    img = (new != world.train.images).flatten(1).any(1)
    cap = [i for i, (a, b) in enumerate(zip(world.train.captions, poisoned.view.captions)) if a != b]
    return set(img.nonzero().flatten().tolist()) | set(cap)


# -- generic contract ----------------------------------------------------------------------


def test_all_registered_with_metadata():
    from shieldbench import api

    rows = {r["name"]: r for r in api.list_plugins("attacks", verbose=True)}
    for name in ALL:
        r = rows[name]
        assert r["threat_model"] in ("dirty_label", "clean_label", "targeted")
        assert r["paper"] and r["description"] and r["params"]
        assert ATTACKS.get(name).__module__.startswith("shieldbench.attacks.")
    assert {p["name"] for p in rows["wanet"]["params"]} >= {"k", "s", "grid_rescale", "cross_ratio", "preset"}


@pytest.mark.parametrize("name", ALL)
def test_plan_deterministic_by_seed(smoke_world, name):
    kw = {"n_targets": 3, "num_captions": 5} if name == "targeted" else {}
    a, b = make(smoke_world, name, **kw), make(smoke_world, name, **kw)
    p1 = a.plan(1)
    assert p1.hash() == b.plan(1).hash()
    assert p1.hash() != a.plan(2).hash()
    assert roundtrip(p1).hash() == p1.hash()


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet", "label_consistent"])
def test_restore_from_json_reproduces_trigger(smoke_world, name):
    atk = make(smoke_world, name)
    plan = atk.plan(5)
    fresh = make(smoke_world, name)
    fresh.restore(roundtrip(plan))
    x = to_float(smoke_world.test.images[:16])
    y1 = atk.apply_trigger(x, generator=torch.Generator().manual_seed(3))
    y2 = fresh.apply_trigger(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, x)
    # The poisoned training set is reproduced exactly too.
    assert torch.equal(atk.poison(plan).view.uint8_images(torch.arange(len(smoke_world.train))),
                       fresh.poison(roundtrip(plan)).view.uint8_images(torch.arange(len(smoke_world.train))))


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet", "label_consistent"])
def test_poisons_land_only_where_planned(smoke_world, name):
    atk = make(smoke_world, name)
    plan = atk.plan(0)
    poisoned = atk.poison(plan)
    rows = {e.row for e in plan.edits}
    poison_rows = {e.row for e in plan.edits if e.transform == "trigger"}
    assert changed_rows(smoke_world, poisoned) <= rows
    assert set(poisoned.is_poison.nonzero().flatten().tolist()) == poison_rows
    assert len(poisoned.view) == len(smoke_world.train)
    pat = class_pattern("banana")
    for e in plan.edits:
        if e.transform == "trigger":
            assert pat.search(poisoned.view.caption(e.row))


# -- BadNets -----------------------------------------------------------------------------


def test_badnets_patch_placement_and_clamp(smoke_world):
    atk = make(smoke_world, "badnets", pattern="grid", size=3)
    atk.plan(0)
    x = torch.full((2, 3, 8, 8), 0.5)
    y = atk.apply_trigger(x)
    grid = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 0, 1]])
    assert torch.equal(y[:, :, 5:, 5:], grid.expand(2, 3, 3, 3))
    assert torch.equal(y[:, :, :5], x[:, :, :5]) and torch.equal(y[:, :, :, :5], x[:, :, :, :5])
    y = atk.apply_trigger(torch.full((1, 3, 8, 8), 3.0))  # out-of-range input is clamped
    assert y.max() == 1 and y.min() == 0


def test_badnets_random_train_fixed_test_location(smoke_world):
    atk = make(smoke_world, "badnets", location="random", test_location="corner")
    plan = atk.plan(0)
    side = atk.trigger_state["size"]
    assert all(e.position is not None and 0 <= min(e.position) and max(e.position) <= 32 - side for e in plan.edits)
    assert len({tuple(e.position) for e in plan.edits}) > 1
    x = torch.zeros(4, 3, 32, 32)
    y = atk.apply_trigger(x, generator=torch.Generator().manual_seed(0))
    patch = torch.tensor(atk.trigger_state["patch"])
    assert torch.equal(y[:, :, -side:, -side:], patch.expand(4, *patch.shape))
    # Training poisons carry their own random positions.
    poisoned = atk.poison(plan)
    e = plan.edits[0]
    top, left = e.position
    got = poisoned.view.images([e.row])[0, :, top:top + side, left:left + side]
    assert torch.allclose(got, (patch * 255).round() / 255, atol=1e-6)


def test_badnets_append_mix(smoke_world):
    atk = make(smoke_world, "badnets", mix="append")
    plan = atk.plan(0)
    poisoned = atk.poison(plan)
    n = len(smoke_world.train)
    m = len(plan.edits)
    assert len(poisoned.view) == n + m
    # Appended poisons sit at shuffled positions, not at the tail; the corpus keeps its order around them.
    flagged = poisoned.is_poison.nonzero().flatten()
    assert flagged.numel() == m and int(flagged.min()) < n
    clean_rows = (~poisoned.is_poison).nonzero().flatten()
    assert torch.equal(poisoned.view.uint8_images(clean_rows), smoke_world.train.images)
    assert [poisoned.view.caption(int(r)) for r in clean_rows] == smoke_world.train.captions


# -- Blended -----------------------------------------------------------------------------


def test_blended_noise_key_arithmetic(smoke_world):
    atk = make(smoke_world, "blended")
    plan = atk.plan(7)
    seed = plan.trigger["key_seed"]
    key = torch.rand((3, 32, 32), generator=torch.Generator().manual_seed(seed))  # independent draw
    x = torch.full((2, 3, 32, 32), 0.5)
    y = atk.apply_trigger(x)
    assert torch.allclose(y, 0.8 * 0.5 + 0.2 * key.expand(2, 3, 32, 32), atol=1e-6)
    assert set(plan.trigger) == {"alpha", "key", "key_seed"}  # the seed, not the image, is stored
    atk2 = make(smoke_world, "blended", alpha=0.5)
    atk2.plan(7)
    assert torch.allclose(atk2.apply_trigger(torch.ones(1, 3, 32, 32)), 0.5 + 0.5 * key, atol=1e-6)


def test_blended_file_key(smoke_world, tmp_path):
    from PIL import Image

    path = tmp_path / "key.png"
    Image.new("RGB", (10, 10), (255, 0, 0)).save(path)
    atk = make(smoke_world, "blended", key="file", key_path=str(path))
    plan = atk.plan(0)
    y = atk.apply_trigger(torch.zeros(2, 3, 32, 32))
    assert torch.allclose(y[:, 0], torch.full((2, 32, 32), 0.2)) and torch.equal(y[:, 1:], torch.zeros(2, 2, 32, 32))
    assert plan.trigger["key_sha256"]
    for bad in (tmp_path / "missing.png", tmp_path / "corrupt.png"):
        if bad.name == "corrupt.png":
            bad.write_bytes(b"not an image at all")
        with pytest.raises(UserError) as err:
            make(smoke_world, "blended", key="file", key_path=str(bad))
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="key_path"):
        make(smoke_world, "blended", key="file")


def test_blended_cleanclip_key_is_per_image(smoke_world):
    atk = make(smoke_world, "blended", key="cleanclip")
    atk.plan(0)
    x = torch.full((4, 3, 32, 32), 0.5)
    y = atk.apply_trigger(x, generator=torch.Generator().manual_seed(1))
    k = (y - 0.8 * x) / 0.2  # the key each image got
    assert k.min() >= -1e-5 and k.max() <= 1 + 1e-5
    assert not torch.allclose(k[0], k[1])
    y2 = atk.apply_trigger(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y2)


# -- WaNet -------------------------------------------------------------------------------


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    def w(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def _upsample_bicubic_np(c: np.ndarray, n: int) -> np.ndarray:
    """Independent bicubic upsampling (align_corners=True, a=-0.75, clamped borders) of (k, k) -> (n, n)."""
    k = c.shape[0]
    mat = np.zeros((n, k))
    for o in range(n):
        src = o * (k - 1) / (n - 1) if n > 1 else 0.0
        i0 = math.floor(src)
        for off, wt in zip((-1, 0, 1, 2), _cubic_weights(src - i0)):
            mat[o, min(max(i0 + off, 0), k - 1)] += wt
    return mat @ c @ mat.T


def _warp_np(x: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Independent bilinear sampling, align_corners=True, zero padding; x (C, H, W)."""
    c, h, w = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            px, py = (gx[i, j] + 1) / 2 * (w - 1), (gy[i, j] + 1) / 2 * (h - 1)
            x0, y0 = math.floor(px), math.floor(py)
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, i, j] += wy * wx * x[:, yy, xx]
    return out


def test_wanet_warp_matches_independent_computation(smoke_world):
    atk = make(smoke_world, "wanet", s=3.0)
    plan = atk.plan(11)
    ctrl = np.array(plan.trigger["control"], dtype=np.float64)[0]  # (2, k, k)
    assert ctrl.shape == (2, 4, 4) and abs(np.abs(ctrl).mean() - 1) < 1e-5
    h = 16
    flow = [_upsample_bicubic_np(ctrl[d], h) for d in range(2)]
    lin = np.linspace(-1, 1, h)
    gx = np.clip(lin[None, :] + 3.0 * flow[0] / h, -1, 1)
    gy = np.clip(lin[:, None] + 3.0 * flow[1] / h, -1, 1)
    x = torch.rand(2, 3, h, h, generator=torch.Generator().manual_seed(0))
    y = atk.apply_trigger(x)
    for n in range(2):
        expected = np.clip(_warp_np(x[n].double().numpy(), gx, gy), 0, 1)
        np.testing.assert_allclose(y[n].numpy(), expected, atol=2e-5)
    # And it is exactly the triggers.* composition.
    g = T.wanet_grid(T.wanet_identity_grid(h, h), T.wanet_flow_field(atk.control(), h, h), 3.0, 1.0)
    assert torch.equal(y, T.wanet_warp(x, g))


def test_wanet_identity_at_zero_strength_and_integer_shift(smoke_world):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    atk = make(smoke_world, "wanet", s=0.0)
    atk.plan(0)
    torch.testing.assert_close(atk.apply_trigger(x), x, atol=1e-5, rtol=0)  # float rounding only
    # A constant control grid shifts every pixel: s * c / H * (W - 1) / 2 = 1 pixel in x.
    atk = make(smoke_world, "wanet", s=1.0)
    atk.plan(0)
    atk.trigger_state["control"] = [[[[64 / 31] * 4] * 4, [[0.0] * 4] * 4]]
    atk._grids = {}
    expected = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
    torch.testing.assert_close(atk.apply_trigger(x), expected, atol=1e-5, rtol=0)


def test_wanet_noise_mode_keeps_captions_and_is_not_poison(smoke_world):
    atk = make(smoke_world, "wanet", n_poison=10)
    plan = atk.plan(0)
    trig = [e for e in plan.edits if e.transform == "trigger"]
    noise = [e for e in plan.edits if e.transform == "noise"]
    assert len(trig) == 10 and len(noise) == 20 and plan.notes["n_noise_mode"] == 20
    assert plan.n_poisoned == 10
    assert not {e.row for e in trig} & {e.row for e in noise}
    assert all(e.caption is None for e in noise)
    poisoned = atk.poison(plan)
    for e in noise:
        assert poisoned.view.caption(e.row) == smoke_world.train.captions[e.row]
        assert not poisoned.is_poison[e.row]
    assert int(poisoned.is_poison.sum()) == 10
    # Noise rows are warped with the fixed grid + per-sample noise, not the trigger alone.
    rows = [e.row for e in noise]
    src = to_float(smoke_world.train.images[rows])
    got = poisoned.view.images(rows)
    assert not torch.allclose(got, T.wanet_warp(src, atk.grid(32, 32)).mul(255).round().div(255))
    assert make(smoke_world, "wanet", n_poison=10, cross_ratio=0).plan(0).notes["n_noise_mode"] == 0


def test_wanet_apply_noise_is_grid_plus_uniform_over_h(smoke_world):
    atk = make(smoke_world, "wanet")
    atk.plan(3)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = atk.apply_noise(x, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    ins = torch.rand(4, 32, 32, 2, generator=g) * 2 - 1
    grids = torch.clamp(atk.grid(32, 32) + ins / 32, -1, 1)
    ref = F.grid_sample(x, grids, align_corners=True).clamp(0, 1)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)


def test_wanet_cleanclip_preset_is_per_pixel(smoke_world):
    atk = make(smoke_world, "wanet", preset="cleanclip")
    plan = atk.plan(0)
    assert plan.trigger["k"] == 32 and plan.trigger["s"] == 1.0
    flow = T.wanet_flow_field(atk.control(), 32, 32)
    torch.testing.assert_close(flow, atk.control().permute(0, 2, 3, 1), atol=1e-5, rtol=0)  # no smoothing


# -- label-consistent ----------------------------------------------------------------------


def test_label_consistent_touches_only_matching_rows_and_keeps_captions(smoke_world):
    atk = make(smoke_world, "label_consistent")
    plan = atk.plan(0)
    pat = class_pattern("banana")
    matching = {i for i, c in enumerate(smoke_world.train.captions) if pat.search(c)}
    rows = {e.row for e in plan.edits}
    assert rows and rows <= matching
    assert all(e.caption is None for e in plan.edits)
    assert plan.threat_model == "clean_label" and plan.notes["n_matching"] == len(matching)
    poisoned = atk.poison(plan)
    assert poisoned.view.captions == smoke_world.train.captions
    assert changed_rows(smoke_world, poisoned) <= rows
    capped = make(smoke_world, "label_consistent", n_poison=10_000).plan(0)
    assert capped.n_requested == 10_000 and capped.n_poisoned == len(matching)
    assert capped.notes["capped"] and capped.notes["n_requested"] == 10_000


@pytest.fixture(scope="module")
def micro_vit():
    from shieldbench.models import build_model

    torch.manual_seed(0)
    return build_model("micro-vit").eval()


def test_label_consistent_pgd_within_eps_and_increases_loss(smoke_world, micro_vit):
    eps = 8 / 255
    atk = make(smoke_world, "label_consistent", surrogate=lambda: copy.deepcopy(micro_vit),
               n_poison=6, pgd_steps=4, pgd_eps=eps, pgd_step=2 / 255)
    plan = atk.plan(0)
    rows = [e.source_index for e in plan.edits]
    caps = [smoke_world.train.captions[r] for r in rows]
    x0 = to_float(smoke_world.train.images[rows])
    xh = atk.harden(x0, caps)
    assert (xh - x0).abs().max() <= eps + 1e-6 and xh.min() >= 0 and xh.max() <= 1
    with torch.no_grad():
        before = atk.surrogate_loss(micro_vit, x0, caps).mean()
        after = atk.surrogate_loss(micro_vit, xh, caps).mean()
    assert after > before
    # The hardened image is baked into the poisons, deterministically; the plan stays image-free.
    p1, p2 = atk.poison(plan), atk.poison(roundtrip(plan))
    n = len(smoke_world.train)
    assert torch.equal(p1.view.uint8_images(torch.arange(n)), p2.view.uint8_images(torch.arange(n)))
    no_pgd = PoisonPlan.from_dict({**plan.to_dict(), "trigger": {k: v for k, v in plan.trigger.items() if k != "pgd"}})
    plain_atk = make(smoke_world, "label_consistent", n_poison=6)
    plain_atk.restore(no_pgd)
    plain = plain_atk.poison(no_pgd)
    r = plan.edits[0].row
    assert not torch.equal(p1.view.uint8_images([r]), plain.view.uint8_images([r]))
    side = atk.trigger_state["size"]
    assert torch.equal(p1.view.uint8_images([r])[..., -side:, -side:], plain.view.uint8_images([r])[..., -side:, -side:])
    assert len(plan.to_json()) < 4000
    caption_loss = make(smoke_world, "label_consistent", surrogate=lambda: copy.deepcopy(micro_vit),
                        pgd_steps=2, pgd_loss="caption")
    xc = caption_loss.harden(x0[:2], caps[:2])
    with torch.no_grad():
        assert caption_loss.surrogate_loss(micro_vit, xc, caps[:2]).mean() > caption_loss.surrogate_loss(micro_vit, x0[:2], caps[:2]).mean()


def test_label_consistent_pgd_needs_surrogate(smoke_world):
    atk = make(smoke_world, "label_consistent", pgd_steps=2, n_poison=2)
    with pytest.raises(UserError, match="surrogate"):
        atk.poison(atk.plan(0))


# -- targeted --------------------------------------------------------------------------------


def test_targeted_appends_pool_images_with_target_captions(smoke_world):
    atk = make(smoke_world, "targeted", n_targets=4, num_captions=7, rate=0.5)
    plan = atk.plan(0)
    assert plan.mix == "append" and plan.threat_model == "targeted" and not atk.has_trigger
    assert plan.n_requested == plan.n_poisoned == 28  # poison_rate does not apply
    targets = sorted({e.source_index for e in plan.edits})
    assert len(targets) == 4 and all(e.source == "pool" and e.row is None and e.transform == "none" for e in plan.edits)
    assert all(int(smoke_world.test.labels[t]) != atk.target_index for t in targets)
    poisoned = atk.poison(plan)
    n = len(smoke_world.train)
    assert len(poisoned.view) == n + 28
    clean_rows = (~poisoned.is_poison).nonzero().flatten()
    assert torch.equal(poisoned.view.uint8_images(clean_rows), smoke_world.train.images)
    assert [poisoned.view.caption(int(r)) for r in clean_rows] == smoke_world.train.captions
    rows = poisoned.is_poison.nonzero().flatten().tolist()
    assert len(rows) == 28 and rows[0] < n  # shuffled in, not appended at the tail
    pat = class_pattern("banana")
    got = sorted((e.source_index, e.caption) for e in plan.edits)
    seen = []
    for r in rows:
        img = poisoned.view.uint8_images([r])[0]
        src = [t for t in targets if torch.equal(img, smoke_world.test.images[t])]
        assert len(src) == 1 and pat.search(poisoned.view.caption(r))
        seen.append((src[0], poisoned.view.caption(r)))
    assert sorted(seen) == got


def test_targeted_replace_and_caption_set(smoke_world):
    atk = make(smoke_world, "targeted", n_targets=2, num_captions=5, mix="replace", caption_source="caption_set")
    plan = atk.plan(1)
    poisoned = atk.poison(plan)
    assert len(poisoned.view) == len(smoke_world.train)
    rows = {e.row for e in plan.edits}
    assert len(rows) == 10 and changed_rows(smoke_world, poisoned) <= rows
    train_caps = set(smoke_world.train.captions)
    assert all(e.caption in train_caps for e in plan.edits)


def test_plan_names_its_attack(smoke_world):
    for name in ("badnets", "blended", "targeted"):
        assert make(smoke_world, name).plan(0).attack == name
