"""The installed ``shieldbench`` command: runs, lists, and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cli_helpers import EXE, one_error_line, sb

pytestmark = pytest.mark.skipif(EXE is None, reason="shieldbench is not installed (pip install -e .)")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--attack", "nosuch"], ["unknown attack 'nosuch'", "badnets", "none"]),
        (["--defense", "nosuch"], ["unknown defense 'nosuch'", "none"]),
        (["--model", "nosuch"], ["unknown model 'nosuch'", "tiny-vit"]),
        (["--dataset", "nosuch"], ["unknown dataset 'nosuch'", "synthetic"]),
        (["--set", "attack.poison_rate=1.5"], ["attack.poison_rate=1.5", "allowed [0, 1]"]),
        (["--set", "train.epochs=-1"], ["train.epochs=-1", "out of range"]),
        (["--set", "attack.nosuch=1"], ["unknown option attack.nosuch", "pattern"]),
        (["--preset", "huge"], ["unknown preset 'huge'", "smoke", "small"]),
        (["--config", "missing.toml"], ["config file not found: missing.toml"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needles, tmp_path):
    line = one_error_line(sb("run", *args, "-o", str(tmp_path), cwd=tmp_path))
    for n in needles:
        assert n in line
    assert not (tmp_path / "runs").exists()


def test_run_smoke_then_leaderboard(tmp_path):
    proc = sb("run", "--attack", "badnets", "--defense", "none", "--preset", "smoke", "-q", "-o", "res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "attack success" in proc.stdout and "clean top-1" in proc.stdout
    assert (tmp_path / "res" / "leaderboard.csv").is_file()
    board = sb("leaderboard", "-o", "res", cwd=tmp_path)
    assert board.returncode == 0 and "badnets" in board.stdout
    md = sb("leaderboard", "-o", "res", "--format", "markdown", "--metrics", "clean_top1,asr", cwd=tmp_path)
    lines = md.stdout.splitlines()
    assert md.returncode == 0 and lines[0] == "| attack | defense | setting | n | clean_top1 | asr |"
    assert lines[2].startswith("| badnets | none |  | 1 | ")
    assert one_error_line(sb("leaderboard", "-o", "res", "--format", "html", cwd=tmp_path)).endswith(
        "choose table, markdown (md), latex or csv")


def test_leaderboard_missing_is_one_line(tmp_path):
    line = one_error_line(sb("leaderboard", "-o", "nowhere", "--no-rebuild", cwd=tmp_path))
    assert "no leaderboard at nowhere" in line


def test_corrupt_leaderboard_is_one_line(tmp_path):
    (tmp_path / "leaderboard.csv").write_bytes(b"\xff\xfe\x00garbage\n\"unterminated")
    line = one_error_line(sb("leaderboard", "-o", str(tmp_path), "--no-rebuild"))
    assert "leaderboard" in line and str(tmp_path) in line


def test_list_and_help():
    proc = sb("list", "attacks", "--verbose")
    assert proc.returncode == 0 and "badnets" in proc.stdout and "pattern" in proc.stdout
    assert sb("list", "defenses").returncode == 0
    assert "tiny-vit" in sb("list", "models").stdout
    line = one_error_line(sb("list", "gadgets"))
    assert "unknown kind 'gadgets'" in line
    for cmd in ("run", "grid", "report", "list", "leaderboard"):
        h = sb(cmd, "--help")
        assert h.returncode == 0 and "Examples" in h.stdout
        assert sb(cmd, "-h").stdout == h.stdout
    from importlib.metadata import version

    v = sb("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"shieldbench {version('shieldbench')}"


def test_grid_writes_report_and_resumes(tmp_path):
    args = ("grid", "--preset", "smoke", "--attacks", "badnets", "--defenses", "none", "-q", "-o", "res")
    first = sb(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "1 of 1 cells ok" in first.stdout
    for name in ("index.html", "asr_heatmap.png", "tradeoff.png"):
        assert (tmp_path / "res" / "report" / name).is_file()
    again = sb(*args, cwd=tmp_path)
    assert again.returncode == 0 and "reused its record" in again.stderr
    assert "smoke preset test code paths, not science" in again.stdout
    assert (tmp_path / "res" / "leaderboard_long.csv").is_file()
    tex = sb("leaderboard", "-o", "res", "--format", "latex", "--metrics", "clean_top1,asr", cwd=tmp_path)
    assert tex.returncode == 0 and tex.stdout.startswith("\\begin{tabular}") and "smoke preset" in tex.stderr
    line = one_error_line(sb("grid", "--seeds", "a,b", cwd=tmp_path))
    assert "--seeds" in line


def test_config_attack_and_defense_are_not_replaced_by_flag_defaults(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('preset = "smoke"\n[attack]\nname = "blended"\n[defense]\nname = "semantic_shield"\n')
    proc = sb("run", "--config", str(cfg), "--dry-run", "-o", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert "blended x semantic_shield" in proc.stdout
    proc = sb("run", "--config", str(cfg), "-a", "badnets", "--dry-run", "-o", str(tmp_path / "r"))
    assert "badnets x semantic_shield" in proc.stdout


def test_json_without_quiet_is_valid_json_and_progress_goes_to_stderr(tmp_path):
    proc = sb("run", "--preset", "smoke", "-a", "badnets", "-d", "none", "--json", "-o", "res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "ok" and record["attack"] == "badnets"
    assert "train (none)" in proc.stderr  # the bar is there, on stderr


def test_ctrl_c_says_a_rerun_resumes(tmp_path):
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([EXE, "run", "--preset", "smoke", "-a", "badnets", "-d", "none", "-q", "-o", "res",
                             "--set", "base.epochs=200"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "res" / "cache" / "base").glob("*/ckpt.pt")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    assert list((tmp_path / "res" / "cache" / "base").glob("*/ckpt.pt"))  # the checkpoint survives
