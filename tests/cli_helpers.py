"""Running the installed ``shieldbench`` command in tests, and checking one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

EXE = shutil.which("shieldbench")
needs_cli = pytest.mark.skipif(EXE is None, reason="shieldbench is not installed (pip install -e .)")


def sb(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user error (exit code 2, no traceback)."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]
