"""Leaderboard aggregation: seeds are averaged, settings never are."""

from __future__ import annotations

import math

import pytest

from shieldbench.benchmark import leaderboard as L


def _record(variant: str | None, seed: int, asr: float, ca: float, attack: str = "badnets") -> dict:
    options = {"variant": variant} if variant else {}
    spec = {"preset": "small", "seed": seed, "attack": {"name": attack, "options": {"size": 4}},
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
    half = 12.706204736174707 * ke["asr_std"] / math.sqrt(2)
    assert ke["asr_ci_low"] == pytest.approx(0.85 - half) and ke["asr_ci_high"] == pytest.approx(0.85 + half)
    attn = board.loc[("semantic_shield", "defense.variant=attn")]
    assert attn["n_seeds"] == 1 and attn["asr_mean"] == pytest.approx(0.10) and attn["asr_std"] == 0.0
    none = board.loc[("none", "")]  # one setting in its family: no label
    assert none["n_seeds"] == 2 and none["clean_top1_mean"] == pytest.approx(0.96)


def test_identical_labels_are_told_apart_by_config():
    a, b = _record("ke", 0, 0.5, 0.9), _record("ke", 0, 0.4, 0.9)
    b["spec"]["defense"]["options"] = {}  # an older record that lacked the parameter
    board = L.leaderboard_frame(L.runs_frame([a, b]))
    assert len(board) == 2 and board["config"].nunique() == 2
    assert all("config" in s for s in board["setting"])
