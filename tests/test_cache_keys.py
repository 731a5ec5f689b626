"""Cache keys change with every input that changes an artifact: code versions, file contents, the data."""

from __future__ import annotations

import pytest

from shieldbench import api
from shieldbench.benchmark import keys as K
from shieldbench.registry import ATTACKS, DEFENSES


def _spec(**kw):
    return api.make_spec(preset="smoke", **kw)


def test_plugin_versions_enter_the_keys(monkeypatch):
    spec = _spec(attack="badnets", defense="semantic_shield")
    plan, train = K.plan_key(spec), K.train_key(spec, True)
    base, none_train = K.base_key(spec), K.train_key(spec, False)
    monkeypatch.setattr(ATTACKS.get("badnets"), "version", "999")
    assert K.plan_key(spec) != plan and K.train_key(spec, True) != train
    assert K.base_key(spec) == base  # the clean base model does not depend on the attack
    monkeypatch.undo()
    monkeypatch.setattr(DEFENSES.get("semantic_shield"), "version", "999")
    assert K.train_key(spec, True) != train  # a training defense's checkpoint follows its code
    assert K.train_key(spec, False) == none_train  # the `none` checkpoint a repair defense reuses does not
    assert K.plan_key(spec) == plan


def test_package_version_enters_the_keys(monkeypatch):
    spec = _spec()
    before = (K.base_key(spec), K.plan_key(spec), K.train_key(spec, False), K.base_eval_key(spec, "h"))
    monkeypatch.setattr(K, "package_versions", lambda: {"shieldbench": "9.9", "torch": "x", "open_clip_torch": "y"})
    after = (K.base_key(spec), K.plan_key(spec), K.train_key(spec, False), K.base_eval_key(spec, "h"))
    assert all(a != b for a, b in zip(before, after))


def test_files_are_keyed_by_content_not_path(tmp_path):
    key = tmp_path / "key.png"
    key.write_bytes(b"one")
    spec = _spec(attack="blended", overrides=["attack.key=file", f"attack.key_path={key}"])
    first = K.plan_key(spec)
    key.write_bytes(b"two, a different image")
    assert K.plan_key(spec) != first
    copy = tmp_path / "copy.png"
    copy.write_bytes(b"two, a different image")
    assert K.file_digest(str(copy)) == K.file_digest(str(key))


def test_local_weights_are_keyed_by_content(tmp_path):
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights v1")
    spec = _spec(overrides=[f"model.pretrained={w}"])
    first = K.base_key(spec)
    w.write_bytes(b"weights v2, retrained")
    assert K.base_key(spec) != first


def test_base_eval_key_follows_the_test_split():
    a = _spec()
    b = _spec(overrides=["data.n_test_per_class=5"])
    assert K.base_eval_key(a, "h") != K.base_eval_key(b, "h")


@pytest.mark.parametrize("override", ["runtime.workers=2", "runtime.checkpoint_every=10", "runtime.fused_adamw=false",
                                      "runtime.channels_last=true", "runtime.grad_checkpointing=true",
                                      "runtime.compile=true"])
def test_runtime_settings_are_in_no_key(override):
    a, b = _spec(), _spec(overrides=[override])
    assert a.hash() == b.hash()
    assert K.train_key(a, False) == K.train_key(b, False) and K.plan_key(a) == K.plan_key(b)
