"""Tests of the embedded synthetic world (shieldbench.data.synthetic)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from shieldbench.data import synthetic as syn
from shieldbench.data.synthetic import (
    CLASSNAMES,
    PARTS,
    TEMPLATES,
    find_class_in_caption,
    generate_pairs,
    knowledge_from_caption,
    make_world,
)
from shieldbench.data.types import DatasetBundle, LabelledSet, PairSet, RetrievalSet

SMALL = dict(n_pretrain=60, n_train=50, n_clean=30, n_test_per_class=4, n_retrieval=20)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def world() -> DatasetBundle:
    return make_world(seed=3, **SMALL)


# --- determinism and splits -------------------------------------------------


def _assert_same_world(a: DatasetBundle, b: DatasetBundle) -> None:
    for split in ("pretrain", "train", "clean"):
        pa, pb = getattr(a, split), getattr(b, split)
        assert torch.equal(pa.images, pb.images)
        assert pa.captions == pb.captions
        assert torch.equal(pa.labels, pb.labels)
        assert pa.knowledge == pb.knowledge
        assert pa.ids == pb.ids
    assert torch.equal(a.test.images, b.test.images)
    assert torch.equal(a.test.labels, b.test.labels)
    assert torch.equal(a.retrieval.images, b.retrieval.images)
    assert a.retrieval.captions == b.retrieval.captions


def test_same_seed_same_world(world):
    _assert_same_world(world, make_world(seed=3, **SMALL))


def test_different_seed_different_world(world):
    other = make_world(seed=4, **SMALL)
    assert not torch.equal(world.train.images, other.train.images)
    assert world.train.captions != other.train.captions
    assert not torch.equal(world.test.images, other.test.images)


def test_generate_pairs_deterministic():
    a = generate_pairs(64, 32, _gen(7))
    b = generate_pairs(64, 32, _gen(7))
    c = generate_pairs(64, 32, _gen(8))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]
    assert not torch.equal(a[0], c[0]) and a[1] != c[1]


def test_captions_independent_of_image_size():
    a = generate_pairs(32, 32, _gen(1))
    b = generate_pairs(32, 64, _gen(1))
    assert a[1] == b[1] and torch.equal(a[2], b[2])


def test_splits_independent_of_other_split_sizes(world):
    bigger = make_world(seed=3, **{**SMALL, "n_train": 90, "n_pretrain": 10})
    assert torch.equal(world.test.images, bigger.test.images)
    assert torch.equal(world.clean.images, bigger.clean.images)
    assert world.clean.captions == bigger.clean.captions
    assert world.retrieval.captions == bigger.retrieval.captions
    assert torch.equal(world.retrieval.images, bigger.retrieval.images)
    assert len(bigger.train) == 90


def test_splits_disjoint(world):
    seen: dict[bytes, str] = {}
    sets = {
        "pretrain": world.pretrain.images, "train": world.train.images,
        "clean": world.clean.images, "test": world.test.images,
        "retrieval": world.retrieval.images,
    }
    for name, imgs in sets.items():
        for img in imgs:
            key = img.numpy().tobytes()
            assert key not in seen, f"image shared between {seen.get(key)} and {name}"
            seen[key] = name
    ids = world.pretrain.ids + world.train.ids + world.clean.ids
    assert len(set(ids)) == len(ids)
    assert world.train.ids[123 % len(world.train)] == f"train-{123 % len(world.train):06d}"
    assert world.clean.ids[0] == "clean-000000"


# --- shapes, dtypes, balance -------------------------------------------------


def test_bundle_types_and_shapes(world):
    assert isinstance(world.pretrain, PairSet) and isinstance(world.test, LabelledSet)
    assert isinstance(world.retrieval, RetrievalSet)
    assert world.classnames == CLASSNAMES and world.test.classnames == CLASSNAMES
    assert world.templates == TEMPLATES and world.test.templates == TEMPLATES
    for split, n in (("pretrain", 60), ("train", 50), ("clean", 30)):
        ps = getattr(world, split)
        assert ps.images.shape == (n, 3, 32, 32) and ps.images.dtype == torch.uint8
        assert ps.labels.dtype == torch.int64 and ps.labels.shape == (n,)
        assert len(ps.captions) == n and len(ps.knowledge) == n
    assert world.test.images.shape == (40, 3, 32, 32) and world.test.images.dtype == torch.uint8
    r = world.retrieval
    assert r.images.shape == (20, 3, 32, 32)
    assert len(r.captions) == 40 and r.caption_image.shape == (40,)
    assert torch.equal(r.caption_image, torch.arange(20).repeat_interleave(2))
    assert torch.equal(r.caption_labels, r.image_labels[r.caption_image])
    for j in range(0, 40, 2):  # two different captions per image
        assert r.captions[j] != r.captions[j + 1]
    assert [find_class_in_caption(c) for c in r.captions] == r.caption_labels.tolist()


@pytest.mark.parametrize("size", [32, 64, 224])
def test_image_sizes(size):
    imgs, caps, labels, attrs = generate_pairs(6, size, _gen(0))
    assert imgs.shape == (6, 3, size, size) and imgs.dtype == torch.uint8
    assert labels.shape == (6,) and labels.dtype == torch.int64
    assert len(caps) == 6 and len(attrs) == 6
    assert imgs.float().std() > 10  # not blank


def test_zero_pairs():
    imgs, caps, labels, attrs = generate_pairs(0, 32, _gen(0))
    assert imgs.shape == (0, 3, 32, 32) and caps == [] and labels.numel() == 0 and attrs == []


def test_balanced_test_and_all_classes_present(world):
    counts = torch.bincount(world.test.labels, minlength=len(CLASSNAMES))
    assert counts.tolist() == [4] * len(CLASSNAMES)
    _, _, labels, _ = generate_pairs(500, 32, _gen(2))
    assert (torch.bincount(labels, minlength=10) > 20).all()


def test_attributes_vary_independently_of_class():
    attrs = syn.sample_attributes(4000, _gen(5))
    for key, card in (("colour", 8), ("size", 2), ("position", 5), ("background", 5)):
        table = torch.zeros(10, card)
        table.index_put_((attrs["label"], attrs[key]), torch.ones(4000), accumulate=True)
        assert (table > 0).all(), key


# --- captions ----------------------------------------------------------------


def test_captions_name_their_class():
    _, caps, labels, _ = generate_pairs(2000, 32, _gen(11))
    named = [find_class_in_caption(c) for c in caps]
    assert all(n is not None for n in named)
    assert named == labels.tolist()


def test_caption_variety_and_zero_shot_forms():
    _, caps, labels, attrs = generate_pairs(4000, 32, _gen(12))
    plain = {t.format(c) for t in TEMPLATES for c in CLASSNAMES}
    frac = sum(c in plain for c in caps) / len(caps)
    assert 0.10 < frac < 0.20, frac
    used = {a["template"] for a in attrs}
    assert set(TEMPLATES) <= used
    assert len(used) >= 12 + len(TEMPLATES)
    assert len(set(syn.CAPTION_TEMPLATES)) >= 12
    # Some captions ground a part phrase.
    part_phrases = [p for ps in PARTS.values() for _, p in ps]
    assert sum(any(p in c for p in part_phrases) for c in caps) > 200
    assert "an orange" in " ".join(caps) and " a orange" not in " ".join(caps)


# --- knowledge elements --------------------------------------------------------


def test_knowledge_exactly_k():
    _, caps, _, _ = generate_pairs(300, 32, _gen(13))
    for k in (1, 2, 3, 4, 5, syn.MAX_KNOWLEDGE):
        for c in caps + ["", "nothing to see", "a red thing"]:
            ke = knowledge_from_caption(c, k)
            assert isinstance(ke, tuple) and len(ke) == k and len(set(ke)) == k
    with pytest.raises(ValueError):
        knowledge_from_caption("a kite", 0)


def test_knowledge_from_text_only(world):
    banana = tuple(p for p, _ in PARTS["banana"])
    assert knowledge_from_caption("a photo of a banana.") == banana
    assert knowledge_from_caption("a small red apple on a dark background") == (
        "red apple", "round outline", "dark background")
    assert knowledge_from_caption("a small red apple on a dark background", 4)[-1] == "small object"
    assert knowledge_from_caption("a photo of something.")[0] == "object shape"
    for ps in (world.pretrain, world.train, world.clean):
        assert ps.knowledge == [knowledge_from_caption(c, 3) for c in ps.captions]
    # Same caption on different images -> same knowledge.
    imgs, caps, _, _ = generate_pairs(400, 32, _gen(14))
    by_caption: dict[str, list[int]] = {}
    for i, c in enumerate(caps):
        by_caption.setdefault(c, []).append(i)
    dup = next(ix for ix in by_caption.values() if len(ix) > 1)
    assert not torch.equal(imgs[dup[0]], imgs[dup[1]])
    w = make_world(seed=3, knowledge_k=5, **SMALL)
    assert all(len(k) == 5 for k in w.train.knowledge)


def test_class_word_matching():
    idx = CLASSNAMES.index
    assert find_class_in_caption("two bananas on a table") == idx("banana")
    assert find_class_in_caption("Crosses and stars") == idx("cross")
    assert find_class_in_caption("a red Apple") == idx("apple")
    assert find_class_in_caption("tents, near the top") == idx("tent")
    assert find_class_in_caption("a pineapple") is None
    assert find_class_in_caption("a bricklayer at work") is None
    assert find_class_in_caption("a starfish") is None
    assert find_class_in_caption("a photo of a kite.") == idx("kite")
    assert find_class_in_caption("") is None
    assert knowledge_from_caption("a pineapple")[0] == "object shape"


# --- pixels ------------------------------------------------------------------


def _canonical_masks(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Object masks cropped to their (known) box, 16x16: position/size removed."""
    g = _gen(seed)
    attrs = syn.sample_attributes(n, g)
    _, masks = syn.render(attrs, 32, g, return_masks=True)
    s = attrs["scale"]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = s
    theta[:, 1, 1] = s
    theta[:, 0, 2] = attrs["cx"]
    theta[:, 1, 2] = attrs["cy"]
    grid = F.affine_grid(theta, (n, 1, 16, 16), align_corners=False)
    crops = F.grid_sample(masks[:, None], grid, align_corners=False)
    return crops.flatten(1), attrs["label"]


def test_class_shapes_differ():
    x, y = _canonical_masks(1000, 21)
    xtr, ytr, xte, yte = x[:500], y[:500], x[500:], y[500:]
    centroids = torch.stack([xtr[ytr == c].mean(0) for c in range(10)])
    # Every pair of class-mean shapes differs substantially (>8% of the box).
    dist = (centroids[:, None] - centroids[None]).abs().mean(-1)
    off_diag = dist[~torch.eye(10, dtype=torch.bool)]
    assert off_diag.min() > 0.08, off_diag.min()
    acc = (torch.cdist(xte, centroids).argmin(1) == yte).float().mean().item()
    assert acc > 0.95, acc


def test_object_visible_against_background():
    g = _gen(22)
    attrs = syn.sample_attributes(1500, g)
    imgs, masks = syn.render(attrs, 32, g, return_masks=True)
    x = imgs.float() / 255
    obj = (masks >= 0.75).float()[:, None]
    bg = (masks <= 0.01).float()[:, None]
    assert (obj.sum((1, 2, 3)) > 0).all()
    obj_col = (x * obj).sum((2, 3)) / obj.sum((2, 3))
    bg_col = (x * bg).sum((2, 3)) / bg.sum((2, 3))
    contrast = (obj_col - bg_col).abs().amax(1)
    assert contrast.min() > 0.15, contrast.min()
    # Objects stay inside the frame: the border rows/columns are background.
    border = torch.cat([masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]], 1)
    assert border.max() < 0.05


def test_generation_speed():
    g = _gen(0)
    t0 = time.perf_counter()
    imgs, caps, _, _ = generate_pairs(10_000, 32, g)
    dt = time.perf_counter() - t0
    rate = 10_000 / dt
    print(f"\nsynthetic world: {rate:,.0f} images/s (10k pairs at 32px, {torch.get_num_threads()} threads)")
    assert imgs.shape[0] == len(caps) == 10_000
    assert rate > 300  # loose: the CI machine is shared
