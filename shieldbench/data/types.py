"""Containers for image-caption data and evaluation sets.

Images live in an *image array* (:mod:`shieldbench.data.images`): a ``uint8``
tensor of shape ``(N, 3, H, W)`` for the in-memory synthetic world, or a lazy
array that decodes rows from disk on demand for real corpora. Captions, labels
and ids are held in memory (text is small next to pixels). ``float_images``
turns a batch into float pixels in ``[0, 1]``, which is the space attacks and
the model wrapper work in (normalisation lives in the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from shieldbench.data.images import ImageArray, as_index_list, take


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

    images: ImageArray
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
        il = as_index_list(index, len(self))
        idx = torch.as_tensor(il, dtype=torch.long)
        return PairSet(
            images=take(self.images, il),
            captions=[self.captions[i] for i in il],
            labels=None if self.labels is None else self.labels[idx],
            knowledge=None if self.knowledge is None else [self.knowledge[i] for i in il],
            ids=[self.ids[i] for i in il],
        )


@dataclass
class LabelledSet:
    """A labelled image set for zero-shot classification (the test split)."""

    images: ImageArray
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

    images: ImageArray
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
      (the stand-in for a web-pretrained CLIP); None for corpora on disk,
      where the clean model is a pretrained checkpoint (or a random init);
    - ``train``: the pairs the attacker poisons and the victim trains on;
    - ``clean``: a clean subset for repair defenses (CleanCLIP);
    - ``test``: labelled images for zero-shot accuracy and ASR (None: no
      zero-shot set was given, so those metrics are not computed);
    - ``retrieval``: captioned images for Recall@k and backdoor Hit@k (None:
      not computed).

    ``classnames``/``templates`` are the target vocabulary: the zero-shot
    set's classes when there is one. ``info`` holds facts for the record
    (row counts, sources).
    """

    name: str
    pretrain: PairSet | None
    train: PairSet
    clean: PairSet
    test: LabelledSet | None
    retrieval: RetrievalSet | None
    classnames: list[str]
    templates: list[str]
    info: dict[str, Any] = field(default_factory=dict)
