"""Files the package writes take the umask's mode, so a group can share a results folder.

``tempfile.mkstemp`` creates 0600 files, and an atomic write renames the temp
file into place, so without a chmod every record, CSV and checkpoint would be
private to its writer whatever the umask.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from shieldbench.fileio import atomic_write_json, atomic_write_text
from shieldbench.knowledge.base import KnowledgeCache, KnowledgeRecord
from shieldbench.locks import note_build
from shieldbench.training.checkpoint import atomic_torch_save


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda m: os.umask(m)
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_writer_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_text(tmp_path / "runs.csv", "a,b\n")
    atomic_write_json(tmp_path / "record.json", {"status": "ok"})
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    note_build(tmp_path / "builds.jsonl", "train", "k")
    KnowledgeCache(tmp_path / "ke.jsonl").add([KnowledgeRecord("a red kite", ("kite", "red"))])
    for name in ("runs.csv", "record.json", "model.pt", "builds.jsonl", "ke.jsonl"):
        assert mode(tmp_path / name) == expected, name
    # The umask is left as it was found.
    assert os.umask(mask) == mask
