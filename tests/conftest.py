"""Shared test setup: offline hub, deterministic CPU threads, small fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smoke_world():
    """A tiny synthetic world shared by tests that only read it."""
    from shieldbench.data.datasets import build_dataset
    from shieldbench.spec import build_spec

    return build_dataset(build_spec("smoke").data)


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's handwritten digits written into every on-disk format (see tests/digits.py)."""
    from digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"))
