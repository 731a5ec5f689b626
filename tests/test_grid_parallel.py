"""The grid on several workers, two grids on one folder, a killed grid, and the stage plan.

Every claim is checked on real smoke-preset runs: the same metrics whatever
the number of workers, each artifact built once (the store's build log), a
grid killed with SIGKILL mid-training resumes to the uninterrupted numbers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from cli_helpers import EXE, needs_cli, one_error_line, sb
from shieldbench import api
from shieldbench.benchmark.store import ArtifactStore
from shieldbench.locks import locked

METRICS = ["clean_top1", "asr", "asr_base_model", "hit@1", "i2t_R@1", "asr_before_repair", "clean_top1_before_repair"]
GRID = ("grid", "--preset", "smoke", "--attacks", "none,badnets", "--defenses", "none,cleanclip,semantic_shield", "-q")
SLURM_GRID = ("grid", "--preset", "smoke", "--attacks", "badnets", "--defenses", "none,cleanclip,semantic_shield", "-q")


def runs(results: Path) -> pd.DataFrame:
    df = pd.read_csv(results / "runs.csv").sort_values("run_id").reset_index(drop=True)
    return df[["run_id"] + [m for m in METRICS if m in df.columns]]


def builds(results: Path) -> Counter:
    lines = (results / "cache" / "builds.jsonl").read_text().splitlines()
    return Counter((json.loads(ln)["kind"], json.loads(ln)["key"]) for ln in lines)


def _hold(path: str, ready, release) -> None:
    with locked(path):
        ready.set()
        release.wait(30)


def test_store_lock_excludes_another_process_and_dies_with_it(tmp_path):
    store = ArtifactStore(tmp_path / "cache")
    path = str(store.root / "train" / "k.lock")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, release))
    holder.start()
    assert ready.wait(60)
    from filelock import FileLock, Timeout

    with pytest.raises(Timeout):
        FileLock(path, timeout=0.2).acquire()
    # A holder killed with SIGKILL leaves no stale lock: the kernel drops it.
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    with store.lock("train", "k"):
        pass


def test_grid_plan_counts_shared_stages_once(tmp_path):
    base = api.make_spec(preset="smoke", resolved=False)
    attacks = api.grid_names("attacks", ["all"])
    attacks = [a for a in attacks if a != "none"]
    defenses = api.grid_names("defenses", ["all"])
    assert len(attacks) == 7 and len(defenses) == 5
    plan = api.plan_grid(base, attacks, defenses, [0], tmp_path)
    rows = {r["stage"]: r for r in plan.summary()}
    # 35 cells; one base model; a plan and a base-model evaluation per attack;
    # victims trained by none, semantic_shield, roclip and detect_filter (CleanCLIP repairs none's).
    assert plan.cells == 35
    assert rows["base"]["to_run"] == 1 and rows["plans"]["to_run"] == 7 and rows["base_eval"]["to_run"] == 7
    assert rows["train"]["to_run"] == 28 < 35 and rows["repair"]["to_run"] == 7
    assert plan.trainings == 1 + 28 + 7


def test_slurm_waves_put_base_builders_first_and_repairs_last():
    from shieldbench.benchmark.slurm import waves

    base = api.make_spec(preset="smoke", resolved=False)
    cells = api.grid_cells(base, ["none", "badnets"], ["cleanclip", "none", "semantic_shield"], [0, 1])
    names = [[(cells[i].attack.name, cells[i].defense.name, cells[i].seed) for i in w] for w in waves(cells)]
    # One base model for every cell: the first cell builds it; CleanCLIP cells wait for the none checkpoints.
    assert names[0] == [("none", "none", 0)]
    assert all(d != "cleanclip" for _, d, _ in names[1]) and len(names[1]) == 7
    assert sorted(names[2]) == [(a, "cleanclip", s) for a in ("badnets", "none") for s in (0, 1)]


@pytest.fixture(scope="module")
def sequential_grid(tmp_path_factory) -> Path:
    """The reference: the grid run in one process."""
    cwd = tmp_path_factory.mktemp("sequential")
    one = sb(*GRID, "-o", "res", cwd=cwd)
    assert one.returncode == 0, one.stderr
    return cwd / "res"


@needs_cli
@pytest.mark.slow
def test_slurm_path_through_submitit_local_matches(tmp_path, sequential_grid):
    # Two tasks per job: each cell trains data-parallel on 2 gloo ranks (as on 2 GPUs of a node)
    # and must give the sequential grid's numbers. The BadNets row of the grid is enough for the
    # three waves (the base builder, the victims, the repair that reads a victim's checkpoint);
    # each cell costs two torch processes here, so the other row would only add time.
    proc = sb(*SLURM_GRID, "-o", "res", "--executor", "submitit-local", "--slurm-gpus-per-job", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 cells to run as Slurm job arrays" in proc.stderr
    got = runs(tmp_path / "res")
    want = runs(sequential_grid)
    want = want[want["run_id"].isin(got["run_id"])].reset_index(drop=True)
    assert len(want) == 3
    pd.testing.assert_frame_equal(want, got)
    assert max(builds(tmp_path / "res").values()) == 1
    records = [json.loads(p.read_text()) for p in (tmp_path / "res" / "runs").glob("*/record.json")]
    assert len(records) == 3 and {r["world_size"] for r in records} == {2}
    assert {r["defense"] for r in records} == {"none", "cleanclip", "semantic_shield"}
    line = one_error_line(sb(*GRID, "-o", "res", "--executor", "slurm", "--slurm-gpus-per-job", "99", cwd=tmp_path))
    assert "--slurm-gpus-per-job 99" in line and "0 (CPU jobs) to 64" in line
    line = one_error_line(sb(*GRID, "-o", "res", "--slurm-gpus-per-job", "2", cwd=tmp_path))
    assert "torchrun --nproc_per_node=N" in line
    assert "choose one of local, slurm" in one_error_line(sb(*GRID, "--executor", "pbs", cwd=tmp_path))


@needs_cli
@pytest.mark.slow
def test_two_workers_match_one_build_each_artifact_once_and_resume_trains_nothing(tmp_path, sequential_grid):
    two = sb(*GRID, "-o", "w2", "--workers", "2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert "6 cells to run on 2 workers" in two.stderr and "ETA" in two.stderr
    pd.testing.assert_frame_equal(runs(sequential_grid), runs(tmp_path / "w2"))
    built = builds(tmp_path / "w2")
    assert max(built.values()) == 1
    assert Counter(k for k, _ in built) == {"base": 1, "plans": 2, "base_eval": 2, "train": 4, "repair": 2}
    # The plan now finds everything cached.
    plan = sb(*GRID, "-o", "w2", "--dry-run", cwd=tmp_path)
    assert "6 finished" in plan.stdout and "0 training runs" in plan.stdout
    start = time.perf_counter()
    again = sb(*GRID, "-o", "w2", "--workers", "2", cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("reused its record") == 6
    assert builds(tmp_path / "w2") == built
    assert time.perf_counter() - start < 60  # no worker starts; ~5-9 s here, most of it importing torch


@needs_cli
@pytest.mark.slow
def test_two_grids_at_once_on_one_folder(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    procs = [subprocess.Popen([EXE, *GRID, "-o", "res"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    res = tmp_path / "res"
    records = [json.loads(p.read_text()) for p in sorted((res / "runs").glob("*/record.json"))]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    assert max(builds(res).values()) == 1
    # Each cell ran in one of the grids; the other reused its record.
    assert sum(o[1].count("reused its record") for o in outs) == 6
    assert len(pd.read_csv(res / "runs.csv")) == 6 and len(pd.read_csv(res / "leaderboard.csv")) == 6


@needs_cli
@pytest.mark.slow
def test_grid_killed_mid_training_resumes_to_the_same_numbers(tmp_path):
    args = ("grid", "--preset", "smoke", "--attacks", "badnets", "--defenses", "none", "-q",
            "--set", "train.epochs=6", "--set", "runtime.checkpoint_every=3")
    clean = sb(*args, "-o", "clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([EXE, *args, "-o", "killed"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    ckpts: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((tmp_path / "killed" / "cache" / "train").glob("*/ckpt.pt"))
        if ckpts:
            break
        time.sleep(0.05)
    assert ckpts, "the victim's training never wrote a resumable checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not list((tmp_path / "killed" / "runs").glob("*/record.json"))
    resumed = sb(*args, "-o", "killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(runs(tmp_path / "clean"), runs(tmp_path / "killed"))
    assert not list((tmp_path / "killed" / "cache" / "train").glob("*/ckpt.pt"))  # finished: no orphan checkpoint
