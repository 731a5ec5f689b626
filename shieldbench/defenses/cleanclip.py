"""CleanCLIP (Bansal et al., ICCV 2023): post-training repair on clean pairs.

The (possibly poisoned) model is fine-tuned on the clean subset with

    L = l1 * L_CLIP(original image, original caption) + l2 * L_SS,
    L_SS = (L_in(image, AutoAugment(image)) + L_in(caption, EDA(caption))) / 2,

where ``L_in`` is the one-directional in-modal InfoNCE: row i is the original
sample i, the columns are the augmented views of the batch, the target is the
sample's own view (:func:`inmodal_loss`). All terms share the model's learnable
temperature (``logit_scale``, clamped at 100 by the trainer). The /2 inside
``L_SS`` is the reference code's.

Runs through the project's :class:`~shieldbench.training.trainer.Trainer`:
a *fresh* AdamW (the reference reloads the pretraining optimizer moments),
per-step warmup that really runs (the reference's schedule is one epoch off),
augmentations re-drawn for every batch from a seed derived from
``(ctx.seed, epoch, step)`` (the reference computes the EDA caption once for
the run), and resume from ``ctx.extras["checkpoint_path"]`` (a checkpoint of
``ctx.extras["checkpoint_owner"]`` only).

Learning rate: the paper's 1e-5 is for a CC3M-scale RN50 fine-tuned for ~15k
steps; a small model trained from scratch needs a larger step, so the default
is ``lr = lr_scale * ctx.train.lr`` (the LR of the victim's own training
phase). ``lr`` > 0 overrides it. See docs/baselines.md for the measurements.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from shieldbench.data.views import TrainView
from shieldbench.defenses.augment import eda_batch, make_image_augmenter
from shieldbench.defenses.base import Defense, DefenseContext
from shieldbench.models.clip import ClipModel
from shieldbench.registry import register_defense
from shieldbench.spec import derive_seed, param
from shieldbench.training import distributed as D
from shieldbench.training.contracts import Batch, LossOutput
from shieldbench.training.losses import clip_loss
from shieldbench.training.trainer import TrainConfig, Trainer


def inmodal_loss(x: torch.Tensor, x_aug: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """One-directional in-modal InfoNCE: CE over rows of ``s * norm(x) @ norm(x_aug).T``, target = diagonal.

    Each original is contrasted with its own augmented view against the other
    samples' augmented views (CleanCLIP's ``L_SS`` for one modality). Under
    ``torch.distributed`` the rows are this rank's originals and the columns
    every rank's views (the global batch), as in :func:`clip_loss`.
    """
    views = D.gather(F.normalize(x_aug, dim=-1), grad=True)
    logits = logit_scale.exp() * F.normalize(x, dim=-1) @ views.t()
    labels = torch.arange(logits.shape[0], device=logits.device) + D.rank() * logits.shape[0]
    return F.cross_entropy(logits, labels)


def tokenize_fresh(model: ClipModel, captions: list[str], device: torch.device) -> torch.Tensor:
    """Tokens of augmented captions, bypassing the model's per-caption cache (they rarely repeat)."""
    return model.tokenizer(captions).to(device, non_blocking=True)


class CleanCLIPObjective:
    """``l1 * CLIP(originals) + l2 * (in-modal image + in-modal text) / 2`` with fresh augmentations per batch."""

    def __init__(self, l1: float = 1.0, l2: float = 1.0, image_aug: str = "autoaugment", eda_alpha: float = 0.1,
                 synonyms: str = "table", seed: int = 0) -> None:
        self.l1, self.l2 = l1, l2
        self.augment_images = make_image_augmenter(image_aug)
        self.eda_alpha = eda_alpha
        self.synonyms = synonyms
        self.seed = seed

    def __call__(self, model: ClipModel, batch: Batch) -> LossOutput:
        n = batch.images.shape[0]
        seed = derive_seed(self.seed, "cleanclip-aug", batch.epoch, batch.step)
        # Views are drawn for the global batch and this rank keeps its share (see Batch).
        total = len(batch.all_captions())
        aug_images = (self.augment_images(batch.images, seed, batch.offset, total) if self.augment_images
                      else batch.images)
        aug_caps = eda_batch(batch.all_captions(), random.Random(seed), self.eda_alpha, True,
                             self.synonyms)[batch.local]
        aug_tokens = tokenize_fresh(model, aug_caps, batch.tokens.device)
        img_all = model.encode_image(torch.cat([batch.images, aug_images]))
        txt_all = model.encode_text(torch.cat([batch.tokens, aug_tokens]))
        img, img_aug = img_all[:n], img_all[n:]
        txt, txt_aug = txt_all[:n], txt_all[n:]
        scale = model.logit_scale
        l_clip = clip_loss(img, txt, scale)
        l_img = inmodal_loss(img, img_aug, scale)
        l_txt = inmodal_loss(txt, txt_aug, scale)
        l_ss = 0.5 * (l_img + l_txt)
        loss = self.l1 * l_clip + self.l2 * l_ss
        return LossOutput(loss, {"clip": float(l_clip.detach()), "inmodal_image": float(l_img.detach()),
                                 "inmodal_text": float(l_txt.detach())})


@register_defense("cleanclip")
class CleanCLIP(Defense):
    """Post-training: fine-tune on clean pairs with CLIP + in-modal self-supervised loss (Bansal et al. 2023)."""

    paper: ClassVar[str] = "Bansal et al., CleanCLIP, ICCV 2023"
    version: ClassVar[str] = "2"  # 2: image_aug=simclr is RoCLIP's reference view (jitter 0.5, blur)

    @dataclass(frozen=True)
    class Params:
        l1: float = param(1.0, "weight of the CLIP (cross-modal) loss", lo=0)
        l2: float = param(1.0, "weight of the in-modal self-supervised loss (higher: lower ASR, some CA)", lo=0)
        epochs: int = param(10, "fine-tuning epochs over the clean subset (paper: 10)", lo=1, hi=10000)
        batch_size: int = param(64, "pairs per batch (each also contributes its augmented views)", lo=2, hi=65536)
        lr: float = param(0.0, "learning rate; 0 = lr_scale x the victim's training LR (train.lr)", lo=0, hi=1)
        lr_scale: float = param(1.0, "LR as a multiple of train.lr when lr = 0", lo=0, hi=100, lo_open=True)
        warmup_steps: int = param(10, "linear warmup steps (per optimisation step, then cosine)", lo=0)
        weight_decay: float = param(0.1, "AdamW weight decay (CleanCLIP: 0.1)", lo=0, hi=10)
        image_aug: str = param("autoaugment", "image view for the in-modal loss", choices=("autoaugment", "simclr", "none"))
        eda_alpha: float = param(0.1, "EDA strength (fraction of words edited, at least one)", lo=0, hi=1)
        synonyms: str = param("table", "EDA synonym source (wordnet needs nltk + corpus)", choices=("table", "wordnet", "auto"))

    def learning_rate(self, ctx: DefenseContext) -> float:
        return self.params.lr if self.params.lr > 0 else self.params.lr_scale * ctx.train.lr

    def train_config(self, ctx: DefenseContext) -> TrainConfig:
        p = self.params
        return TrainConfig(
            epochs=p.epochs, batch_size=p.batch_size, lr=self.learning_rate(ctx), weight_decay=p.weight_decay,
            warmup_steps=p.warmup_steps, min_lr_ratio=0.0, grad_clip=ctx.train.grad_clip,
            precision=ctx.train.precision, seed=derive_seed(ctx.seed, "cleanclip-order"),
        )

    def make_objective(self, ctx: DefenseContext) -> CleanCLIPObjective:
        p = self.params
        return CleanCLIPObjective(p.l1, p.l2, p.image_aug, p.eda_alpha, p.synonyms,
                                  seed=derive_seed(ctx.seed, "cleanclip"))

    def repair(self, model: ClipModel, clean: TrainView, ctx: DefenseContext) -> ClipModel:
        trainer = Trainer(
            model, clean, self.train_config(ctx), objective=self.make_objective(ctx),
            checkpoint_path=ctx.extras.get("checkpoint_path") or None,
            checkpoint_owner=ctx.extras.get("checkpoint_owner"), device=ctx.device,
            description="repair (cleanclip)", show_progress=ctx.show_progress,
        )
        result = trainer.fit()
        ctx.extras["steps"] = result.steps
        ctx.extras["history"] = result.history
        ctx.extras["lr"] = trainer.config.lr
        return model
