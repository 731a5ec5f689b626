"""Bad inputs answered in one line, malformed files survived (issue: hardening). Each case is a named test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_helpers import EXE, needs_cli
from shieldbench.benchmark import leaderboard as L
from shieldbench.errors import UserError
from shieldbench.spec import build_spec, parse_overrides


def _record(run_id: str, seed: int, asr: float) -> dict:
    spec = {"preset": "small", "seed": seed, "attack": {"name": "badnets", "target": "banana", "options": {}},
            "defense": {"name": "none", "options": {}}}
    return {"run_id": run_id, "status": "ok", "attack": "badnets", "defense": "none", "model": "tiny-vit",
            "dataset": "synthetic", "preset": "small", "seed": seed, "spec": spec,
            "metrics": {"asr": asr, "clean_top1": 0.9}}


@pytest.mark.parametrize("bad", ["[]", "42", '"text"', '{"status": "ok", "metrics": "x"}',
                                 '{"status": "ok", "metrics": {"asr": "high"}}', "{not json", "DIR"])
def test_a_malformed_record_is_one_corrupt_row_and_the_rest_is_built(tmp_path, bad):
    for i, asr in enumerate((0.9, 0.7)):
        d = tmp_path / "runs" / f"good{i}"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(_record(f"good{i}", i, asr)))
    broken = tmp_path / "runs" / "broken"
    broken.mkdir()
    if bad == "DIR":
        (broken / "record.json").mkdir()
    else:
        (broken / "record.json").write_text(bad)
    runs, board = L.rebuild(tmp_path)
    status = dict(zip(runs["run_id"], runs["status"]))
    assert status == {"good0": "ok", "good1": "ok", "broken": "corrupt"}
    row = board[board["attack"] == "badnets"].iloc[0]
    assert row["n_seeds"] == 2 and row["asr_mean"] == pytest.approx(0.8)


def test_a_corrupt_own_record_is_not_a_finished_cell(tmp_path):
    from shieldbench.benchmark.runner import finished_record, record_path, run_id_for

    spec = build_spec("smoke")
    path = record_path(tmp_path, run_id_for(spec))
    path.parent.mkdir(parents=True)
    for text in ("{not json", "[]", '{"status": "ok", "metrics": "x"}'):
        path.write_text(text)
        assert finished_record(spec, tmp_path) is None


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e999", "NaN", "inf"])
def test_non_finite_numbers_are_refused_with_the_field_named(value):
    with pytest.raises(UserError, match=r"train\.grad_clip.*not a finite number"):
        build_spec("smoke", None, parse_overrides([f"train.grad_clip={value}"]))


@pytest.mark.parametrize("preset", ["", "[1]", "nope"])
def test_a_bad_or_empty_preset_is_an_error_not_small(preset):
    with pytest.raises(UserError, match="unknown preset"):
        build_spec(preset)
    with pytest.raises(UserError, match="unknown preset"):
        build_spec(None, None, parse_overrides([f"preset={preset}"]))


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@needs_cli
def test_cli_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "syntax.py").write_text("def (\n")
    (tmp_path / "c.toml").write_text("data = 1\n")
    cases = {
        ("run", "--preset", "smoke", "-o", "afile"): "not a folder",
        ("grid", "--preset", "smoke", "-o", "afile"): "not a folder",
        ("leaderboard", "-o", "afile"): "not a folder",
        ("grid", "--preset", "smoke", "--seeds", "-1", "--dry-run"): "allowed [0, inf]",
        ("run", "--preset", "", "--dry-run"): "unknown preset ''",
        ("run", "--set", "train.grad_clip=Infinity", "--dry-run"): "not a finite number",
        ("run", "--set", "preset=[1]", "--dry-run"): "unknown preset",
        ("list", "--plugin", "./raises.py"): "RuntimeError: boom",
        ("list", "--plugin", "./syntax.py"): "SyntaxError",
        ("list", "--plugin", ""): "--plugin",
        ("run", "-c", "c.toml", "--dry-run"): "[data] must be a table",  # not eaten as rich markup
    }
    for args, expected in cases.items():
        line = _one_line(subprocess.run([EXE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300))
        assert expected in line, (args, line)
    assert not (tmp_path / "results").exists()  # nothing was written by any of them


@needs_cli
def test_leaderboard_unknown_metric_and_columnless_csv(tmp_path):
    res = tmp_path / "r"
    (res / "runs" / "a").mkdir(parents=True)
    (res / "runs" / "a" / "record.json").write_text(json.dumps(_record("a", 0, 0.5)))
    line = _one_line(subprocess.run([EXE, "leaderboard", "-o", str(res), "--metrics", "nosuch"], capture_output=True,
                                    text=True, timeout=300))
    assert "nosuch" in line and "asr" in line
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "leaderboard.csv").write_text("x,y\n1,2\n")
    line = _one_line(subprocess.run([EXE, "leaderboard", "-o", str(tmp_path / "s"), "--no-rebuild"],
                                    capture_output=True, text=True, timeout=300))
    assert "corrupt leaderboard file" in line and "attack" in line
