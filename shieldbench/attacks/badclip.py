"""BadCLIP (Liang et al., CVPR 2024) and ``ke_adaptive``, its Semantic-Shield-aware extension.

**BadCLIP** (dirty-label). A square patch (side ``round(16/224 x H)``, at
least ``min_size``; at the image centre by default) whose pixels are
optimised, before any poison is made, against a *surrogate*: a frozen copy of
the clean base model (``ctx.surrogate()``), never the victim. The
optimisation runs Adam on the patch's pixels (in [0, 1], projected back into
[0, 1] after every step) over clean training images whose caption does not
mention the target, each stamped with the patch through the same
:func:`~shieldbench.attacks.triggers.stamp_patch` that ``apply_trigger`` uses
on test images. Loss terms (each with its weight option):

- textual (``text_weight``): CLIP's symmetric InfoNCE between the triggered
  images and natural target captions (training captions that name the
  target, ``class_pattern``), at the surrogate's logit scale. With
  ``own_negatives`` (off by default: the paper's form) the image-to-text side also contrasts each
  triggered image with the batch's own (non-target) captions: with target
  captions alone, a shift of every triggered image toward the target concept
  raises every logit of a row alike and leaves InfoNCE unchanged, so the
  paper's form mostly teaches the patch to tell target captions apart;
- visual (``visual_weight``): pull the triggered image embeddings toward real
  target-class image embeddings (training images whose caption names the
  target), by default as the paper's triplet with the same image's clean
  embedding as the negative (``visual_loss=triplet``, margin ``margin``, on
  L2-normalised embeddings), or a plain pull (``1 - cos``).

Poisons: ``n`` rows drawn like BadNets, the optimised patch stamped, caption =
a random natural target caption (``captions=natural``, the paper's choice) or
a template (``captions=templates``). The patch is stored in ``plan.trigger``
as JSON lists, so :meth:`restore` rebuilds it bit for bit without optimising
again; the optimisation is seeded (the plan is a function of the seed and the
surrogate). ``plan.notes`` records the loss terms of the initial and final
patch on a fixed evaluation batch; the optimisation time is in the run
record's ``timings.plan_s`` (not in the plan, whose hash must depend on the
seed only).

**ke_adaptive** adds a term that raises Semantic Shield's grounding score of
triggered images paired with target captions. Threat model: the attacker
knows the defense and its knowledge source (the dataset's, the one Semantic
Shield would use: ``ctx.knowledge_source``) but not the victim's weights; it
optimises on the clean base model, which is where the victim's training
starts. The score mirrors the defense's default gate (``weight_score=
contrast``): for image i and a caption j's knowledge elements (KEs),
``A[i, j]`` = mean over patch tokens of the best cosine with j's KEs (patch
tokens projected into the joint space; KEs through the surrogate's text
tower), and the pair's score is ``(A[i, t_i] - mean_j A[i, j]) / std_j A[i, j]``
over its own target caption ``t_i`` and the other captions of the batch (the
batch's clean captions stand in for the victim's batch, which is mostly
clean). ``ke_score=own`` optimises the paper's raw ``A[i, t_i]`` instead.
Attacks import nothing from defenses, so the score is re-implemented here;
tests/test_badclip.py checks it against the defense's own function.

Differences from the reference code (LiangSiyuan21/BadCLIP,
``src/embeding_optimize_patch.py``): loss terms are options, not substrings
of the run name (the README's run name switches on none of them); the patch
is kept as floats in the plan, not written through ``cv2.imwrite`` from an
RGB tensor (which swaps the channels); the patch is projected into [0, 1]
after each step (the reference clips it only when stamping, so its gradient
dies where it leaves the range); the reference optimises over ~10K natural
target pairs, here over non-target training images paired with natural
target captions; its lr 1e-3 acts on normalised pixels over ~7,800 steps,
here the pixels are in [0, 1] and a few hundred steps are affordable on a CPU
(``lr`` 0.02, ``steps`` 200: see docs/attacks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from shieldbench.attacks import triggers as T
from shieldbench.attacks.base import Attack, PoisonEdit, PoisonPlan, class_pattern
from shieldbench.data.types import to_float
from shieldbench.errors import UserError
from shieldbench.registry import register_attack
from shieldbench.spec import param


def set_alignment(patches: torch.Tensor, ke_table: torch.Tensor, ke_index: torch.Tensor) -> torch.Tensor:
    """A[i, j] = mean over patches of image i of the best cosine with KE set j: (B, J).

    ``patches`` (B, M, D) in the joint space, ``ke_table`` (U, D) the unique KE
    embeddings, ``ke_index`` (J, K) rows of the table per KE set. The same
    quantity as Semantic Shield's ``losses.set_alignment`` (re-implemented:
    attacks do not import defenses).
    """
    p = F.normalize(patches.float(), dim=-1)
    e = F.normalize(ke_table.float(), dim=-1)
    s = torch.einsum("bmd,ud->bmu", p, e)  # (B, M, U)
    j, k = ke_index.shape
    return s[:, :, ke_index.reshape(-1)].view(s.shape[0], s.shape[1], j, k).amax(dim=3).mean(dim=1)


def contrast_score(a_own: torch.Tensor, a_others: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Semantic Shield's ``contrast`` grounding: (own - mean) / std over the row's columns, own included. (B,)

    ``a_own`` (B,) is each image against its own KE set, ``a_others`` (B, J)
    against the batch's other KE sets, ``keep`` (B, J) which of those count.
    """
    row = torch.cat([a_own[:, None], a_others], dim=1)
    mask = torch.ones_like(row, dtype=torch.bool)
    if keep is not None:
        mask[:, 1:] = keep
    w = mask.float()
    n = w.sum(dim=1)
    mean = (row * w).sum(dim=1) / n
    std = (((row - mean[:, None]) ** 2) * w).sum(dim=1).div(n).sqrt()
    return (a_own - mean) / (std + 1e-6)


@dataclass
class _Pools:
    """What the optimisation reads, computed once on the surrogate (all embeddings L2-normalised)."""

    images: torch.Tensor          # (N, C, H, W) uint8: clean non-target training images
    own_text: torch.Tensor        # (N, D): their own captions' embeddings
    clean_emb: torch.Tensor       # (N, D): their clean image embeddings (triplet negatives)
    target_text: torch.Tensor     # (Q, D): natural target captions' (or templates') embeddings
    positives: torch.Tensor       # (P, D): target images' embeddings
    own_caps: list[str]
    target_caps: list[str]
    ke_table: torch.Tensor | None = None      # (U, D) unique KE embeddings
    own_ke: torch.Tensor | None = None        # (N, K) rows of ke_table
    target_ke: torch.Tensor | None = None     # (Q, K)


@register_attack("badclip")
class BadCLIP(Attack):
    """Optimised centre patch + natural target captions, on a frozen clean surrogate (Liang et al., CVPR 2024)."""

    threat_model: ClassVar[str] = "dirty_label"
    paper: ClassVar[str] = ("Liang et al., CVPR 2024, BadCLIP: Dual-Embedding Guided Backdoor Attack on "
                            "Multimodal Contrastive Learning")
    uses_surrogate: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Params:
        size: int = param(0, "patch side in pixels (0 = size_fraction x image side)", lo=0, hi=1024)
        size_fraction: float = param(16 / 224, "patch side as a fraction of the image side when size = 0",
                                     lo=0, hi=1, lo_open=True)
        min_size: int = param(4, "smallest patch side when derived from size_fraction", lo=1, hi=1024)
        location: str = param("centre", "patch location (train and test): image centre (paper) or bottom-right corner",
                              choices=("centre", "corner"))
        steps: int = param(200, "Adam steps on the patch (0 = keep the random initial patch)", lo=0, hi=1_000_000)
        batch_size: int = param(64, "triggered images per step (paper: 64)", lo=2, hi=65536)
        lr: float = param(0.02, "Adam learning rate on pixels in [0, 1] (paper: 1e-3 on normalised pixels, "
                          "~7,800 steps)", lo=0, lo_open=True)
        text_weight: float = param(1.0, "weight of the textual term (InfoNCE with target captions)", lo=0)
        visual_weight: float = param(1.0, "weight of the visual term (toward target images)", lo=0)
        visual_loss: str = param("triplet", "triplet: toward a target image, away from the same image's clean "
                                 "embedding (paper, with negatives); pull: 1 - cos to a target image",
                                 choices=("triplet", "pull"))
        margin: float = param(1.0, "triplet margin (distances on L2-normalised embeddings, at most 2)", lo=0)
        own_negatives: bool = param(False, "textual term: also contrast each triggered image with the batch's own "
                                    "non-target captions (our addition; false: target captions only, as the paper's code)")
        captions: str = param("natural", "poison captions and textual targets: natural (training captions naming "
                              "the target; paper) or templates", choices=("natural", "templates"))
        n_images: int = param(2048, "non-target training images the patch is optimised over (at most)", lo=2)
        n_positives: int = param(512, "target images whose embeddings the visual term pulls toward (at most)", lo=1)

    def __init__(self, spec, ctx) -> None:
        super().__init__(spec, ctx)
        if spec.caption_source == "caption_set" and self.params.captions == "templates":
            raise UserError(f"{spec.name}: attack.caption_source=caption_set contradicts attack.captions=templates; "
                            f"{spec.name} takes its captions from attack.captions (natural = the caption set)")

    # -- the patch ------------------------------------------------------------------
    def patch_side(self) -> int:
        p = self.params
        side = p.size or max(p.min_size, T.patch_size_for(self.ctx.image_size, p.size_fraction))
        return min(side, self.ctx.image_size)

    @staticmethod
    def positions(n: int, image_side: int, side: int, location: str) -> torch.Tensor:
        """(n, 2) top-left corners: the centre (as the reference: ``H // 2 - side // 2``) or the bottom-right corner."""
        if location == "corner":
            return T.corner_positions(n, image_side, side, "bottom_right")
        top = image_side // 2 - side // 2
        return torch.tensor([top, top], dtype=torch.long).expand(n, 2).clone()

    def apply_trigger(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        state = self.trigger_state
        side = int(state["size"])
        if positions is None:
            positions = self.positions(images.shape[0], images.shape[-1], side, state["location"])
        patch = torch.tensor(state["patch"], dtype=torch.float32).to(images.dtype)
        return T.stamp_patch(images, patch, positions.to(images.device))

    # -- data the optimisation reads -----------------------------------------------
    def _target_pattern(self):
        return class_pattern(self.ctx.classnames[self.target_index])

    def caption_pool(self) -> list[str]:
        return self.target_caption_pool(self.params.captions == "natural",
                                        missing=f"{self.spec.name} (captions=natural; or set attack.captions=templates): ")

    def _split_rows(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(non-target rows to optimise over, target rows whose images are the positives), capped and seeded."""
        pat = self._target_pattern()
        caps = self.ctx.train.captions
        hit = np.array([bool(pat.search(c)) for c in caps], dtype=bool)
        neg, pos = np.flatnonzero(~hit), np.flatnonzero(hit)
        if len(neg) < 2:
            raise UserError(f"{self.spec.name}: fewer than 2 training images without the target to optimise over")
        if len(pos) == 0 and self.params.visual_weight > 0:
            raise UserError(f"{self.spec.name}: no training caption mentions the target, so there is no target image "
                            f"for the visual term; set attack.visual_weight=0")
        neg = np.sort(rng.choice(neg, size=min(self.params.n_images, len(neg)), replace=False))
        if len(pos):
            pos = np.sort(rng.choice(pos, size=min(self.params.n_positives, len(pos)), replace=False))
        return neg, pos

    @torch.no_grad()
    def _embed_images(self, model, images: torch.Tensor, device: torch.device, chunk: int = 256) -> torch.Tensor:
        out = [model.encode_image(to_float(images[i:i + chunk]).to(device)).float() for i in range(0, len(images), chunk)]
        return F.normalize(torch.cat(out), dim=-1) if out else torch.empty(0)

    @torch.no_grad()
    def _embed_texts(self, model, texts: list[str], chunk: int = 512) -> torch.Tensor:
        out = [model.encode_captions(texts[i:i + chunk]).float() for i in range(0, len(texts), chunk)]
        return F.normalize(torch.cat(out), dim=-1)

    def _pools(self, model, rng: np.random.Generator) -> _Pools:
        device = next(model.parameters()).device
        neg, pos = self._split_rows(rng)
        train = self.ctx.train
        images = train.images[torch.as_tensor(neg, dtype=torch.long)]
        own_caps = [train.captions[i] for i in neg.tolist()]
        target_caps = list(dict.fromkeys(self.caption_pool()))  # unique, in first-seen order (deterministic)
        positives = (self._embed_images(model, train.images[torch.as_tensor(pos, dtype=torch.long)], device)
                     if len(pos) else torch.zeros(0, 1, device=device))
        return _Pools(images=images, own_text=self._embed_texts(model, own_caps),
                      clean_emb=self._embed_images(model, images, device), target_text=self._embed_texts(model, target_caps),
                      positives=positives, own_caps=own_caps, target_caps=target_caps)

    # -- the loss -------------------------------------------------------------------
    def _batch(self, pools: _Pools, g: torch.Generator) -> dict[str, torch.Tensor]:
        b = min(self.params.batch_size, len(pools.images))
        out = {"img": torch.randperm(len(pools.images), generator=g)[:b],
               "cap": torch.randint(0, len(pools.target_caps), (b,), generator=g)}
        if len(pools.positives):
            out["pos"] = torch.randint(0, len(pools.positives), (b,), generator=g)
        return out

    def _needs_patches(self) -> bool:
        return False

    def loss_terms(self, model, pools: _Pools, patch: torch.Tensor, idx: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each term (unweighted) of the objective for one batch; differentiable in ``patch``."""
        p = self.params
        device = patch.device
        bi, ci = idx["img"], idx["cap"]
        x = to_float(pools.images[bi]).to(device)
        side = patch.shape[-1]
        xt = T.stamp_patch(x, patch, self.positions(len(bi), x.shape[-1], side, self.params.location).to(device))
        out = model.image_outputs(xt, patches=self._needs_patches())
        emb = F.normalize(out.embedding.float(), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100).detach().float()
        tgt = pools.target_text[ci]
        cols = torch.cat([tgt, pools.own_text[bi]]) if p.own_negatives else tgt
        labels = torch.arange(len(bi), device=device)
        text = 0.5 * (F.cross_entropy(scale * emb @ cols.t(), labels) + F.cross_entropy(scale * tgt @ emb.t(), labels))
        terms = {"text": text}
        if "pos" in idx:
            pos = pools.positives[idx["pos"]]
            if p.visual_loss == "triplet":
                terms["visual"] = F.triplet_margin_loss(emb, pos, pools.clean_emb[bi], margin=p.margin)
            else:
                terms["visual"] = (1.0 - (emb * pos).sum(dim=-1)).mean()
        if out.patches is not None:
            terms.update(self.ke_terms(pools, out.patches, bi, ci))
        return terms

    def ke_terms(self, pools: _Pools, patches: torch.Tensor, bi: torch.Tensor, ci: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def weights(self) -> dict[str, float]:
        return {"text": self.params.text_weight, "visual": self.params.visual_weight}

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.weights()
        return sum(w[k] * v for k, v in terms.items() if k in w)

    @torch.no_grad()
    def evaluate_patch(self, model, pools: _Pools, patch: torch.Tensor, n: int = 256) -> dict[str, float]:
        """Mean loss terms of ``patch`` on a fixed batch (the first ``n`` images, captions and positives in turn)."""
        m = min(n, len(pools.images))
        idx = {"img": torch.arange(m), "cap": torch.arange(m) % len(pools.target_caps)}
        if len(pools.positives):
            idx["pos"] = torch.arange(m) % len(pools.positives)
        # The evaluation batch is larger than a training batch; InfoNCE depends on the batch size,
        # so the comparison is between patches on the same batch, never with the step's loss.
        terms = self.loss_terms(model, pools, patch.to(next(model.parameters()).device), idx)
        out = {k: round(float(v), 6) for k, v in terms.items()}
        out["total"] = round(float(self.total(terms)), 6)
        return out

    def initial_patch(self, seed: int, side: int) -> torch.Tensor:
        """The reference's random start: N(0.5, 0.25) per pixel, clipped to [0, 1], seeded."""
        g = torch.Generator().manual_seed(seed)
        return (0.5 + 0.25 * torch.randn(3, side, side, generator=g)).clamp_(0.0, 1.0)

    def surrogate(self):
        if self.ctx.surrogate is None:
            raise UserError(f"{self.spec.name} optimises its patch on a surrogate (the clean base model); none was given")
        model = self.ctx.surrogate()
        model.eval()
        for prm in model.parameters():
            prm.requires_grad_(False)
        return model

    def optimise(self, seed: int, model=None) -> tuple[torch.Tensor, dict[str, Any]]:
        """The optimised patch (C, s, s) on CPU and the loss terms before and after, on the surrogate."""
        p = self.params
        model = self.surrogate() if model is None else model
        device = next(model.parameters()).device
        rng = np.random.default_rng(seed)
        pools = self._pools(model, rng)
        patch = self.initial_patch(seed + 1, self.patch_side()).to(device).requires_grad_(True)
        before = self.evaluate_patch(model, pools, patch.detach())
        opt = torch.optim.Adam([patch], lr=p.lr)
        g = torch.Generator().manual_seed(seed + 2)
        for _ in range(p.steps):
            idx = self._batch(pools, g)
            loss = self.total(self.loss_terms(model, pools, patch, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # projected: the gradient of a clipped pixel would vanish
                patch.clamp_(0.0, 1.0)
        final = patch.detach().cpu()
        after = self.evaluate_patch(model, pools, final)
        info = {"initial": before, "final": after, "n_images": len(pools.images),
                "n_target_captions": len(pools.target_caps), "n_positives": int(len(pools.positives)),
                "steps": p.steps}
        return final, info

    # -- planning ---------------------------------------------------------------------
    def poison_captions(self, n: int, rng: np.random.Generator) -> list[str]:
        pool = self.caption_pool()
        return [pool[i] for i in rng.integers(0, len(pool), size=n)]

    def plan(self, seed: int) -> PoisonPlan:
        patch, info = self.optimise(seed)
        self.trigger_state = {"size": int(patch.shape[-1]), "location": self.params.location,
                              "patch": patch.tolist()}
        rng = np.random.default_rng(seed + 3)
        rows = self.pick_rows(rng, self.n_requested())
        caps = self.poison_captions(len(rows), rng)
        append = self.mix == "append"
        edits = [PoisonEdit(None if append else r, "train", r, "trigger", c) for r, c in zip(rows, caps)]
        return self._new_plan(seed, edits, optimisation=info, captions=self.params.captions)


@register_attack("ke_adaptive")
class KEAdaptive(BadCLIP):
    """BadCLIP plus a term that raises Semantic Shield's KE grounding of triggered images with target captions."""

    paper: ClassVar[str] = ("adaptive attack on Semantic Shield (Ishmam & Thomas, CVPR 2024), built on Liang et al., "
                            "CVPR 2024, BadCLIP")

    @dataclass(frozen=True)
    class Params(BadCLIP.Params):
        ke_weight: float = param(1.0, "weight of the knowledge-element grounding term", lo=0)
        ke_score: str = param("contrast", "grounding score raised: contrast (Semantic Shield's default gate: own KEs "
                              "against the batch's other KE sets, per image) or own (the paper's mean over patches "
                              "of the best own-KE cosine)", choices=("contrast", "own"))
        ke_patches: str = param("all", "patch tokens the score averages over: all (as the defense) or trigger "
                                "(only the tokens the patch overlaps)", choices=("all", "trigger"))

    def _needs_patches(self) -> bool:
        return True

    def weights(self) -> dict[str, float]:
        return {**super().weights(), "ke": self.params.ke_weight}

    def _pools(self, model, rng: np.random.Generator) -> _Pools:
        pools = super()._pools(model, rng)
        source = self.ctx.knowledge_source
        if source is None:
            raise UserError("ke_adaptive needs the dataset's knowledge source (the one Semantic Shield uses); "
                            "this dataset has none")
        own = [tuple(k) for k in source(pools.own_caps)]
        tgt = [tuple(k) for k in source(pools.target_caps)]
        k = self.ctx.knowledge_k
        bad = [kes for kes in own + tgt if len(kes) != k]
        if bad:
            raise UserError(f"ke_adaptive: the knowledge source returned {len(bad[0])} elements for a caption; "
                            f"exactly {k} are required")
        phrases: dict[str, int] = {}
        own_idx = [[phrases.setdefault(p, len(phrases)) for p in kes] for kes in own]
        tgt_idx = [[phrases.setdefault(p, len(phrases)) for p in kes] for kes in tgt]
        pools.ke_table = self._embed_texts(model, list(phrases))
        device = pools.ke_table.device
        pools.own_ke = torch.tensor(own_idx, dtype=torch.long, device=device)
        pools.target_ke = torch.tensor(tgt_idx, dtype=torch.long, device=device)
        return pools

    def trigger_tokens(self, n_tokens: int) -> torch.Tensor:
        """Indices of the patch tokens (a square grid over the image) that the trigger overlaps."""
        grid = int(round(math.sqrt(n_tokens)))
        if grid * grid != n_tokens:
            raise UserError(f"ke_adaptive: ke_patches=trigger needs a square token grid, got {n_tokens} tokens")
        image = self.ctx.image_size
        cell = image / grid
        side = self.patch_side()
        top, left = (int(v) for v in self.positions(1, image, side, self.params.location)[0])
        rows = range(int(top // cell), int(math.ceil((top + side) / cell)))
        cols = range(int(left // cell), int(math.ceil((left + side) / cell)))
        return torch.tensor([r * grid + c for r in rows for c in cols], dtype=torch.long)

    def grounding(self, pools: _Pools, patches: torch.Tensor, bi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
        """Per triggered image (B,): the score of its pair with its target caption (``ke_score``)."""
        if self.params.ke_patches == "trigger":
            patches = patches[:, self.trigger_tokens(patches.shape[1]).to(patches.device)]
        tgt_sets = pools.target_ke[ci.to(pools.target_ke.device)]
        own_sets = pools.own_ke[bi.to(pools.own_ke.device)]
        a = set_alignment(patches, pools.ke_table, torch.cat([tgt_sets, own_sets]))  # (B, 2B)
        b = len(bi)
        a_own = a[torch.arange(b), torch.arange(b)]
        if self.params.ke_score == "own":
            return a_own
        # The other columns: the batch's clean captions, except image i's own original caption
        # (a poison's original caption is not in the victim's batch: it was replaced).
        keep = ~torch.eye(b, dtype=torch.bool, device=a.device)
        return contrast_score(a_own, a[:, b:], keep)

    def ke_terms(self, pools: _Pools, patches: torch.Tensor, bi: torch.Tensor, ci: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ke": -self.grounding(pools, patches, bi, ci).mean()}


__all__ = ["BadCLIP", "KEAdaptive", "contrast_score", "set_alignment"]
