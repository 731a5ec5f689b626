"""--tracker tensorboard: every training's loss terms and LR per step, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import subprocess

import pytest

from cli_helpers import EXE, needs_cli

pytest.importorskip("tensorboard")


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_cli
def test_tensorboard_tracker_logs_every_stage(tmp_path):
    proc = subprocess.run([EXE, "run", "--preset", "smoke", "-a", "badnets", "-d", "cleanclip", "-o", "r", "--json", "-q",
                           "--tracker", "tensorboard"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    logs = tmp_path / "r" / "runs" / record["run_id"] / "tensorboard"
    stages = sorted(p.name for p in logs.iterdir())
    assert stages == ["clean_base_model", "repair_cleanclip", "train_none"], stages
    train = _scalars(logs / "train_none")
    steps = record["artifacts"]["train"]["steps"]
    assert [s for s, _ in train["train/loss"]] == list(range(1, steps + 1))
    # The per-epoch means are the record's training history, term by term.
    for row in record["train_history"]:
        for key in ("loss", "clip", "lr"):
            logged = dict(train[f"epoch/{key}"])[row["epoch"]]
            assert logged == pytest.approx(row[key], rel=1e-5), key
    repair = _scalars(logs / "repair_cleanclip")
    assert {"train/inmodal_image", "train/inmodal_text", "train/lr"} <= set(repair)
    # The learning rate warms up, then decays: the logged schedule is the one used.
    lrs = [v for _, v in repair["train/lr"]]
    assert max(lrs) > lrs[0] and lrs[-1] < max(lrs)
    # Off by default: a second cell without --tracker writes no logs.
    plain = subprocess.run([EXE, "run", "--preset", "smoke", "-a", "badnets", "-d", "none", "-o", "r", "--json", "-q"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert not (tmp_path / "r" / "runs" / json.loads(plain.stdout)["run_id"] / "tensorboard").exists()
    bad = subprocess.run([EXE, "run", "--preset", "smoke", "--tracker", "wandb", "-o", "r"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tracker" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
