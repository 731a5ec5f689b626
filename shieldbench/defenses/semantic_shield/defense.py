"""Semantic Shield (Ishmam & Thomas, CVPR 2024): knowledge-grounded CLIP training.

Image regions that do not align with the caption's knowledge elements (KEs)
must not drive the image-text alignment. Training-time only; the model and
inference are unchanged. See docs/semantic_shield.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shieldbench.data.views import TrainView
from shieldbench.defenses.base import Defense, DefenseContext
from shieldbench.defenses.semantic_shield import losses as L
from shieldbench.errors import UserError
from shieldbench.registry import register_defense
from shieldbench.spec import param
from shieldbench.training import distributed as D
from shieldbench.training.contracts import Batch, Callback, LossOutput
from shieldbench.training.losses import clip_loss, per_pair_clip_loss

# Which loss terms each variant trains: (weighted CLIP?, KE term?, weighted KE?, attention term?).
# The first three are the paper's table rows as the released code trains them
# (`attn_loss_factor` and `weighted_cl_loss` in its train_attention*.py: no KE
# term in either); the KE-inclusive forms are this project's and carry their
# own names, so a row called by a paper name is the paper's.
VARIANT_TERMS: dict[str, tuple[bool, bool, bool, bool]] = {
    "ke": (False, True, False, False),               # paper row 1: L_CL + l_KE L_KE
    "attn": (False, False, False, True),             # paper row 2: L_CL + l_attn L_attn
    "weighted_attn": (True, False, False, True),     # paper row 3: weighted L_CL + l_attn L_attn
    "ke_attn": (False, True, False, True),           # ours: L_CL + L_KE + L_attn
    "weighted_ke_attn": (True, True, False, True),   # ours: weighted L_CL + L_KE + L_attn
    "weighted_ke": (True, True, True, True),         # ours (default): weighted L_CL + weighted L_KE + L_attn
}
VARIANTS = tuple(VARIANT_TERMS)
PAPER_VARIANTS = ("ke", "attn", "weighted_attn")


def encode_texts(model, token_rows: torch.Tensor) -> torch.Tensor:
    """Text embeddings of (N, L) token ids, trimmed to the longest row when exact.

    open_clip's causal text tower pools at the end-of-text token; with a causal
    mask the positions after it never influence it, so running only the first
    ``max_len`` columns gives the same embeddings, faster. Falls back to the
    model's own ``encode_text`` for any other text tower.
    """
    clip = getattr(model, "clip", None)
    mask = getattr(clip, "attn_mask", None)
    if (
        clip is None or mask is None or getattr(clip, "text_pool_type", "argmax") != "argmax"
        or not hasattr(clip, "token_embedding") or not hasattr(clip, "positional_embedding")
    ):
        return model.encode_text(token_rows)
    device = model.pixel_mean.device
    tokens = token_rows.to(device)
    n_used = int((tokens != 0).any(dim=0).nonzero().max()) + 1 if tokens.numel() else tokens.shape[1]
    length = max(1, min(tokens.shape[1], n_used))
    tokens = tokens[:, :length]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)
    x = clip.transformer(x, attn_mask=mask[:length, :length])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


class SemanticShieldObjective(Callback):
    """The Semantic Shield loss of one batch (see :class:`SemanticShield`).

    Also a Callback, only so that the per-row grounding memory
    (``weight_memory``) is saved in the epoch checkpoints and restored on resume
    (the Trainer registers an objective that is a Callback by itself).
    """

    def __init__(self, params: "SemanticShield.Params") -> None:
        self.p = params
        self.weight_clip, self.use_ke, self.weight_ke, self.use_attn = VARIANT_TERMS[params.variant]
        # Per-row grounding memory (row numbers of the TrainView), NaN = not seen yet.
        self.memory = torch.empty(0)
        # ke_text=frozen: every KE phrase of the training data, encoded once by the text tower as
        # it was when training started (phrase -> row of the table).
        self.frozen_rows: dict[str, int] = {}
        self.frozen_table = torch.empty(0)

    def on_train_start(self, trainer) -> None:
        if self.p.ke_text != "frozen" or trainer.data.knowledge is None:
            return
        phrases = sorted({ke for kes in trainer.data.knowledge for ke in kes})
        model = trainer.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            parts = [encode_texts(model, model.tokenize(phrases[i:i + 1024]).to(trainer.device)).float().cpu()
                     for i in range(0, len(phrases), 1024)]
        model.train(was_training)
        self.frozen_rows = {ke: i for i, ke in enumerate(phrases)}
        self.frozen_table = torch.cat(parts) if parts else torch.empty(0)

    def ke_embeddings(self, model, phrases: list[str], device: torch.device) -> torch.Tensor:
        """KE embeddings for ``ke_text`` = detached (current text tower, no gradient) or frozen."""
        if self.p.ke_text == "detached":
            with torch.no_grad():
                return encode_texts(model, model.tokenize(phrases).to(device)).detach()
        missing = [ke for ke in phrases if ke not in self.frozen_rows]
        if missing:
            raise RuntimeError(f"semantic_shield: KE {missing[0]!r} is not in the training data's knowledge "
                               f"(ke_text=frozen encodes those at the start)")
        rows = torch.tensor([self.frozen_rows[ke] for ke in phrases], dtype=torch.long)
        return self.frozen_table[rows].to(device)

    def remember(self, index: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The score to weight with under ``weight_memory`` (``first`` / ``min``), updating the memory.

        ``first`` freezes each pair's grounding at its first visit, i.e. as
        judged by the model before it has trained on that pair; ``min`` keeps
        the lowest grounding seen. Both stop the feedback loop of online
        weighting, where a poison that leaks a little weight teaches the model
        its trigger, which raises the poison's grounding, which raises its
        weight.
        """
        mode = self.p.weight_memory
        if mode == "none":
            return score
        idx = index.to("cpu", torch.long)
        need = int(idx.max()) + 1 if idx.numel() else 0
        if need > self.memory.numel():
            grown = torch.full((need,), float("nan"))
            grown[: self.memory.numel()] = self.memory
            self.memory = grown
        old = self.memory[idx]
        new = score.detach().float().cpu()
        if mode == "first":
            kept = torch.where(torch.isnan(old), new, old)
        elif mode == "min":
            kept = torch.where(torch.isnan(old), new, torch.minimum(old, new))
        else:
            raise ValueError(f"unknown weight memory {mode!r}")
        self.memory[idx] = kept
        return kept.to(score.device)

    def state_dict(self) -> dict | None:
        state: dict = {}
        if self.p.weight_memory != "none":
            state["memory"] = self.memory.clone()
        if self.p.ke_text == "frozen":
            # The frozen phrases must survive a resume: the model at resume time is no longer the start's.
            phrases = sorted(self.frozen_rows, key=self.frozen_rows.__getitem__)
            state["frozen_phrases"], state["frozen_table"] = phrases, self.frozen_table.clone()
        return state or None

    def load_state_dict(self, state: dict) -> None:
        if "memory" in state:
            self.memory = state["memory"].float().clone()
        if "frozen_table" in state:
            self.frozen_rows = {ke: i for i, ke in enumerate(state["frozen_phrases"])}
            self.frozen_table = state["frozen_table"].float().clone()

    def ke_mil_scores(self, patches: torch.Tensor, ke_emb: torch.Tensor, s_all: torch.Tensor,
                      ke_index: torch.Tensor, offset: int) -> torch.Tensor:
        """The KE loss's MIL scores, with the image-side gradient that ``ke_image`` allows.

        The text side (the KE embeddings) keeps its gradient in every mode.
        ``detached``: no gradient into the image tower; ``positives``: the
        image tower is trained only by its own KEs (pulled toward them), not
        pushed away from the batch's other KE sets; ``trunk`` is handled where
        the patches are made (their projection's weights detached).
        """
        p = self.p
        if p.ke_image == "detached":
            return L.mil_scores(L.alignment(patches.detach(), ke_emb), ke_index, p.ke_pool)
        z = L.mil_scores(s_all, ke_index, p.ke_pool)
        if p.ke_image == "positives":
            z_text_only = L.mil_scores(L.alignment(patches.detach(), ke_emb), ke_index, p.ke_pool)
            own = torch.zeros_like(z, dtype=torch.bool)
            rows = torch.arange(z.shape[0], device=z.device)
            own[rows, rows + offset] = True
            z = torch.where(own, z, z_text_only)
        return z

    def terms(self, model, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Each loss term (unweighted by its lambda) and the logs of one batch."""
        p = self.p
        if batch.knowledge is None:
            raise RuntimeError("semantic_shield needs knowledge elements on the batch (prepare_data attaches them)")
        want_attn = self.use_attn and p.lambda_attn > 0
        # ke_image=trunk: the patches' projection (shared with the pooled embedding) is not trained
        # through them; only the KE loss has a gradient path through the patches (the weights are
        # no_grad and the attention target is detached by default).
        out = model.image_outputs(batch.images, patches=True, attention=want_attn,
                                  patch_projection_grad=p.ke_image != "trunk")
        # Unique KE strings, encoded once, in the same text pass as the captions.
        uniq: dict[str, int] = {}
        rows = [[uniq.setdefault(ke, len(uniq)) for ke in kes] for kes in batch.knowledge]
        b = len(rows)
        device = batch.tokens.device
        ke_index = torch.tensor(rows, dtype=torch.long, device=device)
        ke_tokens = model.tokenize(list(uniq)).to(device)
        joint = p.text_pass == "joint" or (p.text_pass == "auto" and device.type == "cuda")
        if p.ke_text != "live":  # the KE loss trains no text tower
            txt, ke_emb = encode_texts(model, batch.tokens), self.ke_embeddings(model, list(uniq), device)
        elif joint:  # one launch: best on GPU
            text = encode_texts(model, torch.cat([batch.tokens, ke_tokens], dim=0))
            txt, ke_emb = text[:b], text[b:]
        else:  # fewer FLOPs (KEs are ~6 tokens, captions ~16): best on CPU
            txt, ke_emb = encode_texts(model, batch.tokens), encode_texts(model, ke_tokens)

        # Under DDP the columns are the global batch's KE sets (module docs of losses.py):
        # gather every rank's KE embeddings (with gradient) and index, shifted to the gathered rows.
        all_ke_index, ke_identity = ke_index, ke_index
        if D.is_distributed():
            ids = D.gather(D.stable_ids(list(uniq)).to(device))
            ke_emb_all = D.gather(ke_emb, grad=True)
            all_ke_index = D.gather(ke_index + D.rank_offset(len(uniq), device))
            ke_emb = ke_emb_all
            ke_identity = ids[all_ke_index]  # equal across ranks for equal KE strings
        s_all = L.alignment(out.patches, ke_emb)  # (B, M, U): this rank's patches x all KEs
        s_own = L.own_alignment(s_all, all_ke_index[batch.local])  # (B, M, K)
        terms: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}

        logs["align"] = float(s_own.detach().amax(dim=2).mean())
        w = None
        if self.weight_clip or self.weight_ke:
            # Memory and batch standardisation over the global batch: every rank computes the
            # same global weights and keeps its share.
            raw = D.gather(L.grounding(s_all, all_ke_index, p.weight_score, batch.offset))
            raw = self.remember(batch.all_rows(), raw)
            w_all = L.pair_weights(raw, p.weight_temperature, p.weight_form, standardize=p.weight_score == "own")
            w = w_all[batch.local]
        if self.weight_clip:
            terms["clip"] = (w * per_pair_clip_loss(out.embedding.float(), txt.float(), model.logit_scale)).mean()
            logs["w_min"], logs["w_max"] = float(w_all.min()), float(w_all.max())
            # Share of the batch the gate silences (weight under a tenth of the mean): the pairs that teach nothing.
            logs["w_gated"] = float((w_all < 0.1).float().mean())
        else:
            terms["clip"] = clip_loss(out.embedding.float(), txt.float(), model.logit_scale)
        if self.use_ke and p.lambda_ke > 0:
            z = self.ke_mil_scores(out.patches, ke_emb, s_all, all_ke_index, batch.offset)  # (B, B_global)
            ignore = L.shared_ke_mask(ke_identity)[batch.local] if p.mask_shared else None
            terms["ke"] = L.ke_loss(z, p.ke_scale, ignore, w if self.weight_ke else None, batch.offset)
        if want_attn:
            target = L.attention_target(s_own, p.tau)
            # Stop-gradient by default: the attention is pulled toward the
            # alignment, not the alignment toward the attention.
            target = target if p.attn_target_grad else target.detach()
            terms["attn"] = L.attention_loss(out.attention, target, p.attn_loss)
        for name, value in terms.items():
            logs[name] = float(value.detach())
        return terms, logs

    def __call__(self, model, batch: Batch) -> LossOutput:
        terms, logs = self.terms(model, batch)
        lam = {"clip": 1.0, "ke": self.p.lambda_ke, "attn": self.p.lambda_attn}
        loss = sum(lam[name] * value for name, value in terms.items())
        return LossOutput(loss, logs)


@register_defense("semantic_shield")
class SemanticShield(Defense):
    """Knowledge elements from a language model ground patches; ungrounded pairs are down-weighted."""

    paper = "Ishmam & Thomas, Semantic Shield, CVPR 2024"
    # 2: paper variants without the KE term, KE-inclusive forms renamed, the
    # attention target stop-gradient, raw weights.
    version = "2"
    needs = frozenset({"patches", "attention"})

    @dataclass(frozen=True)
    class Params:
        variant: str = param("weighted_ke", "paper rows: ke (CLIP + KE), attn (CLIP + attention), weighted_attn "
                             "(weighted CLIP + attention); ours: ke_attn, weighted_ke_attn, weighted_ke (default: "
                             "weighted CLIP + weighted KE + attention)", choices=VARIANTS)
        lambda_ke: float = param(0.1, "weight of the knowledge-element (MIL) loss", lo=0.0)
        lambda_attn: float = param(0.1, "weight of the attention loss (1.0 recommended for warp triggers)", lo=0.0)
        attn_loss: str = param("kl", "kl (default) or bce (as in the released code)", choices=("kl", "bce"))
        attn_target_grad: bool = param(False, "let the attention loss's gradient reach the attention target "
                                       "(the patch-KE alignment); default stop-gradient")
        tau: float = param(0.1, "temperature of the attention target softmax over patches", lo=0.0, lo_open=True)
        ke_scale: float = param(10.0, "logit scale on the cosine MIL scores in the BCE (1 leaves the loss stuck at ln 2)", lo=0.0, lo_open=True)
        mask_shared: bool = param(True, "ignore negatives that share a KE with the positive caption")
        weight_temperature: float = param(0.1, "temperature of the pair weights (sigmoid gate or softmax) over the grounding score", lo=0.0,
                                          lo_open=True)
        weight_score: str = param("contrast", "grounding score of a pair: own (paper: mean over patches of the best "
                                  "own-KE cosine) or contrast (own KEs vs the batch's other KE sets, per image)",
                                  choices=("own", "contrast"))
        weight_memory: str = param("none", "none (paper: weights from the current model at every step), first "
                                   "(each pair's grounding frozen at its first visit) or min (lowest seen)",
                                   choices=("none", "first", "min"))
        weight_form: str = param("sigmoid", "pair weights from the grounding score: sigmoid (bounded gate, mean 1), "
                                 "softmax (B x softmax), or raw (paper: w = A[i,i] itself, needs weight_score=own)",
                                 choices=("softmax", "sigmoid", "raw"))
        text_pass: str = param("auto", "encode KEs with the captions in one text pass (joint), in a second short "
                               "pass (separate), or auto (joint on CUDA, separate on CPU)",
                               choices=("auto", "joint", "separate"))
        knowledge: str = param("default", "knowledge source: default (the dataset's) or a registered name "
                               "(synthetic, llm, file, lexicon)")
        knowledge_model: str = param("", "llm source: hub id or local folder")
        knowledge_path: str = param("", "file source: JSONL path")
        ke_text: str = param("live", "text tower that encodes the KE phrases: live (the model's, trained by the KE "
                             "loss), detached (the model's, no gradient: the KE loss trains the image tower only) "
                             "or frozen (the text tower at the start of training, encoded once)",
                             choices=("live", "detached", "frozen"))
        ke_image: str = param("live", "image side of the KE loss: live (it trains the image tower through the patch "
                              "tokens and the shared projection), detached (it does not), trunk (the tower below "
                              "the projection only), positives (only the pull toward the image's own KEs)",
                              choices=("live", "detached", "trunk", "positives"))
        ke_pool: str = param("max", "KE loss score of an image and a KE set: max (paper: the best patch-KE pair) or "
                             "mean (each KE's best patch, averaged over the set: every KE is trained)",
                             choices=("max", "mean"), added=True)

    def __init__(self, spec) -> None:
        super().__init__(spec)
        from shieldbench.registry import KNOWLEDGE

        if self.params.knowledge != "default" and self.params.knowledge not in KNOWLEDGE:
            raise UserError(KNOWLEDGE.unknown_message(self.params.knowledge))
        if self.params.weight_form == "raw" and self.params.weight_score != "own":
            # The contrast score is a z-score (negative for half the pairs): as a
            # raw weight it would make the model *maximise* those pairs' loss.
            raise UserError("semantic_shield: defense.weight_form=raw is the paper's l * A[i,i] and needs "
                            "defense.weight_score=own")

    def knowledge_source(self, ctx: DefenseContext):
        p = self.params
        if p.knowledge == "default":
            if ctx.knowledge_source is None:
                raise UserError("semantic_shield: this dataset has no default knowledge source; set "
                                "defense.knowledge=llm|file|lexicon")
            return ctx.knowledge_source
        from shieldbench.knowledge import make_knowledge_source

        return make_knowledge_source(p.knowledge, k=ctx.knowledge_k, cache_dir=ctx.cache_dir or None,
                                     model=p.knowledge_model, path=p.knowledge_path)

    def prepare_data(self, data: TrainView, ctx: DefenseContext) -> TrainView:
        """Attach exactly ``knowledge_k`` KEs per caption, from the caption text alone."""
        source = self.knowledge_source(ctx)
        knowledge = [tuple(k) for k in source(data.captions)]
        k = ctx.knowledge_k
        bad = [i for i, kes in enumerate(knowledge) if len(kes) != k]
        if bad:
            raise RuntimeError(f"knowledge source returned {len(knowledge[bad[0]])} elements for caption "
                               f"{data.caption(bad[0])!r}; exactly {k} are required")
        return data.with_knowledge(knowledge)

    def objective(self, ctx: DefenseContext) -> SemanticShieldObjective:
        return SemanticShieldObjective(self.params)
