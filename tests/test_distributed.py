"""DDP under torchrun: two gloo processes train exactly like one process on the same global batch.

tests/ddp_worker.py trains every built-in defense's objective for 8 steps
(2 epochs of 4 global batches of 16): once in this machine's plain process,
once under ``torchrun --nproc_per_node=2`` (8 rows per rank). The per-step
loss of the global batch and the final weights must agree to float32
round-off; a wrong cross-rank semantics (a per-rank batch standardisation, a
pool that only sees its rank's captions, views drawn per rank, a gradient
scaled by the world size) moves them by orders of magnitude more (measured:
0.3 on the loss for views drawn per rank).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shieldbench.data.loader import EpochBatchSampler
from shieldbench.training import distributed as D

WORKER = Path(__file__).with_name("ddp_worker.py")
CASES = ["none", "semantic_shield", "semantic_shield_memory", "roclip", "roclip_text_grad", "cleanclip", "none_resumed"]


def _run(cmd: list[str], out: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([*cmd, str(WORKER), str(out), ",".join(CASES)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _run([sys.executable], one)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], two)
    return one, two


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_mid_epoch_to_the_uninterrupted_weights(runs):
    one, two = (torch.load(d / "none.pt") for d in runs)
    resumed = torch.load(runs[1] / "none_resumed.pt")
    # Killed after step 7; the checkpoint of step 6 (mid-epoch 1) replays steps 7-8 on both ranks.
    assert resumed["world_size"] == 2 and resumed["steps"] == 8 and resumed["resumed_from_epoch"] == 1
    assert len(resumed["losses"]) == 2
    assert torch.allclose(torch.tensor(resumed["losses"]), torch.tensor(one["losses"][6:]), atol=1e-4)
    for name, p in one["params"].items():
        assert torch.allclose(p.float(), resumed["params"][name].float(), atol=2e-4), name


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "none_resumed"])
def test_two_ranks_train_like_one_process(runs, case):
    one, two = (torch.load(d / f"{case}.pt") for d in runs)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == 8
    l1, l2 = torch.tensor(one["losses"]), torch.tensor(two["losses"])
    assert torch.allclose(l1, l2, rtol=1e-4, atol=1e-4), (l1, l2)
    assert not torch.allclose(l1, l1[0].expand_as(l1), atol=1e-2)  # it trained
    for name, p in one["params"].items():
        assert torch.allclose(p.float(), two["params"][name].float(), atol=2e-4), name
    # The epoch logs are the global batch's (averaged over the ranks).
    for k, v in one["history"][-1].items():
        assert two["history"][-1][k] == pytest.approx(v, rel=1e-3, abs=1e-4), k


def test_sampler_shares_are_the_global_batch_in_order():
    full = EpochBatchSampler(50, 12, 3)
    shares = [EpochBatchSampler(50, 12, 3, rank=r, world_size=3) for r in range(3)]
    for s in (full, *shares):
        s.set_epoch(1, start_batch=1)
    for batch, *parts in zip(full, *shares):
        assert sum(parts, []) == batch and all(len(p) == 4 for p in parts)
    with pytest.raises(ValueError, match="not divisible by 5"):
        EpochBatchSampler(50, 12, 3, rank=0, world_size=5)


def test_single_process_helpers_are_the_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather(x, grad=True) is x and D.rank_offset(3) == 0 and D.world_size() == 1 and D.is_main()
    assert D.all_reduce_mean({"a": 2.0}) == {"a": 2.0} and D.broadcast_object([1]) == [1]
    ids = D.stable_ids(["red kite", "red kite", "banana"])
    assert ids[0] == ids[1] != ids[2] and bool((ids >= 0).all())


def test_views_of_a_share_equal_the_views_of_the_whole_batch():
    from shieldbench.defenses.augment import make_image_augmenter

    images = torch.rand(6, 3, 16, 16)
    for kind in ("simclr", "autoaugment"):
        aug = make_image_augmenter(kind)
        whole = aug(images, 7)
        part = aug(images[4:], 7, 4, 6)
        assert torch.allclose(whole[4:], part, atol=1e-6), kind
        assert not torch.allclose(whole[:2], aug(images[:2], 8, 0, 6), atol=1e-3)


@pytest.mark.slow
def test_torchrun_cli_run_writes_one_record_equal_to_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m shieldbench run`: rank 0 prints and writes; the numbers are one process's."""
    import json

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    cell = ["run", "--preset", "smoke", "-a", "badnets", "-d", "semantic_shield", "--json", "-q"]
    one = subprocess.run([sys.executable, "-m", "shieldbench", *cell, "-o", "one"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "shieldbench", *cell, "-o", "two"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # one JSON document: only rank 0 printed
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r2["artifacts"]["train"]["steps"] == r1["artifacts"]["train"]["steps"] > 0
    for k, v in r1["metrics"].items():
        assert r2["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert [round(h["loss"], 4) for h in r1["train_history"]] == [round(h["loss"], 4) for h in r2["train_history"]]
    assert len(list((tmp_path / "two" / "runs").glob("*/record.json"))) == 1
    assert (tmp_path / "two" / "leaderboard.csv").is_file()
    # Run again: the record is reused by every rank, nothing trains.
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "shieldbench", *cell, "-o", "two"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, f"exit {again.returncode}: {again.stderr[-3000:]}"
    assert json.loads(again.stdout)["reused_record"] is True


def test_grid_refuses_to_run_under_torchrun(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "shieldbench", "grid", "--preset", "smoke", "-o", "r"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "grid does not run under torchrun" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
