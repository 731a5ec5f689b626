"""Semantic Shield: each loss term by hand, gradients, stop-gradient weights, exactly-k KEs."""

from __future__ import annotations

import math

import pytest
import torch

from shieldbench.data.synthetic import knowledge_from_caption
from shieldbench.data.views import TrainView
from shieldbench.defenses.base import DefenseContext
from shieldbench.defenses.semantic_shield import SemanticShield
from shieldbench.defenses.semantic_shield import losses as L
from shieldbench.defenses.semantic_shield.defense import encode_texts
from shieldbench.errors import UserError
from shieldbench.knowledge import knowledge_source_for
from shieldbench.registry import DEFENSES
from shieldbench.spec import DataSpec, DefenseSpec, TrainSpec
from shieldbench.training.contracts import Batch
from shieldbench.training.losses import per_pair_clip_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# -- hand-computed terms ---------------------------------------------------------------------

S_ALL = torch.tensor([
    [[0.1, 0.5, -0.2, 0.0], [0.3, 0.0, 0.4, -0.5]],
    [[0.2, -0.1, 0.6, 0.1], [0.0, 0.7, 0.1, 0.2]],
])  # (B=2, M=2, U=4)
KE_INDEX = torch.tensor([[0, 1], [2, 3]])  # caption 0: KEs 0,1; caption 1: KEs 2,3


def test_alignment_is_cosine():
    p = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])
    e = torch.tensor([[1.0, 0.0], [0.0, -5.0]])
    s = L.alignment(p, e)
    assert torch.allclose(s, torch.tensor([[[0.6, -0.8], [0.0, -1.0]]]))


def test_mil_scores_by_hand():
    # best patch per KE: image 0 -> [0.3, 0.5, 0.4, 0.0], image 1 -> [0.2, 0.7, 0.6, 0.2]
    z = L.mil_scores(S_ALL, KE_INDEX)
    assert torch.allclose(z, torch.tensor([[0.5, 0.4], [0.7, 0.6]]))
    own = L.own_alignment(S_ALL, KE_INDEX)
    assert torch.allclose(own[1], torch.tensor([[0.6, 0.1], [0.1, 0.2]]))
    # ke_pool=mean: each KE's best patch, averaged over the caption's KEs.
    z_mean = L.mil_scores(S_ALL, KE_INDEX, "mean")
    assert torch.allclose(z_mean, torch.tensor([[0.4, 0.2], [0.45, 0.4]]))


def test_set_scores_by_hand():
    # A[i, j] = mean over patches of the best cosine with caption j's KEs.
    # image 0: patch 0 -> caption 0: max(0.1, 0.5)=0.5, caption 1: max(-0.2, 0)=0; patch 1 -> 0.3, 0.4
    # image 1: patch 0 -> 0.2, 0.6; patch 1 -> 0.7, 0.2
    a = L.set_alignment(S_ALL, KE_INDEX)
    assert torch.allclose(a, torch.tensor([[0.4, 0.2], [0.45, 0.4]]))
    # contrast (row z-score): image 0: (0.4 - 0.3) / 0.1 = 1; image 1: (0.4 - 0.425) / 0.025 = -1
    assert torch.allclose(L.grounding_from_sets(a, "contrast"), torch.tensor([1.0, -1.0]), atol=1e-4)
    # column (caption i against the batch's images): caption 0: (0.4 - 0.425) / 0.025 = -1;
    # caption 1: (0.4 - 0.3) / 0.1 = 1; two_way: their mean.
    assert torch.allclose(L.grounding_from_sets(a, "column"), torch.tensor([-1.0, 1.0]), atol=1e-4)
    assert torch.allclose(L.grounding_from_sets(a, "two_way"), torch.tensor([0.0, 0.0]), atol=1e-4)
    with pytest.raises(ValueError, match="square"):
        L.grounding_from_sets(a[:1], "column", offset=0)


def test_ke_loss_by_hand():
    z = torch.tensor([[0.5, 0.4], [0.7, 0.6]])
    row0 = 0.5 * (softplus(-0.5) + softplus(0.4))
    row1 = 0.5 * (softplus(-0.6) + softplus(0.7))
    assert L.ke_loss(z).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # scale multiplies the logits; weights multiply the rows
    assert L.ke_loss(z, scale=2.0).item() == pytest.approx(
        (0.5 * (softplus(-1.0) + softplus(0.8)) + 0.5 * (softplus(-1.2) + softplus(1.4))) / 2, rel=1e-6)
    w = torch.tensor([0.5, 1.5])
    assert L.ke_loss(z, weight=w).item() == pytest.approx((0.5 * row0 + 1.5 * row1) / 2, rel=1e-6)
    # an ignored negative leaves only the positive (balanced: the empty negative mean is 0)
    ignore = torch.tensor([[False, True], [True, False]])
    assert L.ke_loss(z, ignore=ignore).item() == pytest.approx(0.25 * (softplus(-0.5) + softplus(-0.6)), rel=1e-6)


def test_shared_ke_mask():
    idx = torch.tensor([[0, 1], [1, 2], [3, 4]])
    m = L.shared_ke_mask(idx)
    assert m.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_attention_kl_and_bce_by_hand():
    attn = torch.tensor([[[0.2, 0.6], [0.4, 0.4]]])  # (B=1, heads=2, M=2): head mean [0.3, 0.5]
    s_own = torch.tensor([[[0.1], [0.3]]])  # (B=1, M=2, K=1)
    t = L.attention_target(s_own, tau=0.1)
    t1 = math.exp(3) / (math.exp(1) + math.exp(3))
    assert torch.allclose(t, torch.tensor([[1 - t1, t1]]), atol=1e-6)
    a = [0.375, 0.625]
    kl = (1 - t1) * math.log((1 - t1) / a[0]) + t1 * math.log(t1 / a[1])
    assert L.attention_loss(attn, t, "kl").item() == pytest.approx(kl, rel=1e-5)
    bce = 0.5 * ((softplus(0.3) - (1 - t1) * 0.3) + (softplus(0.5) - t1 * 0.5))
    assert L.attention_loss(attn, t, "bce").item() == pytest.approx(bce, rel=1e-5)


def test_pair_weights_by_hand_and_stop_gradient():
    raw = torch.tensor([0.1, 0.2, 0.6], requires_grad=True)
    w = L.pair_weights(raw)
    r = raw.tolist()
    mean = sum(r) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
    e = [math.exp((x - mean) / (std + 1e-6)) for x in r]
    assert torch.allclose(w, torch.tensor([3 * x / sum(e) for x in e]), atol=1e-5)
    assert w.sum().item() == pytest.approx(3.0, rel=1e-6)
    assert not w.requires_grad
    per_pair = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    (w * per_pair).mean().backward()
    assert raw.grad is None  # nothing flows into the alignment through the weights
    assert torch.allclose(per_pair.grad, w / 3)
    # sigmoid gate on unstandardised scores: sigmoid(z / T), rescaled to mean 1
    z = [-1.0, 0.0, 2.0]
    g = [1 / (1 + math.exp(-x / 0.5)) for x in z]
    got = L.pair_weights(torch.tensor(z), 0.5, "sigmoid", standardize=False)
    assert torch.allclose(got, torch.tensor([3 * x / sum(g) for x in g]), atol=1e-5)


def test_grounding_scores_by_hand():
    # B=3 images, M=2 patches, K=1 KE per caption, U=3 unique KEs (caption j owns KE j).
    s_all = torch.tensor([
        [[0.9, 0.1, 0.0], [0.5, 0.3, 0.1]],   # image 0 matches its own KE best
        [[0.2, 0.1, 0.8], [0.4, 0.3, 0.6]],   # image 1 matches caption 2's KE, not its own
        [[0.0, 0.0, 0.4], [0.2, 0.2, 0.2]],
    ], requires_grad=True)
    ke_index = torch.tensor([[0], [1], [2]])
    a = L.set_alignment(s_all, ke_index)  # mean over patches
    want = torch.tensor([[0.7, 0.2, 0.05], [0.3, 0.2, 0.7], [0.1, 0.1, 0.3]])
    assert torch.allclose(a, want, atol=1e-6)
    own = L.grounding(s_all, ke_index, "own")
    assert torch.allclose(own, want.diagonal(), atol=1e-6) and not own.requires_grad
    c = L.grounding(s_all, ke_index, "contrast")
    rows = want.tolist()
    expect = []
    for i, row in enumerate(rows):
        m = sum(row) / 3
        sd = math.sqrt(sum((x - m) ** 2 for x in row) / 3)
        expect.append((row[i] - m) / (sd + 1e-6))
    assert torch.allclose(c, torch.tensor(expect), atol=1e-5)
    assert c[0] > 0 > c[1]  # the mismatched pair scores below its batch, the matched one above
    # With K=2 the best of the caption's KEs counts (max over k before the mean over patches).
    ke2 = torch.tensor([[0, 1], [1, 2], [2, 0]])
    assert L.set_alignment(s_all, ke2)[1, 1].item() == pytest.approx((0.8 + 0.6) / 2)
    with pytest.raises(ValueError):
        L.grounding(s_all, ke_index, "nope")


def test_weight_memory_first_and_min():
    first = _objective(weight_memory="first")
    low = _objective(weight_memory="min")
    online = _objective()
    a = first.remember(torch.tensor([0, 3]), torch.tensor([0.5, -1.0]))
    assert a.tolist() == [0.5, -1.0]
    b = first.remember(torch.tensor([3, 1]), torch.tensor([2.0, 0.2]))
    assert b.tolist() == [-1.0, pytest.approx(0.2)]  # row 3 keeps its first score, row 1 is new
    low.remember(torch.tensor([0, 3]), torch.tensor([0.5, -1.0]))
    c = low.remember(torch.tensor([0, 3]), torch.tensor([0.1, 2.0]))
    assert c.tolist() == [pytest.approx(0.1), -1.0]
    assert online.remember(torch.tensor([0]), torch.tensor([7.0])).tolist() == [7.0]
    # state round trip (the trainer checkpoints it)
    again = _objective(weight_memory="first")
    again.load_state_dict(first.state_dict())
    assert again.remember(torch.tensor([3]), torch.tensor([9.0])).tolist() == [-1.0]
    assert online.state_dict() is None


# -- through the model -------------------------------------------------------------------------

CAPTIONS = [
    "a red banana on a dark background", "a photo of a kite.", "a large blue donut with a hole in the middle",
    "a green tent near the top", "a small white star on a striped background", "a cross with crossing arms",
]


@pytest.fixture()
def model_and_batch():
    from shieldbench.models.factory import build_model

    torch.manual_seed(0)
    model = build_model("micro-vit", "", 32).train()
    knowledge = [knowledge_from_caption(c, 3) for c in CAPTIONS]
    batch = Batch(images=torch.rand(len(CAPTIONS), 3, 32, 32), captions=CAPTIONS,
                  tokens=model.tokenize(CAPTIONS), index=torch.arange(len(CAPTIONS)), knowledge=knowledge)
    return model, batch


def _objective(**options):
    return SemanticShield(DefenseSpec("semantic_shield", options)).objective(None)


def _grad_norms(model):
    vis = sum(float(p.grad.abs().sum()) for p in model.clip.visual.parameters() if p.grad is not None)
    txt = sum(float(p.grad.abs().sum()) for n, p in model.clip.named_parameters()
              if not n.startswith("visual.") and n != "logit_scale" and p.grad is not None)
    return vis, txt


@pytest.mark.parametrize("term", ["clip", "ke", "attn"])
@pytest.mark.parametrize("attn_loss", ["kl", "bce"])
def test_every_term_reaches_both_towers(model_and_batch, term, attn_loss):
    model, batch = model_and_batch
    terms, logs = _objective(variant="weighted_ke", attn_loss=attn_loss, attn_target_grad=True).terms(model, batch)
    assert set(terms) == {"clip", "ke", "attn"} and set(terms) <= set(logs)
    model.zero_grad(set_to_none=True)
    terms[term].backward()
    vis, txt = _grad_norms(model)
    assert vis > 0 and txt > 0, (term, vis, txt)


def test_default_attention_term_trains_only_the_image_tower(model_and_batch):
    model, batch = model_and_batch
    terms, _ = _objective(variant="attn").terms(model, batch)
    model.zero_grad(set_to_none=True)
    terms["attn"].backward()
    vis, txt = _grad_norms(model)
    assert vis > 0 and txt == 0, (vis, txt)  # the KE embeddings only form the (detached) target


def test_variants_are_the_paper_rows_and_ours_keep_their_names(model_and_batch):
    model, batch = model_and_batch
    # Paper rows as the released code trains them: no KE term in attn / weighted_attn.
    want = {"ke": {"clip", "ke"}, "attn": {"clip", "attn"}, "weighted_attn": {"clip", "attn"},
            "ke_attn": {"clip", "ke", "attn"}, "weighted_ke_attn": {"clip", "ke", "attn"},
            "weighted_ke": {"clip", "ke", "attn"}}
    for variant, names in want.items():
        obj = _objective(variant=variant)
        terms, logs = obj.terms(model, batch)
        assert set(terms) == names, variant
        assert ("w_min" in logs) == variant.startswith("weighted"), variant
        out = obj(model, batch)
        lam = {"clip": 1.0, "ke": obj.p.lambda_ke, "attn": obj.p.lambda_attn}
        assert out.loss.item() == pytest.approx(sum(lam[n] * float(v.detach()) for n, v in terms.items()), rel=1e-5)
    assert "attn" not in _objective(variant="attn", lambda_attn=0.0)(model, batch).logs


def test_weighted_ke_differs_from_weighted_ke_attn_only_in_the_ke_rows(model_and_batch):
    model, batch = model_and_batch
    a, _ = _objective(variant="weighted_ke_attn").terms(model, batch)
    b, _ = _objective(variant="weighted_ke").terms(model, batch)
    assert float(a["clip"]) == pytest.approx(float(b["clip"]), rel=1e-5)
    assert float(a["attn"]) == pytest.approx(float(b["attn"]), rel=1e-5)
    assert float(a["ke"]) != pytest.approx(float(b["ke"]), rel=1e-3)


def test_attention_target_is_stop_gradient_unless_asked(model_and_batch):
    """Default: only the attention moves toward the target. attn_target_grad: the alignment moves too."""
    model, batch = model_and_batch
    proj = model.clip.visual.proj  # patch tokens reach the alignment only through the projection...

    def proj_grad(**kw) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        terms, _ = _objective(variant="attn", **kw).terms(model, batch)
        terms["attn"].backward()
        return proj.grad.clone() if proj.grad is not None else torch.zeros_like(proj)

    # ...and the CLS->patch attention of the last block never passes through it.
    assert float(proj_grad().abs().sum()) == 0.0
    assert float(proj_grad(attn_target_grad=True).abs().sum()) > 0.0


def test_raw_weights_are_the_paper_score_itself():
    s_all = S_ALL
    own = L.grounding(s_all, KE_INDEX, "own")
    # A[i,i]: image 0 patches -> best of KEs 0,1: [0.5, 0.3] -> 0.4; image 1 -> KEs 2,3: [0.6, 0.2] -> 0.4
    assert torch.allclose(own, torch.tensor([0.4, 0.4]))
    w = L.pair_weights(torch.tensor([0.2, 0.5, -0.1]), form="raw")
    assert torch.equal(w, torch.tensor([0.2, 0.5, -0.1]))  # no standardisation, no rescaling
    with pytest.raises(UserError, match="weight_score=own"):
        SemanticShield(DefenseSpec("semantic_shield", {"weight_form": "raw", "weight_score": "contrast"}))
    SemanticShield(DefenseSpec("semantic_shield", {"weight_form": "raw", "weight_score": "own"}))


@pytest.mark.parametrize("score", ["own", "contrast"])
def test_weighted_clip_term_uses_stop_gradient_weights(model_and_batch, score):
    model, batch = model_and_batch
    obj = _objective(variant="weighted_attn", lambda_ke=0.0, lambda_attn=0.0, weight_score=score)
    model.zero_grad(set_to_none=True)
    obj(model, batch).loss.backward()
    got = {n: p.grad.clone() for n, p in model.clip.named_parameters() if p.grad is not None}

    # The same loss with the weights computed separately and frozen as constants.
    model.zero_grad(set_to_none=True)
    out = model.image_outputs(batch.images, patches=True)
    uniq = list(dict.fromkeys(k for ks in batch.knowledge for k in ks))
    idx = torch.tensor([[uniq.index(k) for k in ks] for ks in batch.knowledge])
    with torch.no_grad():
        s_all = L.alignment(out.patches, encode_texts(model, model.tokenize(uniq)))  # the objective's own path
        w_const = L.pair_weights(L.grounding(s_all, idx, obj.p.weight_score), obj.p.weight_temperature,
                                 obj.p.weight_form, standardize=obj.p.weight_score == "own")
    txt = model.encode_text(batch.tokens)
    (w_const * per_pair_clip_loss(out.embedding, txt, model.logit_scale)).mean().backward()
    for n, p in model.clip.named_parameters():
        if n in got:
            assert torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4), n
    # Patch tokens only enter through the weights: the patch projection path gets no gradient
    # beyond what the pooled embedding gives it (identical grads above prove it).


def test_encode_texts_matches_open_clip(model_and_batch):
    model, batch = model_and_batch
    toks = model.tokenize(CAPTIONS + ["curved body"])
    assert torch.allclose(encode_texts(model, toks), model.encode_text(toks), atol=1e-5)


# -- data preparation ----------------------------------------------------------------------------

def _ctx(k=3, source=None):
    src = source if source is not None else knowledge_source_for(DataSpec(knowledge_k=k))
    return DefenseContext(seed=0, train=TrainSpec(), device=torch.device("cpu"), knowledge_k=k, knowledge_source=src)


def test_prepare_data_attaches_exactly_k_from_caption_text():
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)  # the images say nothing; only text is read
    caps = ["a photo of a banana.", "a red kite on the left", "a photo of a banana."]
    view = TrainView(images, caps, knowledge=[("stale",)] * 3)  # stale knowledge is replaced
    for k in (1, 3, 5):
        out = SemanticShield(DefenseSpec("semantic_shield")).prepare_data(view, _ctx(k))
        assert all(len(kes) == k for kes in out.knowledge)
        # a "poisoned" pair gets its (poisoned) caption's KEs, identical for the same text
        assert out.knowledge[0] == knowledge_from_caption(caps[0], k) == out.knowledge[2]
        assert out.captions == caps and torch.equal(out.uint8_images([0, 1, 2]), images)


def test_prepare_data_rejects_wrong_k_and_missing_source():
    view = TrainView(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"])
    bad = lambda caps: [("x", "y")] * len(caps)  # noqa: E731
    with pytest.raises(RuntimeError, match="exactly 3"):
        SemanticShield(DefenseSpec("semantic_shield")).prepare_data(view, _ctx(3, bad))
    ctx = DefenseContext(seed=0, train=TrainSpec(), device=torch.device("cpu"))
    with pytest.raises(UserError, match="no default knowledge source"):
        SemanticShield(DefenseSpec("semantic_shield")).prepare_data(view, ctx)
    out = SemanticShield(DefenseSpec("semantic_shield", {"knowledge": "lexicon"})).prepare_data(
        TrainView(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a red kite"]), ctx)
    assert out.knowledge[0][0] == "red kite"


def test_registered_training_time_only_and_options_validated():
    cls = DEFENSES.get("semantic_shield")
    assert cls is SemanticShield and cls.trains() and not cls.repairs()
    assert {"patches", "attention"} <= cls.needs
    with pytest.raises(UserError, match="variant"):
        cls(DefenseSpec("semantic_shield", {"variant": "nope"}))
    with pytest.raises(UserError, match="unknown knowledge"):
        cls(DefenseSpec("semantic_shield", {"knowledge": "nope"}))


def test_joint_and_separate_text_pass_agree(model_and_batch):
    model, batch = model_and_batch
    a = _objective(text_pass="joint")(model, batch).loss
    b = _objective(text_pass="separate")(model, batch).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-4)


def test_resnet_tower_works(model_and_batch):
    from shieldbench.models.factory import build_model

    _, batch = model_and_batch
    model = build_model("tiny-rn", "", 32).train()
    batch.tokens = model.tokenize(batch.captions)
    out = _objective()(model, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and {"clip", "ke", "attn"} <= set(out.logs)


@pytest.mark.parametrize("ke_text", ["detached", "frozen"])
def test_ke_text_detached_or_frozen_keeps_the_ke_loss_off_the_text_tower(model_and_batch, ke_text):
    model, batch = model_and_batch
    live, _ = _objective(variant="ke").terms(model, batch)
    obj = _objective(variant="ke", ke_text=ke_text)
    if ke_text == "frozen":
        trainer = type("T", (), {"data": type("D", (), {"knowledge": batch.knowledge})(), "model": model,
                                 "device": torch.device("cpu")})()
        obj.on_train_start(trainer)
        assert len(obj.frozen_rows) == len({ke for kes in batch.knowledge for ke in kes})
    terms, _ = obj.terms(model, batch)
    # Same model, same phrases: the same loss value; only the gradient's path differs.
    assert float(terms["ke"].detach()) == pytest.approx(float(live["ke"].detach()), rel=1e-5)
    model.zero_grad(set_to_none=True)
    terms["ke"].backward()
    vis, txt = _grad_norms(model)
    assert vis > 0 and txt == 0, (vis, txt)
    if ke_text == "frozen":
        # The table is the start's: a changed text tower does not move it, and it survives a resume.
        phrases, cpu = sorted(obj.frozen_rows), torch.device("cpu")
        before = obj.ke_embeddings(model, phrases, cpu)
        with torch.no_grad():
            model.clip.token_embedding.weight.add_(torch.randn_like(model.clip.token_embedding.weight))
        assert torch.equal(obj.ke_embeddings(model, phrases, cpu), before)
        assert not torch.allclose(_objective(ke_text="detached").ke_embeddings(model, phrases, cpu), before, atol=1e-3)
        restored = _objective(variant="ke", ke_text="frozen")
        restored.load_state_dict(obj.state_dict())
        assert torch.equal(restored.frozen_table, obj.frozen_table) and restored.frozen_rows == obj.frozen_rows


def test_ke_image_detached_keeps_the_ke_loss_off_the_image_tower(model_and_batch):
    model, batch = model_and_batch
    terms, _ = _objective(variant="ke", ke_image="detached").terms(model, batch)
    model.zero_grad(set_to_none=True)
    terms["ke"].backward()
    vis, txt = _grad_norms(model)
    assert vis == 0 and txt > 0, (vis, txt)


def test_ke_image_trunk_trains_the_tower_but_not_the_shared_projection(model_and_batch):
    model, batch = model_and_batch
    live, _ = _objective(variant="ke").terms(model, batch)
    terms, _ = _objective(variant="ke", ke_image="trunk").terms(model, batch)
    assert float(terms["ke"].detach()) == pytest.approx(float(live["ke"].detach()), rel=1e-5)
    model.zero_grad(set_to_none=True)
    terms["ke"].backward(retain_graph=True)
    proj = model.clip.visual.proj
    assert proj.grad is None or float(proj.grad.abs().sum()) == 0
    vis, txt = _grad_norms(model)
    assert vis > 0 and txt > 0, (vis, txt)
    # The pooled embedding's path through the projection is untouched: the CLIP term still trains it.
    model.zero_grad(set_to_none=True)
    terms["clip"].backward()
    assert float(proj.grad.abs().sum()) > 0


def test_ke_image_positives_sends_only_the_own_ke_pull_into_the_image_tower(model_and_batch):
    from shieldbench.defenses.semantic_shield import losses as L

    model, batch = model_and_batch
    obj = _objective(variant="ke", ke_image="positives")
    live, _ = _objective(variant="ke").terms(model, batch)
    terms, _ = obj.terms(model, batch)
    assert float(terms["ke"].detach()) == pytest.approx(float(live["ke"].detach()), rel=1e-5)
    # The image-side gradient equals that of a loss whose negatives see detached patches, and it
    # differs from the live one (which also pushes patches away from other captions' KEs).
    patches = torch.randn(4, 5, 8, requires_grad=True)
    ke_emb = torch.randn(12, 8)
    index = torch.arange(12).view(4, 3)
    z = obj.ke_mil_scores(patches, ke_emb, L.alignment(patches, ke_emb), index, 0)
    L.ke_loss(z, 10.0).backward()
    got = patches.grad.clone()
    patches.grad = None
    z_live = L.mil_scores(L.alignment(patches, ke_emb), index)
    diag = torch.diagonal(z_live)
    # Only the diagonal (own KE set) of the live scores carries the image gradient.
    bce_pos = torch.nn.functional.binary_cross_entropy_with_logits(diag * 10.0, torch.ones(4), reduction="none")
    (0.5 * bce_pos).mean().backward()
    assert torch.allclose(got, patches.grad, atol=1e-6)
    patches.grad = None
    L.ke_loss(L.mil_scores(L.alignment(patches, ke_emb), index), 10.0).backward()
    assert not torch.allclose(got, patches.grad, atol=1e-4)


def test_an_added_option_at_its_default_leaves_run_ids_alone():
    """ke_pool was added after runs were recorded: at its default it is not in the spec, set it is."""
    from shieldbench.api import resolve
    from shieldbench.benchmark.runner import run_id_for
    from shieldbench.spec import ExperimentSpec

    plain = resolve(ExperimentSpec(defense=DefenseSpec("semantic_shield")))
    explicit = resolve(ExperimentSpec(defense=DefenseSpec("semantic_shield", {"ke_pool": "max"})))
    other = resolve(ExperimentSpec(defense=DefenseSpec("semantic_shield", {"ke_pool": "mean"})))
    assert "ke_pool" not in plain.defense.options and plain.defense.options["ke_image"] == "live"
    assert run_id_for(plain) == run_id_for(explicit) != run_id_for(other)
    assert other.defense.options["ke_pool"] == "mean"
    # The defense built from the spec without the key has the default.
    assert SemanticShield(plain.defense).params.ke_pool == "max"
