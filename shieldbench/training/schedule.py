"""Learning-rate schedule and optimizer construction.

Linear warmup then cosine decay, computed per optimisation step (not per
epoch: CleanCLIP's code is one epoch off, so its warmup never runs).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def warmup_cosine(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR at ``step`` (0-based): linear ramp to ``base_lr`` over ``warmup_steps``, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = base_lr * min_lr_ratio
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def exclude_from_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip's rule: no weight decay on norms, biases, gains and the logit scale."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, with open_clip's no-decay groups.

    ``fused`` (``runtime.fused_adamw``): torch's fused kernel where the device
    has one, else torch's default implementation.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_from_decay(name, p) else decay).append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
    # CLIP's betas and eps (Radford et al.), as in open_clip's training script.
    # The fused kernel is several times faster on CPU for the large token table.
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
        except (RuntimeError, TypeError):  # older torch or unsupported device
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
