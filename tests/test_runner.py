"""One cell end to end on the smoke preset: record, caches, determinism, leaderboard."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from shieldbench import api
from shieldbench.benchmark.runner import run_id_for


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def first(results):
    spec = api.make_spec(attack="badnets", defense="none", preset="smoke")
    return spec, api.run(spec, results, show_progress=False)


def test_record_has_everything(first, results):
    spec, rec = first
    assert rec["status"] == "ok", rec.get("error")
    path = results / "runs" / run_id_for(spec) / "record.json"
    on_disk = json.loads(path.read_text())
    for key in ("spec", "metrics", "timings", "peak_memory_mb", "versions", "git_commit", "status", "plan"):
        assert key in on_disk
    m = on_disk["metrics"]
    for key in ("clean_top1", "clean_top5", "asr", "asr_ci_low", "asr_ci_high", "hit@1", "i2t_R@1", "t2i_R@10"):
        assert 0.0 <= m[key] <= 1.0
    assert m["asr_ci_low"] <= m["asr"] <= m["asr_ci_high"]
    # ASR counts non-target test images only: 9 of the 10 smoke classes.
    assert m["asr_n"] == 9 * 10
    assert on_disk["plan"]["n_poisoned"] == round(0.05 * 384)
    assert on_disk["versions"]["torch"]
    assert (results / "runs" / run_id_for(spec) / "train_log.csv").is_file()
    # The clean base model under the same trigger, evaluated before victim training changed it.
    base = on_disk["metrics_base_model"]
    assert m["asr_base_model"] == base["asr"] and 0.0 <= base["asr"] <= 1.0
    assert base != {k: v for k, v in m.items() if k in base}


def test_leaderboard_rebuilt_from_records(first, results):
    runs = pd.read_csv(results / "runs.csv")
    board = pd.read_csv(results / "leaderboard.csv")
    assert len(runs) >= 1 and "asr" in runs.columns
    row = board[(board.attack == "badnets") & (board.defense == "none")].iloc[0]
    assert row["n_seeds"] == 1
    assert row["asr_mean"] == pytest.approx(first[1]["metrics"]["asr"])


def test_same_seed_same_plan_and_metrics(first, tmp_path):
    spec, rec = first
    again = api.run(spec, tmp_path, show_progress=False)  # fresh folder: retrains everything
    assert again["plan"]["hash"] == rec["plan"]["hash"]
    for k in ("clean_top1", "asr", "i2t_R@1", "hit@1"):
        assert again["metrics"][k] == pytest.approx(rec["metrics"][k], abs=1e-9), k


def test_different_seed_different_plan(first, results):
    spec = api.make_spec(attack="badnets", defense="none", preset="smoke", seed=1)
    rec = api.run(spec, results, show_progress=False)
    assert rec["plan"]["hash"] != first[1]["plan"]["hash"]
    # The clean base model is shared across seeds: trained once, reused.
    assert rec["artifacts"]["base"]["cached"] is True
    board = pd.read_csv(results / "leaderboard.csv")
    row = board[(board.attack == "badnets") & (board.defense == "none")].iloc[0]
    assert row["n_seeds"] == 2


def test_rerun_does_no_training(first, results):
    spec, _ = first
    rec = api.run(spec, results, show_progress=False)
    assert rec.get("reused_record") is True
    forced = api.run(spec, results, show_progress=False, force=True)
    assert forced["artifacts"]["train"]["reused"] is True
    assert forced["timings"]["train_s"] == 0.0


def test_failed_run_is_a_row(results, monkeypatch):
    from shieldbench.benchmark import runner

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(runner, "run_evaluation", boom)
    spec = api.make_spec(attack="badnets", defense="none", preset="smoke", seed=7)
    rec = api.run(spec, results, show_progress=False)
    assert rec["status"] == "failed" and "simulated failure" in rec["error"]
    runs = pd.read_csv(results / "runs.csv")
    assert "failed" in set(runs["status"])
    board = pd.read_csv(results / "leaderboard.csv")
    row = board[(board.attack == "badnets") & (board.defense == "none")].iloc[0]
    assert row["n_failed"] == 1


def test_stages_without_a_bar_show_a_status_line(tmp_path):
    import io
    import time as _time

    from rich.console import Console

    from shieldbench.benchmark.runner import RunContext
    from shieldbench.spec import build_spec

    buf = io.StringIO()
    rc = RunContext(build_spec("smoke"), tmp_path, Console(file=buf, force_terminal=True, width=100))
    with rc.status("evaluating"):
        _time.sleep(0.3)
    assert "evaluating" in buf.getvalue()
    quiet = io.StringIO()
    rc = RunContext(build_spec("smoke"), tmp_path, Console(file=quiet, force_terminal=True), show_progress=False)
    with rc.status("evaluating"):
        pass
    assert quiet.getvalue() == ""
