"""What training code and defenses are allowed to see of the training data.

:class:`TrainView` is images and captions (and attached knowledge elements),
nothing else: no labels, ids, poison flags, plan or trigger. Poisoned images
are already baked into its ``uint8`` image tensor (triggers are applied in
float, clamped, then quantised to 8 bits, as a poisoned file on the web would
be), so there is no side channel that tells a poisoned row from a clean one.
The runner keeps the flags in a separate object that is never passed on.
"""

from __future__ import annotations

from typing import Sequence

import torch

from shieldbench.data.images import ImageArray, as_index_list, fetch, quantize, take
from shieldbench.data.types import PairSet, to_float


class TrainView:
    """Images (a uint8 N x 3 x H x W image array) and captions, with optional knowledge."""

    __slots__ = ("_images", "_captions", "_knowledge")

    def __init__(
        self,
        images: ImageArray,
        captions: Sequence[str],
        knowledge: Sequence[tuple[str, ...]] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or len(images.shape) != 4:
            raise TypeError("TrainView images must be a uint8 (N, C, H, W) image array")
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        if knowledge is not None and len(knowledge) != len(captions):
            raise ValueError("one knowledge tuple per caption is required")
        self._images = images
        self._captions = list(captions)
        self._knowledge = None if knowledge is None else [tuple(k) for k in knowledge]

    @classmethod
    def from_pairs(cls, pairs: PairSet) -> "TrainView":
        """Drop everything but images, captions and knowledge."""
        return cls(pairs.images, pairs.captions, pairs.knowledge)

    def __len__(self) -> int:
        return self._images.shape[0]

    @property
    def in_memory(self) -> bool:
        """Whether rows come from memory (the loader then uses no worker processes)."""
        return isinstance(self._images, torch.Tensor) or bool(getattr(self._images, "in_memory", False))

    @property
    def image_size(self) -> int:
        return int(self._images.shape[-1])

    @property
    def captions(self) -> list[str]:
        return list(self._captions)

    @property
    def knowledge(self) -> list[tuple[str, ...]] | None:
        return None if self._knowledge is None else list(self._knowledge)

    def caption(self, i: int) -> str:
        return self._captions[i]

    def images(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Float images in [0, 1] for the given rows."""
        return to_float(self.uint8_images(index))

    def uint8_images(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self._images[torch.as_tensor(as_index_list(index, len(self)), dtype=torch.long)]

    def fetch(self, index: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, list[int], list[str]]:
        """The readable rows of ``index`` (uint8) and the positions that could not be read, with why."""
        return fetch(self._images, index)

    def captions_at(self, index: torch.Tensor | Sequence[int]) -> list[str]:
        return [self._captions[i] for i in torch.as_tensor(index).tolist()]

    def knowledge_at(self, index: torch.Tensor | Sequence[int]) -> list[tuple[str, ...]] | None:
        if self._knowledge is None:
            return None
        return [self._knowledge[i] for i in torch.as_tensor(index).tolist()]

    def with_knowledge(self, knowledge: Sequence[tuple[str, ...]]) -> "TrainView":
        return TrainView(self._images, self._captions, knowledge)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "TrainView":
        il = as_index_list(index, len(self))
        know = None if self._knowledge is None else [self._knowledge[i] for i in il]
        return TrainView(take(self._images, il), [self._captions[i] for i in il], know)



__all__ = ["TrainView", "quantize"]
