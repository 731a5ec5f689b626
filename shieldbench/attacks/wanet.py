"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping trigger.

Exact construction (the paper's reference code, via ``triggers.wanet_*``):

1. control grid ``ins ~ U(-1, 1)`` of shape (1, 2, k, k), ``ins /= mean(|ins|)``;
2. flow ``P`` = bicubic upsampling of ``ins`` to H x W (``align_corners=True``),
   permuted to (1, H, W, 2);
3. identity grid ``M`` from ``linspace(-1, 1)`` in the (x, y) order that
   ``grid_sample`` expects;
4. ``G = clamp((M + s * P / H) * grid_rescale, -1, 1)``;
5. ``x' = grid_sample(x, G, align_corners=True)`` (bilinear, zero padding),
   clamped to [0, 1].

Defaults are the paper's: ``k = 4``, ``s = 0.5``, ``grid_rescale = 1``. The
warp is drawn once per attack instance from the plan seed and the control
grid is stored in the plan (``plan.trigger["control"]``, nested lists), so
:meth:`restore` rebuilds the identical warp from a cached plan.

Dirty-label poisons (``poison_rate`` / ``n_poison`` of them) are warped with
``G`` and get a target caption. Noise ("cross") mode: ``cross_ratio`` times as
many *other* random pairs (paper: 2) are warped with ``G + U(-1, 1) / H``
(fresh noise per sample, pixel and coordinate, clamped) and KEEP their true
captions; they are edits with ``transform="noise"`` and are not counted or
flagged as poisons. ``cross_ratio = 0`` turns noise mode off.

``preset``: ``paper`` (default) uses ``k``, ``s`` as given. ``cleanclip``
mimics CleanCLIP's "WaNet", which sets ``k = H`` (the image side) and
``s = 1`` -- overriding ``k`` and ``s``. With one control point per pixel the
bicubic upsampling is the identity, so this is an *unsmoothed per-pixel
random jitter* of at most about one pixel, not the paper's smooth warp; it is
offered for comparison with CleanCLIP's numbers only.

Differences from reference code: WaNet's own code is followed exactly
(including dividing both coordinates' flow by the height H). Semantic
Shield's code resamples the warp per image (a different trigger for every
poison); here the warp is fixed per attack instance, as in the paper. At
32 x 32 the paper's ``s = 0.5`` moves pixels by at most ~0.25 px on average:
see docs/attacks.md for the measured effect and the small-preset overrides.
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


@register_attack("wanet")
class WaNet(Attack):
    """Smooth image warp + target caption, optional noise mode (Nguyen & Tran, ICLR 2021)."""

    threat_model: ClassVar[str] = "dirty_label"
    paper: ClassVar[str] = "Nguyen & Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021"

    @dataclass(frozen=True)
    class Params:
        k: int = param(4, "control grid side (paper: 4); ignored when preset=cleanclip", lo=1, hi=1024)
        s: float = param(0.5, "warp strength (paper: 0.5); ignored when preset=cleanclip", lo=0, hi=1000)
        grid_rescale: float = param(1.0, "grid rescale factor (paper: 1)", lo=0, hi=10, lo_open=True)
        cross_ratio: float = param(2.0, "noise-mode samples per poison, kept with their true captions (paper: 2; 0 = off)",
                                   lo=0, hi=100)
        preset: str = param("paper", "paper: k, s as given; cleanclip: k = image side, s = 1 (per-pixel jitter, "
                                     "not the smooth warp)", choices=("paper", "cleanclip"))

    def __init__(self, spec, ctx) -> None:
        super().__init__(spec, ctx)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def warp_params(self) -> tuple[int, float]:
        """``(k, s)`` after the preset."""
        if self.params.preset == "cleanclip":
            return self.ctx.image_size, 1.0
        return self.params.k, self.params.s

    # -- trigger state ---------------------------------------------------------------
    def _setup_trigger(self, seed: int) -> None:
        k, s = self.warp_params()
        control = T.wanet_control_grid(k, torch.Generator().manual_seed(seed))
        self.trigger_state = {"k": k, "s": s, "grid_rescale": self.params.grid_rescale,
                              "preset": self.params.preset, "control": control.tolist()}
        self._grids = {}

    def restore(self, plan: PoisonPlan) -> None:
        super().restore(plan)
        self._grids = {}

    def control(self) -> torch.Tensor:
        return torch.tensor(self.trigger_state["control"], dtype=torch.float32)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The fixed warping grid G, (1, H, W, 2)."""
        if (height, width) not in self._grids:
            st = self.trigger_state
            flow = T.wanet_flow_field(self.control(), height, width)
            ident = T.wanet_identity_grid(height, width)
            self._grids[(height, width)] = T.wanet_grid(ident, flow, float(st["s"]), float(st["grid_rescale"]))
        return self._grids[(height, width)]

    # -- planning -----------------------------------------------------------------
    def plan(self, seed: int) -> PoisonPlan:
        self._setup_trigger(seed)
        rng = np.random.default_rng(seed)
        n = min(self.n_requested(), len(self.ctx.train))
        n_cross = min(int(round(self.params.cross_ratio * n)), len(self.ctx.train) - n)
        chosen = rng.choice(len(self.ctx.train), size=n + n_cross, replace=False)
        rows = sorted(int(i) for i in chosen[:n])
        cross = sorted(int(i) for i in chosen[n:])
        caps = self.target_captions(len(rows), rng)
        append = self.mix == "append"
        edits = [PoisonEdit(None if append else r, "train", r, "trigger", c) for r, c in zip(rows, caps)]
        edits += [PoisonEdit(None if append else r, "train", r, "noise", None) for r in cross]
        return self._new_plan(seed, edits, n_noise_mode=len(cross))

    # -- triggers -----------------------------------------------------------------
    def apply_trigger(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        h, w = images.shape[-2:]
        return T.wanet_warp(images, self.grid(h, w))

    def apply_noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = images.shape[-2:]
        grids = T.wanet_noise_grid(self.grid(h, w), images.shape[0], h, generator)
        return T.wanet_warp(images, grids)


__all__ = ["WaNet"]
