"""BadNets (Gu et al., 2017) as used against CLIP (Carlini & Terzis; CleanCLIP).

Dirty-label: ``n`` random pairs get a patch stamped on the image,
``x' = (1-m) x + m p``, and a caption naming the target class. Options:

- ``pattern``: ``noise`` (one seeded uniform-noise patch, the default),
  ``grid`` (Huang et al.: ones at even rows and columns), ``checkerboard``
  (Semantic Shield), ``cleanclip`` (CleanCLIP's per-image patch: the image's
  per-channel mean + N(0,1) noise, resampled for every image, i.e. a family of
  triggers);
- ``location``: ``corner`` (bottom-right, fixed) or ``random`` (uniform per
  image at train and test time, as in CleanCLIP);
- ``size``: the patch side in pixels, or 0 for ``round(size_fraction * H)``
  with ``size_fraction`` = 16/224 (a 16-pixel patch on 224-pixel images),
  never below ``min_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from shieldbench.attacks import triggers as T
from shieldbench.attacks.base import Attack, PoisonEdit, PoisonPlan
from shieldbench.registry import register_attack
from shieldbench.spec import param


@register_attack("badnets")
class BadNets(Attack):
    """Patch trigger + target caption (Gu et al. 2017; CLIP: Carlini & Terzis 2022)."""

    threat_model: ClassVar[str] = "dirty_label"
    paper: ClassVar[str] = "Gu et al., BadNets, 2017; Carlini & Terzis, ICLR 2022"

    @dataclass(frozen=True)
    class Params:
        pattern: str = param("noise", "patch pattern", choices=("noise", "grid", "checkerboard", "cleanclip"))
        location: str = param("corner", "bottom-right corner, or uniformly random per image", choices=("corner", "random"))
        size: int = param(0, "patch side in pixels (0 = size_fraction x image side)", lo=0, hi=1024)
        size_fraction: float = param(16 / 224, "patch side as a fraction of the image side when size = 0", lo=0, hi=1, lo_open=True)
        min_size: int = param(4, "smallest patch side when derived from size_fraction", lo=1, hi=1024)

    def patch_side(self) -> int:
        p = self.params
        side = p.size or max(p.min_size, T.patch_size_for(self.ctx.image_size, p.size_fraction))
        return min(side, self.ctx.image_size)

    def _setup_trigger(self, seed: int) -> None:
        side = self.patch_side()
        state: dict = {"size": side, "pattern": self.params.pattern, "location": self.params.location}
        if self.params.pattern in ("noise", "grid", "checkerboard"):
            g = torch.Generator().manual_seed(seed)
            state["patch"] = T.make_patch(self.params.pattern, side, 3, generator=g).tolist()
        self.trigger_state = state

    def plan(self, seed: int) -> PoisonPlan:
        self._setup_trigger(seed)
        rng = np.random.default_rng(seed)
        rows = self.pick_rows(rng, self.n_requested())
        caps = self.target_captions(len(rows), rng)
        side = self.trigger_state["size"]
        positions: list[list[int] | None] = [None] * len(rows)
        if self.params.location == "random":
            g = torch.Generator().manual_seed(seed + 1)
            positions = T.random_positions(len(rows), self.ctx.image_size, side, g).tolist()
        edits = [PoisonEdit(r, "train", r, "trigger", c, pos) for r, c, pos in zip(rows, caps, positions)]
        return self._new_plan(seed, edits)

    def apply_trigger(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        state = self.trigger_state
        side = int(state["size"])
        n = images.shape[0]
        if positions is None:
            if state["location"] == "random":
                positions = T.random_positions(n, images.shape[-1], side, generator or torch.Generator().manual_seed(0))
            else:
                positions = T.corner_positions(n, images.shape[-1], side, "bottom_right")
        if state["pattern"] == "cleanclip":
            patch = T.cleanclip_noise_patch(images, side, generator or torch.Generator().manual_seed(0))
        else:
            patch = torch.tensor(state["patch"], dtype=images.dtype)
        return T.stamp_patch(images, patch, positions.to(images.device))
