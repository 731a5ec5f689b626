"""The artifact store trusts no file it finds: manifests, tampering, stale temp files, old artifacts (issue: hardening)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from shieldbench.benchmark.store import MANIFEST, ArtifactStore
from shieldbench.models.factory import build_model


@pytest.fixture
def store(tmp_path):
    warnings: list[str] = []
    s = ArtifactStore(tmp_path / "cache", warn=warnings.append)
    s.warnings = warnings  # type: ignore[attr-defined]
    return s


def _model(seed: int):
    torch.manual_seed(seed)
    return build_model("micro-vit")


def _builds(store) -> list[str]:
    if not store.builds_log.is_file():
        return []
    return [json.loads(line)["kind"] for line in store.builds_log.read_text().splitlines()]


def test_every_artifact_has_a_manifest_with_the_sha256_of_each_file(store):
    store.save_model("train", "k1", _model(0), {"steps": 3})
    store.save_json("plans", "p1", "plan.json", {"edits": [1, 2]})
    for kind, key, names in (("train", "k1", ["meta.json", "model.pt"]), ("plans", "p1", ["plan.json"])):
        manifest = json.loads(store.manifest_path(kind, key).read_text())
        assert sorted(manifest["files"]) == names
        for name, entry in manifest["files"].items():
            data = (store.dir(kind, key) / name).read_bytes()
            assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert store.finished_model("train", "k1") and store.finished_json("plans", "p1", "plan.json") == {"edits": [1, 2]}
    assert store.warnings == []


def test_a_swapped_model_file_is_detected_and_removed(store):
    store.save_model("base", "b", _model(0), {"steps": 1})
    store.save_model("train", "t", _model(1), {"steps": 2})
    # Another model of the same architecture: it would load without complaint.
    store.model_path("train", "t").write_bytes(store.model_path("base", "b").read_bytes())
    store.checkpoint_path("train", "t").write_bytes(b"an orphan resume checkpoint")
    assert store.verify("train", "t", ("model.pt", "meta.json")).state == "bad"
    assert store.has_model("train", "t")  # the cheap read-only check does not hash
    assert not store.finished_model("train", "t")
    assert len(store.warnings) == 1 and str(store.dir("train", "t")) in store.warnings[0]
    assert "model.pt does not match its SHA-256" in store.warnings[0]
    assert sorted(p.name for p in store.dir("train", "t").iterdir()) == []  # the stage builds it again from nothing
    assert store.finished_model("base", "b")  # the other artifact is untouched


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / "meta.json").write_text('{"steps": 999}\n'), "meta.json does not match"),
    (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    (lambda d: (d / MANIFEST).write_text("{not json"), "manifest.json is unreadable"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"files": {"model.pt": {"sha256": "0", "bytes": 1}}})),
     "meta.json is not in manifest.json"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({"files": {
        **json.loads((d / MANIFEST).read_text())["files"], "../../x": {"sha256": "0", "bytes": 0}}})),
     "unexpected file '../../x'"),
])
def test_each_damage_is_named(store, damage, why):
    store.save_model("repair", "r", _model(0), {"steps": 1})
    damage(store.dir("repair", "r"))
    assert not store.finished_model("repair", "r")
    assert len(store.warnings) == 1 and why in store.warnings[0], store.warnings
    assert not store.model_path("repair", "r").exists()


def test_an_edited_json_artifact_is_rebuilt(store):
    store.save_json("base_eval", "e", "metrics.json", {"asr": 0.25})
    path = store.json_path("base_eval", "e", "metrics.json")
    path.write_text(path.read_text().replace("0.25", "0.0"))
    assert store.load_json("base_eval", "e", "metrics.json") == {"asr": 0.0}  # read-only: no check
    assert store.finished_json("base_eval", "e", "metrics.json") is None
    assert not path.exists() and "metrics.json does not match" in store.warnings[0]
    store.save_json("base_eval", "e", "metrics.json", {"asr": 0.25})  # the stage writes it again
    assert store.finished_json("base_eval", "e", "metrics.json") == {"asr": 0.25}


def test_an_artifact_from_before_manifests_is_accepted_once_and_given_one(store):
    store.save_model("base", "old", _model(0), {"steps": 7})
    store.save_json("plans", "old", "plan.json", {"edits": []})
    for kind in ("base", "plans"):
        store.manifest_path(kind, "old").unlink()
    builds = _builds(store)
    model_bytes = store.model_path("base", "old").read_bytes()
    assert store.verify("base", "old", ("model.pt", "meta.json")).state == "legacy"
    assert store.finished_model("base", "old") and store.finished_json("plans", "old", "plan.json") == {"edits": []}
    assert store.manifest_path("base", "old").is_file() and store.manifest_path("plans", "old").is_file()
    assert store.model_path("base", "old").read_bytes() == model_bytes and _builds(store) == builds  # not rebuilt
    assert store.warnings == []
    # From now on it is checked like any other.
    store.json_path("plans", "old", "plan.json").write_text('{"edits": [1]}')
    assert store.finished_json("plans", "old", "plan.json") is None


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / "meta.json").unlink(), "meta.json missing and no manifest"),
    (lambda d: (d / "model.pt").write_bytes(b"\x00" * 64), "model.pt is unreadable and has no manifest"),
])
def test_an_old_artifact_that_cannot_be_read_is_rebuilt_not_adopted(store, damage, why):
    store.save_model("train", "old", _model(0), {"steps": 7})
    store.manifest_path("train", "old").unlink()
    damage(store.dir("train", "old"))
    assert not store.finished_model("train", "old")
    assert why in store.warnings[0] and not store.manifest_path("train", "old").exists()


def test_killed_writes_leave_nothing_behind_the_next_run_keeps(store, tmp_path):
    from shieldbench.benchmark import leaderboard

    store.save_model("train", "done", _model(0), {"steps": 1})
    done = store.dir("train", "done")
    (done / ".model.pt.a1b2.tmp").write_bytes(b"half a model")
    (done / ".ckpt.pt.c3d4.tmp").write_bytes(b"half a checkpoint")
    store.checkpoint_path("train", "done").write_bytes(b"orphan")  # killed before the checkpoint was removed
    # An unfinished artifact: its checkpoint is the resume point and stays; the temp file goes.
    todo = store.dir("train", "todo")
    todo.mkdir(parents=True)
    (todo / "ckpt.pt").write_bytes(b"resume here")
    (todo / ".ckpt.pt.e5f6.tmp").write_bytes(b"half")
    with store.lock("train", "done"):
        assert store.finished_model("train", "done")
    with store.lock("train", "todo"):
        assert not store.finished_model("train", "todo")
    assert sorted(p.name for p in done.iterdir()) == ["manifest.json", "meta.json", "model.pt"]
    assert sorted(p.name for p in todo.iterdir()) == ["ckpt.pt"]
    assert store.warnings == []
    # The leaderboard's folder: only temp files of the files written under its lock are swept.
    (tmp_path / ".runs.csv.x1.tmp").write_text("half")
    (tmp_path / ".leaderboard.csv.x2.tmp").write_text("half")
    (tmp_path / ".notes.txt.x3.tmp").write_text("someone else's")
    leaderboard.rebuild(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [".notes.txt.x3.tmp"]


# -- end to end: a tampered cache never reaches a record ------------------------------------------

def _same(a: dict, b: dict) -> None:
    assert a["plan"]["hash"] == b["plan"]["hash"] and a["plan"]["n_poisoned"] == b["plan"]["n_poisoned"]
    assert b["metrics_base_model"] == a["metrics_base_model"]
    assert set(a["metrics"]) == set(b["metrics"])
    for k, v in a["metrics"].items():
        assert b["metrics"][k] == pytest.approx(v, abs=1e-9), k


@pytest.mark.slow
def test_tampered_plan_checkpoint_and_base_asr_are_rebuilt_and_the_record_is_unchanged(tmp_path, capsys):
    from shieldbench import api
    from shieldbench.benchmark.runner import run_id_for

    spec = api.make_spec(attack="badnets", defense="none", preset="smoke")
    clean = api.run(spec, tmp_path, show_progress=False)
    assert clean["status"] == "ok" and clean["plan"]["n_poisoned"] > 0
    cache, arts = tmp_path / "cache", clean["artifacts"]
    store = ArtifactStore(cache)
    builds = _builds(store)

    # 1. the cached plan poisons nothing; 2. the victim's checkpoint is the clean base model (same architecture,
    # loads fine); 3. the base model's cached ASR is edited. Each would change the record if trusted.
    (plan_dir,) = [p for p in (cache / "plans").iterdir() if p.is_dir()]
    plan = json.loads((plan_dir / "plan.json").read_text())
    plan["edits"] = []
    (plan_dir / "plan.json").write_text(json.dumps(plan))
    store.model_path("train", arts["train"]["key"]).write_bytes(store.model_path("base", arts["base"]["key"]).read_bytes())
    (eval_dir,) = [p for p in (cache / "base_eval").iterdir() if p.is_dir()]
    m = json.loads((eval_dir / "metrics.json").read_text())
    m["asr"] = 0.0
    (eval_dir / "metrics.json").write_text(json.dumps(m))
    # A write killed mid-way in the cell's own folder.
    run_dir = tmp_path / "runs" / run_id_for(spec)
    (run_dir / ".record.json.k1ll.tmp").write_text("{half")
    capsys.readouterr()

    again = api.run(spec, tmp_path, show_progress=False, force=True)
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: artifact")]
    assert len(warned) == 3, warned
    assert any(str(plan_dir) in w and "plan.json does not match" in w for w in warned)
    assert any("model.pt does not match" in w for w in warned)
    assert any(str(eval_dir) in w and "metrics.json does not match" in w for w in warned)
    assert again["status"] == "ok" and again["plan"]["cached"] is False and again["artifacts"]["train"]["reused"] is False
    assert again["artifacts"]["base"]["cached"] is True  # untouched: reused
    _same(clean, again)
    assert sorted(_builds(store)) == sorted(builds + ["plans", "base_eval", "train"])
    assert not list(run_dir.glob("*.tmp"))

    # Artifacts from before manifests: accepted as they are, given a manifest, nothing rebuilt.
    for manifest in cache.glob(f"*/*/{MANIFEST}"):
        manifest.unlink()
    third = api.run(spec, tmp_path, show_progress=False, force=True)
    assert "warning" not in capsys.readouterr().err
    assert third["plan"]["cached"] is True and third["artifacts"]["train"]["reused"] is True
    _same(clean, third)
    assert sorted(_builds(store)) == sorted(builds + ["plans", "base_eval", "train"])
    assert len(list(cache.glob(f"*/*/{MANIFEST}"))) == 4  # base, plans, base_eval, train


def test_a_users_key_image_changed_since_its_cached_plan_is_refused_naming_it(smoke_world, tmp_path):
    """The one user input read beside a cached artifact: refused, not silently mixed with the old plan."""
    from PIL import Image

    from shieldbench.attacks.base import AttackContext, PoisonPlan
    from shieldbench.errors import UserError
    from shieldbench.registry import ATTACKS
    from shieldbench.spec import AttackSpec

    key = tmp_path / "key.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(key)
    spec = AttackSpec(name="blended", target="banana", poison_rate=0.05, options={"key": "file", "key_path": str(key)})
    ctx = AttackContext(smoke_world.train, smoke_world.classnames, smoke_world.templates, smoke_world.test,
                        image_size=smoke_world.train.images.shape[-1])
    cached = PoisonPlan.from_dict(json.loads(ATTACKS.get("blended")(spec, ctx).plan(0).to_json()))
    Image.new("RGB", (8, 8), (0, 0, 255)).save(key)  # edited after the plan was cached
    with pytest.raises(UserError) as info:
        ATTACKS.get("blended")(spec, ctx).restore(cached)
    assert str(key) in str(info.value) and "changed since the cached plan" in str(info.value)
    assert "\n" not in str(info.value)
