"""Reference results (RobustBench style): committed smoke-preset records that the current code must reproduce.

``results/reference/runs/*/record.json`` were written by

    shieldbench run -a badnets  -d none            -p smoke -o results/reference
    shieldbench run -a badnets  -d semantic_shield -p smoke -o results/reference
    shieldbench run -a blended  -d cleanclip       -p smoke -o results/reference
    shieldbench run -a targeted -d roclip          -p smoke -o results/reference

(then ``rm -r results/reference/cache``). CPU runs are deterministic on this
machine, so every metric must come back identical. A change that moves a
number fails here: if the move is intended, regenerate the records with the
commands above and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shieldbench.benchmark.runner import run_cell
from shieldbench.spec import spec_from_dict

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference" / "runs"
RECORDS = sorted(REFERENCE.glob("*/record.json"))


def test_reference_records_exist():
    assert len(RECORDS) == 4


@pytest.mark.slow
def test_reference_results_reproduce(tmp_path):
    for path in RECORDS:
        ref = json.loads(path.read_text())
        spec = spec_from_dict(ref["spec"])
        assert spec.hash() == ref["spec_hash"], path  # the spec still means what it meant
        got = run_cell(spec, tmp_path, show_progress=False)
        assert got["status"] == "ok", got.get("error")
        assert got["plan"]["hash"] == ref["plan"]["hash"], path
        assert set(got["metrics"]) == set(ref["metrics"]), path
        for key, value in ref["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, abs=1e-9), f"{path.parent.name}: {key}"
