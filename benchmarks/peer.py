"""open_clip_train's own training step, side by side with shieldbench's Trainer.

The peer is open_clip_train as shipped in the open_clip wheel:
:func:`open_clip_train.train.train_one_epoch` (its loop: scheduler, autocast,
``model(images, texts)``, loss, backward, clip, AdamW step, logit-scale
clamp, its logging), :func:`open_clip.create_loss` (``ClipLoss``) and
:func:`open_clip_train.scheduler.cosine_lr`. Only the optimizer is rebuilt
here, because ``open_clip_train.main.main`` builds it inline: the same
no-decay rule and ``torch.optim.AdamW(groups, lr, betas, eps)``, which on CPU
is torch's default (single-tensor) AdamW. ``fused=True`` gives the peer the
fused kernel shieldbench uses, to separate the loop from the optimizer.

Both sides train a copy of the same initial weights on the same batches (the
same rows in the same order). The peer gets its batches ready-made (images
already normalised floats, captions already tokens), as open_clip_train's
DataLoader workers would hand them over; shieldbench's ``Trainer.fit`` does
that work itself in the loop (uint8 -> float, tokens from its cache), so the
comparison charges shieldbench for its data preparation and the peer for none.
The two are timed in one process, alternating round by round, so load from
other jobs on the machine falls on both alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator

import torch


@dataclass
class PeerResult:
    """Samples per second of each side, per round, and their paired ratios."""

    model: str
    batch_size: int
    steps_per_round: int
    shieldbench_sps: list[float] = field(default_factory=list)
    open_clip_sps: list[float] = field(default_factory=list)
    max_loss_gap: float = 0.0
    """Largest gap between the two sides' logged losses after the first round (the same computation?)."""

    @property
    def ratios(self) -> list[float]:
        return [s / o for s, o in zip(self.shieldbench_sps, self.open_clip_sps)]

    @property
    def ratio(self) -> float:
        """Median over rounds of shieldbench's / the peer's samples per second (paired by round)."""
        return statistics.median(self.ratios)

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "batch_size": self.batch_size, "steps_per_round": self.steps_per_round,
                "rounds": len(self.ratios), "shieldbench_samples_per_s": statistics.median(self.shieldbench_sps),
                "open_clip_samples_per_s": statistics.median(self.open_clip_sps), "ratio": self.ratio,
                "ratio_min": min(self.ratios), "ratio_max": max(self.ratios), "max_loss_gap": self.max_loss_gap}


class _Loader:
    """The little of open_clip_train's DataInfo/DataLoader that ``train_one_epoch`` reads."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.num_batches = len(batches)
        self.num_samples = sum(int(b[0].shape[0]) for b in batches)
        self.dataloader = self

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)


def open_clip_args(batch_size: int, lr: float, weight_decay: float, grad_clip: float, precision: str = "fp32",
                   device: str = "cpu") -> SimpleNamespace:
    """open_clip_train's parsed arguments, the fields its loop and ``create_loss`` read."""
    return SimpleNamespace(
        device=device, precision=precision, distill=False, accum_freq=1, skip_scheduler=False,
        grad_clip_norm=grad_clip if grad_clip > 0 else None, horovod=False, rank=0, local_rank=0, world_size=1,
        log_every_n_steps=100, batch_size=batch_size, wandb=False, model="", siglip=False, local_loss=False,
        gather_with_grad=False, lr=lr, wd=weight_decay, beta1=0.9, beta2=0.98, eps=1e-6,
    )


def open_clip_optimizer(model: torch.nn.Module, args: SimpleNamespace, fused: bool = False) -> torch.optim.AdamW:
    """``open_clip_train.main``'s AdamW (its no-decay rule and groups); ``fused`` only for the comparison."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": args.wd}],
                             lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, **extra)


def compare(model_name: str = "tiny-vit", image_size: int = 32, batch_size: int = 128, steps_per_round: int = 8,
            rounds: int = 6, warmup_rounds: int = 1, peer_fused: bool = False, lr: float = 5e-4,
            weight_decay: float = 0.1, grad_clip: float = 1.0, show_progress: bool = True) -> PeerResult:
    """Train the same model on the same batches with both loops, alternating; samples/s per round.

    Each round is one epoch of ``steps_per_round`` batches for each side
    (shieldbench's ``Trainer.fit`` with ``epochs=1``, open_clip_train's
    ``train_one_epoch``); the order inside a round alternates too. The
    warm-up rounds (allocator, token cache, kernels) are not counted.
    """
    import open_clip
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from shieldbench.data.synthetic import generate_pairs
    from shieldbench.data.views import TrainView
    from shieldbench.models.factory import build_model
    from shieldbench.training.trainer import TrainConfig, Trainer

    n = batch_size * steps_per_round
    images, captions, _, _ = generate_pairs(n, image_size, torch.Generator().manual_seed(0))
    view = TrainView(images, captions)
    torch.manual_seed(0)
    ours = build_model(model_name, "", image_size)
    peer = copy.deepcopy(ours.clip)
    peer.output_dict = True  # as open_clip_train creates its model (create_model_and_transforms(output_dict=True))

    total = steps_per_round * (rounds + warmup_rounds)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=0,
                      grad_clip=grad_clip, precision="fp32", seed=0, workers=0)
    # With its progress bar, as `shieldbench run` trains (the bar goes to stderr; pytest captures it).
    trainer = Trainer(ours, view, cfg, device=torch.device("cpu"), show_progress=show_progress)
    trainer.total_steps = total  # one schedule over every round, like the peer's

    # The peer's batches: the rows shieldbench's sampler yields for its epoch 0, prepared as its workers would.
    trainer.sampler.set_epoch(0)
    order = [torch.as_tensor(b) for b in trainer.sampler]
    mean, std = ours.pixel_mean.cpu(), ours.pixel_std.cpu()
    batches = [((images[i].float() / 255.0 - mean) / std, ours.tokenize([captions[j] for j in i.tolist()]))
               for i in order]
    args = open_clip_args(batch_size, lr, weight_decay, grad_clip)
    loss = open_clip.create_loss(args)
    opt = open_clip_optimizer(peer, args, fused=peer_fused)
    sched = cosine_lr(opt, lr, 0, total)
    data = {"train": _Loader(batches)}

    result = PeerResult(model_name, batch_size, steps_per_round)

    def run_peer(r: int) -> float:
        t = time.perf_counter()
        train_one_epoch(peer, data, loss, r, opt, None, sched, None, args)
        return n / (time.perf_counter() - t)

    def run_ours() -> float:
        t = time.perf_counter()
        trainer.fit()
        return n / (time.perf_counter() - t)

    for r in range(rounds + warmup_rounds):
        if r % 2 == 0:
            sb, oc = run_ours(), run_peer(r)
        else:
            oc, sb = run_peer(r), run_ours()
        if r == 0:
            result.max_loss_gap = _loss_gap(ours, peer, loss, images[order[0]], batches[0][1])
        if r >= warmup_rounds:
            result.shieldbench_sps.append(sb)
            result.open_clip_sps.append(oc)
    return result


@torch.no_grad()
def _loss_gap(ours, peer: torch.nn.Module, loss, images_u8: torch.Tensor, tokens: torch.Tensor) -> float:
    """|shieldbench's CLIP loss - the peer's| on one batch, both models in eval mode."""
    import torch.nn.functional as F

    peer_was, ours_was = peer.training, ours.training
    peer.eval(), ours.eval()
    x = images_u8.float() / 255.0
    out = peer(ours.normalize(x), tokens)  # open_clip's forward: normalised features, exp'd scale
    theirs = float(loss(out["image_features"], out["text_features"], out["logit_scale"]))
    mine = float(loss(F.normalize(ours.encode_image(x), dim=-1), F.normalize(ours.encode_text(tokens), dim=-1),
                      ours.logit_scale.exp()))
    peer.train(peer_was), ours.train(ours_was)
    return abs(mine - theirs)


__all__ = ["PeerResult", "compare", "open_clip_args", "open_clip_optimizer"]
