"""The examples/ plugin packages: installed (no network), found through their entry points, run by the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import EXE, needs_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Both examples installed into a folder that is put on PYTHONPATH (the test's venv stays untouched)."""
    import shutil

    target = tmp_path_factory.mktemp("site")
    sources = tmp_path_factory.mktemp("src")
    for pkg in ("shieldbench-clean-finetune", "shieldbench-sig-attack"):
        # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
        shutil.copytree(EXAMPLES / pkg, sources / pkg)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                               "--target", str(target), str(sources / pkg)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return target


def _sb(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    return subprocess.run([EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@needs_cli
def test_installed_examples_are_listed_by_their_entry_points(site, tmp_path):
    defenses = _sb(site, tmp_path, "list", "defenses")
    attacks = _sb(site, tmp_path, "list", "attacks")
    assert defenses.returncode == 0 and "clean_finetune" in defenses.stdout
    assert attacks.returncode == 0 and "sig" in attacks.stdout.split()
    # Without the package the names are unknown (no --plugin, no entry point).
    bare = subprocess.run([EXE, "list", "defenses"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "clean_finetune" not in bare.stdout


@needs_cli
@pytest.mark.slow
def test_installed_examples_run_through_shieldbench_run(site, tmp_path):
    proc = _sb(site, tmp_path, "run", "--preset", "smoke", "-a", "sig", "-d", "clean_finetune", "-o", "res", "--json",
               "-q", "--set", "defense.epochs=2", "--set", "attack.delta=0.2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["status"] == "ok" and record["attack"] == "sig" and record["defense"] == "clean_finetune"
    assert record["spec"]["attack"]["options"]["delta"] == pytest.approx(0.2)
    assert record["plan"]["n_poisoned"] == record["plan"]["n_requested"] > 0
    assert record["plan"]["threat_model"] == "dirty_label"
    # Post-training: it repaired a checkpoint trained without a defense, for 2 epochs of the clean subset.
    assert record["artifacts"]["repair"]["steps"] > 0 and "metrics_before_repair" in record
    assert 0.0 <= record["metrics"]["asr"] <= 1.0 and 0.0 < record["metrics"]["clean_top1"] <= 1.0
    # The `none` cell of the same attack and seed reuses that very checkpoint instead of training again.
    none = _sb(site, tmp_path, "run", "--preset", "smoke", "-a", "sig", "-d", "none", "-o", "res", "--json", "-q",
               "--set", "attack.delta=0.2")
    again = json.loads(none.stdout)
    assert again["artifacts"]["train"]["reused"] is True
    assert again["artifacts"]["train"]["key"] == record["artifacts"]["train"]["key"]
    # A bad option of the plugin is one line with its range.
    bad = _sb(site, tmp_path, "run", "--preset", "smoke", "-a", "sig", "-d", "clean_finetune", "-o", "res",
              "--set", "defense.epochs=0")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "epochs" in bad.stderr
