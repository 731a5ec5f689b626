"""In-memory containers for image-caption data and evaluation sets.

Images are stored as ``uint8`` tensors of shape ``(N, 3, H, W)`` so that a
world of tens of thousands of 32-pixel images fits in a few tens of MiB;
``float_images`` turns a batch into float pixels in ``[0, 1]``, which is the
space attacks and the model wrapper work in (normalisation lives in the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` (or float) images -> float32 in ``[0, 1]``."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


@dataclass
class PairSet:
    """Image-caption pairs (a training corpus or the clean subset).

    ``labels`` are class indices where the corpus has them (``-1`` for none);
    they are used by the runner and evaluator, never handed to a defense.
    ``knowledge`` holds the knowledge elements of each caption when a source
    has attached them (a tuple of short phrases per caption).
    """

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None = None
    knowledge: list[tuple[str, ...]] | None = None
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if len(self.captions) != n:
            raise ValueError(f"{n} images but {len(self.captions)} captions")
        if self.labels is not None and self.labels.shape[0] != n:
            raise ValueError(f"{n} images but {self.labels.shape[0]} labels")
        if self.knowledge is not None and len(self.knowledge) != n:
            raise ValueError(f"{n} images but {len(self.knowledge)} knowledge lists")
        if not self.ids:
            self.ids = [str(i) for i in range(n)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def float_images(self, index: torch.Tensor | Sequence[int] | slice) -> torch.Tensor:
        return to_float(self.images[index])

    def subset(self, index: Sequence[int] | torch.Tensor) -> "PairSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        il = idx.tolist()
        return PairSet(
            images=self.images[idx],
            captions=[self.captions[i] for i in il],
            labels=None if self.labels is None else self.labels[idx],
            knowledge=None if self.knowledge is None else [self.knowledge[i] for i in il],
            ids=[self.ids[i] for i in il],
        )


@dataclass
class LabelledSet:
    """A labelled image set for zero-shot classification (the test split)."""

    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class RetrievalSet:
    """Images with one or more captions each, for Recall@k and backdoor Hit@k.

    ``caption_image[j]`` is the index of the image that caption ``j`` describes;
    ``caption_labels[j]`` the class the caption names (``-1`` when unknown).
    """

    images: torch.Tensor
    image_labels: torch.Tensor
    captions: list[str]
    caption_image: torch.Tensor
    caption_labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class DatasetBundle:
    """Everything one experiment draws on, split so that no image is shared.

    - ``pretrain``: clean pairs used to train the shared clean base model
      (the stand-in for a web-pretrained CLIP);
    - ``train``: the pairs the attacker poisons and the victim fine-tunes on;
    - ``clean``: a disjoint clean subset for repair defenses (CleanCLIP);
    - ``test``: labelled images for zero-shot accuracy and ASR;
    - ``retrieval``: captioned images for Recall@k and backdoor Hit@k.
    """

    name: str
    pretrain: PairSet
    train: PairSet
    clean: PairSet
    test: LabelledSet
    retrieval: RetrievalSet
    classnames: list[str]
    templates: list[str]
