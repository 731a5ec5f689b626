"""pytest-benchmark: one training step with Semantic Shield vs a plain CLIP step.

Same model (tiny-vit), batch 128 at 32 px, synthetic captions and their
knowledge elements, full step (forward, backward, clip, AdamW). Run with

    python -m pytest benchmarks/bench_semantic_shield.py

``test_step_time_ratio`` times the two steps interleaved (so machine load hits
both alike) and reports median(SS) / median(plain) in ``extra_info`` and on
stdout; the issue's bar is <= 1.5. Set ``SB_ASSERT_RATIO=1`` to fail above it.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from shieldbench.data.synthetic import generate_pairs, knowledge_from_caption
from shieldbench.data.views import TrainView
from shieldbench.defenses.semantic_shield import SemanticShield
from shieldbench.models.factory import build_model
from shieldbench.spec import DefenseSpec
from shieldbench.training.losses import ClipObjective
from shieldbench.training.trainer import TrainConfig, Trainer

BATCH = 128


def _trainer(objective, knowledge: bool) -> tuple[Trainer, torch.Tensor]:
    torch.manual_seed(0)
    images, captions, _, _ = generate_pairs(BATCH, 32, torch.Generator().manual_seed(0))
    ke = [knowledge_from_caption(c, 3) for c in captions] if knowledge else None
    view = TrainView(images, captions, ke)
    model = build_model("tiny-vit", "", 32)
    trainer = Trainer(model, view, TrainConfig(epochs=1, batch_size=BATCH, lr=1e-4, precision="fp32"),
                      objective=objective, device=torch.device("cpu"), show_progress=False)
    model.train()
    return trainer, torch.arange(BATCH)


def _ss_objective():
    return SemanticShield(DefenseSpec("semantic_shield")).objective(None)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("which", ["plain", "semantic_shield"])
def test_train_step(benchmark, which):
    trainer, index = _trainer(ClipObjective() if which == "plain" else _ss_objective(), which != "plain")
    batch = trainer.make_batch(index, 0)
    benchmark.group = "train step, tiny-vit, batch 128, 32 px"
    out = benchmark.pedantic(lambda: trainer.train_step(batch), rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(out.loss)


def test_step_time_ratio(benchmark):
    plain, index = _trainer(ClipObjective(), False)
    ss, _ = _trainer(_ss_objective(), True)
    b_plain, b_ss = plain.make_batch(index, 0), ss.make_batch(index, 0)
    for _ in range(2):  # warm-up (token caches, allocator)
        plain.train_step(b_plain)
        ss.train_step(b_ss)
    t_plain, t_ss = [], []
    for _ in range(7):
        t = time.perf_counter()
        plain.train_step(b_plain)
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        ss.train_step(b_ss)
        t_ss.append(time.perf_counter() - t)
    ratio = statistics.median(t_ss) / statistics.median(t_plain)
    benchmark.extra_info.update({"plain_s": statistics.median(t_plain), "semantic_shield_s": statistics.median(t_ss),
                                 "ratio": ratio})
    print(f"\nstep time: plain {statistics.median(t_plain) * 1e3:.0f} ms, semantic_shield "
          f"{statistics.median(t_ss) * 1e3:.0f} ms, ratio {ratio:.2f} (bar: <= 1.5)")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if os.environ.get("SB_ASSERT_RATIO") == "1":
        assert ratio <= 1.5
