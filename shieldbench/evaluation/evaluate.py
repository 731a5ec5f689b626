"""Evaluate a trained model: utility, backdoor and poisoning success.

The evaluator receives the trigger as a plain function from the runner (it
does not import attacks). Triggered test images go through the same 8-bit
quantisation as the training poisons, so train and test triggers are the same
function. The evaluated checkpoint is always the last one: no epoch is ever
selected by test ASR, which a defender cannot see.

Evaluation sets may live on disk (lazy image arrays read through the data
loader) and may be absent: with no zero-shot set there is no clean accuracy
or ASR, with no retrieval set no Recall@k or Hit@k. An image that cannot be
read is left out of every metric that needs it and counted
(``n_unreadable_test`` / ``n_unreadable_retrieval``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from shieldbench.data.images import BadImage, ImageArray, quantize, take
from shieldbench.data.loader import iter_rows
from shieldbench.data.types import LabelledSet, RetrievalSet, to_float
from shieldbench.evaluation import metrics as M
from shieldbench.models.clip import ClipModel

Trigger = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TargetImages:
    """Targeted poisoning: held-out images the attacker wants read as the target."""

    images: torch.Tensor  # uint8 (T, C, H, W)
    labels: torch.Tensor  # their true classes


@torch.no_grad()
def embed_images(model: ClipModel, images: ImageArray, batch_size: int, device: torch.device,
                 trigger: "Trigger | None" = None, trigger_seed: int = 0, on_error: str = "skip") -> torch.Tensor:
    """Embeddings of every row, in order; a row that cannot be read gets a NaN row
    (``on_error="fail"``: raises :class:`~shieldbench.data.images.BadImage` naming the file).

    With ``trigger``, each batch is triggered in float, clamped and quantised
    to 8 bits before embedding (one generator, consumed in row order).
    """
    n = images.shape[0]
    out: torch.Tensor | None = None
    g = torch.Generator().manual_seed(trigger_seed)
    for rows in iter_rows(images, batch_size):
        if rows.failed and on_error == "fail":
            raise BadImage(rows.errors[0])
        if rows.index.numel() == 0:
            continue
        x = rows.images
        if trigger is not None:
            x = quantize(trigger(to_float(x), g))
        emb = model.encode_image(to_float(x).to(device)).float().cpu()
        if out is None:
            out = torch.full((n, emb.shape[1]), float("nan"))
        out[rows.index] = emb
    return out if out is not None else torch.full((n, 1), float("nan"))


def readable(emb: torch.Tensor) -> torch.Tensor:
    """Rows that were read (not NaN)."""
    return ~emb.isnan().any(dim=1)


@torch.no_grad()
def embed_texts(model: ClipModel, captions: list[str], batch_size: int, device: torch.device) -> torch.Tensor:
    """Text embeddings, ``batch_size`` captions per pass.

    Tokenised here and not through the model's caption cache: evaluation
    texts (80 templates x 1,000 classes, a retrieval set's captions) are
    embedded once, and caching them would only evict the training captions.
    """
    out = []
    for i in range(0, len(captions), batch_size):
        tokens = model.tokenizer(list(captions[i : i + batch_size])).to(device)
        out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def class_embeddings(model: ClipModel, classnames: list[str], templates: list[str], device: torch.device) -> torch.Tensor:
    """Zero-shot classifier: normalised mean of normalised template embeddings.

    :func:`evaluate` computes it once per model and scores every image batch
    (clean, triggered, the targeted attack's images) against it; re-embedding
    the prompts per image batch would cost ``classes x templates`` text
    passes per batch (80,000 for ImageNet with the OpenAI templates).
    """
    texts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(model, texts, 1024, device)
    return M.zeroshot_classifier(emb.view(len(classnames), len(templates), -1))


def _logits(emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(emb, dim=-1) @ classifier.t()


@torch.no_grad()
def evaluate(
    model: ClipModel,
    test: LabelledSet | None,
    retrieval: RetrievalSet | None,
    target: int,
    trigger: Trigger | None,
    device: torch.device,
    batch_size: int = 512,
    trigger_seed: int = 0,
    n_backdoor_queries: int = 0,
    target_images: TargetImages | None = None,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    on_error: str = "skip",
) -> dict[str, float]:
    """All metrics of one model as a flat dict of floats (fractions in [0, 1]).

    ``classnames``/``templates`` give the zero-shot classifier when there is
    no test set (targeted poisoning success on its own target images).
    """
    model.eval().to(device)
    out: dict[str, float] = {}
    names = test.classnames if test is not None else classnames
    temps = test.templates if test is not None else templates
    classifier = class_embeddings(model, names, temps, device) if names else None

    if test is not None:
        clean_emb = embed_images(model, test.images, batch_size, device, on_error=on_error)
        ok = readable(clean_emb)
        labels = test.labels[ok]
        clean_logits = _logits(clean_emb[ok], classifier)
        k5 = min(5, len(names))  # a set of fewer than 5 classes has no top-5 beyond all classes
        acc = M.topk_accuracy(clean_logits, labels, ks=(1, k5))
        out["clean_top1"] = acc[1].value
        out["clean_top5"] = acc[k5].value
        out["n_test"] = float(int(ok.sum()))
        out["n_unreadable_test"] = float(int((~ok).sum()))
        if trigger is not None:
            trig_emb = embed_images(model, test.images, batch_size, device, trigger, trigger_seed, on_error)
            tok = readable(trig_emb)
            trig_logits = _logits(trig_emb[tok], classifier)
            tl = test.labels[tok]
            asr1 = M.attack_success_rate(trig_logits, tl, target, k=1)
            asr5 = M.attack_success_rate(trig_logits, tl, target, k=k5)
            out.update({"asr": asr1.value, "asr_ci_low": asr1.ci_low, "asr_ci_high": asr1.ci_high,
                        "asr_n": float(asr1.n), "asr_top5": asr5.value})
            out["robust_acc"] = M.robust_accuracy(trig_logits, tl, target).value

    ret_img = ret_txt = None
    if retrieval is not None:
        # Retrieval utility on clean images and captions (unreadable images and their captions left out).
        ret_img_all = embed_images(model, retrieval.images, batch_size, device, on_error=on_error)
        ok = readable(ret_img_all)
        keep_caps = ok[retrieval.caption_image]
        new_index = torch.cumsum(ok.long(), 0) - 1
        ret_img = ret_img_all[ok]
        ret_captions = [c for c, k in zip(retrieval.captions, keep_caps.tolist()) if k]
        ret_txt = embed_texts(model, ret_captions, batch_size, device)
        caption_image = new_index[retrieval.caption_image[keep_caps]]
        caption_labels = retrieval.caption_labels[keep_caps]
        image_labels = retrieval.image_labels[ok]
        out["n_unreadable_retrieval"] = float(int((~ok).sum()))
        out.update(M.retrieval_recall(ret_img, ret_txt, caption_image, ks=(1, 5, 10)))
        if trigger is not None:
            # Backdoor Hit@k (Semantic Shield): triggered non-target images retrieve captions.
            keep = (image_labels != target).nonzero().flatten()
            if n_backdoor_queries:
                keep = keep[:n_backdoor_queries]
            readable_rows = ok.nonzero().flatten()[keep]
            q = embed_images(model, _rows(retrieval.images, readable_rows), batch_size, device, trigger, trigger_seed + 1)
            q = q[readable(q)]
            hits = M.backdoor_hit_at_k(q, ret_txt, caption_labels, target)
            for k, r in hits.items():
                out[f"hit@{k}"] = r.value
            # The same Hit@k on clean queries: what retrieval gives without the trigger.
            clean_hits = M.backdoor_hit_at_k(ret_img[keep], ret_txt, caption_labels, target, ks=(1,))
            out["hit@1_clean"] = clean_hits[1].value

    if target_images is not None and target_images.images.shape[0] and classifier is not None:
        t_emb = embed_images(model, target_images.images, batch_size, device)
        success = M.targeted_poisoning_success(_logits(t_emb, classifier), target)
        out.update({"poison_success": success.value, "poison_success_ci_low": success.ci_low,
                    "poison_success_ci_high": success.ci_high, "poison_n": float(success.n)})
        # Text -> image retrieval of each target image among the clean gallery.
        if ret_img is not None:
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


def _rows(images: ImageArray, rows: torch.Tensor) -> ImageArray:
    return take(images, rows.tolist())
