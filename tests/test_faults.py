"""Faults survived (issue 15): a full disk at each write, SIGKILL at each stage, a corrupt resume checkpoint.

Each fault is followed by a rerun without it, whose record must equal an
uninterrupted run's, with no temp file left anywhere under the results
folder and nothing half-written trusted. A full disk is the kernel's own
``ENOSPC``: the file descriptor the project writes through is pointed at
``/dev/full`` (Linux), so the error comes up through the real write path
(Python's buffered file, ``torch.save``, ``os.write``). A kill is a real
SIGKILL of the installed ``shieldbench`` command, sent by itself at an exact
stage through a test-only ``sitecustomize`` (tests/faults/).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from cli_helpers import EXE, needs_cli

HERE = Path(__file__).resolve().parent
RUN_ID_GLOB = "badnets__*"
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def temps(results: Path) -> list[Path]:
    """Temp files of writes (``.<name>.<random>.tmp``, see shieldbench.fileio) anywhere under ``results``."""
    return sorted(p for p in results.rglob("*.tmp"))


def record_of(results: Path) -> dict:
    (path,) = results.glob(f"runs/{RUN_ID_GLOB}/record.json")
    return json.loads(path.read_text())


def same_results(record: dict, reference: dict) -> None:
    """Everything the experiment measured equals the reference's (timings and memory aside)."""
    assert record["status"] == "ok", record.get("error")
    for key in ("metrics", "metrics_base_model", "metrics_before_repair", "train_history"):
        assert record.get(key) == reference.get(key), key
    assert record["plan"]["hash"] == reference["plan"]["hash"]
    assert record["plan"]["n_poisoned"] == reference["plan"]["n_poisoned"]


def all_artifacts_intact(results: Path) -> None:
    """Every artifact in the store matches its manifest, and no finished model keeps a resume checkpoint."""
    from shieldbench.benchmark.store import MODEL_FILES, ArtifactStore

    store = ArtifactStore(results / "cache")
    kinds = set()
    for folder in sorted((results / "cache").glob("*/*/")):
        kind, key = folder.parent.name, folder.name
        if kind == "knowledge":
            continue
        names = MODEL_FILES if (folder / "model.pt").exists() else tuple(
            p.name for p in folder.glob("*.json") if p.name != "manifest.json")
        assert names and store.verify(kind, key, names).state == "ok", folder
        assert not (folder / "ckpt.pt").exists(), folder
        kinds.add(kind)
    assert {"base", "plans", "base_eval", "train"} <= kinds, kinds


def seed_cache(reference: Path, results: Path, kinds: tuple[str, ...]) -> None:
    """Start from the artifacts an uninterrupted run had built before the stage under test (saves its time)."""
    for kind in kinds:
        shutil.copytree(reference / "cache" / kind, results / "cache" / kind)


# -- a full disk at each write ----------------------------------------------------------------------------

RUN = ["run", "--preset", "smoke", "-a", "badnets", "-d", "none", "-q"]


def cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run ``shieldbench ARGS`` in this process, as the installed command would; (exit code, stdout, stderr)."""
    from shieldbench import cli as sb_cli

    handler = signal.getsignal(signal.SIGINT)
    old_argv = sys.argv
    sys.argv = ["shieldbench", *args]
    code = 0
    try:
        sb_cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        signal.signal(signal.SIGINT, handler)  # main() installs its own
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextlib.contextmanager
def disk_full_at(pattern: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Writes to a file whose path matches ``pattern`` fail with the kernel's ENOSPC; yields the paths hit.

    An atomic write's temp file (``.NAME.<random>.tmp``) counts as its final
    path. The descriptor is pointed at /dev/full after the temp file is made
    (and its mode set), so the temp file exists on disk and must be removed
    by the writer; an append (the build log, a knowledge cache) gets the
    same from ``os.open``.
    """
    from shieldbench import fileio

    hit: list[str] = []

    def divert(fd: int, path: str) -> None:
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        hit.append(path)

    real_temp_beside = fileio.temp_beside

    def temp_beside(path: Path) -> tuple[int, str]:
        fd, tmp = real_temp_beside(path)
        if fnmatch.fnmatch(str(path), pattern):
            divert(fd, str(path))
        return fd, tmp

    real_open = os.open

    def open_(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        name = os.fspath(path)
        if flags & os.O_APPEND and fnmatch.fnmatch(name, pattern):
            divert(fd, name)
        return fd

    monkeypatch.setattr(fileio, "temp_beside", temp_beside)
    monkeypatch.setattr(os, "open", open_)
    try:
        yield hit
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """The reference: the cell run once, in this process, with no fault."""
    results = tmp_path_factory.mktemp("clean") / "res"
    from shieldbench import cli as sb_cli

    handler = signal.getsignal(signal.SIGINT)
    old_argv = sys.argv
    sys.argv = ["shieldbench", *RUN, "-o", str(results)]
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            sb_cli.main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    finally:
        sys.argv = old_argv
        signal.signal(signal.SIGINT, handler)
    return results


# (what is written, the path written, the artifacts an uninterrupted run had before that write). Those that
# train twice (the fault, then the rerun) are marked slow; the rest take seconds each.
slow = pytest.mark.slow
LATE = ("base", "plans", "base_eval", "train")
WRITES = [
    pytest.param("the clean base model's weights", "*/cache/base/*/model.pt", (), marks=slow),
    pytest.param("the victim's resume checkpoint", "*/cache/train/*/ckpt.pt", ("base", "plans", "base_eval"), marks=slow),
    pytest.param("the victim's weights", "*/cache/train/*/model.pt", ("base", "plans", "base_eval")),
    pytest.param("the victim's meta.json", "*/cache/train/*/meta.json", ("base", "plans", "base_eval"), marks=slow),
    pytest.param("an artifact's manifest", "*/cache/train/*/manifest.json", ("base", "plans", "base_eval")),
    pytest.param("the poison plan", "*/cache/plans/*/plan.json", ("base",), marks=slow),
    pytest.param("the base model's metrics under the trigger", "*/cache/base_eval/*/metrics.json", ("base", "plans")),
    pytest.param("the build log", "*/cache/builds.jsonl", ("base", "plans"), marks=slow),
    pytest.param("the record", "*/runs/*/record.json", LATE),
    pytest.param("the training log", "*/runs/*/train_log.csv", LATE),
    pytest.param("runs.csv", "*/runs.csv", LATE),
    pytest.param("leaderboard.csv", "*/leaderboard.csv", LATE),
    pytest.param("leaderboard_long.csv", "*/leaderboard_long.csv", LATE),
]


@needs_dev_full
@pytest.mark.parametrize("what, pattern, before", WRITES, ids=[w.values[0] for w in WRITES])
def test_a_full_disk_at_each_write_is_one_line_and_a_rerun_equals_a_clean_run(
        what, pattern, before, clean_run, tmp_path, capsys, monkeypatch):
    results = tmp_path / "res"
    seed_cache(clean_run, results, before)
    with disk_full_at(pattern, monkeypatch) as hit:
        code, _, err = cli([*RUN, "-o", str(results)], capsys)
    assert hit, f"{what}: the run never wrote {pattern}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # One line naming the file being written (not its temp file), exit 2, no traceback.
    assert code == 2 and lines == [f"error: no space left on device: {hit[0]}"], (code, err)
    assert not temps(results), temps(results)  # the writer removed its own temp file
    if not pattern.endswith(".jsonl"):
        assert not list(results.glob(pattern.removeprefix("*/"))), "a file the full disk cut short was kept"
    else:  # an append: the lines already there stay whole
        for line in (results / "cache" / "builds.jsonl").read_text().splitlines():
            json.loads(line)
    if "runs/" in pattern or "cache/" in pattern:
        # The cell stopped before its record: nothing half-done counts as a finished cell.
        assert not list(results.glob("runs/*/record.json"))
    # There is room again: the same command finishes, trusts nothing half-written, and measures the same.
    code, _, err = cli([*RUN, "-o", str(results)], capsys)
    assert code == 0, err
    same_results(record_of(results), record_of(clean_run))
    assert not temps(results)
    all_artifacts_intact(results)
    import pandas as pd

    assert len(pd.read_csv(results / "runs.csv")) == 1 and len(pd.read_csv(results / "leaderboard.csv")) == 1


@needs_dev_full
def test_a_full_disk_while_appending_knowledge_is_one_line_and_the_cache_recovers(tmp_path, monkeypatch):
    from shieldbench.errors import UserError
    from shieldbench.knowledge import make_knowledge_source

    caps = ["a red kite in the sky", "a blue tent on grass", "a green star"]
    truth = make_knowledge_source("lexicon", k=3)(caps)
    with disk_full_at("*.jsonl", monkeypatch) as hit:
        src = make_knowledge_source("lexicon", k=3, cache_dir=str(tmp_path))
        with pytest.raises(UserError) as exc:
            src(caps)
    assert str(exc.value) == f"no space left on device: {hit[0]}" and hit[0].startswith(str(tmp_path))
    # Room again: whatever the full disk left is not trusted, every caption is answered truly and cached.
    again = make_knowledge_source("lexicon", k=3, cache_dir=str(tmp_path))
    assert again(caps) == truth
    third = make_knowledge_source("lexicon", k=3, cache_dir=str(tmp_path))
    third._extract_batch = lambda c: pytest.fail(f"re-extracted {c}")
    assert third(caps) == truth and not temps(tmp_path)


@needs_dev_full
def test_torch_save_on_a_full_disk_says_so_not_unexpected_pos(tmp_path, monkeypatch):
    from shieldbench.fileio import DiskFull
    from shieldbench.training.checkpoint import atomic_torch_save

    path = tmp_path / "model.pt"
    path.write_bytes(b"the previous version")
    with disk_full_at(str(path), monkeypatch), pytest.raises(DiskFull) as exc:
        atomic_torch_save({"w": torch.zeros(1 << 18)}, path)
    assert str(exc.value) == f"no space left on device: {path}"
    assert path.read_bytes() == b"the previous version" and not temps(tmp_path)


def test_an_unwrapped_full_disk_error_is_still_one_line(capsys, monkeypatch):
    """A full disk where no writer names its file (a library's own write) reaches main() as OSError: one line."""
    import errno

    from shieldbench import cli as sb_cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/lib/file")

    monkeypatch.setattr(sb_cli, "app", full)
    code, _, err = cli(["list"], capsys)
    assert code == 2 and err.strip() == "error: no space left on device: /some/lib/file"


# -- a corrupt resume checkpoint is discarded, never refused forever -------------------------------------

@pytest.fixture(scope="module")
def fresh_model():
    """A seeded, untrained micro-vit: each training below starts from a copy of it (building one takes seconds)."""
    from shieldbench.models.factory import build_model

    torch.manual_seed(0)
    return build_model("micro-vit", "", 32)


def _trainer(ckpt: Path, bundle, model, epochs: int = 2, owner: str | None = None):
    """A tiny training (32 of the smoke world's clean pairs, 2 steps of 16 an epoch), checkpointing to ``ckpt``."""
    import copy

    from shieldbench.data.views import TrainView
    from shieldbench.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-3, warmup_steps=2, seed=0, workers=0)
    return Trainer(copy.deepcopy(model), TrainView.from_pairs(bundle.clean).subset(range(32)), cfg, checkpoint_path=ckpt,
                   device=torch.device("cpu"), show_progress=False, checkpoint_owner=owner)


def _bad_checkpoints(good: dict) -> dict[str, Callable[[Path], None]]:
    other = dict(good, model={k: (v[:1] if v.dim() > 0 else v) for k, v in good["model"].items()})
    return {
        "garbage": lambda p: p.write_bytes(b"not a checkpoint at all"),
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "a list": lambda p: torch.save([1, 2], p),
        "another model's shapes": lambda p: torch.save(other, p),
        "no optimizer": lambda p: torch.save({k: v for k, v in good.items() if k != "optimizer"}, p),
        "an epoch past the end": lambda p: torch.save(dict(good, epoch=99), p),
        "a text step": lambda p: torch.save(dict(good, step="7"), p),
    }


CORRUPTIONS = ["garbage", "truncated", "a list", "another model's shapes", "no optimizer", "an epoch past the end",
               "a text step"]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, smoke_world, fresh_model) -> tuple[dict, dict]:
    """A finished 2-epoch training: its last checkpoint, and the weights it ends with."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    trainer = _trainer(ckpt, smoke_world, fresh_model)
    trainer.fit()
    return torch.load(ckpt, weights_only=True), {k: v.clone() for k, v in trainer.model.clip.state_dict().items()}


@pytest.mark.parametrize("damage", CORRUPTIONS)
def test_a_corrupt_resume_checkpoint_is_one_warning_and_training_restarts(damage, trained_once, smoke_world,
                                                                          fresh_model, tmp_path, capsys):
    good, final_weights = trained_once
    ckpt = tmp_path / "ckpt.pt"
    torch.save(good, ckpt)
    _bad_checkpoints(good)[damage](ckpt)
    trainer = _trainer(ckpt, smoke_world, fresh_model)
    result = trainer.fit()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"warning: resume checkpoint {ckpt}: ") \
        and err[0].endswith("removed, training starts from the beginning"), err
    # Trained from the start: every epoch run, the same weights as an uninterrupted training.
    assert result.resumed_from_epoch == 0 and result.epochs_run == 2
    for name, value in trainer.model.clip.state_dict().items():
        assert torch.equal(value, final_weights[name]), name
    assert "Traceback" not in "\n".join(err)


def test_another_trainings_checkpoint_is_not_resumed_from(trained_once, smoke_world, fresh_model, tmp_path, capsys):
    """A well-formed checkpoint of the same model, copied in from another training's folder, is discarded."""
    good, final_weights = trained_once
    ckpt = tmp_path / "ckpt.pt"
    # Its own: resumed (the good checkpoint is the last epoch's, so nothing is left to run).
    torch.save(dict(good, owner="train/mine"), ckpt)
    own = _trainer(ckpt, smoke_world, fresh_model, owner="train/mine").fit()
    assert own.resumed_from_epoch == 2 and own.epochs_run == 0
    assert not [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    # Another training's, and one from before owners were written: one warning each, trained from the start.
    for foreign in ("train/other", None):
        torch.save(dict(good, owner=foreign), ckpt)
        trainer = _trainer(ckpt, smoke_world, fresh_model, owner="train/mine")
        result = trainer.fit()
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and f"it belongs to another training ({foreign!r}, not 'train/mine')" in err[0], err
        assert result.resumed_from_epoch == 0 and result.epochs_run == 2
        for name, value in trainer.model.clip.state_dict().items():
            assert torch.equal(value, final_weights[name]), name
    # The checkpoints the trainer writes carry its owner.
    assert torch.load(ckpt, weights_only=True)["owner"] == "train/mine"


# -- SIGKILL at each stage of the installed command ----------------------------------------------------------

KILL_RUN = ["run", "--preset", "smoke", "-a", "badnets", "-d", "cleanclip", "-q", "--set", "defense.epochs=2",
            "--set", "defense.image_aug=none", "--set", "runtime.checkpoint_every=2"]


def sb_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", **extra)
    if "SHIELDBENCH_TEST_KILL" in extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE / "faults"), env.get("PYTHONPATH", "")) if p)
    return env


def sb_run(results: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([EXE, *KILL_RUN, "-o", str(results)], env=sb_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=600)
    with contextlib.suppress(ProcessLookupError):  # a data-loader worker of a killed process
        os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("uninterrupted") / "res"
    proc = sb_run(results)
    assert proc.returncode == 0, proc.stderr
    return results


# (stage, the write the process is killed in (the N-th onto that path), the artifacts built before the stage)
STAGES = [
    ("base training", "*/cache/base/*/ckpt.pt@2", ()),
    ("base model's final write", "*/cache/base/*/meta.json@1", ()),
    ("plan written", "*/cache/plans/*/manifest.json@1", ("base",)),
    ("victim training", "*/cache/train/*/ckpt.pt@2", ("base", "plans", "base_eval")),
    ("cleanclip repair", "*/cache/repair/*/ckpt.pt@2", ("base", "plans", "base_eval", "train")),
    ("record write", "*/runs/*/record.json@1", ("base", "plans", "base_eval", "train", "repair")),
    ("leaderboard write", "*/runs.csv@1", ("base", "plans", "base_eval", "train", "repair")),
]


@needs_cli
@pytest.mark.slow
@pytest.mark.parametrize("stage, kill_at, before", STAGES, ids=[s[0] for s in STAGES])
def test_sigkill_at_each_stage_then_a_rerun_equals_an_uninterrupted_run(stage, kill_at, before, uninterrupted,
                                                                         tmp_path):
    results = tmp_path / "res"
    seed_cache(uninterrupted, results, before)
    killed = sb_run(results, SHIELDBENCH_TEST_KILL=kill_at)
    assert killed.returncode == -signal.SIGKILL, (stage, killed.returncode, killed.stderr[-2000:])
    assert temps(results), f"{stage}: the kill left no temp file: it did not hit mid-write"
    rerun = sb_run(results)
    assert rerun.returncode == 0, rerun.stderr
    same_results(record_of(results), record_of(uninterrupted))
    assert not temps(results), temps(results)
    all_artifacts_intact(results)


# -- a malformed record in the folder: skipped, reported in one line, the rest built -------------------------

@pytest.mark.parametrize("bad", ["[]", "42", '{"status": "ok", "metrics": "x"}', "DIR"])
def test_a_malformed_record_is_one_warning_line_and_leaderboard_and_report_are_built(bad, tmp_path, capsys):
    from test_hardening import _record

    results = tmp_path / "res"
    for i, asr in enumerate((0.9, 0.7)):
        (results / "runs" / f"good{i}").mkdir(parents=True)
        (results / "runs" / f"good{i}" / "record.json").write_text(json.dumps(_record(f"good{i}", i, asr)))
    broken = results / "runs" / "broken" / "record.json"
    broken.parent.mkdir()
    broken.mkdir() if bad == "DIR" else broken.write_text(bad)
    for command in (["leaderboard", "--format", "csv", "--metrics", "asr"], ["report"]):
        code, out, err = cli([*command, "-o", str(results)], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 0, err
        assert len(lines) == 1 and lines[0].startswith("warning: 1 unreadable record(s) left out of the leaderboard: ") \
            and str(broken) in lines[0], lines
        if command[0] == "leaderboard":  # the good records are one row over two seeds; no row for the broken one
            rows = out.strip().splitlines()[1:]
            assert len(rows) == 1 and rows[0].startswith("badnets,none,"), out
    import pandas as pd

    runs = pd.read_csv(results / "runs.csv")
    assert dict(zip(runs["run_id"], runs["status"])) == {"good0": "ok", "good1": "ok", "broken": "corrupt"}
    board = pd.read_csv(results / "leaderboard.csv")
    assert len(board) == 1 and board["n_seeds"].tolist() == [2] and board["asr_mean"].tolist() == [pytest.approx(0.8)]
    assert (results / "report" / "index.html").is_file()


# -- two runs at once on one folder ---------------------------------------------------------------------------

@needs_cli
@pytest.mark.slow
def test_two_runs_at_once_on_one_folder_keep_every_record_and_the_leaderboard_agrees(tmp_path):
    """Two cells finishing together each rebuild the leaderboard; the last rebuild must see both records."""
    import pandas as pd

    cells = (["-a", "badnets", "-d", "none"], ["-a", "none", "-d", "none"])
    procs = [subprocess.Popen([EXE, "run", "--preset", "smoke", "-q", *cell, "-o", "res"], cwd=tmp_path,
                              env=sb_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cell in cells]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    res = tmp_path / "res"
    records = {json.loads(p.read_text())["attack"]: json.loads(p.read_text())
               for p in (res / "runs").glob("*/record.json")}
    assert set(records) == {"badnets", "none"} and all(r["status"] == "ok" for r in records.values())
    assert not temps(res)
    all_artifacts_intact(res)
    runs = pd.read_csv(res / "runs.csv")
    board = pd.read_csv(res / "leaderboard.csv")
    assert sorted(runs["attack"]) == sorted(board["attack"]) == ["badnets", "none"]
    # Every leaderboard row is its run's numbers (one seed: the mean is the value), from the records themselves.
    for _, row in board.iterrows():
        metrics = records[row["attack"]]["metrics"]
        for m in ("clean_top1", "asr", "hit@1", "i2t_R@1"):
            if m in metrics:
                assert row[f"{m}_mean"] == pytest.approx(metrics[m]), (row["attack"], m)
                assert runs.loc[runs["attack"] == row["attack"], m].item() == pytest.approx(metrics[m])
