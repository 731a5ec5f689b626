"""RoCLIP (Yang et al., NeurIPS 2023): training-time defense by caption-pool matching.

A FIFO pool holds text embeddings of recent *real* captions. On every
``match_every``-th epoch (the paper's ``epoch mod K = 0`` with 1-based epochs,
i.e. 0-based epochs K-1, 2K-1, ...), each image is matched to its nearest
caption in the pool (cosine, looked up *before* the batch's own captions are
enqueued) and the symmetric InfoNCE is taken between the images and those
matched captions; the other epochs use the plain CLIP loss. A poisoned pair's
image is thus pulled toward whatever caption its content resembles, not toward
the attacker's caption. Image views (RoCLIP's ``augment_image.py``: flip,
RandomResizedCrop, ColorJitter(0.5, 0.5, 0.5, 0.1) p 0.8, grayscale 0.2,
Gaussian blur) and EDA captions are always on (options).

Reference-code defects avoided:

- the pool is filled at train start by encoding captions of the training data
  (the reference starts from random vectors);
- the pool is refreshed at every step of every epoch (the reference enqueues
  only on matching epochs, so the pool goes stale);
- :class:`FIFOPool` wraps around with modular indexing and keeps every
  enqueued item until it is overwritten (the reference drops the overflow);
- whether the text tower gets gradient on matching epochs is an explicit
  option, ``text_grad_on_match`` (the reference silently gives it none, because
  matched captions are read from the detached pool). ``False`` (default)
  reproduces the reference; ``True`` re-encodes the matched captions with the
  current text tower so both towers learn from the matched pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from shieldbench.defenses.augment import eda_batch, make_image_augmenter
from shieldbench.defenses.base import Defense, DefenseContext
from shieldbench.defenses.cleanclip import tokenize_fresh
from shieldbench.models.clip import ClipModel
from shieldbench.registry import register_defense
from shieldbench.spec import derive_seed, param
from shieldbench.training import distributed as D
from shieldbench.training.contracts import Batch, Callback, LossOutput
from shieldbench.training.losses import clip_loss


class FIFOPool:
    """A ring buffer of (L2-normalised embedding, caption) pairs.

    Enqueued items stay until exactly ``capacity`` later items have
    overwritten them; a batch larger than the capacity keeps its last
    ``capacity`` items. ``valid()`` is the filled part, in slot order.
    """

    def __init__(self, capacity: int, dim: int, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError("pool capacity must be positive")
        self.capacity = int(capacity)
        self.embeddings = torch.zeros(self.capacity, dim, device=device)
        self.captions: list[str | None] = [None] * self.capacity
        self.ptr = 0  # next slot to write
        self.count = 0  # filled slots
        self.total = 0  # items ever enqueued

    def __len__(self) -> int:
        return self.count

    def enqueue(self, embeddings: torch.Tensor, captions: Sequence[str] | None = None) -> None:
        emb = F.normalize(embeddings.detach().float(), dim=-1).to(self.embeddings.device)
        caps = list(captions) if captions is not None else [None] * emb.shape[0]
        if len(caps) != emb.shape[0]:
            raise ValueError("one caption per embedding")
        n = emb.shape[0]
        self.total += n
        if n > self.capacity:  # only the newest `capacity` survive; keep their slot order consistent
            skip = n - self.capacity
            self.ptr = (self.ptr + skip) % self.capacity
            emb, caps, n = emb[skip:], caps[skip:], self.capacity
        slots = (self.ptr + torch.arange(n)) % self.capacity
        self.embeddings[slots.to(self.embeddings.device)] = emb
        for s, c in zip(slots.tolist(), caps):
            self.captions[s] = c
        self.ptr = (self.ptr + n) % self.capacity
        self.count = min(self.capacity, self.count + n)

    def valid(self) -> torch.Tensor:
        """The filled slots' embeddings (slots 0..count-1 until the pool is full, then all)."""
        return self.embeddings[: self.count]

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Slot of the most cosine-similar pool entry for each query row."""
        if self.count == 0:
            raise RuntimeError("nearest() on an empty pool")
        q = F.normalize(queries.detach().float(), dim=-1).to(self.embeddings.device)
        return (q @ self.valid().t()).argmax(dim=1)

    def captions_at(self, slots: torch.Tensor) -> list[str]:
        out = [self.captions[i] for i in slots.tolist()]
        if any(c is None for c in out):
            raise RuntimeError("pool slot without a caption")
        return out  # type: ignore[return-value]


@torch.no_grad()
def encode_captions_batched(model: ClipModel, captions: Sequence[str], device: torch.device,
                            batch_size: int = 512) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = [model.encode_text(model.tokenizer(list(captions[i:i + batch_size])).to(device)).float()
           for i in range(0, len(captions), batch_size)]
    model.train(was_training)
    return torch.cat(out)


class RoCLIPTraining(Callback):
    """RoCLIP's objective and pool maintenance in one object (it is both Objective and Callback)."""

    # Matching epochs read the matched captions from the pool: no gradient reaches the text
    # tower (unless text_grad_on_match), which DDP must be told.
    leaves_parameters_unused = True

    def __init__(self, pool_size: int = 1024, match_every: int = 2, text_grad_on_match: bool = False,
                 image_aug: str = "simclr", crop_min_scale: float = 0.08, eda: bool = True, eda_alpha: float = 0.1,
                 synonyms: str = "table", seed: int = 0) -> None:
        self.pool_size = pool_size
        self.match_every = match_every
        self.text_grad_on_match = text_grad_on_match
        self.augment_images = make_image_augmenter(
            image_aug, 0, **({"crop_scale": (crop_min_scale, 1.0)} if image_aug == "simclr" else {}))
        self.eda = eda
        self.eda_alpha = eda_alpha
        self.synonyms = synonyms
        self.seed = seed
        self.pool: FIFOPool | None = None
        self._pending: tuple[torch.Tensor, list[str]] | None = None

    def is_matching_epoch(self, epoch: int) -> bool:
        return (epoch + 1) % self.match_every == 0

    # -- callback --------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        """Fill the pool with embeddings of real training captions (a seeded random sample)."""
        data, model = trainer.data, trainer.model
        n = min(self.pool_size, len(data))
        g = torch.Generator().manual_seed(derive_seed(self.seed, "roclip-pool-init"))
        rows = torch.randperm(len(data), generator=g)[:n]
        captions = data.captions_at(rows)
        emb = encode_captions_batched(model, captions, trainer.device)
        self.pool = FIFOPool(self.pool_size, emb.shape[1], trainer.device)
        self.pool.enqueue(emb, captions)
        self._pending = None

    def state_dict(self) -> dict | None:
        """The pool, so a resumed run matches against the same captions as an uninterrupted one."""
        if self.pool is None:
            return None
        p = self.pool
        return {"embeddings": p.embeddings.detach().cpu(), "captions": [c or "" for c in p.captions],
                "filled": [c is not None for c in p.captions], "ptr": p.ptr, "count": p.count, "total": p.total}

    def load_state_dict(self, state: dict) -> None:
        emb = state["embeddings"]
        device = self.pool.embeddings.device if self.pool is not None else "cpu"
        pool = FIFOPool(emb.shape[0], emb.shape[1], device)
        pool.embeddings.copy_(emb.to(device))
        pool.captions = [c if filled else None for c, filled in zip(state["captions"], state["filled"])]
        pool.ptr, pool.count, pool.total = int(state["ptr"]), int(state["count"]), int(state["total"])
        self.pool = pool
        self._pending = None

    def on_step_end(self, trainer, batch: Batch, out: LossOutput) -> None:
        if self._pending is not None and self.pool is not None:
            self.pool.enqueue(*self._pending)
        self._pending = None

    # -- objective -------------------------------------------------------------------
    def __call__(self, model: ClipModel, batch: Batch) -> LossOutput:
        if self.pool is None:
            raise RuntimeError("RoCLIP's pool is empty: on_train_start was not called")
        seed = derive_seed(self.seed, "roclip-aug", batch.epoch, batch.step)
        # Views are drawn for the global batch and this rank keeps its share (see Batch); every rank
        # enqueues the whole global batch, so the pools stay identical across ranks.
        all_captions = batch.all_captions()
        images = (self.augment_images(batch.images, seed, batch.offset, len(all_captions)) if self.augment_images
                  else batch.images)
        tokens = batch.tokens
        if self.eda:
            all_captions = eda_batch(all_captions, random.Random(seed), self.eda_alpha, True, self.synonyms)
            tokens = tokenize_fresh(model, all_captions[batch.local], batch.tokens.device)
        img = model.encode_image(images)
        if not self.is_matching_epoch(batch.epoch):
            txt = model.encode_text(tokens)
            loss = clip_loss(img, txt, model.logit_scale)
            self._pending = (D.gather(txt.detach()), list(all_captions))
            return LossOutput(loss, {"clip": float(loss.detach()), "matching": 0.0})
        slots = self.pool.nearest(img)  # before this batch's captions are enqueued
        if self.text_grad_on_match:
            matched = model.encode_text(tokenize_fresh(model, self.pool.captions_at(slots), batch.tokens.device))
        else:
            matched = self.pool.embeddings[slots]
        loss = clip_loss(img, matched, model.logit_scale)
        with torch.no_grad():
            txt = model.encode_text(tokens)
        self._pending = (D.gather(txt), list(all_captions))
        all_slots = D.gather(slots)
        unique = float(torch.unique(all_slots).numel()) / all_slots.numel()
        return LossOutput(loss, {"match": float(loss.detach()), "matching": 1.0, "match_unique": unique})


@register_defense("roclip")
class RoCLIP(Defense):
    """Training-time: match images to their nearest caption in a FIFO pool every K-th epoch (Yang et al. 2023)."""

    paper: ClassVar[str] = "Yang et al., RoCLIP, NeurIPS 2023"
    version: ClassVar[str] = "2"  # 2: the reference's views (jitter 0.5, Gaussian blur)

    @dataclass(frozen=True)
    class Params:
        pool_size: int = param(1024, "FIFO pool capacity (text embeddings of recent captions)", lo=1)
        match_every: int = param(2, "match images to pool captions every K-th epoch (K)", lo=1, hi=10000)
        text_grad_on_match: bool = param(False, "re-encode matched captions so the text tower gets gradient on matching epochs")
        image_aug: str = param("simclr", "always-on image augmentation (simclr: RoCLIP's view)", choices=("simclr", "autoaugment", "none"))
        crop_min_scale: float = param(0.08, "smallest RandomResizedCrop area fraction (RoCLIP / torchvision: 0.08)", lo=0, hi=1, lo_open=True)
        eda: bool = param(True, "always-on EDA caption augmentation")
        eda_alpha: float = param(0.1, "EDA strength", lo=0, hi=1)
        synonyms: str = param("table", "EDA synonym source", choices=("table", "wordnet", "auto"))

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self._impl: tuple[DefenseContext, RoCLIPTraining] | None = None

    def training(self, ctx: DefenseContext) -> RoCLIPTraining:
        """One shared objective+callback per context (the runner asks for both with the same ctx)."""
        if self._impl is None or self._impl[0] is not ctx:
            p = self.params
            impl = RoCLIPTraining(p.pool_size, p.match_every, p.text_grad_on_match, p.image_aug, p.crop_min_scale,
                                  p.eda, p.eda_alpha, p.synonyms, seed=derive_seed(ctx.seed, "roclip"))
            self._impl = (ctx, impl)
        return self._impl[1]

    def objective(self, ctx: DefenseContext) -> RoCLIPTraining:
        return self.training(ctx)

    def callbacks(self, ctx: DefenseContext) -> list[Callback]:
        return [self.training(ctx)]
