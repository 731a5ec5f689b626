"""Blended (Chen et al., 2017) as used against CLIP (CleanCLIP, Bansal et al. 2023).

Dirty-label: ``n`` random pairs get a full-size key blended into the image,
``x' = (1 - a) x + a k`` (``a = alpha``, default 0.2, the paper's value),
clamped to [0, 1], and a caption naming the target class. Default mix:
replace (``mix=append`` appends triggered copies instead). Options:

- ``key``: ``noise`` (default) -- one fixed uniform ``U[0,1)`` noise image,
  drawn from the plan seed (the plan stores only that seed, and
  :meth:`restore` regenerates the identical key); ``file`` -- a user image
  (``key_path``, e.g. the usual Hello Kitty), read with PIL, converted to RGB
  and resized bilinearly to the image size; ``cleanclip`` -- CleanCLIP's
  variant: uniform noise *resampled for every image* (at train and at test
  time), i.e. a family of triggers rather than one key.
- ``alpha``: the blend weight in [0, 1].

Differences from the reference code: CleanCLIP blends a fresh noise image per
image (offered as ``key=cleanclip``, not the default, because Chen et al.'s
attack uses one fixed key), and it does not clip before converting to 8 bits;
here every trigger is clamped to [0, 1] and then quantised, for training
poisons and test images alike. The plan records the SHA-256 of a ``file``
key, so a cached plan is never silently reused with a different image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from shieldbench.attacks import triggers as T
from shieldbench.attacks.base import Attack, PoisonEdit, PoisonPlan
from shieldbench.errors import UserError
from shieldbench.registry import register_attack
from shieldbench.spec import param


def read_key_file(path: str, size: int | tuple[int, int]) -> tuple[torch.Tensor, str]:
    """The key image (3, size, size) and the file's SHA-256; one-line UserError if unusable."""
    if not path:
        raise UserError("attack.key=file needs attack.key_path=PATH (an image file)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"attack.key_path: key image not found: {str(p)!r}")
    try:
        key = T.load_key_image(p, size)
    except UserError as exc:
        lines = str(exc.__cause__ or exc).strip().splitlines()
        reason = lines[0] if lines else "not a readable image"
        raise UserError(f"attack.key_path: cannot read key image {str(p)!r}: {reason}") from None
    return key, hashlib.sha256(p.read_bytes()).hexdigest()


@register_attack("blended")
class Blended(Attack):
    """Full-image blend x'=(1-a)x+a*k + target caption (Chen et al. 2017; CLIP: CleanCLIP)."""

    threat_model: ClassVar[str] = "dirty_label"
    paper: ClassVar[str] = "Chen et al., Targeted Backdoor Attacks ... Data Poisoning, 2017; Bansal et al., CleanCLIP, ICCV 2023"

    @dataclass(frozen=True)
    class Params:
        alpha: float = param(0.2, "blend weight a in x' = (1-a) x + a k", lo=0, hi=1)
        key: str = param("noise", "noise: one fixed seeded uniform-noise key; file: the image at key_path; "
                                  "cleanclip: uniform noise resampled per image (CleanCLIP)",
                         choices=("noise", "file", "cleanclip"))
        key_path: str = param("", "image file used as the key when key=file")

    def __init__(self, spec, ctx) -> None:
        super().__init__(spec, ctx)
        self._keys: dict[tuple[int, int], torch.Tensor] = {}
        self._file_key: torch.Tensor | None = None
        self._file_sha = ""
        if self.params.key == "file":  # fail early, before any planning
            self._file_key, self._file_sha = read_key_file(self.params.key_path, ctx.image_size)

    # -- trigger state ---------------------------------------------------------------
    def _setup_trigger(self, seed: int) -> None:
        state: dict[str, Any] = {"alpha": self.params.alpha, "key": self.params.key}
        if self.params.key == "noise":
            state["key_seed"] = int(seed)
        elif self.params.key == "file":
            state["key_path"] = self.params.key_path
            state["key_sha256"] = self._file_sha
        self.trigger_state = state
        self._keys = {}

    def restore(self, plan: PoisonPlan) -> None:
        super().restore(plan)
        self._keys = {}
        st = self.trigger_state
        if st.get("key") == "file":
            key, sha = read_key_file(st["key_path"], self.ctx.image_size)
            if st.get("key_sha256") and sha != st["key_sha256"]:
                raise UserError(f"attack.key_path: {st['key_path']!r} changed since the cached plan was made; "
                                "delete the plan cache or restore the file")
            self._file_key = key

    def key_for(self, height: int, width: int) -> torch.Tensor:
        """The fixed key (C, H, W) for ``key=noise`` / ``key=file``."""
        st = self.trigger_state
        if (height, width) in self._keys:
            return self._keys[(height, width)]
        if st["key"] == "noise":
            key = T.noise_key(3, height, width, torch.Generator().manual_seed(int(st["key_seed"])))
        elif st["key"] == "file":
            key = self._file_key
            if key is None or tuple(key.shape[-2:]) != (height, width):
                key, _ = read_key_file(st["key_path"], (height, width))
        else:
            raise ValueError("key=cleanclip has no fixed key")
        self._keys[(height, width)] = key
        return key

    # -- planning -----------------------------------------------------------------
    def plan(self, seed: int) -> PoisonPlan:
        self._setup_trigger(seed)
        rng = np.random.default_rng(seed)
        rows = self.pick_rows(rng, self.n_requested())
        caps = self.target_captions(len(rows), rng)
        append = self.mix == "append"
        edits = [PoisonEdit(None if append else r, "train", r, "trigger", c) for r, c in zip(rows, caps)]
        return self._new_plan(seed, edits)

    def apply_trigger(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        st = self.trigger_state
        n, c, h, w = images.shape
        if st["key"] == "cleanclip":
            g = generator or torch.Generator().manual_seed(0)
            key = torch.rand((n, c, h, w), generator=g, device=g.device).to(images.device, images.dtype)
        else:
            key = self.key_for(h, w)
        return T.blend(images, key, float(st["alpha"]))


__all__ = ["Blended", "read_key_file"]
