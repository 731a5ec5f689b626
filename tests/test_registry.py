"""Registry: decorator, lazy entries, entry points, did-you-mean errors."""

from __future__ import annotations

import pytest

from shieldbench.errors import UserError
from shieldbench.registry import ATTACKS, DEFENSES, Registry


def test_decorator_and_lookup():
    reg = Registry("widgets")

    @reg.register("alpha")
    class Alpha:
        pass

    assert reg.get("alpha") is Alpha
    assert reg.names() == ["alpha"]
    assert "alpha" in reg and "beta" not in reg


def test_duplicate_name_rejected():
    reg = Registry("widgets")
    reg.add("a", object())
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", object())


def test_lazy_entry_imported_on_first_use():
    reg = Registry("widgets")
    reg.add("joiner", "os.path:join")
    import os.path

    assert reg.get("joiner") is os.path.join


def test_lazy_entry_that_does_not_import_is_a_user_error():
    reg = Registry("widgets")
    reg.add("broken", "no_such_module_xyz:thing")
    with pytest.raises(UserError, match="no_such_module_xyz"):
        reg.get("broken")


def test_unknown_name_lists_registered_and_suggests():
    with pytest.raises(UserError) as exc:
        ATTACKS.get("badnet")
    msg = str(exc.value)
    assert "Did you mean 'badnets'" in msg
    assert "none" in msg and "badnets" in msg
    assert "\n" not in msg


def test_builtins_are_registered():
    assert {"none", "badnets"} <= set(ATTACKS.names())
    assert "none" in DEFENSES.names()


def test_datasets_list_the_options_they_read():
    from shieldbench import api

    rows = {r["name"]: r for r in api.list_plugins("datasets", verbose=True)}
    assert {"synthetic", "csv", "webdataset", "coco", "flickr30k"} <= set(rows)
    assert "data.csv_img_key" in rows["csv"]["options"] and "data.path" not in rows["synthetic"]["options"]
    assert "eval.retrieval_path" in rows["webdataset"]["options"] and "eval.retrieval_path" not in rows["coco"]["options"]
