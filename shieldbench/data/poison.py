"""A poison plan as an overlay on a source: poisoned rows are made per index, never stored.

:class:`PoisonOverlay` is an image array (see :mod:`shieldbench.data.images`)
over a clean corpus. A row the plan does not touch is the corpus' own row,
read on demand. A row the plan touches is produced when it is read (in the
loader worker): its source image (a corpus row or a held-out target image) is
turned into float ``[0, 1]``, transformed (``trigger``, ``noise``, ``none``),
clamped and quantised to 8 bits. Each row's randomness comes from its own
generator, seeded by the plan seed and the row, so a row is the same image
whichever worker reads it, in whatever order, on every epoch.

Appended rows (``mix=append``) are placed at seeded random positions of the
overlay's index space rather than at its tail, so a defense cannot find them
by position. The state is a few arrays the size of the plan: a corpus of
millions with 1,500 poisons costs 1,500 rows of state, not a copy. Source
images an attack cannot produce per index (PGD-hardened images) are passed
in pre-computed as ``uint8`` ``sources`` for those edits only; the transform
is still applied per row on top of them.

The overlay knows nothing of attacks: it receives the transforms as
callables ``(float images (1, C, H, W), generator, positions | None) ->
float images``. Positions, sources and captions come from the plan's edits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from shieldbench.data.images import BadImage, ImageArray, LazyImages, as_index_list, quantize
from shieldbench.data.images import fetch as fetch_rows
from shieldbench.data.types import to_float

Transform = Callable[[torch.Tensor, torch.Generator, "torch.Tensor | None"], torch.Tensor]

TRANSFORMS = ("trigger", "noise", "none")


def row_seed(seed: int, row: int) -> int:
    """The per-row generator seed: independent of read order and worker."""
    h = hashlib.sha256(f"shieldbench.poison:{seed}:{row}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class OverlayEdit:
    """One planned row, in the corpus' index space (``row=None``: appended)."""

    row: int | None
    source: str  # "train" | "pool"
    source_index: int
    transform: str  # one of TRANSFORMS
    position: Sequence[int] | None = None


def appended_positions(n_base: int, n_appended: int, seed: int) -> np.ndarray:
    """Sorted overlay positions of the appended rows: a seeded draw from ``range(n_base + n_appended)``."""
    if n_appended == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(row_seed(seed, -1))
    return np.sort(rng.choice(n_base + n_appended, size=n_appended, replace=False)).astype(np.int64)


class PoisonOverlay(LazyImages):
    """The corpus' images with the plan applied row by row (see the module docstring)."""

    def __init__(
        self,
        base: ImageArray,
        edits: Sequence[OverlayEdit],
        transforms: Mapping[str, Transform],
        seed: int,
        pool: ImageArray | None = None,
        sources: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        self._base = base
        self._pool = pool
        self._transforms = dict(transforms)
        self._seed = int(seed)
        self.image_size = int(base.shape[-1])
        self.in_memory = all(isinstance(a, torch.Tensor) or getattr(a, "in_memory", False)
                             for a in (base, pool) if a is not None)
        n_base = int(base.shape[0])
        appended = [e for e in edits if e.row is None]
        self._n = n_base + len(appended)
        # Where the appended rows sit, and the overlay index of every base row.
        self._appended_at = appended_positions(n_base, len(appended), seed)
        self._n_before = self._appended_at - np.arange(len(appended))  # base rows before each appended row
        rows = np.empty(len(edits), dtype=np.int64)
        j = 0
        for k, e in enumerate(edits):
            if e.row is None:
                rows[k] = self._appended_at[j]
                j += 1
            else:
                rows[k] = self.overlay_row(int(e.row))
        self._plan_rows = rows  # overlay row of each edit, in the plan's order
        order = np.argsort(rows)
        self._rows = rows[order]
        self._edits = [edits[k] for k in order]
        sources = dict(sources or {})
        self._sources = {int(rows[k]): sources[k] for k in range(len(edits)) if k in sources}
        for e in self._edits:
            if e.transform not in TRANSFORMS:
                raise ValueError(f"unknown transform {e.transform!r}")
            if e.source == "pool" and pool is None:
                raise ValueError("plan uses the target pool but none was given")

    # -- index space ------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def overlay_row(self, base_row: int) -> int:
        """Overlay index of corpus row ``base_row``."""
        return base_row + int(np.searchsorted(self._n_before, base_row, side="right"))

    def edited_rows(self) -> np.ndarray:
        """Overlay index of each edit, in the order the edits were given (the plan's)."""
        return self._plan_rows.copy()

    def source_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """For every overlay row: the corpus row it shows (-1 for appended rows), and the appended mask."""
        appended = np.zeros(self._n, dtype=bool)
        appended[self._appended_at] = True
        base = np.full(self._n, -1, dtype=np.int64)
        base[~appended] = np.arange(self._n - len(self._appended_at))
        return base, appended

    def _edit_at(self, i: int) -> OverlayEdit | None:
        k = int(np.searchsorted(self._rows, i))
        if k < len(self._rows) and self._rows[k] == i:
            return self._edits[k]
        return None

    def base_row(self, i: int) -> int:
        """Corpus row that overlay row ``i`` shows (for a non-appended row)."""
        return i - int(np.searchsorted(self._appended_at, i, side="right"))

    # -- reading ----------------------------------------------------------------------
    def load(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} images")
        edit = self._edit_at(i)
        if edit is None:
            return self._base[self.base_row(i)]
        if i in self._sources:
            x = to_float(self._sources[i].unsqueeze(0))
        else:
            src = self._pool if edit.source == "pool" else self._base
            x = to_float(src[int(edit.source_index)].unsqueeze(0))
        if edit.transform != "none":
            g = torch.Generator().manual_seed(row_seed(self._seed, i))
            pos = None if edit.position is None else torch.tensor([list(edit.position)], dtype=torch.long)
            x = self._transforms[edit.transform](x, g, pos)
        return quantize(x)[0]

    def fetch(self, index: Any) -> tuple[torch.Tensor, list[int], list[str]]:
        """Untouched rows in one read of the corpus; planned rows one by one."""
        rows = np.asarray(as_index_list(index, self._n), dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self._n):
            raise IndexError(f"index out of range for {self._n} images")
        k = np.searchsorted(self._rows, rows)
        edited = (k < len(self._rows)) & (self._rows[np.minimum(k, len(self._rows) - 1)] == rows) if len(self._rows) else np.zeros(len(rows), bool)
        plain_pos = np.nonzero(~edited)[0]
        base_rows = rows[plain_pos] - np.searchsorted(self._appended_at, rows[plain_pos], side="right")
        s = self.image_size
        out = torch.empty((len(rows), 3, s, s), dtype=torch.uint8)
        ok = np.ones(len(rows), dtype=bool)
        failed: list[int] = []
        why: list[str] = []
        if plain_pos.size:
            imgs, bad, msgs = fetch_rows(self._base, base_rows)
            good = np.delete(plain_pos, bad)
            out[torch.as_tensor(good)] = imgs
            ok[plain_pos[bad]] = False
            failed += plain_pos[bad].tolist()
            why += msgs
        for pos in np.nonzero(edited)[0].tolist():
            try:
                out[pos] = self.load(int(rows[pos]))
            except BadImage as exc:
                ok[pos] = False
                failed.append(pos)
                why.append(str(exc))
        order = np.argsort(failed, kind="stable")
        return out[torch.as_tensor(ok)], [failed[j] for j in order], [why[j] for j in order]

    def describe(self, i: int) -> str:
        edit = self._edit_at(i)
        if edit is None:
            j = self.base_row(i)
            return self._base.describe(j) if isinstance(self._base, LazyImages) else f"row {j}"
        src = self._pool if edit.source == "pool" else self._base
        return src.describe(edit.source_index) if isinstance(src, LazyImages) else f"row {edit.source_index}"


__all__ = ["OverlayEdit", "PoisonOverlay", "TRANSFORMS", "appended_positions", "quantize", "row_seed"]
