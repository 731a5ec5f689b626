"""detect_filter: the local outlier scores, the AUROC, the defense's drop, and the runner's detection record.

Scores are checked against hand-derived neighbourhoods of a 1-D point set
(every distance distinct, so the neighbours are unambiguous) and the AUROC
against a hand count with ties. The end-to-end tests run the installed CLI
on the smoke world with a real BadNets trigger (slow: they train a base
model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import needs_cli, sb
from shieldbench.data.views import TrainView
from shieldbench.defenses.base import DefenseContext, SuspicionReport
from shieldbench.defenses.detect_filter import (DetectFilter, batched_scores, dao_score, drop_count, kdist_score,
                                                knn, lid_score, slof_score)
from shieldbench.evaluation.metrics import detection_auroc, detection_metrics
from shieldbench.spec import DefenseSpec, TrainSpec

# 1-D points 0, 1, 3, 7, 20 with k = 2; each point's two nearest others and their distances, by hand:
#   0 -> 1 (1), 3 (3)     1 -> 0 (1), 3 (2)     3 -> 1 (2), 0 (3)     7 -> 3 (4), 1 (6)     20 -> 7 (13), 3 (17)
POINTS = torch.tensor([[0.0], [1.0], [3.0], [7.0], [20.0]])
NEIGHBOURS = [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]]
DISTANCES = [[1.0, 3.0], [1.0, 2.0], [2.0, 3.0], [4.0, 6.0], [13.0, 17.0]]
K = 2


def hand_kdist() -> list[float]:
    return [r[-1] for r in DISTANCES]


def hand_lid() -> list[float]:
    # MLE: -k / sum_i log(r_i / r_k)
    return [-K / sum(math.log(ri / r[-1]) for ri in r) for r in DISTANCES]


def test_knn_finds_the_hand_neighbours():
    dist, idx = knn(POINTS, K)
    assert idx.tolist() == NEIGHBOURS
    assert torch.allclose(dist, torch.tensor(DISTANCES, dtype=torch.float64))


def test_kdist_and_lid_equal_their_hand_values():
    assert kdist_score(POINTS, K).tolist() == pytest.approx(hand_kdist())
    assert lid_score(POINTS, K).tolist() == pytest.approx(hand_lid())
    # e.g. the point 1: -2 / (log(1/2) + log(2/2)) = 2 / log 2
    assert lid_score(POINTS, K)[1].item() == pytest.approx(2 / math.log(2))


def test_slof_and_dao_equal_their_hand_values():
    dk, lid = hand_kdist(), hand_lid()
    slof = [np.mean([dk[p] / dk[o] for o in NEIGHBOURS[p]]) for p in range(5)]
    dao = [np.mean([(dk[p] / dk[o]) ** lid[o] for o in NEIGHBOURS[p]]) for p in range(5)]
    assert slof_score(POINTS, K).tolist() == pytest.approx(slof)
    # dao_score returns log DAO (same ranking, no overflow)
    assert torch.exp(dao_score(POINTS, K)).tolist() == pytest.approx(dao, rel=1e-9)
    # the point 20: neighbours 7 (d_k 6) and 3 (d_k 3), its own d_k 17
    assert slof[4] == pytest.approx((17 / 6 + 17 / 3) / 2)


@pytest.mark.parametrize("score", ["dao", "kdist", "slof"])
def test_an_isolated_point_in_a_2d_cloud_scores_highest(score):
    g = torch.Generator().manual_seed(0)
    cloud = torch.randn(200, 2, generator=g)
    x = torch.cat([cloud, torch.tensor([[6.0, 6.0]])])
    s = batched_scores(x, score, 16, 0, seed=0)
    assert int(np.argmax(s)) == 200


def test_duplicates_give_finite_scores():
    x = torch.tensor([[0.0], [0.0], [0.0], [0.0], [5.0]])
    for fn in (dao_score, kdist_score, slof_score, lid_score):
        assert torch.isfinite(fn(x, 2)).all(), fn.__name__


def test_batched_scores_score_each_random_batch_against_itself():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 4, generator=g)
    whole = batched_scores(x, "kdist", 5, 0, seed=3)
    assert whole == pytest.approx(kdist_score(x, 5).numpy())
    assert batched_scores(x, "kdist", 5, 1000, seed=3) == pytest.approx(whole)  # a batch larger than the set
    halves = batched_scores(x, "kdist", 5, 50, seed=3)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    for rows in torch.tensor_split(perm, 2):
        assert halves[rows.numpy()] == pytest.approx(kdist_score(x[rows], 5).numpy())
    assert not np.allclose(halves, whole)  # the reference set really is the batch
    # near-equal batches: 10 rows in batches of 4 -> 3 batches of 4, 3, 3, never a batch of 2 with k capped
    assert np.isfinite(batched_scores(x[:10], "dao", 16, 4, seed=0)).all()


# -- AUROC ------------------------------------------------------------------------------------
def test_auroc_against_a_hand_count_with_ties():
    # poisons score 0.9, 0.8, 0.8; clean rows 0.8, 0.3, 0.1. Pairs won by the poison:
    # 0.9: 3; each 0.8: 2 wins + a tie (1/2) = 2.5 -> (3 + 2.5 + 2.5) / 9 = 8/9
    scores = [0.9, 0.8, 0.8, 0.3, 0.1, 0.8]
    flags = [True, True, False, False, False, True]
    assert detection_auroc(scores, flags) == pytest.approx(8 / 9)
    assert detection_auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert detection_auroc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert detection_auroc([7, 7, 7, 7], [False, True, False, True]) == 0.5
    assert math.isnan(detection_auroc([1, 2], [False, False]))


def test_detection_metrics_of_a_drop():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.0, 0.05, 0.6, 0.4])
    flags = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    kept = [1, 3, 5, 6, 7, 8, 9]  # dropped: 0, 2, 4 (two poisons, one clean)
    m = detection_metrics(scores, flags, kept)
    assert m["n_dropped"] == 3 and m["n_poison_dropped"] == 2
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    # top round(0.2 * 10) = 2 rows are 0 and 2, both poisons: recall 2/3
    assert m["recall_at_0.2"] == pytest.approx(2 / 3)
    assert m["auroc"] == pytest.approx(detection_auroc(scores, flags))
    assert detection_metrics(scores, np.zeros(10, bool))["auroc"] is None


def test_a_suspicion_report_refuses_bad_input():
    with pytest.raises(ValueError):
        SuspicionReport(np.array([1.0, np.nan]))
    with pytest.raises(ValueError):
        SuspicionReport(np.array([1.0, 2.0]), np.array([0, 2]))


# -- the defense ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_model():
    from shieldbench.models.factory import build_model

    torch.manual_seed(0)
    return build_model("micro-vit", "", 32).eval()


def ctx_with(model) -> DefenseContext:
    import copy

    return DefenseContext(seed=0, train=TrainSpec(), device=torch.device("cpu"),
                          reference_model=lambda: copy.deepcopy(model).eval())


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1])
def test_the_defense_drops_exactly_the_requested_fraction(smoke_world, micro_model, fraction):
    view = TrainView.from_pairs(smoke_world.train)
    d = DetectFilter(DefenseSpec(name="detect_filter", options={"drop_fraction": fraction, "batch_size": 128}))
    ctx = ctx_with(micro_model)
    out = d.prepare_data(view, ctx)
    n_drop = int(round(fraction * len(view)))
    assert n_drop == drop_count(len(view), fraction)
    assert len(out) == len(view) - n_drop
    report = ctx.suspicion()
    assert report is not None and len(report.scores) == len(view)
    # the dropped rows are the highest-scoring ones, and the view keeps the others' captions in order
    dropped = np.setdiff1d(np.arange(len(view)), report.kept)
    if n_drop:
        assert report.scores[dropped].min() >= report.scores[report.kept].max()
    assert out.captions == [view.caption(i) for i in report.kept]


def test_the_defense_sees_only_images_and_captions(smoke_world, micro_model, monkeypatch):
    """Its inputs are a TrainView and a context; it reads nothing else of the world, and not the base model's weights in place."""
    view = TrainView.from_pairs(smoke_world.train)
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}
    seen: list[object] = []
    original = TrainView.fetch

    def spy(self, index):
        seen.append(self)
        return original(self, index)

    monkeypatch.setattr(TrainView, "fetch", spy)
    d = DetectFilter(DefenseSpec(name="detect_filter", options={"detector": "base"}))
    d.prepare_data(view, ctx_with(micro_model))
    assert seen and all(v is view for v in seen)
    assert all(torch.equal(before[k], v) for k, v in micro_model.state_dict().items())


def test_no_defenders_model_is_one_clear_error(smoke_world):
    from shieldbench.errors import UserError

    d = DetectFilter(DefenseSpec(name="detect_filter"))
    ctx = DefenseContext(seed=0, train=TrainSpec(), device=torch.device("cpu"))
    with pytest.raises(UserError, match="reference_model"):
        d.prepare_data(TrainView.from_pairs(smoke_world.train), ctx)


# -- through the runner (CLI, smoke world, real BadNets trigger) -------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("detect_filter_runs")
    proc = sb("run", "-a", "badnets", "-d", "detect_filter", "--preset", "smoke", "--results", str(results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = list((results / "runs").glob("*/record.json"))
    return results, path


@needs_cli
@pytest.mark.slow
def test_the_runner_measures_the_auroc_of_a_real_badnets_world(smoke_run):
    results, path = smoke_run
    record = json.loads(path.read_text())
    assert record["status"] == "ok", record["error"]
    det = record["detection"]
    n_train, n_poison = record["plan"]["n_train"], record["plan"]["n_poisoned"]
    assert det["n_rows"] == n_train and det["n_poison"] == n_poison > 0
    assert 0.0 <= det["auroc"] <= 1.0
    assert det["n_dropped"] == round(0.1 * n_train)
    assert record["metrics"]["detection_auroc"] == det["auroc"]
    assert record["metrics"]["detection_n_dropped"] == det["n_dropped"]
    # the train log's rows: the victim trained on the kept pairs only
    assert record["artifacts"]["train"]["reused"] is False
    # and the leaderboard shows it
    header = (results / "runs.csv").read_text().splitlines()[0].split(",")
    assert "detection_auroc" in header
    assert "detection_auroc_mean" in (results / "leaderboard.csv").read_text().splitlines()[0].split(",")
    # The detector's warm-up (as many steps as the victim's training here) and scoring are part of
    # the defense's cost, beside the victim's training.
    tm = record["timings"]
    assert tm["prepare_s"] > 0.2 * tm["train_s"] > 0, tm
    assert tm["cost_train_s"] == pytest.approx(tm["prepare_s"] + tm["train_s"])


@needs_cli
@pytest.mark.slow
def test_a_reused_train_checkpoint_still_reports_the_auroc(smoke_run):
    results, path = smoke_run
    first = json.loads(path.read_text())
    proc = sb("run", "-a", "badnets", "-d", "detect_filter", "--preset", "smoke", "--results", str(results), "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(path.read_text())
    assert again["artifacts"]["train"]["reused"] is True
    assert again["detection"] == first["detection"]
    assert again["metrics"]["detection_auroc"] == first["metrics"]["detection_auroc"]
    assert again["timings"]["prepare_s"] == again["timings"]["cost_train_s"] == 0.0  # nothing was prepared or trained


@needs_cli
@pytest.mark.slow
def test_a_defense_without_a_report_has_no_detection_entry(smoke_run):
    results, _ = smoke_run
    proc = sb("run", "-a", "badnets", "-d", "none", "--preset", "smoke", "--results", str(results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = [p for p in Path(results, "runs").glob("*__none__*/record.json")]
    record = json.loads(path.read_text())
    assert "detection" not in record and "detection_auroc" not in record["metrics"]
    tm = record["timings"]  # no defense: nothing to prepare, the cost is the training
    assert tm["prepare_s"] < 0.1 * tm["train_s"] and tm["cost_train_s"] == pytest.approx(tm["prepare_s"] + tm["train_s"])
