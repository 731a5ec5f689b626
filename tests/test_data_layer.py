"""The streaming data layer end to end on real images (scikit-learn digits, see tests/digits.py).

- each on-disk format runs through the installed ``shieldbench run``;
- the same poison plan gives identical poisoned rows from CSV, shards and the COCO folder;
- poisoned rows are produced per index: the same with and without loader workers, in any order;
- broken data gets its documented behaviour (skip and count, or fail; one-line errors);
- the trainer resumed mid-epoch replays exactly the batches it had not yet seen.
"""

from __future__ import annotations

import dataclasses

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import needs_cli, one_error_line, sb

from shieldbench.benchmark.runner import make_attack
from shieldbench.data.datasets import build_dataset
from shieldbench.data.loader import EpochBatchSampler, epoch_order, make_loader
from shieldbench.data.views import TrainView
from shieldbench.spec import build_spec

# Small enough for seconds: micro-vit, one epoch, 5% poisons, a digit as the target.
SMOKE = ["--preset", "smoke", "-q", "--set", "attack.target=seven", "--set", "attack.poison_rate=0.05"]


def corpus_args(digits, fmt: str) -> list[str]:
    if fmt == "csv":
        return ["--dataset", "csv", "--set", f"data.path={digits.train_csv}", "--set", f"eval.path={digits.test_dir}",
                "--set", f"eval.retrieval_path={digits.retrieval_csv}"]
    if fmt == "webdataset":
        return ["--dataset", "webdataset", "--set", f"data.path={digits.shards}", "--set", f"eval.path={digits.test_csv}"]
    root = digits.coco_dir if fmt == "coco" else digits.flickr_dir
    return ["--dataset", fmt, "--set", f"data.path={root}", "--set", f"eval.path={digits.test_dir}"]


def spec_for(digits, fmt: str, attack: str = "badnets", **extra):
    args = corpus_args(digits, fmt)
    tree: dict = {"attack": {"name": attack, "target": "seven", "poison_rate": 0.05}}
    for k in range(1, len(args), 2):
        if args[k - 1] == "--dataset":
            tree.setdefault("data", {})["dataset"] = args[k]
        else:
            key, value = args[k].split("=", 1)
            sec, name = key.split(".")
            tree.setdefault(sec, {})[name] = value
    tree["eval"]["path"] = str(digits.test_dir)  # one zero-shot set (the targeted attack's pool) for every format
    for key, value in extra.items():
        sec, name = key.split("__")
        tree.setdefault(sec, {})[name] = value
    from shieldbench import api

    return api.resolve(build_spec("smoke", None, tree))


# -- every format through the installed command ----------------------------------------------
@needs_cli
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "webdataset", "coco", "flickr30k"])
def test_each_format_runs_end_to_end(digits, fmt, tmp_path):
    proc = sb("run", "-a", "badnets", "-d", "none", *SMOKE, *corpus_args(digits, fmt), "-o", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["status"] == "ok" and record["dataset"] == fmt
    m = record["metrics"]
    assert m["n_test"] == digits.n_test and 0.0 <= m["clean_top1"] <= 1.0 and "asr" in m
    assert record["plan"]["n_poisoned"] == round(0.05 * digits.n_train)
    assert record["data"]["n_train"] == digits.n_train and record["data"]["n_unreadable_train"] == 0
    assert record["artifacts"]["base"]["steps"] == 0  # no base stage for a corpus on disk
    if fmt in ("csv", "coco", "flickr30k"):  # a retrieval set: COCO/Flickr's Karpathy test split, or the CSV
        assert "i2t_R@1" in m and "hit@1" in m


# -- the same rows whichever format they come from --------------------------------------------
@pytest.mark.parametrize("attack", ["badnets", "blended", "wanet", "targeted"])
def test_same_plan_same_poisoned_rows_across_formats(digits, attack):
    extra = {"attack__pattern": "cleanclip"} if attack == "badnets" else {}  # a per-image random patch
    if attack == "blended":
        extra = {"attack__key": "cleanclip"}  # per-image noise
    if attack == "targeted":
        extra = {"attack__n_targets": 3, "attack__num_captions": 5}
    rows = {}
    for fmt in ("csv", "webdataset", "coco"):
        spec = spec_for(digits, fmt, attack, **extra)
        bundle = build_dataset(spec.data, spec.eval)
        atk = make_attack(spec, bundle)
        plan = atk.plan(123)
        poisoned = atk.poison(plan)
        flagged = poisoned.is_poison.nonzero().flatten()
        assert flagged.numel() > 0
        sample = torch.cat([flagged, torch.arange(0, len(poisoned.view), 97)])
        rows[fmt] = (plan.hash(), poisoned.view.uint8_images(sample), poisoned.view.captions_at(sample), flagged)
    ref = rows["csv"]
    for fmt in ("webdataset", "coco"):
        assert rows[fmt][0] == ref[0], fmt  # same plan
        assert torch.equal(rows[fmt][3], ref[3]), fmt  # same poisoned positions
        assert torch.equal(rows[fmt][1], ref[1]), fmt  # same pixels, triggers included
        assert rows[fmt][2] == ref[2], fmt


def test_poisoned_rows_do_not_depend_on_workers_or_order(digits):
    spec = spec_for(digits, "csv", "blended", attack__key="cleanclip")
    bundle = build_dataset(spec.data, spec.eval)
    atk = make_attack(spec, bundle)
    poisoned = atk.poison(atk.plan(7))
    view = poisoned.view
    flagged = poisoned.is_poison.nonzero().flatten()
    forward = view.uint8_images(flagged)
    backward = view.uint8_images(flagged.flip(0)).flip(0)
    assert torch.equal(forward, backward)
    sampler = EpochBatchSampler(len(view), 64, seed=3)
    seen = {}
    for workers in (0, 2):
        sampler.set_epoch(0)
        got = {}
        for rb in make_loader(view, sampler, workers=workers, persistent=False):
            for i, img in zip(rb.index.tolist(), rb.images):
                got[i] = img
        seen[workers] = got
    assert seen[0].keys() == seen[2].keys()
    for i in seen[0]:
        assert torch.equal(seen[0][i], seen[2][i])
    for i, img in zip(flagged.tolist(), forward):
        if i in seen[0]:
            assert torch.equal(seen[0][i], img)


def test_overlay_state_is_the_plan_not_a_copy(digits):
    spec = spec_for(digits, "csv", "badnets")
    bundle = build_dataset(spec.data, spec.eval)
    atk = make_attack(spec, bundle)
    poisoned = atk.poison(atk.plan(0))
    overlay = poisoned.view._images  # the runner's side: the defense never gets this object
    # Nothing is decoded up front: the only pixel state is the plan's few rows.
    assert not any(isinstance(v, torch.Tensor) and v.numel() > 3 * 32 * 32 for v in vars(overlay).values())
    assert len(overlay.edited_rows()) == int(poisoned.is_poison.sum())


# -- broken data -----------------------------------------------------------------------------------
def _corrupt_copy(digits, tmp_path: Path, n_bad: int = 3) -> Path:
    """A copy of the train CSV whose first n_bad images are garbage bytes and one is missing."""
    src = digits.train_csv.read_text().splitlines()
    (tmp_path / "images").mkdir()
    out = [src[0]]
    for k, line in enumerate(src[1:]):
        rel, caption = line.split("\t", 1)
        target = tmp_path / rel
        if k < n_bad:
            target.write_bytes(b"not a png at all")
        elif k == n_bad:
            pass  # missing file
        else:
            shutil.copy(digits.root / rel, target)
        out.append(f"{rel}\t{caption}")
    path = tmp_path / "train.csv"
    path.write_text("\n".join(out) + "\n")
    return path


@needs_cli
@pytest.mark.slow
def test_unreadable_images_are_skipped_and_counted_or_fail_the_run(digits, tmp_path):
    csv_path = _corrupt_copy(digits, tmp_path)
    base = ["run", "-a", "none", "-d", "none", *SMOKE, "--dataset", "csv", "--set", f"data.path={csv_path}",
            "--set", f"eval.path={digits.test_dir}", "--json"]
    proc = sb(*base, "-o", str(tmp_path / "r1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    # 4 unreadable rows; an epoch reads each row at most once (the ragged last batch is dropped).
    assert 0 < record["data"]["n_unreadable_train"] <= 4
    proc = sb(*base, "--set", "data.on_error=fail", "-o", str(tmp_path / "r2"))
    assert proc.returncode == 1
    assert "cannot decode image" in proc.stderr or "image not found" in proc.stderr
    assert str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["status"] == "failed"


@needs_cli
def test_truncated_shard_is_one_line_naming_the_shard(digits, tmp_path):
    shard = sorted(Path(digits.shards.split("{")[0]).parent.glob("*.tar"))[1]
    bad = tmp_path / "shard-000001.tar"
    data = shard.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    shutil.copy(shard.with_name("shard-000000.tar"), tmp_path / "shard-000000.tar")
    proc = sb("run", *SMOKE, "--dataset", "webdataset", "--set", f"data.path={tmp_path}/shard-{{000000..000001}}.tar",
              "--set", f"eval.path={digits.test_dir}", "-o", str(tmp_path / "r"))
    line = one_error_line(proc)
    assert "truncated or corrupt shard" in line and str(bad) in line


@needs_cli
def test_csv_without_the_named_column_names_the_columns_it_has(digits, tmp_path):
    proc = sb("run", *SMOKE, "--dataset", "csv", "--set", f"data.path={digits.train_csv}",
              "--set", "data.csv_caption_key=caption", "-o", str(tmp_path))
    line = one_error_line(proc)
    assert "caption" in line and "filepath" in line and "title" in line


@needs_cli
@pytest.mark.parametrize("args, needles", [
    (["--set", "data.path=train.csv"], ["data.path is not used by dataset 'synthetic'", "csv"]),
    (["--set", "eval.path=val"], ["eval.path is not used by dataset 'synthetic'"]),
    (["--dataset", "csv", "--set", "data.path=x.csv", "--set", "data.n_pretrain=5"],
     ["data.n_pretrain is not used by dataset 'csv'"]),
    (["--dataset", "csv"], ["dataset 'csv' needs data.path=PATH"]),
    (["--dataset", "csv", "--set", "data.path=nowhere.csv"], ["CSV file not found: nowhere.csv"]),
])
def test_unused_or_missing_data_options_are_errors(args, needles, tmp_path):
    line = one_error_line(sb("run", "--preset", "smoke", *args, "-o", str(tmp_path)))
    for needle in needles:
        assert needle in line, line


# -- dry run on the paper protocols -------------------------------------------------------------
@needs_cli
@pytest.mark.slow
@pytest.mark.parametrize("config, fmt", [("semantic_shield_coco.toml", "coco"), ("cleanclip_cc3m.toml", "csv"),
                                         ("roclip_cc3m_targeted.toml", "webdataset")])
def test_paper_configs_pass_dry_run_on_fixtures(digits, config, fmt, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]))
    path = {"coco": digits.coco_dir, "csv": digits.train_csv, "webdataset": digits.shards}[fmt]
    args = ["--set", f"data.path={path}", "--set", "attack.target=seven", "--set", "data.image_size=224"]
    if fmt == "coco":
        args += ["--set", f"eval.classnames={names}", "--set", "attack.poison_rate=0.01"]
    else:
        args += ["--set", f"eval.path={digits.test_dir}"]
    cfg = Path(__file__).resolve().parent.parent / "configs" / config
    proc = sb("run", "--config", str(cfg), *args, "--dry-run", "-o", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dry run: nothing was trained" in proc.stdout
    assert "TFLOP per step" in proc.stdout and "train" in proc.stdout
    assert not (tmp_path / "r").exists()  # nothing written


# -- the loader ------------------------------------------------------------------------------------
def test_sampler_full_batches_seeded_and_resumable():
    s = EpochBatchSampler(103, 10, seed=5)
    s.set_epoch(2)
    batches = list(s)
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)
    assert torch.equal(torch.tensor(sum(batches, [])), epoch_order(103, 5, 2)[:100])
    s.set_epoch(2, start_batch=7)
    assert list(s) == batches[7:]
    s.set_epoch(3)
    assert list(s) != batches
    # Two ranks split every global batch into its two halves, in order.
    r0, r1 = EpochBatchSampler(103, 10, 5, rank=0, world_size=2), EpochBatchSampler(103, 10, 5, rank=1, world_size=2)
    for s_ in (r0, r1):
        s_.set_epoch(2)
    for a, b, full in zip(r0, r1, batches):
        assert a + b == full


def test_trainer_resumes_mid_epoch_exactly(smoke_world, tmp_path):
    from shieldbench.models.factory import build_model
    from shieldbench.training.trainer import TrainConfig, Trainer

    view = TrainView.from_pairs(smoke_world.pretrain.subset(range(256)))

    def trainer(path, epochs=2):
        torch.manual_seed(0)
        model = build_model("micro-vit", "", 32)
        cfg = TrainConfig(epochs=epochs, batch_size=32, lr=1e-3, seed=1, checkpoint_every=3)
        return Trainer(model, view, cfg, checkpoint_path=path, show_progress=False)

    full = trainer(tmp_path / "a.pt")
    full.fit()

    class Crash(Exception):
        pass

    crashing = trainer(tmp_path / "b.pt")
    original = crashing.train_step

    def step_then_crash(batch):
        out = original(batch)
        if crashing.step == 11:  # epoch 1, mid-epoch (8 steps per epoch; checkpoint at step 9)
            raise Crash
        return out

    crashing.train_step = step_then_crash
    with pytest.raises(Crash):
        crashing.fit()
    resumed = trainer(tmp_path / "b.pt")
    result = resumed.fit()
    assert result.resumed_from_epoch == 1 and resumed.step == full.step == 16
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert np.isclose(full.history[-1]["loss"], resumed.history[-1]["loss"], atol=1e-6)


def test_cache_keys_follow_the_corpus_content(digits, tmp_path):
    from shieldbench.benchmark.keys import data_identity

    csv_path = tmp_path / "train.csv"
    lines = digits.train_csv.read_text().splitlines()
    lines = [lines[0]] + [f"{digits.root}/{ln}" for ln in lines[1:]]  # absolute paths: the copy reads the same files
    csv_path.write_text("\n".join(lines) + "\n")
    spec = spec_for(digits, "csv")
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, path=str(csv_path)))
    before = data_identity(spec)
    lines[5] = lines[5].replace("digit", "numeral")  # one caption edited, same path
    csv_path.write_text("\n".join(lines) + "\n")
    build_dataset.cache_clear()
    after = data_identity(spec)
    assert before["spec"] == after["spec"] and before["content"] != after["content"]


def test_unreadable_evaluation_images_are_left_out_and_counted_or_fail(digits, tmp_path):
    from shieldbench.data.formats.zeroshot import read_zeroshot
    from shieldbench.data.images import BadImage
    from shieldbench.evaluation.evaluate import evaluate
    from shieldbench.models.factory import build_model

    folder = tmp_path / "test"
    shutil.copytree(digits.test_dir, folder)
    victim = sorted((folder / "three").glob("*.png"))[0]
    victim.write_bytes(b"\x89PNG truncated")
    test = read_zeroshot(str(folder), 32, "", "simple", "filepath", "label", 0)
    torch.manual_seed(0)
    model = build_model("micro-vit", "", 32)
    m = evaluate(model, test, None, 7, None, torch.device("cpu"), batch_size=128)
    assert m["n_unreadable_test"] == 1 and m["n_test"] == digits.n_test - 1
    with pytest.raises(BadImage, match=str(victim)):
        evaluate(model, test, None, 7, None, torch.device("cpu"), batch_size=128, on_error="fail")


@needs_cli
def test_dry_run_checks_option_files(tmp_path):
    line = one_error_line(sb("run", "--preset", "smoke", "-a", "blended", "--set", "attack.key=file",
                             "--set", "attack.key_path=/no/such/key.png", "--dry-run", "-o", str(tmp_path)))
    assert "attack.key_path: file not found: /no/such/key.png" in line
