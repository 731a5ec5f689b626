"""Hand-computed checks for shieldbench.evaluation.metrics."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from shieldbench.evaluation.metrics import (
    Rate,
    attack_success_rate,
    backdoor_hit_at_k,
    defense_effectiveness_rating,
    hit_at_k_from_ranks,
    retrieval_recall,
    robust_accuracy,
    targeted_poisoning_success,
    text_to_image_rank,
    topk_accuracy,
    wilson_interval,
    zeroshot_classifier,
)


def _embed(sims: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose cosine-similarity matrix is exactly ``sims``.

    Rows (queries) are the first A basis vectors of R^(A+1); column j becomes
    the unit vector ``[sims[0][j], ..., sims[A-1][j], slack]``, so
    ``cos(row i, col j) == sims[i][j]``.
    """
    s = torch.tensor(sims, dtype=torch.float64)
    a, b = s.shape
    rows = torch.eye(a, a + 1, dtype=torch.float64)
    sq = (s**2).sum(dim=0)
    assert bool((sq <= 1).all())
    cols = torch.cat([s.T, (1 - sq).sqrt()[:, None]], dim=1)
    return rows.float(), cols.float()


# ---------------------------------------------------------------- Wilson / Rate


def _wilson_closed_form(k: int, n: int, conf: float) -> tuple[float, float]:
    z = norm.ppf(1 - (1 - conf) / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(7, 20), (0, 10), (10, 10), (1, 3), (50, 100)])
@pytest.mark.parametrize("conf", [0.95, 0.9])
def test_wilson_matches_closed_form(k, n, conf):
    low, high = wilson_interval(k, n, conf)
    exp_low, exp_high = _wilson_closed_form(k, n, conf)
    assert low == pytest.approx(exp_low, abs=1e-9)
    assert high == pytest.approx(exp_high, abs=1e-9)


def test_wilson_known_value():
    # k=7, n=20, z=1.959964: centre=0.3742..., half=0.1928... -> (0.1812, 0.5671)
    low, high = wilson_interval(7, 20)
    assert low == pytest.approx(0.18119, abs=1e-4)
    assert high == pytest.approx(0.56714, abs=1e-4)


def test_wilson_empty_and_invalid():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


def test_rate_of_and_to_dict():
    r = Rate.of(3, 4)
    assert (r.k, r.n, r.value) == (3, 4, 0.75)
    assert (r.ci_low, r.ci_high) == pytest.approx(_wilson_closed_form(3, 4, 0.95))
    assert r.ci_low < 0.75 < r.ci_high
    d = r.to_dict()
    assert d == {"k": 3, "n": 4, "value": 0.75, "ci_low": r.ci_low, "ci_high": r.ci_high}
    e = Rate.of(0, 0)
    assert e.n == 0 and math.isnan(e.value) and math.isnan(e.ci_low)
    with pytest.raises(Exception):
        r.k = 5  # frozen


# ---------------------------------------------------------------- classification


def test_zeroshot_classifier_normalises_templates_first():
    emb = torch.tensor(
        [
            [[3.0, 0.0], [0.0, 4.0]],  # -> mean([1,0],[0,1]) = [.5,.5] -> [1/√2, 1/√2]
            [[1.0, 0.0], [2.0, 0.0]],  # -> [1, 0]
        ]
    )
    w = zeroshot_classifier(emb)
    r = 1 / math.sqrt(2)
    # averaging raw embeddings first would give [0.6, 0.8] for class 0
    assert torch.allclose(w, torch.tensor([[r, r], [1.0, 0.0]]), atol=1e-6)
    assert w.shape == (2, 2)


def test_topk_accuracy_hand_computed():
    logits = torch.tensor(
        [
            [3.0, 2.0, 1.0],  # label 0: top1 0 (hit), top2 {0,1} hit
            [1.0, 3.0, 2.0],  # label 2: top1 1 (miss), top2 {1,2} hit
            [2.0, 1.0, 3.0],  # label 2: top1 2 (hit), top2 {2,0} hit
            [1.0, 2.0, 3.0],  # label 0: top1 2 (miss), top2 {2,1} miss
        ]
    )
    labels = torch.tensor([0, 2, 2, 0])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert (acc[1].k, acc[1].n) == (2, 4)
    assert acc[2].k == 3
    assert acc[5].k == 4 and acc[5].value == 1.0  # k=5 clipped to C=3
    assert set(topk_accuracy(logits, labels)) == {1, 5}


# ASR fixture: target = 1
#   img  label  triggered logits   top1  top2
#   0    0      [1, 5, 0]          1     {1,0}   counted, success@1
#   1    1      [0, 4, 1]          1     {1,2}   EXCLUDED (target class)
#   2    2      [0, 3, 2]          1     {1,2}   counted, success@1
#   3    1      [0, 2, 1]          1     {1,2}   EXCLUDED (target class)
#   4    0      [4, 2, 1]          0     {0,1}   counted, success only @2
_ASR_LOGITS = torch.tensor(
    [[1.0, 5.0, 0.0], [0.0, 4.0, 1.0], [0.0, 3.0, 2.0], [0.0, 2.0, 1.0], [4.0, 2.0, 1.0]]
)
_ASR_LABELS = torch.tensor([0, 1, 2, 1, 0])


def test_attack_success_rate_excludes_target_class():
    asr = attack_success_rate(_ASR_LOGITS, _ASR_LABELS, target=1)
    # counting all images would give 4/5
    assert (asr.k, asr.n) == (2, 3)
    assert asr.value == pytest.approx(2 / 3)
    asr2 = attack_success_rate(_ASR_LOGITS, _ASR_LABELS, target=1, k=2)
    assert (asr2.k, asr2.n) == (3, 3)


def test_attack_success_rate_no_nontarget_images():
    asr = attack_success_rate(_ASR_LOGITS[[1, 3]], _ASR_LABELS[[1, 3]], target=1)
    assert asr.n == 0 and math.isnan(asr.value)


def test_robust_accuracy_hand_computed():
    ra = robust_accuracy(_ASR_LOGITS, _ASR_LABELS, target=1)
    # non-target images 0, 2, 4: predictions 1, 1, 0 vs labels 0, 2, 0 -> only img 4
    assert (ra.k, ra.n) == (1, 3)


def test_targeted_poisoning_success():
    logits = torch.tensor(
        [[0.0, 1.0, 2.0], [3.0, 1.0, 2.0], [0.0, 0.0, 1.0], [0.0, 5.0, 1.0]]
    )  # top-1: 2, 0, 2, 1
    r = targeted_poisoning_success(logits, target=2)
    assert (r.k, r.n) == (2, 4)


# ---------------------------------------------------------------- retrieval

# Cosine similarities image i (row) vs caption j (column).
# caption_image = [0, 0, 1, 1, 2, 2]
#        c0    c1    c2    c3    c4    c5
_RET_SIMS = [
    [0.10, 0.70, 0.40, 0.30, 0.50, 0.20],  # i0: c1 c4 c2 c3 c5 c0 -> own c1 at 1
    [0.65, 0.20, 0.60, 0.10, 0.40, 0.30],  # i1: c0 c2 c4 c5 c1 c3 -> own c2 at 2
    [0.30, 0.10, 0.20, 0.50, 0.00, 0.25],  # i2: c3 c0 c5 c2 c1 c4 -> own c5 at 3
]
# i0's FIRST caption (c0) is ranked last: only its second caption is retrieved.
# t2i (rank of own image among the 3 images, column-wise):
#   c0 [.10,.65,.30] -> 3 | c1 [.70,.20,.10] -> 1 | c2 [.40,.60,.20] -> 1
#   c3 [.30,.10,.50] -> 3 | c4 [.50,.40,.00] -> 3 | c5 [.20,.30,.25] -> 2
_RET_CAPTION_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])
_RET_T2I_RANKS = [3, 1, 1, 3, 3, 2]


def test_retrieval_recall_hand_computed():
    img, txt = _embed(_RET_SIMS)
    # arbitrary positive rescaling must not matter (normalised inside)
    img = img * torch.tensor([[2.0], [0.5], [3.0]])
    txt = txt * torch.tensor([[1.0], [4.0], [0.2], [7.0], [1.5], [0.3]])
    rec = retrieval_recall(img, txt, _RET_CAPTION_IMAGE, ks=(1, 2, 3, 10))
    expected = {
        "i2t_R@1": 1 / 3,
        "i2t_R@2": 2 / 3,
        "i2t_R@3": 1.0,
        "i2t_R@10": 1.0,
        "t2i_R@1": 2 / 6,
        "t2i_R@2": 3 / 6,
        "t2i_R@3": 1.0,
        "t2i_R@10": 1.0,
    }
    assert set(rec) == set(expected)
    for key, val in expected.items():
        assert rec[key] == pytest.approx(val), key


def test_retrieval_recall_only_second_caption():
    # Two images; image 0 owns captions c0 (far) and c1 (retrieved at rank 1 by image 0)
    img, txt = _embed([[0.1, 0.8, 0.3], [0.6, 0.2, 0.7]])
    rec = retrieval_recall(img, txt, torch.tensor([0, 0, 1]), ks=(1,))
    assert rec["i2t_R@1"] == 1.0  # i0 -> c1 (own, second), i1 -> c2 (own)
    # t2i: c0 -> i1 (miss), c1 -> i0 (hit), c2 -> i1 (hit)
    assert rec["t2i_R@1"] == pytest.approx(2 / 3)


def test_retrieval_recall_rejects_image_without_caption():
    img, txt = _embed(_RET_SIMS)
    with pytest.raises(ValueError):
        retrieval_recall(img, txt, torch.tensor([0, 0, 1, 1, 1, 1]))


def test_text_to_image_rank_and_hits():
    img, txt = _embed(_RET_SIMS)
    ranks = text_to_image_rank(txt, img, _RET_CAPTION_IMAGE)
    assert ranks.dtype == torch.long
    assert ranks.tolist() == _RET_T2I_RANKS
    hits = hit_at_k_from_ranks(ranks, ks=(1, 2, 3))
    assert hits == pytest.approx({1: 2 / 6, 2: 3 / 6, 3: 1.0})
    assert int(ranks.min()) == 1  # MinRank
    assert hit_at_k_from_ranks(torch.tensor([1, 4, 10, 11]), ks=(1, 5, 10)) == {
        1: 0.25,
        5: 0.5,
        10: 0.75,
    }


def test_backdoor_hit_at_k_hand_computed():
    # caption_labels = [0, 2, 1, 2, 0], target = 2 (target captions: c1, c3)
    #         c0    c1    c2     c3     c4
    sims = [
        [0.45, 0.40, 0.05, 0.10, 0.15],  # q0: c0 c1 ...        -> first target at 2
        [0.05, 0.10, 0.15, 0.45, 0.20],  # q1: c3 ...           -> first target at 1
        [0.25, 0.05, 0.30, 0.025, 0.35],  # q2: c4 c2 c0 c1 c3 -> first target at 4
    ]
    q, txt = _embed(sims)
    labels = torch.tensor([0, 2, 1, 2, 0])
    hits = backdoor_hit_at_k(q, txt, labels, target=2, ks=(1, 2, 3, 5, 10))
    assert {k: (r.k, r.n) for k, r in hits.items()} == {
        1: (1, 3),
        2: (2, 3),
        3: (2, 3),
        5: (3, 3),
        10: (3, 3),  # clipped to M=5
    }
    assert hits[2].value == pytest.approx(2 / 3)


# ---------------------------------------------------------------- DER


def test_der_values_and_sign():
    # ASR 0.9 -> 0.1, CA unchanged: (0.8 - 0 + 1) / 2 = 0.9
    assert defense_effectiveness_rating(0.9, 0.1, 0.8, 0.8) == pytest.approx(0.9)
    # same ASR drop but CA 0.8 -> 0.6: (0.8 - 0.2 + 1) / 2 = 0.8 (LOWER, not 1.0)
    hurt = defense_effectiveness_rating(0.9, 0.1, 0.8, 0.6)
    assert hurt == pytest.approx(0.8)
    assert hurt < defense_effectiveness_rating(0.9, 0.1, 0.8, 0.8)
    # CA increase is clipped to 0; ASR increase is clipped to 0
    assert defense_effectiveness_rating(0.9, 0.1, 0.8, 0.95) == pytest.approx(0.9)
    assert defense_effectiveness_rating(0.2, 0.5, 0.8, 0.7) == pytest.approx(0.45)
    # extremes
    assert defense_effectiveness_rating(1.0, 0.0, 0.9, 0.9) == 1.0
    assert defense_effectiveness_rating(0.0, 0.0, 1.0, 0.0) == 0.0
    assert defense_effectiveness_rating(0.5, 0.5, 0.5, 0.5) == 0.5


@pytest.mark.parametrize(
    "args", [(90.0, 10.0, 80.0, 80.0), (-0.1, 0.0, 0.5, 0.5), (0.5, 0.5, float("nan"), 0.5)]
)
def test_der_rejects_out_of_range(args):
    with pytest.raises(ValueError):
        defense_effectiveness_rating(*args)
