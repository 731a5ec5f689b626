"""Label-consistent (clean-label) backdoor (Turner et al., 2019), CLIP version.

Turner et al.: only images that already belong to the target class are
poisoned, so every label stays correct. To make the model rely on the trigger
rather than on the (easy) target features, the images are first made *hard*
(PGD on a robust model, L-inf eps 8/255, step 1.5/255, 100 steps, maximising
the loss of their true label) and then get a small corner pattern.

CleanCLIP's CLIP adaptation, implemented here: the candidate pairs are the
training pairs whose caption mentions the target class (word-boundary,
plural-aware match via ``class_pattern``, not a substring: "pineapple" does not
match "apple"); ``n`` of them (``poison_rate`` / ``n_poison``, capped by the
number of matching captions) get the BadNets patch (all BadNets options:
``pattern``, ``location``, ``size``, ...), and their captions are kept
(``caption=None`` in the plan). ``plan.notes`` records ``n_matching``,
``n_requested`` and ``n_poisoned``; ``capped`` is true when fewer captions
matched than were requested.

Optional PGD hardening (``pgd_steps > 0``; off by default, as in CleanCLIP):
against a *surrogate* -- a copy of the clean base model (``ctx.surrogate()``),
not a robust classifier as in Turner et al. -- each selected image is moved by
L-inf projected gradient ascent (``pgd_eps``, ``pgd_step``, sign steps, no
random start, images kept in [0, 1]) to maximise ``pgd_loss``:

- ``target`` (default, Turner's objective): the zero-shot cross-entropy of the
  image for the target class (class embeddings from the templates, the model's
  logit scale);
- ``caption``: ``1 - cos`` between the image embedding and its own caption.

The hardened image is then stamped with the patch and quantised to 8 bits.
No image is stored in the plan: :meth:`poison` recomputes the hardening
deterministically (same surrogate, same rows, no randomness), so the plan JSON
stays small and deterministic. The plan records the PGD settings.

Differences from the reference code: CleanCLIP selects captions with a
substring match (so "apple" also poisons "pineapple" pairs) and has no
hardening; Turner et al. use a 3x3 corner pattern on 32x32 images and a
robust classifier, while here the patch is BadNets' (default 4x4 at 32 px)
and the surrogate is the clean CLIP base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from shieldbench.attacks.badnets import BadNets
from shieldbench.attacks.base import PoisonEdit, PoisonPlan, class_pattern
from shieldbench.data.types import to_float
from shieldbench.data.poison import quantize
from shieldbench.errors import UserError
from shieldbench.registry import register_attack
from shieldbench.spec import param


@register_attack("label_consistent")
class LabelConsistent(BadNets):
    """Clean-label: BadNets patch on pairs whose caption names the target, captions kept (Turner et al. 2019)."""

    threat_model: ClassVar[str] = "clean_label"
    paper: ClassVar[str] = "Turner et al., Label-Consistent Backdoor Attacks, 2019; Bansal et al., CleanCLIP, ICCV 2023"

    @dataclass(frozen=True)
    class Params(BadNets.Params):
        pgd_steps: int = param(0, "PGD hardening steps against the clean surrogate (0 = off; Turner et al.: 100)",
                               lo=0, hi=10000)
        pgd_eps: float = param(8 / 255, "L-inf radius of the hardening", lo=0, hi=1)
        pgd_step: float = param(1.5 / 255, "PGD step size", lo=0, hi=1)
        pgd_loss: str = param("target", "loss maximised: target = zero-shot CE of the target class; "
                                        "caption = 1 - cos(image, own caption)", choices=("target", "caption"))
        pgd_batch: int = param(128, "images per PGD batch", lo=1, hi=65536)

    def matching_rows(self) -> np.ndarray:
        pat = class_pattern(self.ctx.classnames[self.target_index])
        return np.array([i for i, c in enumerate(self.ctx.train.captions) if pat.search(c)], dtype=np.int64)

    def plan(self, seed: int) -> PoisonPlan:
        self._setup_trigger(seed)
        p = self.params
        if p.pgd_steps:
            self.trigger_state["pgd"] = {"steps": p.pgd_steps, "eps": p.pgd_eps, "step": p.pgd_step, "loss": p.pgd_loss}
        rng = np.random.default_rng(seed)
        matching = self.matching_rows()
        requested = self.n_requested()
        rows = self.pick_rows(rng, requested, matching) if len(matching) else []
        positions = self._train_positions(len(rows), seed)
        append = self.mix == "append"
        edits = [PoisonEdit(None if append else r, "train", r, "trigger", None, pos) for r, pos in zip(rows, positions)]
        return self._new_plan(seed, edits, n_matching=int(len(matching)), n_requested=int(requested),
                              n_poisoned=len(rows), capped=bool(len(rows) < requested))

    # -- PGD hardening ---------------------------------------------------------------
    def pgd_config(self) -> dict:
        """PGD settings: the plan's (``trigger["pgd"]``) when one is loaded, else the options."""
        p = self.params
        return self.trigger_state.get("pgd") or {"steps": p.pgd_steps, "eps": p.pgd_eps, "step": p.pgd_step,
                                                 "loss": p.pgd_loss}

    def surrogate_loss(self, model, images: torch.Tensor, captions: list[str], text: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image loss the hardening maximises (``pgd_loss``)."""
        emb = F.normalize(model.encode_image(images).float(), dim=-1)
        if text is None:
            text = self._text_targets(model, captions)
        if self.pgd_config()["loss"] == "caption":
            return 1.0 - (emb * text).sum(-1)
        scale = model.clip.logit_scale.exp().clamp(max=100).detach().float() if hasattr(model.clip, "logit_scale") else 100.0
        logits = scale * emb @ text.t()
        target = torch.full((images.shape[0],), self.target_index, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target, reduction="none")

    @torch.no_grad()
    def _text_targets(self, model, captions: list[str]) -> torch.Tensor:
        if self.pgd_config()["loss"] == "caption":
            return F.normalize(model.encode_captions(captions).float(), dim=-1)
        names, temps = self.ctx.classnames, self.ctx.templates
        emb = F.normalize(model.encode_captions([t.format(c) for c in names for t in temps]).float(), dim=-1)
        return F.normalize(emb.view(len(names), len(temps), -1).mean(1), dim=-1)

    def harden(self, images: torch.Tensor, captions: list[str], model=None) -> torch.Tensor:
        """L-inf PGD (sign ascent, projected to the eps-ball and [0, 1]) on float images.

        Settings from :meth:`pgd_config`. Deterministic: no random start.
        """
        p = self.params
        cfg = self.pgd_config()
        steps, eps, step = int(cfg["steps"]), float(cfg["eps"]), float(cfg["step"])
        if model is None:
            if self.ctx.surrogate is None:
                raise UserError("attack.pgd_steps > 0 needs a surrogate model (the clean base model); none was given")
            model = self.ctx.surrogate()
        model.eval()
        for prm in model.parameters():
            prm.requires_grad_(False)
        device = next(model.parameters()).device
        out = []
        for i in range(0, images.shape[0], p.pgd_batch):
            x0 = images[i : i + p.pgd_batch].to(device)
            caps = captions[i : i + p.pgd_batch]
            text = self._text_targets(model, caps)
            x = x0.clone()
            for _ in range(steps):
                x.requires_grad_(True)
                loss = self.surrogate_loss(model, x, caps, text).sum()
                (grad,) = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    x = x + step * grad.sign()
                    x = torch.min(torch.max(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)
            out.append(x.detach().cpu())
        return torch.cat(out) if out else images.clone()

    def source_images(self, plan: PoisonPlan) -> dict[int, torch.Tensor]:
        """With ``pgd`` set, the selected images hardened (then 8-bit) before the patch is stamped per row."""
        if not plan.trigger.get("pgd") or not plan.edits:
            return {}
        train = self.ctx.train
        sel = [k for k, e in enumerate(plan.edits) if e.transform == "trigger"]
        src = [plan.edits[k].source_index for k in sel]
        x = self.harden(to_float(train.images[torch.tensor(src, dtype=torch.long)]), [train.captions[i] for i in src])
        hardened = quantize(x)
        return {k: hardened[j] for j, k in enumerate(sel)}


__all__ = ["LabelConsistent"]
