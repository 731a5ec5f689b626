"""Benchmark suite setup: figures printed in pytest's terminal summary.

pytest captures what a test prints, and ``--benchmark-only`` shows timing
tables, not the ratios and memory figures the benchmarks compute. A test
hands each figure to the ``figures`` fixture, which keeps it in the
benchmark's ``extra_info`` (the JSON of ``--benchmark-json``) and prints it,
under "shieldbench figures", at the end of the run:

    pytest benchmarks/ --benchmark-only
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_FIGURES: list[str] = []


@pytest.fixture
def figures(benchmark, request) -> Callable[..., None]:
    """``figures(line, **numbers)``: print ``line`` in the summary and store ``numbers`` in ``extra_info``."""

    def record(line: str, **numbers: Any) -> None:
        benchmark.extra_info.update(numbers)
        _FIGURES.append(f"{request.node.name}: {line}")

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if _FIGURES:
        terminalreporter.section("shieldbench figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
