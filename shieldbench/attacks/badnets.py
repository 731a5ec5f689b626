"""BadNets (Gu et al., 2017) as used against CLIP (Carlini & Terzis; CleanCLIP).

Dirty-label: ``n`` random pairs get a patch stamped on the image,
``x' = (1-m) x + m p``, and a caption naming the target class. Options:

- ``pattern``: ``noise`` (one seeded uniform-noise patch, the default),
  ``grid`` (Huang et al.: ones at even rows and columns), ``checkerboard``
  (dense, 1-pixel cells), ``sparse_checkerboard`` (Semantic Shield's released
  trigger: black with 2 white pixels per 8x8 cell), ``cleanclip`` (CleanCLIP's per-image patch: the image's
  per-channel mean + N(0,1) noise, resampled for every image, i.e. a family of
  triggers);
- ``location``: ``corner`` (bottom-right, fixed) or ``random`` (uniform per
  image, as in CleanCLIP), for the training poisons;
- ``test_location``: where the patch goes on test images: ``same`` (default,
  as ``location``), ``corner`` or ``random`` (the CLIP papers stamp at a random
  location in training and a random or fixed one at test time);
- ``size``: the patch side in pixels, or 0 for ``round(size_fraction * H)``
  with ``size_fraction`` = 16/224 (a 16-pixel patch on 224-pixel images),
  never below ``min_size``.

``mix=append`` appends triggered copies instead of replacing the rows.
Differences from the reference code: CleanCLIP does not clip the patched image
before converting it to 8 bits (here every trigger is clamped, then quantised);
its patch is the per-image ``cleanclip`` family, offered as an option but not
the default, since Gu et al.'s BadNets uses one fixed pattern.
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
        pattern: str = param("noise", "patch pattern", choices=("noise", "grid", "checkerboard", "sparse_checkerboard", "cleanclip"))
        location: str = param("corner", "bottom-right corner, or uniformly random per image", choices=("corner", "random"))
        size: int = param(0, "patch side in pixels (0 = size_fraction x image side)", lo=0, hi=1024)
        size_fraction: float = param(16 / 224, "patch side as a fraction of the image side when size = 0", lo=0, hi=1, lo_open=True)
        min_size: int = param(4, "smallest patch side when derived from size_fraction", lo=1, hi=1024)
        test_location: str = param("same", "patch location on test images: same as location, corner or random",
                                   choices=("same", "corner", "random"))

    def patch_side(self) -> int:
        p = self.params
        side = p.size or max(p.min_size, T.patch_size_for(self.ctx.image_size, p.size_fraction))
        return min(side, self.ctx.image_size)

    def _setup_trigger(self, seed: int) -> None:
        side = self.patch_side()
        state: dict = {"size": side, "pattern": self.params.pattern, "location": self.params.location}
        if self.params.test_location != "same":
            state["test_location"] = self.params.test_location
        if self.params.pattern in ("noise", "grid", "checkerboard", "sparse_checkerboard"):
            g = torch.Generator().manual_seed(seed)
            state["patch"] = T.make_patch(self.params.pattern, side, 3, generator=g).tolist()
        self.trigger_state = state

    def plan(self, seed: int) -> PoisonPlan:
        self._setup_trigger(seed)
        rng = np.random.default_rng(seed)
        rows = self.pick_rows(rng, self.n_requested())
        caps = self.target_captions(len(rows), rng)
        positions = self._train_positions(len(rows), seed)
        append = self.mix == "append"
        edits = [PoisonEdit(None if append else r, "train", r, "trigger", c, pos) for r, c, pos in zip(rows, caps, positions)]
        return self._new_plan(seed, edits)

    def _train_positions(self, n: int, seed: int) -> list[list[int] | None]:
        """Per-poison patch positions for the plan (None: the fixed corner, decided at apply time).

        Explicit positions are stored when the location is random, or when test
        images use another location than the training poisons.
        """
        side = self.trigger_state["size"]
        if self.params.location == "random":
            g = torch.Generator().manual_seed(seed + 1)
            return T.random_positions(n, self.ctx.image_size, side, g).tolist()
        if self.params.test_location != "same":
            return T.corner_positions(n, self.ctx.image_size, side, "bottom_right").tolist()
        return [None] * n

    def apply_trigger(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        state = self.trigger_state
        side = int(state["size"])
        n = images.shape[0]
        if positions is None:  # test images (training poisons carry their positions when they differ)
            if state.get("test_location", state["location"]) == "random":
                positions = T.random_positions(n, images.shape[-1], side, generator or torch.Generator().manual_seed(0))
            else:
                positions = T.corner_positions(n, images.shape[-1], side, "bottom_right")
        if state["pattern"] == "cleanclip":
            patch = T.cleanclip_noise_patch(images, side, generator or torch.Generator().manual_seed(0))
        else:
            patch = torch.tensor(state["patch"], dtype=images.dtype)
        return T.stamp_patch(images, patch, positions.to(images.device))
