"""Semantic Shield's loss terms as pure functions of tensors (unit-testable).

Notation: ``P`` patches (B, M, D) and ``E`` knowledge-element embeddings
(U, D) in the joint space; ``ke_index`` (B, K) maps each caption's K KEs to
rows of ``E`` (unique KE strings are encoded once per batch). Everything is
computed in float32 on L2-normalised vectors.

Under ``torch.distributed`` the rows (images, their patches) are this rank's
share and the columns (captions' KE sets) are the global batch's: ``E`` and
``ke_index`` are gathered from all ranks, and ``offset`` says where this
rank's own pairs sit among the columns (0 in one process, where the
functions reduce to the square (B, B) forms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment(patches: torch.Tensor, ke_emb: torch.Tensor) -> torch.Tensor:
    """S over all unique KEs: (B, M, U) cosine similarities patch x KE."""
    p = F.normalize(patches.float(), dim=-1)
    e = F.normalize(ke_emb.float(), dim=-1)
    return torch.einsum("bmd,ud->bmu", p, e)


def own_alignment(s_all: torch.Tensor, ke_index: torch.Tensor) -> torch.Tensor:
    """S_{i,m,k} = cos(p_{i,m}, e_{i,k}) for each pair's own KEs: (B, M, K)."""
    b, m, _ = s_all.shape
    idx = ke_index.to(s_all.device)[:, None, :].expand(b, m, ke_index.shape[1])
    return torch.gather(s_all, 2, idx)


def mil_scores(s_all: torch.Tensor, ke_index: torch.Tensor, pool: str = "max") -> torch.Tensor:
    """z_{ij} = max over patches m of image i and KEs k of caption j of S: (B, B) (rows x ke_index rows).

    The diagonal holds each image's score against its own KE set (positives),
    the rest against the other captions' KE sets in the batch (negatives).
    ``pool="mean"``: the mean over caption j's KEs of each KE's best patch
    instead of the max over KEs, so every KE gets a gradient, not only the
    one that matches best.
    """
    best = s_all.amax(dim=1)  # (B, U): best patch of image i for each KE
    b, k = ke_index.shape
    idx = ke_index.to(s_all.device).reshape(1, b * k).expand(best.shape[0], b * k)
    per_ke = torch.gather(best, 1, idx).view(best.shape[0], b, k)
    if pool == "max":
        return per_ke.amax(dim=2)
    if pool == "mean":
        return per_ke.mean(dim=2)
    raise ValueError(f"unknown KE pooling {pool!r}")


def shared_ke_mask(ke_index: torch.Tensor) -> torch.Tensor:
    """(B, B) True where captions i != j share at least one KE (ambiguous negatives)."""
    b, _ = ke_index.shape
    same = (ke_index[:, None, :, None] == ke_index[None, :, None, :]).any(dim=(-1, -2))
    return same & ~torch.eye(b, dtype=torch.bool, device=ke_index.device)


def ke_loss(z: torch.Tensor, scale: float = 1.0, ignore: torch.Tensor | None = None,
            weight: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """BCE-with-logits on the MIL scores, y = identity; per image row, then mean.

    ``ignore`` (B, B) drops entries (shared-KE negatives); ``weight`` (B,)
    multiplies each image's row loss (the per-pair weights, already detached).
    Positives and negatives are balanced within a row (the positive counts
    as much as the mean of the negatives), so the loss does not reduce to
    "push every score down" as the batch grows. Row i's positive is column
    ``offset + i``.
    """
    rows = torch.arange(z.shape[0], device=z.device)
    y = torch.zeros_like(z)
    y[rows, rows + offset] = 1.0
    bce = F.binary_cross_entropy_with_logits(z * scale, y, reduction="none")
    keep = torch.ones_like(bce, dtype=torch.bool) if ignore is None else ~ignore
    neg = keep & (y == 0)
    pos_term = bce[rows, rows + offset]
    neg_term = (bce * neg).sum(dim=1) / neg.sum(dim=1).clamp_min(1)
    row = 0.5 * (pos_term + neg_term)
    if weight is not None:
        row = row * weight
    return row.mean()


def attention_target(s_own: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax over patches of max_k S / tau: where the KEs say the evidence is. (B, M)."""
    return torch.softmax(s_own.amax(dim=2) / tau, dim=1)


def attention_loss(attn: torch.Tensor, target: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Push the CLS->patch attention (B, heads, M) toward ``target`` (B, M).

    ``kl``: KL(target || a) with ``a`` the head-mean attention renormalised
    over patches (the CLS->CLS weight is excluded); ``bce``: the released
    code's BCE-with-logits(a, target) on the raw head-mean attention.
    """
    a = attn.float().mean(dim=1)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(a, target)
    if kind != "kl":
        raise ValueError(f"unknown attention loss {kind!r}")
    a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (target * (target.clamp_min(1e-12).log() - a.clamp_min(1e-12).log())).sum(dim=1).mean()


def set_alignment(s_all: torch.Tensor, ke_index: torch.Tensor) -> torch.Tensor:
    """A[i, j] = mean over patches of image i of the best cosine with caption j's KEs: (B, B).

    The diagonal is the paper's grounding of each pair (how well image i's
    patches match its own caption's KEs); row i off the diagonal says how well
    the same patches match the other captions' KEs in the batch.
    """
    b, k = ke_index.shape
    idx = ke_index.to(s_all.device).reshape(-1)
    return s_all[:, :, idx].view(s_all.shape[0], s_all.shape[1], b, k).amax(dim=3).mean(dim=1)


def grounding(s_all: torch.Tensor, ke_index: torch.Tensor, score: str = "own", offset: int = 0) -> torch.Tensor:
    """Per-pair grounding score (B,), under ``no_grad``.

    ``own`` (paper): A[i, i], the mean over patches of the best own-KE cosine.
    ``contrast``: (A[i, i] - mean_j A[i, j]) / std_j A[i, j], i.e. how far
    image i's own KEs stand above the batch's other KE sets *for the same
    image*. It removes each image's offset (some images align with every
    phrase), which the raw score leaves in: on the training pairs of the
    validation world it ranks poisons below clean pairs with AUC 0.97
    (BadNets, Blended) and 0.93 (WaNet), against 0.86-0.88 for ``own``.
    ``column`` and ``two_way`` need the whole square matrix: see
    :func:`grounding_from_sets`.
    """
    with torch.no_grad():
        return grounding_from_sets(set_alignment(s_all.detach().float(), ke_index), score, offset)


def grounding_from_sets(a: torch.Tensor, score: str = "own", offset: int = 0) -> torch.Tensor:
    """The grounding score of each row's own pair from A (rows: images, columns: KE sets); see :func:`grounding`.

    ``column``: (A[i, i] - mean_k A[k, i]) / std_k A[k, i], how far caption
    i's KEs match its own image above the batch's other images: it removes
    each *KE set's* offset (a set of shape phrases matches every image
    weakly, one with a colour phrase matches every image of that colour
    strongly), which ``contrast`` leaves in. ``two_way``: the mean of the
    ``contrast`` and ``column`` z-scores. Both need A square (all images and
    all KE sets of the batch: ``offset`` 0).
    """
    with torch.no_grad():
        a = a.detach().float()
        rows = torch.arange(a.shape[0], device=a.device)
        own = a[rows, rows + offset]
        if score == "own":
            return own

        def z(matrix: torch.Tensor) -> torch.Tensor:
            std = matrix.std(dim=1, unbiased=False) if matrix.shape[1] > 1 else torch.zeros_like(own)
            return (own - matrix.mean(dim=1)) / (std + 1e-6)

        if score == "contrast":
            return z(a)
        if score in ("column", "two_way"):
            if a.shape[0] != a.shape[1] or offset != 0:
                raise ValueError(f"grounding score {score!r} needs the square (all images x all KE sets) matrix")
            col = z(a.t())
            return col if score == "column" else 0.5 * (z(a) + col)
        raise ValueError(f"unknown grounding score {score!r}")


def phrase_contrast(s_all: torch.Tensor, ke_index: torch.Tensor) -> torch.Tensor:
    """Per-pair score (B,): how much better image i matches each of its own KEs than the batch's other images do.

    best[i, u] = max over patches of image i of cos(patch, KE u); each KE's
    column is standardised over the batch's images, and pair i's score is the
    mean of its own K KEs' z-scores. Unlike the set-level scores it compares
    a phrase only with itself, so a caption with only shape phrases (which
    match every image weakly) is not judged against captions with a colour
    phrase (which match every image of that colour strongly). Needs every
    image of the batch (all ranks' rows). Under ``no_grad``.
    """
    with torch.no_grad():
        best = s_all.detach().float().amax(dim=1)  # (B, U)
        std = best.std(dim=0, unbiased=False) if best.shape[0] > 1 else torch.zeros_like(best[0])
        z = (best - best.mean(dim=0)) / (std + 1e-6)
        return torch.gather(z, 1, ke_index.to(z.device)).mean(dim=1)


def pair_weights(raw: torch.Tensor, temperature: float = 1.0, form: str = "softmax",
                 standardize: bool = True) -> torch.Tensor:
    """Per-pair weights (B,) from grounding scores, stop-gradient, mean 1.

    ``z`` = the scores standardised within the batch (``standardize``, for
    the raw ``own`` score whose scale drifts during training) or taken as they
    are (the ``contrast`` score is already a per-image z-score, so 0 means
    "no better than the average caption"). ``softmax``: w = B * softmax(z / T)
    (unbounded above: a sharp temperature hands the batch to a few pairs).
    ``sigmoid``: w = sigmoid(z / T), rescaled to mean 1: bounded, so a sharp
    temperature silences poorly grounded pairs without letting the best
    grounded ones dominate. ``raw``: w = the score itself (the paper's l * w
    with w = A[i, i]; no standardisation, no normalisation, so the CLIP term's
    scale is the batch's mean grounding). Computed under ``no_grad`` so the
    model cannot raise its own weight.
    """
    with torch.no_grad():
        z = raw.detach().float()
        b = z.shape[0]
        if form == "raw":
            return z
        if standardize:
            std = z.std(unbiased=False) if b > 1 else z.new_tensor(0.0)
            z = (z - z.mean()) / (std + 1e-6)
        if form == "softmax":
            return torch.softmax(z / temperature, dim=0) * b
        if form == "sigmoid":
            g = torch.sigmoid(z / temperature)
            return g * (b / g.sum().clamp_min(1e-12))
        raise ValueError(f"unknown weight form {form!r}")
