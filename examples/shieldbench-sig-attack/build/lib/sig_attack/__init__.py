"""SIG's trigger (Barni et al., ICIP 2019) as a dirty-label attack on image-caption pairs.

The trigger is a horizontal sinusoid added to every pixel row,
``x'[i, j] = clamp(x[i, j] + delta * sin(2 pi j f / W))`` (the paper's
delta = 20/255, f = 6). Barni et al. poison *clean-label* (target-class
images only, captions untouched); this example pairs the signal with a
caption naming the target (dirty-label, like BadNets and Blended here), so
``threat_model`` says ``dirty_label``. It is an example of the plugin path,
not one of the benchmark's reported attacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from shieldbench.plugin import Attack, PoisonEdit, PoisonPlan, param


class SIG(Attack):
    """Sinusoidal-signal trigger + target caption (after Barni et al. 2019; dirty-label here)."""

    threat_model: ClassVar[str] = "dirty_label"
    paper: ClassVar[str] = "Barni et al., A new backdoor attack in CNNs by training set corruption, ICIP 2019"

    @dataclass(frozen=True)
    class Params:
        delta: float = param(20 / 255, "amplitude of the signal (fraction of the pixel range)", lo=0, hi=1)
        frequency: float = param(6.0, "periods across the image width", lo=0, lo_open=True, hi=1000)

    def plan(self, seed: int) -> PoisonPlan:
        self.trigger_state = {"delta": self.params.delta, "frequency": self.params.frequency}
        rng = np.random.default_rng(seed)
        rows = self.pick_rows(rng, self.n_requested())
        captions = self.target_captions(len(rows), rng)
        edits = [PoisonEdit(r, "train", r, "trigger", c) for r, c in zip(rows, captions)]
        return self._new_plan(seed, edits)

    def apply_trigger(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        st = self.trigger_state
        w = images.shape[-1]
        j = torch.arange(w, dtype=images.dtype, device=images.device)
        signal = float(st["delta"]) * torch.sin(2 * math.pi * j * float(st["frequency"]) / w)
        return (images + signal.view(1, 1, 1, w)).clamp(0, 1)
