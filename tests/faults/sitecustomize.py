"""Test-only fault injection into a ``shieldbench`` subprocess; tests/test_faults.py puts this folder on PYTHONPATH.

``SHIELDBENCH_TEST_KILL="GLOB@N"``: the process sends itself SIGKILL just
before its ``N``-th ``os.replace`` onto a path matching ``GLOB`` (fnmatch,
``*`` crossing folders). Every file the project writes goes through a temp
file and ``os.replace`` (:mod:`shieldbench.fileio`), so this is a kill at an
exact stage, mid-write: the temp file is complete and left behind, as a
kill (or power loss) at that instant would leave it. Nothing here is
imported by the package or by a process started without the variable.
"""

from __future__ import annotations

import fnmatch
import os
import signal

_spec = os.environ.get("SHIELDBENCH_TEST_KILL", "")
if _spec:
    _pattern, _, _nth = _spec.rpartition("@")
    _state = {"seen": 0, "nth": int(_nth)}
    _replace = os.replace

    def _killing_replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if fnmatch.fnmatch(os.fspath(dst), _pattern):
            _state["seen"] += 1
            if _state["seen"] == _state["nth"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _killing_replace
