"""Contrastive losses shared by the trainer and the defenses.

The symmetric CLIP loss is open_clip's :class:`open_clip.ClipLoss`; the
per-pair variant (needed by loss-weighting defenses) is written here because
open_clip only returns the batch mean.

Under ``torch.distributed`` both are *local rows against global columns*:
this rank's images against every rank's captions and this rank's captions
against every rank's images (open_clip's ``local_loss=True,
gather_with_grad=True``). The mean of the ranks' losses is then the loss of
the global batch, and DDP's averaged gradient is that of one process on the
global batch. In one process they are the plain batch losses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from shieldbench.training import distributed as D
from shieldbench.training.contracts import Batch, LossOutput

if TYPE_CHECKING:  # pragma: no cover
    import open_clip

_clip_losses: dict[tuple[int, int], "open_clip.ClipLoss"] = {}


def _open_clip_loss() -> "open_clip.ClipLoss":
    import open_clip  # here, not at the top: validating a defense's options should not load open_clip

    key = (D.rank(), D.world_size())
    if key not in _clip_losses:
        if key[1] == 1:
            _clip_losses[key] = open_clip.ClipLoss()
        else:
            _clip_losses[key] = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=key[0],
                                                   world_size=key[1])
    return _clip_losses[key]


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the (global) batch (open_clip's ClipLoss), on normalised embeddings."""
    return _open_clip_loss()(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), logit_scale.exp())


def per_pair_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B,) per-pair symmetric loss of this rank's pairs: 0.5 * (CE_i2t[i] + CE_t2i[i]).

    Its mean is :func:`clip_loss`; the negatives are the whole global batch.
    """
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    if not D.is_distributed():
        logits = logit_scale.exp() * img @ txt.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                      + F.cross_entropy(logits.t(), labels, reduction="none"))
    all_img, all_txt = D.gather(img, grad=True), D.gather(txt, grad=True)
    scale = logit_scale.exp()
    # The trainer gives every rank an equal share, so this rank's rows start at rank * B.
    labels = torch.arange(img.shape[0], device=img.device) + D.rank() * img.shape[0]
    return 0.5 * (
        F.cross_entropy(scale * img @ all_txt.t(), labels, reduction="none")
        + F.cross_entropy(scale * txt @ all_img.t(), labels, reduction="none")
    )


class ClipObjective:
    """The plain CLIP objective: what the ``none`` defense trains with."""

    def __call__(self, model, batch: Batch) -> LossOutput:
        img = model.encode_image(batch.images)
        txt = model.encode_text(batch.tokens)
        loss = clip_loss(img, txt, model.logit_scale)
        return LossOutput(loss, {"clip": float(loss.detach())})
