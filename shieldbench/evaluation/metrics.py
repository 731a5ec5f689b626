"""Pure metric functions on logits and embeddings.

Nothing here touches a model: every function takes tensors (logits, labels,
embeddings) and returns numbers. Counting metrics are returned as :class:`Rate`
objects, which carry the raw counts and a Wilson score interval so that
reports can show uncertainty; retrieval recalls are plain fractions.

Conventions
-----------
* All rates and fractions are in ``[0, 1]`` (never percentages).
* Embeddings are L2-normalised inside each function that compares them, so
  callers may pass raw encoder outputs. Similarity is the cosine similarity.
* Top-k ``k`` values larger than the number of candidates are clipped to the
  number of candidates; result dictionaries are still keyed by the ``k`` the
  caller asked for.
* Ranking uses :func:`torch.topk`. When scores tie exactly, which of the tied
  candidates is returned is whatever ``torch.topk`` does (unspecified by
  PyTorch); with continuous embeddings exact ties are practically absent.
* Computation is done in float32 on the input's device; large similarity
  matrices are processed in row chunks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binomtest, mannwhitneyu

__all__ = [
    "Rate",
    "attack_success_rate",
    "backdoor_hit_at_k",
    "defense_effectiveness_rating",
    "detection_auroc",
    "detection_metrics",
    "hit_at_k_from_ranks",
    "retrieval_recall",
    "robust_accuracy",
    "targeted_poisoning_success",
    "text_to_image_rank",
    "topk_accuracy",
    "wilson_interval",
    "zeroshot_classifier",
]

# Rows of a similarity matrix computed at once (bounds memory at
# _CHUNK * num_candidates floats).
_CHUNK = 1024


# --------------------------------------------------------------------------
# Rates and intervals
# --------------------------------------------------------------------------


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    Computed with ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``.

    Args:
        k: Number of successes, ``0 <= k <= n``.
        n: Number of trials, ``n >= 0``.
        confidence: Confidence level in ``(0, 1)``.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``n == 0``.

    Raises:
        ValueError: If the counts or the confidence level are invalid.
    """
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Rate:
    """A proportion ``k / n`` with its 95% Wilson score interval.

    Attributes:
        k: Number of successes.
        n: Number of trials.
        value: ``k / n`` (``nan`` when ``n == 0``).
        ci_low: Lower end of the 95% Wilson interval (``nan`` when ``n == 0``).
        ci_high: Upper end of the 95% Wilson interval (``nan`` when ``n == 0``).
    """

    k: int
    n: int
    value: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, k: int, n: int) -> "Rate":
        """Build a :class:`Rate` from counts (95% Wilson interval)."""
        k, n = int(k), int(n)
        low, high = wilson_interval(k, n)
        value = k / n if n > 0 else math.nan
        return cls(k=k, n=n, value=value, ci_low=low, ci_high=high)

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict ``{"k", "n", "value", "ci_low", "ci_high"}`` for reports."""
        return asdict(self)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N={logits.shape[0]}, got shape {tuple(labels.shape)}"
        )


def _check_target(target: int, num_classes: int) -> int:
    target = int(target)
    if not 0 <= target < num_classes:
        raise ValueError(f"target {target} out of range for {num_classes} classes")
    return target


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
    return ks


def _check_emb(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")


def _topk_indices(
    queries: torch.Tensor, keys: torch.Tensor, k: int
) -> torch.Tensor:
    """Indices (Q, k) of the k most cosine-similar keys for each query."""
    q = _normalise(queries)
    kk = _normalise(keys)
    out = []
    for start in range(0, q.shape[0], _CHUNK):
        sims = q[start : start + _CHUNK] @ kk.T
        out.append(torch.topk(sims, k, dim=1).indices)
    if not out:
        return torch.empty(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(out, dim=0)


# --------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------


def zeroshot_classifier(class_text_embeddings: torch.Tensor) -> torch.Tensor:
    """Zero-shot class weights from per-template text embeddings.

    Each class embedding is ``normalise(mean_t normalise(text[c, t]))`` (the
    CLIP prompt-ensembling recipe: templates are normalised before averaging).

    Args:
        class_text_embeddings: ``(C, T, D)`` text embeddings, one per class and
            template.

    Returns:
        ``(C, D)`` float32 unit-norm class embeddings; logits are
        ``normalise(image_emb) @ result.T`` (times a temperature if wanted).
    """
    if class_text_embeddings.dim() != 3:
        raise ValueError(
            "class_text_embeddings must be (C, T, D), got shape "
            f"{tuple(class_text_embeddings.shape)}"
        )
    return _normalise(_normalise(class_text_embeddings).mean(dim=1))


def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, Rate]:
    """Top-k classification accuracy.

    Args:
        logits: ``(N, C)`` scores.
        labels: ``(N,)`` true class indices.
        ks: Values of k; each is clipped to ``C`` (so top-5 with 3 classes is
            1.0). Results are keyed by the requested k.

    Returns:
        ``{k: Rate}`` with ``n = N``.
    """
    _check_logits_labels(logits, labels)
    ks = _check_ks(ks)
    n, c = logits.shape
    labels = labels.to(logits.device).long()
    kmax = min(max(ks), c)
    top = torch.topk(logits.float(), kmax, dim=1).indices  # (N, kmax)
    correct = top == labels[:, None]
    return {k: Rate.of(int(correct[:, : min(k, c)].any(dim=1).sum()), n) for k in ks}


def attack_success_rate(
    logits_triggered: torch.Tensor, labels: torch.Tensor, target: int, k: int = 1
) -> Rate:
    """Attack success rate (ASR) of a targeted backdoor on classification.

    Only images whose true label differs from ``target`` are counted (an
    image of the target class predicted as the target is not a success of the
    attack). A counted image is a success when ``target`` is among the top-k
    predictions on its triggered version.

    Args:
        logits_triggered: ``(N, C)`` scores on triggered images.
        labels: ``(N,)`` true labels of the clean images.
        target: Target class of the backdoor.
        k: Top-k (clipped to ``C``); 1 gives the usual ASR.

    Returns:
        :class:`Rate` with ``n`` = number of non-target images (``nan`` if none).
    """
    _check_logits_labels(logits_triggered, labels)
    c = logits_triggered.shape[1]
    target = _check_target(target, c)
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = labels.to(logits_triggered.device).long()
    keep = labels != target
    logits = logits_triggered[keep].float()
    if logits.shape[0] == 0:
        return Rate.of(0, 0)
    top = torch.topk(logits, min(int(k), c), dim=1).indices
    return Rate.of(int((top == target).any(dim=1).sum()), logits.shape[0])


def robust_accuracy(
    logits_triggered: torch.Tensor, labels: torch.Tensor, target: int
) -> Rate:
    """Accuracy on triggered non-target images (top-1 still the true class).

    Args:
        logits_triggered: ``(N, C)`` scores on triggered images.
        labels: ``(N,)`` true labels.
        target: Target class of the backdoor; images of this class are excluded.

    Returns:
        :class:`Rate` with ``n`` = number of non-target images (``nan`` if none).
    """
    _check_logits_labels(logits_triggered, labels)
    target = _check_target(target, logits_triggered.shape[1])
    labels = labels.to(logits_triggered.device).long()
    keep = labels != target
    preds = logits_triggered[keep].float().argmax(dim=1)
    return Rate.of(int((preds == labels[keep]).sum()), int(keep.sum()))


def targeted_poisoning_success(logits: torch.Tensor, target: int) -> Rate:
    """Success of a targeted (clean-label / single-image) poisoning attack.

    Args:
        logits: ``(T, C)`` scores on the attacked target images.
        target: The class the attacker wants them classified as.

    Returns:
        :class:`Rate`: fraction of the ``T`` images whose top-1 prediction is
        ``target``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (T, C), got shape {tuple(logits.shape)}")
    target = _check_target(target, logits.shape[1])
    preds = logits.float().argmax(dim=1)
    return Rate.of(int((preds == target).sum()), logits.shape[0])


# --------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@k (CLIP/COCO style).

    * i2t: image ``i`` is a hit at k if ANY caption ``j`` with
      ``caption_image[j] == i`` is among its k most similar captions.
      Averaged over all ``N`` images.
    * t2i: caption ``j`` is a hit at k if image ``caption_image[j]`` is among
      its k most similar images. Averaged over all ``M`` captions.

    Embeddings are L2-normalised here; similarity is cosine. Ranking uses
    ``torch.topk`` (exact-tie order unspecified); k is clipped to ``M`` (i2t)
    or ``N`` (t2i).

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(M, D)`` caption embeddings.
        caption_image: ``(M,)`` long, index of the image each caption describes.
        ks: Values of k.

    Returns:
        ``{"i2t_R@k": float, ..., "t2i_R@k": float, ...}``, fractions in [0, 1].

    Raises:
        ValueError: On shape mismatch, out-of-range ``caption_image``, or an
            image without any caption (its i2t recall would be undefined).
    """
    _check_emb(image_emb, "image_emb")
    _check_emb(text_emb, "text_emb")
    ks = _check_ks(ks)
    n, m = image_emb.shape[0], text_emb.shape[0]
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError("image_emb and text_emb must have the same dimension")
    if caption_image.dim() != 1 or caption_image.shape[0] != m:
        raise ValueError(f"caption_image must be (M,) with M={m}")
    if n == 0 or m == 0:
        raise ValueError("need at least one image and one caption")
    caption_image = caption_image.to(image_emb.device).long()
    if int(caption_image.min()) < 0 or int(caption_image.max()) >= n:
        raise ValueError("caption_image has indices outside [0, N)")
    if int(torch.bincount(caption_image, minlength=n).min()) == 0:
        raise ValueError("every image needs at least one caption")

    result: dict[str, float] = {}

    # image -> text
    k_i2t = min(max(ks), m)
    top_txt = _topk_indices(image_emb, text_emb, k_i2t)  # (N, k) caption ids
    own = caption_image[top_txt] == torch.arange(n, device=top_txt.device)[:, None]
    for k in ks:
        result[f"i2t_R@{k}"] = own[:, : min(k, m)].any(dim=1).float().mean().item()

    # text -> image
    k_t2i = min(max(ks), n)
    top_img = _topk_indices(text_emb, image_emb, k_t2i)  # (M, k) image ids
    hit = top_img == caption_image[:, None]
    for k in ks:
        result[f"t2i_R@{k}"] = hit[:, : min(k, n)].any(dim=1).float().mean().item()
    return result


def backdoor_hit_at_k(
    triggered_image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_labels: torch.Tensor,
    target: int,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, Rate]:
    """Backdoor Hit@k for image-to-text retrieval (Semantic Shield).

    A triggered query is a hit at k if any of its k most similar captions has
    ``caption_labels == target``. The caller passes only queries whose clean
    image is NOT of the target class.

    Args:
        triggered_image_emb: ``(Q, D)`` embeddings of triggered images.
        text_emb: ``(M, D)`` caption gallery embeddings.
        caption_labels: ``(M,)`` class label of each caption.
        target: Target label.
        ks: Values of k (clipped to ``M``).

    Returns:
        ``{k: Rate}`` with ``n = Q``.
    """
    _check_emb(triggered_image_emb, "triggered_image_emb")
    _check_emb(text_emb, "text_emb")
    ks = _check_ks(ks)
    q, m = triggered_image_emb.shape[0], text_emb.shape[0]
    if caption_labels.dim() != 1 or caption_labels.shape[0] != m:
        raise ValueError(f"caption_labels must be (M,) with M={m}")
    if m == 0:
        raise ValueError("empty caption gallery")
    kmax = min(max(ks), m)
    top = _topk_indices(triggered_image_emb, text_emb, kmax)
    is_target = caption_labels.to(top.device).long()[top] == int(target)
    return {k: Rate.of(int(is_target[:, : min(k, m)].any(dim=1).sum()), q) for k in ks}


def text_to_image_rank(
    query_text_emb: torch.Tensor,
    gallery_image_emb: torch.Tensor,
    positive_index: torch.Tensor,
) -> torch.Tensor:
    """1-based rank of the positive image for each text query.

    ``rank = 1 + #{gallery images strictly more similar than the positive}``,
    so exact ties are resolved in the positive's favour (optimistic). This is
    the building block of MinRank (the minimum over queries of these ranks).

    Args:
        query_text_emb: ``(Q, D)`` text query embeddings.
        gallery_image_emb: ``(G, D)`` gallery image embeddings.
        positive_index: ``(Q,)`` long, index into the gallery of each query's
            positive image.

    Returns:
        ``(Q,)`` long tensor of ranks in ``[1, G]``.
    """
    _check_emb(query_text_emb, "query_text_emb")
    _check_emb(gallery_image_emb, "gallery_image_emb")
    q, g = query_text_emb.shape[0], gallery_image_emb.shape[0]
    if positive_index.dim() != 1 or positive_index.shape[0] != q:
        raise ValueError(f"positive_index must be (Q,) with Q={q}")
    positive_index = positive_index.to(query_text_emb.device).long()
    if q and (int(positive_index.min()) < 0 or int(positive_index.max()) >= g):
        raise ValueError("positive_index has indices outside [0, G)")
    t = _normalise(query_text_emb)
    im = _normalise(gallery_image_emb)
    ranks = []
    for start in range(0, q, _CHUNK):
        sims = t[start : start + _CHUNK] @ im.T
        pos = sims.gather(1, positive_index[start : start + _CHUNK, None])
        ranks.append((sims > pos).sum(dim=1) + 1)
    if not ranks:
        return torch.empty(0, dtype=torch.long, device=query_text_emb.device)
    return torch.cat(ranks).long()


def hit_at_k_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of 1-based ``ranks`` that are ``<= k``, for each k.

    Returns ``nan`` values for an empty ``ranks`` tensor.
    """
    ks = _check_ks(ks)
    if ranks.numel() == 0:
        return {k: math.nan for k in ks}
    return {k: (ranks <= k).float().mean().item() for k in ks}


# --------------------------------------------------------------------------
# Defense summary
# --------------------------------------------------------------------------


def defense_effectiveness_rating(
    asr_none: float, asr_def: float, ca_none: float, ca_def: float
) -> float:
    """Defense Effectiveness Rating (DER, BackdoorBench).

    ``DER = (max(0, ASR_none - ASR_def) - max(0, CA_none - CA_def) + 1) / 2``

    It rewards the drop in attack success and penalises the drop in clean
    accuracy; the result is in ``[0, 1]`` and 0.5 means "no effect". A drop in
    clean accuracy LOWERS the rating (BackdoorBench's reference code has the
    sign of this term wrong; this follows the paper's definition).

    Args:
        asr_none: ASR without defense, in [0, 1].
        asr_def: ASR with defense, in [0, 1].
        ca_none: Clean accuracy without defense, in [0, 1].
        ca_def: Clean accuracy with defense, in [0, 1].

    Raises:
        ValueError: If any input is not a finite number in ``[0, 1]``.
    """
    vals = {"asr_none": asr_none, "asr_def": asr_def, "ca_none": ca_none, "ca_def": ca_def}
    for name, v in vals.items():
        v = float(v)
        if not (0.0 <= v <= 1.0):  # also rejects nan
            raise ValueError(f"{name} must be a fraction in [0, 1], got {v}")
    asr_drop = max(0.0, float(asr_none) - float(asr_def))
    ca_drop = max(0.0, float(ca_none) - float(ca_def))
    return (asr_drop - ca_drop + 1.0) / 2.0


# --------------------------------------------------------------------------
# Poison detection (a defense's per-row suspicion scores against the truth)
# --------------------------------------------------------------------------

#: Fractions of the data, ranked by suspicion, at which :func:`detection_metrics` reports the recall.
RECALL_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)


def _scores_flags(scores: Sequence[float] | np.ndarray, is_poison: Sequence[bool] | np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(is_poison, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores but {y.shape[0]} poison flags")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y


def detection_auroc(scores: Sequence[float] | np.ndarray, is_poison: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more suspicious) for telling poisons from clean rows.

    ``AUROC = U / (n_pos * n_neg)``, ``U`` the Mann-Whitney statistic of the
    poisons' scores against the clean ones' (``scipy.stats.mannwhitneyu``):
    the probability that a random poison outscores a random clean row, a tie
    counting one half. 0.5 is chance, 1 a perfect ranking.

    Returns ``nan`` when there are no poisons or no clean rows.
    """
    s, y = _scores_flags(scores, is_poison)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    u = mannwhitneyu(s[y], s[~y], alternative="two-sided").statistic
    return float(u) / (n_pos * n_neg)


def detection_metrics(scores: Sequence[float] | np.ndarray, is_poison: Sequence[bool] | np.ndarray,
                      kept: Sequence[int] | np.ndarray | None = None) -> dict[str, float | int | None]:
    """What a detector achieved: AUROC, recall at fixed fractions and, if rows were dropped, precision / recall.

    * ``auroc``: :func:`detection_auroc` (None without both classes);
    * ``recall_at_<f>``: poisons among the ``round(f * n)`` highest-scoring rows
      (ties broken by row order), over all poisons, for ``f`` in
      :data:`RECALL_FRACTIONS`: what dropping that fraction would catch;
    * ``n_rows``, ``n_poison``; with ``kept``: ``n_dropped``, ``n_poison_dropped``,
      ``precision`` (poisons among the dropped rows; None if none dropped) and
      ``recall`` (dropped poisons over all poisons; None without poisons).
    """
    s, y = _scores_flags(scores, is_poison)
    n, n_pos = len(s), int(y.sum())
    auroc = detection_auroc(s, y)
    out: dict[str, float | int | None] = {"auroc": None if math.isnan(auroc) else auroc, "n_rows": n,
                                          "n_poison": n_pos}
    order = np.argsort(-s, kind="stable")
    for f in RECALL_FRACTIONS:
        m = int(round(f * n))
        out[f"recall_at_{f:g}"] = float(y[order[:m]].sum()) / n_pos if n_pos else None
    if kept is not None:
        dropped = np.ones(n, dtype=bool)
        dropped[np.asarray(kept, dtype=np.int64).reshape(-1)] = False
        n_drop, hit = int(dropped.sum()), int((dropped & y).sum())
        out.update({"n_dropped": n_drop, "n_poison_dropped": hit,
                    "precision": hit / n_drop if n_drop else None,
                    "recall": hit / n_pos if n_pos else None})
    return out
