"""The CLI answers listing and name errors without importing torch or open_clip; list -v shows the preset's defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shieldbench.builtins import BUILTIN_METADATA
from shieldbench.registry import KINDS

PROBE = r"""
import sys
from typer.testing import CliRunner
from shieldbench.cli import app
r = CliRunner()
codes = []
for args in (["list", "attacks"], ["list", "defenses"], ["list", "models"], ["list", "datasets"],
             ["list", "knowledge"], ["run", "--preset", "nope"], ["run", "-a", "badnetz"], ["run", "-d", "nope"],
             ["list", "nope"], ["grid", "--attacks", "nope"]):
    res = r.invoke(app, args)
    codes.append((args[:2], res.exit_code, type(res.exception).__name__ if res.exception else ""))
print(codes)
print(sorted(m for m in ("torch", "open_clip", "pandas", "scipy", "transformers") if m in sys.modules))
"""


def test_listing_and_name_errors_import_no_torch():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    codes, heavy = proc.stdout.strip().splitlines()[-2:]
    assert heavy == "[]", heavy  # none of the heavy modules was imported
    assert "(['list', 'attacks'], 0" in codes and "UserError" in codes


@pytest.mark.parametrize("kind", ["attacks", "defenses", "models", "datasets", "knowledge"])
def test_declared_metadata_is_the_plugins_own(kind):
    """What `list` shows without importing equals what the imported class says."""
    reg = KINDS[kind]
    for name, meta in BUILTIN_METADATA[kind].items():
        assert reg.metadata(name, load=True) == meta, name


def test_list_verbose_shows_the_presets_effective_defaults():
    from shieldbench.api import list_plugins

    def params(preset):
        rows = {r["name"]: r for r in list_plugins("attacks", verbose=True, preset=preset)}
        return {p["name"]: p for p in rows["wanet"]["params"]}

    small, smoke = params("small"), params("smoke")
    assert small["s"]["default"] == 12.0 and small["s"]["preset"] is True
    assert smoke["s"]["default"] == 0.5 and smoke["s"]["preset"] is False
    bn = {p["name"]: p for p in {r["name"]: r for r in list_plugins("attacks", True)}["badnets"]["params"]}
    assert all(not isinstance(p["default"], float) or len(repr(p["default"])) <= 8 for p in bn.values())


def test_declared_option_schemas_are_the_plugins_own():
    """builtin_params.json (what validates option values without importing) equals each class's Params."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "write_builtin_params", Path(__file__).resolve().parents[1] / "scripts" / "write_builtin_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from shieldbench.builtins import builtin_params

    assert builtin_params() == module.current(), "run: python scripts/write_builtin_params.py"


@pytest.mark.parametrize("option, message", [
    ("defense.lambda_ke=-1", "defense.lambda_ke=-1.0 is out of range"),
    ("defense.variant=nope", "defense.variant='nope' is not allowed"),
    ("defense.nope=1", "unknown option defense.nope"),
    ("attack.size_fraction=2", "attack.size_fraction=2.0 is out of range"),
])
def test_option_errors_import_no_torch(option, message):
    """A bad option value of a built-in is answered from its declared schema: no torch, open_clip, transformers."""
    probe = r"""
import sys
from typer.testing import CliRunner
from shieldbench.cli import app
res = CliRunner().invoke(app, ["run", "-d", "semantic_shield", "--set", sys.argv[1]])
print(type(res.exception).__name__, str(res.exception)[:200])
print(sorted(m for m in ("torch", "open_clip", "transformers") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", probe, option], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    error, heavy = proc.stdout.strip().splitlines()[-2:]
    assert error.startswith("UserError") and message in error, error
    assert heavy == "[]", heavy
