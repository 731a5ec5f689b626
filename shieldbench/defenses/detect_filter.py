"""Detect and filter (Huang et al., ICLR 2025): drop the pairs whose image embedding is a local outlier.

"Detecting Backdoor Samples in Contrastive Language Image Pretraining"
observes that a CLIP model places backdoor-poisoned training images in
*sparse* local neighbourhoods: a poison's nearest neighbours are clean images
that are much closer to their own neighbours than the poison is to them. A
density-ratio outlier score over the image embeddings therefore ranks poisons
first; dropping the top of the ranking before training removes most of them.

What this defense does, in ``prepare_data``, before the victim trains:

1. Embed every training image with the defender's model: ``detector = base``
   is the clean base model (``ctx.reference_model()``, this suite's stand-in
   for a web-pretrained CLIP); ``detector = warmup`` is a copy of it
   fine-tuned on the (poisoned) training view for ``warmup_epochs`` with the
   plain CLIP loss (the paper's setting: a model trained on the poisoned data
   itself).
2. Score each image against its ``k`` nearest neighbours *within a random
   batch* of ``batch_size`` embeddings, as the reference code does (it scores
   each shuffled data-loader batch against itself; ``batch_size = 0`` uses
   the whole set as one batch). Scores (higher = more suspicious):

   - ``kdist``: ``d_k(p)``, the distance to the k-th nearest other point;
   - ``lid`` (default; chosen on validation worlds 1 and 2, see
     docs/baselines.md): the MLE of local intrinsic dimensionality (Amsaleg
     et al.; Ma et al. 2018), ``LID(p) = -k / sum_{i<=k} log(r_i(p) / r_k(p))``;
   - ``slof``: simplified LOF, ``mean_{o in N_k(p)} d_k(p) / d_k(o)``;
   - ``dao`` (the paper's recommended score): dimensionality-aware outlier
     score (Anderberg et al. 2024), ``DAO(p) = mean_{o in N_k(p)} (d_k(p) / d_k(o)) ** LID(o)``,
     returned as ``log DAO`` (computed by log-mean-exp: the same ranking,
     without overflowing when LID is large).

3. Drop the ``drop_fraction`` highest-scoring pairs (``round(f * n)``) and
   train on the rest (``view.subset(kept)``) with the plain CLIP objective.
   The scores and the kept rows are reported through
   ``ctx.report_suspicion``: the runner, which alone holds the poison flags,
   measures the detection AUROC from them.

Differences from the reference code (HanxunH/Detect-CLIP-Backdoor-Samples,
``backdoor_sample_detector/``), each on purpose:

- one neighbourhood definition throughout: ``N_k`` and ``d_k`` are the k
  nearest *other* points of the batch, for the scored point and for its
  neighbours alike (the reference's DAO and SLOF take the (k+1)-th distance
  for the scored point, and the neighbours' k-distance and LID from a sorted
  row that still holds their zero self-distance);
- ``dao`` is the paper's arithmetic mean of the powered ratios (the
  reference averages ``LID(o) * log(ratio)``, the log of their geometric
  mean);
- the LID estimator has no ``+1e-4`` inside its logarithm (exact for distinct
  distances); zero distances (duplicate images) are floored instead, so no
  score is NaN or infinite;
- batches are a seeded permutation cut into near-equal parts (no short last
  batch with fewer than ``k + 1`` points);
- image embeddings only (the reference's CLIP path also adds the batch's
  caption embeddings to the reference set, with neighbour indices that no
  longer line up with it after the self-distance is masked out; its README's
  usage, ``detector(model=model, images=images)``, is image-only).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from shieldbench.data.types import to_float
from shieldbench.data.views import TrainView
from shieldbench.defenses.base import Defense, DefenseContext
from shieldbench.errors import UserError
from shieldbench.models.clip import ClipModel
from shieldbench.registry import register_defense
from shieldbench.spec import derive_seed, param
from shieldbench.training import distributed as D
from shieldbench.training.trainer import TrainConfig, Trainer

# Distances below this are treated as this (duplicate images): keeps every ratio and logarithm finite.
_FLOOR = 1e-12


# -- local outlier scores on a set of embeddings ----------------------------------------------
def knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (n, k), ascending, and indices (n, k) of each row's k nearest *other* rows (Euclidean).

    Needs ``1 <= k < n``. Distances are floored at a tiny positive value.
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    x = x.double()
    # The exact (non-matmul) distance, as the reference's 'donot_use_mm_for_euclid_dist': better precision.
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)  # a point is not its own neighbour
    dist, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
    return dist.clamp_min(_FLOOR), idx


def _lid_from(dist: torch.Tensor) -> torch.Tensor:
    # -k / sum_i log(r_i / r_k); the sum is <= 0 and 0 only when all k distances are equal (LID unbounded).
    k = dist.shape[1]
    s = torch.log(dist / dist[:, -1:]).sum(dim=1)
    return k / (-s).clamp_min(_FLOOR)


def kdist_score(x: torch.Tensor, k: int) -> torch.Tensor:
    """``d_k(p)``: the distance to the k-th nearest other point."""
    return knn(x, k)[0][:, -1]


def lid_score(x: torch.Tensor, k: int) -> torch.Tensor:
    """MLE local intrinsic dimensionality, ``-k / sum_{i=1..k} log(r_i / r_k)``."""
    return _lid_from(knn(x, k)[0])


def slof_score(x: torch.Tensor, k: int) -> torch.Tensor:
    """Simplified LOF: ``mean_{o in N_k(p)} d_k(p) / d_k(o)``."""
    dist, idx = knn(x, k)
    dk = dist[:, -1]
    return (dk[:, None] / dk[idx]).mean(dim=1)


def dao_score(x: torch.Tensor, k: int) -> torch.Tensor:
    """``log DAO(p)``, ``DAO(p) = mean_{o in N_k(p)} (d_k(p) / d_k(o)) ** LID(o)`` (log-mean-exp: same order)."""
    dist, idx = knn(x, k)
    dk, lid = dist[:, -1], _lid_from(dist)
    log_terms = lid[idx] * torch.log(dk[:, None] / dk[idx])
    return torch.logsumexp(log_terms, dim=1) - math.log(k)


SCORES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "dao": dao_score, "kdist": kdist_score, "slof": slof_score, "lid": lid_score,
}


def batched_scores(emb: torch.Tensor, score: str, k: int, batch_size: int, seed: int) -> np.ndarray:
    """Each row's score within its random batch (``batch_size = 0``: the whole set), in row order.

    Rows are shuffled by a seeded permutation and cut into ``ceil(n / batch_size)``
    near-equal batches (at least two rows each); each batch is its own
    reference set. ``k`` is capped at a batch's size minus one.
    """
    n = emb.shape[0]
    if n < 2:
        return np.zeros(n)
    fn = SCORES[score]
    parts = 1 if batch_size <= 0 or batch_size >= n else math.ceil(n / batch_size)
    parts = min(parts, n // 2)  # every batch has another point to be a neighbour
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    out = np.empty(n, dtype=np.float64)
    for rows in torch.tensor_split(perm, parts):
        out[rows.numpy()] = fn(emb[rows.to(emb.device)], min(k, len(rows) - 1)).cpu().numpy()
    return out


# -- embedding --------------------------------------------------------------------------------
@torch.no_grad()
def embed_images(model: ClipModel, view: TrainView, device: torch.device, batch_size: int = 256,
                 normalize: bool = False) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Image embeddings (float32, CPU) of the readable rows, those rows, and the rows that could not be read."""
    model.eval().to(device)
    chunks: list[torch.Tensor] = []
    readable: list[int] = []
    unreadable: list[int] = []
    for start in range(0, len(view), batch_size):
        rows = list(range(start, min(start + batch_size, len(view))))
        images, failed, _ = view.fetch(rows)
        bad = set(failed)
        unreadable.extend(rows[pos] for pos in failed)
        readable.extend(r for pos, r in enumerate(rows) if pos not in bad)
        if len(images):
            chunks.append(model.encode_image(to_float(images).to(device)).float().cpu())
    emb = torch.cat(chunks) if chunks else torch.zeros(0, 1)
    if normalize:
        emb = F.normalize(emb, dim=-1)
    return emb, np.asarray(readable, dtype=np.int64), np.asarray(unreadable, dtype=np.int64)


def drop_count(n: int, fraction: float) -> int:
    """How many of ``n`` rows ``drop_fraction`` drops: ``round(fraction * n)``, never all of them."""
    return min(max(n - 1, 0), int(round(fraction * n)))


@register_defense("detect_filter")
class DetectFilter(Defense):
    """Pre-training: drop the pairs whose image embedding is a local outlier (LID / DAO / SLOF / k-dist), then train (Huang et al. 2025)."""

    paper: ClassVar[str] = "Huang et al., Detecting Backdoor Samples in Contrastive Language Image Pretraining, ICLR 2025"
    version: ClassVar[str] = "1"

    @dataclass(frozen=True)
    class Params:
        # score, batch_size and detector: chosen on validation worlds 1 and 2 by a rule fixed
        # before world 2 was diagnosed (docs/baselines.md); the paper's recommended DAO in batches
        # under the pretrained model was at chance there (AUROC 0.48-0.52 on BadNets).
        score: str = param("lid", "local outlier score of each image embedding (higher: more suspicious)",
                           choices=("dao", "kdist", "slof", "lid"))
        k: int = param(16, "neighbours per point (paper: 16)", lo=1, hi=4096)
        drop_fraction: float = param(0.1, "fraction of pairs dropped, highest scores first (rule on validation worlds 1 and 2, docs/baselines.md)",
                                     lo=0, hi=0.9)
        batch_size: int = param(0, "embeddings per scoring batch, each its own reference set (0: the whole set)", lo=0)
        detector: str = param("warmup", "model that embeds: base = the clean base model (pretrained CLIP), "
                              "warmup = it fine-tuned on the poisoned view first", choices=("base", "warmup"))
        warmup_epochs: int = param(1, "epochs of plain CLIP training on the poisoned view (detector = warmup)", lo=1, hi=1000)
        normalize: bool = param(False, "L2-normalise the embeddings before scoring (the reference does not)")

    def detector_model(self, view: TrainView, ctx: DefenseContext) -> ClipModel:
        """The model that embeds: the clean base model, or a copy fine-tuned on the poisoned view."""
        if ctx.reference_model is None:
            raise UserError("detect_filter needs the defender's model (ctx.reference_model), and this run gives none")
        model = ctx.reference_model()
        if self.params.detector == "base":
            return model
        if D.is_distributed():
            # prepare_data runs on rank 0 first, then on the others: a collective inside it would never meet.
            raise UserError("detect_filter: detector=warmup trains in one process; under torchrun use detector=base")
        # The victim's training settings, for fewer epochs.
        config = dataclasses.replace(
            TrainConfig.from_spec(ctx.train, derive_seed(ctx.seed, "detect-filter-warmup")),
            epochs=self.params.warmup_epochs)
        Trainer(model, view, config, device=ctx.device, description="detect_filter warm-up",
                show_progress=ctx.show_progress).fit()
        return model.eval()

    def scores(self, view: TrainView, ctx: DefenseContext) -> np.ndarray:
        """One suspicion score per row of ``view``; an unreadable row gets the lowest (the trainer skips it anyway)."""
        p = self.params
        model = self.detector_model(view, ctx)
        emb, readable, unreadable = embed_images(model, view, ctx.device, normalize=p.normalize)
        del model
        scores = np.zeros(len(view))
        if len(readable):
            scores[readable] = batched_scores(emb, p.score, p.k, p.batch_size,
                                              derive_seed(ctx.seed, "detect-filter-batches"))
            scores[unreadable] = scores[readable].min() - 1.0
        return scores

    def prepare_data(self, data: TrainView, ctx: DefenseContext) -> TrainView:
        scores = self.scores(data, ctx)
        n_drop = drop_count(len(data), self.params.drop_fraction)
        # Highest scores first; ties broken by row order so the choice is deterministic.
        order = np.argsort(-scores, kind="stable")
        kept = np.sort(order[n_drop:])
        ctx.report_suspicion(scores, kept)
        return data.subset(kept.tolist())
