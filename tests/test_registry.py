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


# -- --plugin: a module name from the working directory or a .py file; every failure one line ----------
PLUGIN = '''
from shieldbench.defenses.base import Defense
from shieldbench.registry import register_defense


@register_defense("{name}")
class MyDefense(Defense):
    """A do-nothing defense registered by a plugin file."""
'''


def test_plugin_from_a_py_file_and_from_a_module_in_the_working_directory(tmp_path, monkeypatch):
    from shieldbench.registry import load_plugin

    (tmp_path / "file_plugin.py").write_text(PLUGIN.format(name="from_file"))
    load_plugin(str(tmp_path / "file_plugin.py"))
    load_plugin(str(tmp_path / "file_plugin.py"))  # a second import (a grid worker's) is a no-op
    assert DEFENSES.get("from_file").__name__ == "MyDefense"
    (tmp_path / "cwd_plugin.py").write_text(PLUGIN.format(name="from_cwd"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    load_plugin("cwd_plugin")
    assert "from_cwd" in DEFENSES


@pytest.mark.parametrize("source, needle", [
    ("raise RuntimeError('no licence key')", "RuntimeError: no licence key"),
    ("def broken(:\n", "SyntaxError"),
    ("import a_module_that_does_not_exist", "ModuleNotFoundError"),
    ("from shieldbench.registry import register_defense\n@register_defense('not_a_defense')\nclass X:\n    pass\n",
     "is not a subclass of shieldbench.defenses.base.Defense"),
])
def test_plugin_failures_are_one_line(tmp_path, source, needle):
    from shieldbench.registry import load_plugin

    path = tmp_path / "bad_plugin.py"
    path.write_text(source)
    with pytest.raises(UserError) as info:
        load_plugin(str(path))
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert "not_a_defense" not in DEFENSES


@pytest.mark.parametrize("target, needle", [("", "give a module name"), ("nowhere/missing.py", "plugin file not found"),
                                            ("no_such_plugin_module", "ModuleNotFoundError")])
def test_plugin_bad_targets(target, needle):
    from shieldbench.registry import load_plugin

    with pytest.raises(UserError, match=needle):
        load_plugin(target)


def test_an_entry_that_is_not_an_attack_is_refused_on_lookup():
    reg = Registry("attacks", base="shieldbench.attacks.base:Attack")
    reg.add("lazy", "collections:OrderedDict")
    with pytest.raises(UserError, match="is not a subclass of shieldbench.attacks.base.Attack"):
        reg.get("lazy")
