"""Contrastive losses shared by the trainer and the defenses.

The symmetric CLIP loss is open_clip's :class:`open_clip.ClipLoss`; the
per-pair variant (needed by loss-weighting defenses) is written here because
open_clip only returns the batch mean.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

from shieldbench.training.contracts import Batch, LossOutput

_clip_loss = open_clip.ClipLoss()


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (open_clip's ClipLoss), on normalised embeddings."""
    return _clip_loss(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), logit_scale.exp())


def per_pair_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B,) per-pair symmetric loss: 0.5 * (CE_i2t[i] + CE_t2i[i]). Its mean is :func:`clip_loss`."""
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (
        F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.t(), labels, reduction="none")
    )


class ClipObjective:
    """The plain CLIP objective: what the ``none`` defense trains with."""

    def __call__(self, model, batch: Batch) -> LossOutput:
        img = model.encode_image(batch.images)
        txt = model.encode_text(batch.tokens)
        loss = clip_loss(img, txt, model.logit_scale)
        return LossOutput(loss, {"clip": float(loss.detach())})
