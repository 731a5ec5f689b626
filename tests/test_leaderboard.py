"""Leaderboard aggregation: seeds are averaged, settings never are."""

from __future__ import annotations

import math

import pytest

from shieldbench.benchmark import leaderboard as L


def _record(variant: str | None, seed: int, asr: float, ca: float, attack: str = "badnets") -> dict:
    options = {"variant": variant} if variant else {}
    spec = {"preset": "small", "seed": seed, "attack": {"name": attack, "target": "banana", "poison_rate": 0.02,
                                                        "options": {"size": 4}},
            "defense": {"name": "semantic_shield" if variant else "none", "options": options}}
    return {"run_id": f"{attack}-{variant}-{seed}", "status": "ok", "attack": attack,
            "defense": spec["defense"]["name"], "model": "tiny-vit", "dataset": "synthetic", "preset": "small",
            "seed": seed, "spec": spec, "metrics": {"asr": asr, "clean_top1": ca}}


def test_settings_are_rows_and_seeds_are_averaged():
    records = [_record("ke", 0, 0.90, 0.96), _record("ke", 1, 0.80, 0.94), _record("attn", 0, 0.10, 0.90),
               _record(None, 0, 0.99, 0.97), _record(None, 1, 0.97, 0.95)]
    runs = L.runs_frame(records)
    board = L.leaderboard_frame(runs).set_index(["defense", "setting"])
    assert len(board) == 3
    ke = board.loc[("semantic_shield", "defense.variant=ke")]
    assert ke["n_seeds"] == 2
    assert ke["asr_mean"] == pytest.approx(0.85)
    assert ke["asr_std"] == pytest.approx(math.sqrt(((0.05) ** 2 * 2) / 1))
    # 95% t interval with 1 degree of freedom: mean +- t(0.975, 1) * sd / sqrt(2)
    # half = 12.706 * 0.0707 / 1.414 = 0.635: the interval is clipped to what a fraction can be.
    half = 12.706204736174707 * ke["asr_std"] / math.sqrt(2)
    assert ke["asr_seed_ci_low"] == pytest.approx(max(0.0, 0.85 - half)) == pytest.approx(0.215, abs=1e-3)
    assert ke["asr_seed_ci_high"] == 1.0
    assert ke["seeds"] == "0,1"
    attn = board.loc[("semantic_shield", "defense.variant=attn")]
    assert attn["n_seeds"] == 1 and attn["asr_mean"] == pytest.approx(0.10)
    # One seed: no spread, and no interval pretending to be one.
    assert math.isnan(attn["asr_std"]) and math.isnan(attn["asr_seed_ci_low"]) and math.isnan(attn["asr_seed_ci_high"])
    none = board.loc[("none", "")]  # one setting in its family: no label
    assert none["n_seeds"] == 2 and none["clean_top1_mean"] == pytest.approx(0.96)


def test_identical_labels_are_told_apart_by_config():
    a, b = _record("ke", 0, 0.5, 0.9), _record("ke", 0, 0.4, 0.9)
    b["spec"]["defense"]["options"] = {}  # an older record that lacked the parameter
    board = L.leaderboard_frame(L.runs_frame([a, b]))
    assert len(board) == 2 and board["config"].nunique() == 2
    assert all("config" in s for s in board["setting"])


def test_seed_intervals_stay_in_range_and_are_named_apart_from_wilson():
    recs = [_record(None, s, asr, 0.9) for s, asr in ((0, 0.02), (1, 0.0), (2, 0.05))]
    for r, secs in zip(recs, (1.0, 40.0, 2.0)):
        r["timings"] = {"train_s": secs}
        r["metrics"]["asr_ci_low"] = 0.001  # a run's own Wilson interval
    runs = L.runs_frame(recs)
    assert "asr_ci_low" in runs.columns  # per run: Wilson
    row = L.leaderboard_frame(runs).iloc[0]
    assert "asr_ci_low" not in row.index and row["asr_seed_ci_low"] == 0.0  # clipped at 0, not negative
    assert row["train_s_seed_ci_low"] == 0.0 and row["train_s_seed_ci_high"] > 40
    assert row["target"] == "banana" and row["n_seeds"] == 3 and row["seeds"] == "0,1,2"


def test_markdown_table_cells_by_hand():
    from shieldbench.benchmark.tables import cell, filter_rows, markdown

    records = [_record("ke", 0, 0.90, 0.96), _record("ke", 1, 0.80, 0.94), _record(None, 0, 0.99, 0.97),
               _record("ke", 0, 0.50, 0.90, attack="wanet")]
    for r, secs in zip(records, (10.0, 20.0, 5.0, 7.0)):
        r["timings"] = {"train_s": secs}
    board = L.leaderboard_frame(L.runs_frame(records))
    ke = board[(board["defense"] == "semantic_shield") & (board["attack"] == "badnets")].iloc[0]
    # mean 0.85, std sqrt(0.005) = 0.0707 -> percent; seconds stay seconds
    assert cell(ke, "asr") == "85.0 ± 7.1" and cell(ke, "train_s") == "15.0 ± 7.1"
    assert cell(ke, "hit@1") == "-"
    rows = filter_rows(board, attacks=["wanet", "badnets"], defenses=["none", "semantic_shield"])
    assert list(zip(rows["attack"], rows["defense"])) == [("wanet", "semantic_shield"), ("badnets", "none"),
                                                          ("badnets", "semantic_shield")]
    assert len(filter_rows(board, settings=["-"])) == len(board)  # every family here has a single setting
    assert filter_rows(board, settings=["nothing"]).empty
    md = markdown(rows, ["clean_top1", "asr", "nope"]).splitlines()
    assert md[0] == "| attack | defense | setting | n | clean_top1 | asr |"
    assert md[2] == "| wanet | semantic_shield |  | 1 | 90.0 | 50.0 |"  # one seed: no spread shown
    assert md[4] == "| badnets | semantic_shield |  | 2 | 95.0 ± 1.4 | 85.0 ± 7.1 |"


def test_latex_and_the_tidy_long_export_by_hand():
    from shieldbench.benchmark.tables import latex

    records = [_record("ke", 0, 0.90, 0.96), _record("ke", 1, 0.80, 0.94), _record(None, 0, 0.99, 0.97)]
    board = L.leaderboard_frame(L.runs_frame(records))
    tex = latex(board[board["defense"] == "semantic_shield"], ["clean_top1", "asr"])
    assert r"\toprule" in tex and r"clean\_top1" in tex
    assert r"badnets & semantic\_shield &  & 2 & 95.0 $\pm$ 1.4 & 85.0 $\pm$ 7.1 \\" in tex
    long = L.long_frame(board)
    ke = long[(long["defense"] == "semantic_shield") & (long["metric"] == "asr")].iloc[0]
    assert math.isclose(ke["mean"], 0.85) and math.isclose(ke["std"], math.sqrt(0.005))
    assert ke["seeds"] == "0,1" and ke["n_seeds"] == 2
    # one row per setting x metric that has a value: 2 settings x (asr, clean_top1)
    assert len(long) == 4 and set(long["metric"]) == {"asr", "clean_top1"}
    none = long[(long["defense"] == "none") & (long["metric"] == "asr")].iloc[0]
    assert math.isnan(none["std"]) and math.isnan(none["seed_ci_low"])  # one seed: no spread
