"""CleanCLIP and RoCLIP: losses vs hand values, EDA, FIFO pool, hook detection, runner reuse."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shieldbench import api
from shieldbench.data.views import TrainView
from shieldbench.defenses.augment import eda, make_image_augmenter, synonyms
from shieldbench.defenses.base import DefenseContext
from shieldbench.defenses.cleanclip import CleanCLIP, CleanCLIPObjective, inmodal_loss
from shieldbench.defenses.roclip import FIFOPool, RoCLIP, RoCLIPTraining
from shieldbench.models import build_model
from shieldbench.spec import DefenseSpec, TrainSpec
from shieldbench.training.contracts import Batch, LossOutput
from shieldbench.training.trainer import TrainConfig, Trainer


def _ce(row: list[float], target: int) -> float:
    return -row[target] + math.log(sum(math.exp(v) for v in row))


# -- losses ----------------------------------------------------------------------------------
def test_inmodal_loss_hand_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
    x_aug = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # normalised: (0.6, 0.8), e2
    scale = torch.log(torch.tensor(2.0))  # logit scale exp = 2
    # logits = 2 * [[0.6, 0], [0.8, 1]]; rows are originals, targets on the diagonal.
    expected = 0.5 * (_ce([1.2, 0.0], 0) + _ce([1.6, 2.0], 1))
    assert float(inmodal_loss(x, x_aug, scale)) == pytest.approx(expected, rel=1e-6)
    # One-directional: swapping the roles changes the value (columns are the views).
    assert float(inmodal_loss(x_aug, x, scale)) == pytest.approx(0.5 * (_ce([1.2, 1.6], 0) + _ce([0.0, 2.0], 1)), rel=1e-6)


class FakeModel(torch.nn.Module):
    """Encoders that look embeddings up by caption / by the first pixel of an image."""

    def __init__(self, text_table: dict[str, list[float]], image_table: list[list[float]]) -> None:
        super().__init__()
        self.names = list(text_table)
        self.text = torch.nn.Parameter(torch.tensor([text_table[n] for n in self.names]))
        self.image = torch.nn.Parameter(torch.tensor(image_table))
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0))  # exp = 1

    def tokenizer(self, captions):
        return torch.tensor([[self.names.index(c)] for c in captions])

    def tokenize(self, captions):
        return self.tokenizer(captions)

    def encode_text(self, tokens):
        return self.text[tokens[:, 0]]

    def encode_image(self, images):
        return self.image[images[:, 0, 0, 0].long()]


def _batch(model, captions, image_rows, epoch):
    images = torch.zeros(len(image_rows), 3, 2, 2)
    images[:, 0, 0, 0] = torch.tensor(image_rows, dtype=torch.float)
    return Batch(images=images, captions=captions, tokens=model.tokenize(captions),
                 index=torch.arange(len(captions)), epoch=epoch, step=0)


def _roclip(**kw):
    return RoCLIPTraining(image_aug="none", eda=False, **kw)


def test_roclip_matching_loss_hand_values_and_lookup_before_enqueue():
    texts = {"p0": [1.0, 0.0], "p1": [0.0, 1.0], "p2": [0.6, 0.8], "own0": [1.0, 0.0], "own1": [0.8, 0.6]}
    model = FakeModel(texts, [[1.0, 0.0], [0.8, 0.6]])
    rc = _roclip(pool_size=8, match_every=2)
    rc.pool = FIFOPool(8, 2)
    rc.pool.enqueue(model.text[:3].detach(), ["p0", "p1", "p2"])
    # Epoch 1 (0-based) is a matching epoch for K = 2. The batch's own captions
    # equal the images exactly, so matching after enqueueing would pick them.
    assert not rc.is_matching_epoch(0) and rc.is_matching_epoch(1) and rc.is_matching_epoch(3)
    batch = _batch(model, ["own0", "own1"], [0, 1], epoch=1)
    out = rc(model, batch)
    loss = float(out.loss.detach())
    # image 0 -> p0 (cos 1); image 1 (0.8, 0.6) -> p2 (cos 0.96 > 0.8 for p0)
    # logits = [[1, 0.6], [0.8, 0.96]]; symmetric InfoNCE.
    i2t = (_ce([1.0, 0.6], 0) + _ce([0.8, 0.96], 1)) / 2
    t2i = (_ce([1.0, 0.8], 0) + _ce([0.6, 0.96], 1)) / 2
    assert loss == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)
    assert len(rc.pool) == 3  # nothing enqueued during the loss
    rc.on_step_end(None, batch, out)
    assert len(rc.pool) == 5 and rc.pool.captions[3:5] == ["own0", "own1"]
    # Reference behaviour (default): the text tower gets no gradient on matching epochs.
    out.loss.backward()
    assert model.text.grad is None and model.image.grad is not None


def test_roclip_text_grad_on_match_and_plain_epochs():
    texts = {"p0": [1.0, 0.0], "p1": [0.0, 1.0], "own0": [0.9, 0.1], "own1": [0.2, 0.8]}
    model = FakeModel(texts, [[1.0, 0.0], [0.0, 1.0]])
    rc = _roclip(pool_size=4, match_every=2, text_grad_on_match=True)
    rc.pool = FIFOPool(4, 2)
    rc.pool.enqueue(model.text[:2].detach(), ["p0", "p1"])
    out = rc(model, _batch(model, ["own0", "own1"], [0, 1], epoch=1))
    out.loss.backward()
    grad = model.text.grad
    assert grad is not None and grad[:2].abs().sum() > 0  # matched captions p0, p1 re-encoded
    assert grad[2:].abs().sum() == 0  # the batch's own captions: no gradient on a matching epoch
    # A plain epoch is the CLIP loss on the batch's own pairs.
    model.zero_grad()
    out = rc(model, _batch(model, ["own0", "own1"], [0, 1], epoch=0))
    logits = [[0.9 / math.hypot(0.9, 0.1), 0.2 / math.hypot(0.2, 0.8)],
              [0.1 / math.hypot(0.9, 0.1), 0.8 / math.hypot(0.2, 0.8)]]
    i2t = (_ce(logits[0], 0) + _ce(logits[1], 1)) / 2
    t2i = (_ce([logits[0][0], logits[1][0]], 0) + _ce([logits[0][1], logits[1][1]], 1)) / 2
    assert float(out.loss.detach()) == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)


# -- FIFO -----------------------------------------------------------------------------------
def test_fifo_keeps_everything_until_overwritten_and_wraps():
    pool = FIFOPool(5, 1)
    v = lambda *xs: torch.tensor([[float(x)] for x in xs])  # noqa: E731  (1-d embeddings normalise to +-1)
    pool.enqueue(v(1, 1, 1), ["a", "b", "c"])
    assert len(pool) == 3 and pool.captions[:3] == ["a", "b", "c"] and pool.ptr == 3
    pool.enqueue(v(1, 1, 1, 1), ["d", "e", "f", "g"])  # wraps: f, g overwrite a, b
    assert len(pool) == 5 and pool.ptr == 2
    assert sorted(pool.captions) == ["c", "d", "e", "f", "g"]
    assert pool.captions == ["f", "g", "c", "d", "e"]
    pool.enqueue(v(1), ["h"])  # overwrites the oldest (c) only
    assert sorted(pool.captions) == ["d", "e", "f", "g", "h"]
    pool.enqueue(v(*range(1, 8)), list("1234567"))  # larger than the pool: the newest 5 survive
    assert sorted(pool.captions) == ["3", "4", "5", "6", "7"] and pool.total == 15
    # Order is still oldest-first from ptr.
    order = [pool.captions[(pool.ptr + i) % 5] for i in range(5)]
    assert order == ["3", "4", "5", "6", "7"]
    # Embeddings travel with their captions and are normalised.
    pool2 = FIFOPool(3, 2)
    pool2.enqueue(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), ["x", "y"])
    assert torch.allclose(pool2.valid(), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert pool2.nearest(torch.tensor([[0.1, 5.0], [1.0, 1.0]])).tolist() == [1, 0]


def test_pool_initialised_from_real_caption_embeddings(smoke_world):
    torch.manual_seed(0)
    model = build_model("micro-vit").eval()
    view = TrainView.from_pairs(smoke_world.train.subset(range(40)))
    rc = _roclip(pool_size=32)
    rc.on_train_start(SimpleNamespace(data=view, model=model, device=torch.device("cpu")))
    assert len(rc.pool) == 32 and rc.pool.capacity == 32
    caps = rc.pool.captions
    assert set(caps) <= set(view.captions) and len(set(caps)) > 1
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_captions(caps), dim=-1)
    assert torch.allclose(rc.pool.valid(), expected, atol=1e-5)
    # A pool larger than the data holds every caption once and fills up by FIFO later.
    big = _roclip(pool_size=64)
    big.on_train_start(SimpleNamespace(data=view, model=model, device=torch.device("cpu")))
    assert len(big.pool) == 40 and big.pool.capacity == 64 and sorted(big.pool.captions[:40]) == sorted(view.captions)


def test_roclip_trains_through_the_trainer(smoke_world):
    torch.manual_seed(0)
    view = TrainView.from_pairs(smoke_world.train.subset(range(48)))
    d = RoCLIP(DefenseSpec("roclip", {"pool_size": 32}))
    ctx = DefenseContext(seed=0, train=TrainSpec(), device=torch.device("cpu"))
    assert d.objective(ctx) is d.callbacks(ctx)[0]
    result = Trainer(build_model("micro-vit"), view, TrainConfig(epochs=2, batch_size=16, lr=1e-4), objective=d.objective(ctx),
                     callbacks=d.callbacks(ctx), device=torch.device("cpu"), show_progress=False).fit()
    assert [row["matching"] for row in result.history] == [0.0, 1.0]
    assert "match" in result.history[1] and d.training(ctx).pool.total == 32 + 6 * 16
    # The pool is part of the checkpoint: a restored pool matches exactly like the original.
    rc = d.training(ctx)
    other = _roclip(pool_size=32)
    other.load_state_dict(rc.state_dict())
    assert (other.pool.ptr, other.pool.count, other.pool.total) == (rc.pool.ptr, rc.pool.count, rc.pool.total)
    assert other.pool.captions == rc.pool.captions and torch.equal(other.pool.embeddings, rc.pool.embeddings)
    q = torch.randn(5, rc.pool.embeddings.shape[1])
    assert torch.equal(other.pool.nearest(q), rc.pool.nearest(q))


# -- EDA and image views ---------------------------------------------------------------------
CAPTIONS = ["a photo of a banana.", "a large cyan donut with a hole in the middle on a striped background",
            "banana", "a b", "the red kite near the top", "star star", "a cross shown on the left"]


def test_eda_never_empties_and_changes_when_asked():
    rng = random.Random(0)
    for cap in CAPTIONS:
        for _ in range(200):
            out = eda(cap, rng)
            assert out.strip(), cap
            if len(set(cap.split())) > 1:
                assert out != cap, cap
    # A single word without synonyms cannot change: it comes back as it is.
    assert eda("banana", rng) == "banana"
    assert eda("small", rng) in synonyms("small")  # one word with synonyms does change
    # Deletion-only never empties either.
    for _ in range(200):
        assert eda("a b", rng, alpha=1.0, operations=("rd",)).strip()


def test_eda_is_deterministic_for_both_rng_kinds():
    cap = CAPTIONS[1]
    a = [eda(cap, random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1
    gen = [eda(cap, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(gen)) == 1
    r = random.Random(3)
    assert len({eda(cap, r) for _ in range(20)}) > 5  # re-sampled on every call


def test_image_views_are_deterministic_and_in_range():
    x = torch.rand(6, 3, 16, 16)
    for kind in ("autoaugment", "simclr"):
        aug = make_image_augmenter(kind)
        a, b, c = aug(x, 1), aug(x, 1), aug(x, 2)
        assert a.shape == x.shape and a.dtype == torch.float32 and 0 <= float(a.min()) and float(a.max()) <= 1
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_cleanclip_objective_resamples_views_per_batch():
    torch.manual_seed(0)
    model = build_model("micro-vit", image_size=16)
    obj = CleanCLIPObjective(seed=0)
    caps = ["a photo of a banana.", "a red kite on the left", "a small star near the top", "a large cyan donut"]
    batch = Batch(images=torch.rand(4, 3, 16, 16), captions=caps, tokens=model.tokenize(caps),
                  index=torch.arange(4), epoch=0, step=0)
    out = obj(model, batch)
    assert isinstance(out, LossOutput) and torch.isfinite(out.loss)
    assert set(out.logs) == {"clip", "inmodal_image", "inmodal_text"}
    assert float(out.loss.detach()) == pytest.approx(out.logs["clip"] + 0.5 * (out.logs["inmodal_image"] + out.logs["inmodal_text"]), rel=1e-5)
    batch.step = 1
    assert obj(model, batch).logs["inmodal_text"] != out.logs["inmodal_text"]


# -- hooks and the runner -------------------------------------------------------------------
def test_post_training_vs_training_time_detection():
    assert CleanCLIP.repairs() and not CleanCLIP.trains()
    assert RoCLIP.trains() and not RoCLIP.repairs()


def test_cleanclip_lr_follows_the_preset():
    ctx = DefenseContext(seed=0, train=TrainSpec(lr=5e-4), device=torch.device("cpu"))
    assert CleanCLIP(DefenseSpec("cleanclip")).learning_rate(ctx) == pytest.approx(5e-4)
    assert CleanCLIP(DefenseSpec("cleanclip", {"lr": 1e-5})).learning_rate(ctx) == pytest.approx(1e-5)
    cfg = CleanCLIP(DefenseSpec("cleanclip", {"lr_scale": 0.5})).train_config(ctx)
    assert cfg.lr == pytest.approx(2.5e-4) and cfg.epochs == 10 and cfg.warmup_steps > 0


def test_cleanclip_reuses_the_none_checkpoint_in_either_order(tmp_path):
    # A smaller smoke world keeps the test short; the stages are the same.
    world = ["data.n_pretrain=128", "data.n_train=128", "data.n_clean=64", "data.n_test_per_class=5",
             "data.n_retrieval=30", "base.epochs=1"]
    repair = ["defense.epochs=1", "defense.batch_size=32"]

    def run(defense, seed):
        spec = api.make_spec(attack="badnets", defense=defense, preset="smoke", seed=seed,
                             overrides=world + (repair if defense == "cleanclip" else []))
        rec = api.run(spec, tmp_path, show_progress=False)
        assert rec["status"] == "ok", rec.get("error")
        return rec

    # Order 1: none, then cleanclip (seed 0). Order 2: cleanclip, then none (seed 1).
    none0, clean0 = run("none", 0), run("cleanclip", 0)
    assert none0["artifacts"]["train"]["reused"] is False
    assert clean0["artifacts"]["train"]["reused"] is True
    assert clean0["artifacts"]["train"]["key"] == none0["artifacts"]["train"]["key"]
    assert clean0["metrics_before_repair"]["asr"] == pytest.approx(none0["metrics"]["asr"])
    assert clean0["artifacts"]["repair"]["steps"] == 64 // 32
    for key in ("clean_top1", "asr"):
        assert key in clean0["metrics"] and key in clean0["metrics_before_repair"]
    clean1, none1 = run("cleanclip", 1), run("none", 1)
    assert clean1["artifacts"]["train"]["reused"] is False
    assert none1["artifacts"]["train"]["reused"] is True
    assert none1["artifacts"]["train"]["key"] == clean1["artifacts"]["train"]["key"]


def test_roclip_blur_matches_torchvision_and_scales_with_the_image():
    from torchvision.transforms.v2 import functional as TF

    from shieldbench.defenses.augment import ROCLIP_JITTER, blur_at, gaussian_blur

    assert ROCLIP_JITTER == (0.5, 0.5, 0.5, 0.1)  # RoCLIP's utils/augment_image.py
    assert blur_at(224) == (21, (0.1, 2.0))
    k, (lo, hi) = blur_at(32)
    assert k == 3 and lo == pytest.approx(0.1 * 32 / 224) and hi == pytest.approx(2.0 * 32 / 224)
    x = torch.rand(3, 3, 20, 20)
    sig = torch.tensor([0.3, 1.0, 2.5])
    got = gaussian_blur(x, sig, 7)
    for i in range(3):
        want = TF.gaussian_blur(x[i], [7, 7], [float(sig[i])] * 2)
        assert torch.allclose(got[i], want, atol=1e-5)


def test_roclip_view_jitter_ranges_are_the_reference():
    from shieldbench.defenses.augment import SimCLRAugmenter

    # Only brightness can move a grey image's level; with every other step off,
    # the output/input ratio is the brightness factor: U(0.5, 1.5) for 0.5.
    x = torch.full((400, 3, 8, 8), 0.5)
    aug = SimCLRAugmenter(crop_scale=(1.0, 1.0), jitter=(0.5, 0.0, 0.0, 0.0), flip_p=0.0, grayscale_p=0.0,
                          jitter_p=1.0, blur=False)
    f = aug(x, 0)[:, 0, 0, 0] / 0.5
    assert 0.5 <= float(f.min()) < 0.55 and 1.45 < float(f.max()) <= 1.5 + 1e-6
    # The default applies the blur: a single bright pixel spreads.
    spot = torch.zeros(50, 3, 32, 32)
    spot[..., 16, 16] = 1.0
    plain = SimCLRAugmenter(crop_scale=(1.0, 1.0), flip_p=0.0, grayscale_p=0.0, jitter_p=0.0)
    out = plain(spot, 3)
    # sigma ~ U(0.014, 0.29) px at 32 px: the widest blurs leak ~0.3% into the neighbours.
    assert 1e-4 < float(out[:, 0, 16, 17].max()) < 0.01 and float(out[:, 0, 16, 16].min()) < 0.995
