"""Evaluate a trained model: utility, backdoor and poisoning success.

The evaluator receives the trigger as a plain function from the runner (it
does not import attacks). Triggered test images go through the same 8-bit
quantisation as the training poisons, so train and test triggers are the same
function. The evaluated checkpoint is always the last one: no epoch is ever
selected by test ASR, which a defender cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from shieldbench.data.types import LabelledSet, RetrievalSet, to_float
from shieldbench.data.views import quantize
from shieldbench.evaluation import metrics as M
from shieldbench.models.clip import ClipModel

Trigger = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TargetImages:
    """Targeted poisoning: held-out images the attacker wants read as the target."""

    images: torch.Tensor  # uint8 (T, C, H, W)
    labels: torch.Tensor  # their true classes


@torch.no_grad()
def embed_images(model: ClipModel, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = to_float(images[i : i + batch_size]).to(device)
        out.append(model.encode_image(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_texts(model: ClipModel, captions: list[str], batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for i in range(0, len(captions), batch_size):
        tokens = model.tokenize(captions[i : i + batch_size]).to(device)
        out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def class_embeddings(model: ClipModel, classnames: list[str], templates: list[str], device: torch.device) -> torch.Tensor:
    """Zero-shot classifier: normalised mean of normalised template embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(model, texts, 1024, device)
    return M.zeroshot_classifier(emb.view(len(classnames), len(templates), -1))


def triggered(images: torch.Tensor, trigger: Trigger, seed: int, batch_size: int = 1024) -> torch.Tensor:
    """Apply the trigger in float, clamp, quantise to uint8 (as at training time)."""
    g = torch.Generator().manual_seed(seed)
    parts = [quantize(trigger(to_float(images[i : i + batch_size]), g)) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(parts)


def _logits(emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(emb, dim=-1) @ classifier.t()


@torch.no_grad()
def evaluate(
    model: ClipModel,
    test: LabelledSet,
    retrieval: RetrievalSet,
    target: int,
    trigger: Trigger | None,
    device: torch.device,
    batch_size: int = 512,
    trigger_seed: int = 0,
    n_backdoor_queries: int = 0,
    target_images: TargetImages | None = None,
) -> dict[str, float]:
    """All metrics of one model as a flat dict of floats (fractions in [0, 1])."""
    model.eval().to(device)
    out: dict[str, float] = {}
    classifier = class_embeddings(model, test.classnames, test.templates, device)
    clean_emb = embed_images(model, test.images, batch_size, device)
    clean_logits = _logits(clean_emb, classifier)
    acc = M.topk_accuracy(clean_logits, test.labels, ks=(1, 5))
    out["clean_top1"] = acc[1].value
    out["clean_top5"] = acc[5].value
    out["n_test"] = float(len(test))

    # Retrieval utility on clean images and captions.
    ret_img = embed_images(model, retrieval.images, batch_size, device)
    ret_txt = embed_texts(model, retrieval.captions, batch_size, device)
    out.update(M.retrieval_recall(ret_img, ret_txt, retrieval.caption_image, ks=(1, 5, 10)))

    if trigger is not None:
        trig_images = triggered(test.images, trigger, trigger_seed)
        trig_logits = _logits(embed_images(model, trig_images, batch_size, device), classifier)
        asr1 = M.attack_success_rate(trig_logits, test.labels, target, k=1)
        asr5 = M.attack_success_rate(trig_logits, test.labels, target, k=5)
        out.update({"asr": asr1.value, "asr_ci_low": asr1.ci_low, "asr_ci_high": asr1.ci_high,
                    "asr_n": float(asr1.n), "asr_top5": asr5.value})
        out["robust_acc"] = M.robust_accuracy(trig_logits, test.labels, target).value
        # Backdoor Hit@k (Semantic Shield): triggered non-target images retrieve captions.
        keep = (retrieval.image_labels != target).nonzero().flatten()
        if n_backdoor_queries:
            keep = keep[:n_backdoor_queries]
        q = triggered(retrieval.images[keep], trigger, trigger_seed + 1)
        hits = M.backdoor_hit_at_k(embed_images(model, q, batch_size, device), ret_txt, retrieval.caption_labels, target)
        for k, r in hits.items():
            out[f"hit@{k}"] = r.value
        # The same Hit@k on clean queries: what retrieval gives without the trigger.
        clean_hits = M.backdoor_hit_at_k(ret_img[keep], ret_txt, retrieval.caption_labels, target, ks=(1,))
        out["hit@1_clean"] = clean_hits[1].value

    if target_images is not None and target_images.images.shape[0]:
        t_emb = embed_images(model, target_images.images, batch_size, device)
        success = M.targeted_poisoning_success(_logits(t_emb, classifier), target)
        out.update({"poison_success": success.value, "poison_success_ci_low": success.ci_low,
                    "poison_success_ci_high": success.ci_high, "poison_n": float(success.n)})
        # Text -> image retrieval of each target image among the clean gallery.
        query = classifier[target : target + 1]
        ranks = []
        for i in range(t_emb.shape[0]):
            gallery = torch.cat([t_emb[i : i + 1], ret_img])
            ranks.append(M.text_to_image_rank(query, gallery, torch.zeros(1, dtype=torch.long)))
        r = torch.cat(ranks)
        for k, v in M.hit_at_k_from_ranks(r, (1, 5, 10)).items():
            out[f"poison_hit@{k}"] = v
        out["poison_min_rank"] = float(r.min())
        out["poison_mean_rank"] = float(r.float().mean())
    return out
