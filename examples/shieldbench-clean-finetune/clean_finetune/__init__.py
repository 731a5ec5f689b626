"""Clean fine-tuning: the "fine-tune on clean data" baseline of CleanCLIP's tables (Bansal et al., ICCV 2023).

A post-training defense: the (possibly poisoned) model is fine-tuned on the
clean subset the runner hands to ``repair`` with the plain CLIP loss only,
i.e. CleanCLIP without its in-modal term. Because it overrides only
``repair``, the runner reuses the checkpoint trained under ``none`` for the
same attack and seed and repairs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from shieldbench.plugin import ClipModel, Defense, DefenseContext, Trainer, TrainConfig, TrainView, derive_seed, param


class CleanFinetune(Defense):
    """Post-training: fine-tune on clean pairs with the CLIP loss alone (CleanCLIP's FT baseline)."""

    paper: ClassVar[str] = "Bansal et al., CleanCLIP, ICCV 2023 (fine-tuning baseline)"
    version: ClassVar[str] = "1"  # bump when a change moves the results: it is in the cache keys

    @dataclass(frozen=True)
    class Params:
        epochs: int = param(5, "fine-tuning epochs over the clean subset", lo=1, hi=10000)
        batch_size: int = param(64, "pairs per batch", lo=2, hi=65536)
        lr_scale: float = param(1.0, "learning rate as a multiple of the victim's training LR", lo=0, hi=100,
                                lo_open=True)
        warmup_steps: int = param(10, "linear warmup steps, then cosine", lo=0)

    def repair(self, model: ClipModel, clean: TrainView, ctx: DefenseContext) -> ClipModel:
        p = self.params
        config = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr_scale * ctx.train.lr,
                             weight_decay=ctx.train.weight_decay, warmup_steps=p.warmup_steps,
                             grad_clip=ctx.train.grad_clip, precision=ctx.train.precision,
                             seed=derive_seed(ctx.seed, "clean-finetune-order"))
        # The default objective is the CLIP loss; the checkpoint path lets a killed repair resume,
        # and the owner makes it resume from this repair's checkpoint only.
        result = Trainer(model, clean, config, checkpoint_path=ctx.extras.get("checkpoint_path") or None,
                         checkpoint_owner=ctx.extras.get("checkpoint_owner"), device=ctx.device,
                         description="repair (clean_finetune)", show_progress=ctx.show_progress).fit()
        ctx.extras["steps"], ctx.extras["history"] = result.steps, result.history
        return model
