"""pytest-benchmark: the figures of docs/performance.md.

    pytest benchmarks/bench_performance.py --benchmark-only          # these figures
    pytest benchmarks/ --benchmark-only                              # the whole suite

Every figure is printed at the end of the run under "shieldbench figures"
(``benchmarks/conftest.py``) and kept in the benchmark's ``extra_info``.

- ``test_peer_open_clip``: shieldbench's ``Trainer`` (defense ``none``)
  against open_clip_train's own ``train_one_epoch`` on the same model, the
  same initial weights and the same batches, alternating in one process
  (``benchmarks/peer.py``): tiny-vit at batch 128, and ViT-B-32 at batch 8
  (224 px; ``SB_PEER_VITB32=0`` leaves it out). The ratio is shieldbench's
  samples per second over the peer's, the median of per-round ratios.
- ``test_defense_overheads``: the training step of each defense over a plain
  CLIP step on the same model and batch, interleaved: Semantic Shield per
  variant, RoCLIP on a plain and on a matching epoch, CleanCLIP's repair step
  per clean sample (at its batch of 64, against a plain step at 64).
- ``test_zeroshot_eval_vs_naive``: ``evaluate`` on 80 templates x 1,000
  classes (ImageNet's names, the OpenAI templates) against a naive
  evaluation that re-embeds the class prompts for every image batch.
- ``test_retrieval_blocked``: Recall@k over a COCO-5k-sized gallery.
- ``test_gpu_smoke``: ``benchmarks/gpu_smoke.py`` (ViT-B-32, batch 256);
  skipped without CUDA.
- ``test_memory_csv_1m`` / ``test_memory_small_run``: peak resident memory
  of opening a 1,000,000-row caption CSV and reading 1,000 items, and of one
  ``small``-preset run, each in a fresh process (``benchmarks/memory_probe.py``;
  ``SB_RUN_BASE_FROM=RESULTS_DIR`` lets the run reuse that folder's clean base
  model instead of training it).

Torch threads: ``SB_BENCH_THREADS`` (default: 2, or the cores if fewer).
The machine this was measured on has 2 cores shared with other jobs: every
ratio is of interleaved measurements so load falls on both sides alike; the
absolute numbers move with the load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

HERE = Path(__file__).resolve().parent
THREADS = int(os.environ.get("SB_BENCH_THREADS", min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _once(benchmark, fn: Callable):
    """Run ``fn`` once under pytest-benchmark (the figures are computed inside it)."""
    return benchmark.pedantic(fn, rounds=1, iterations=1)


# -- 1. peer comparison --------------------------------------------------------------------------
PEERS = [
    pytest.param("tiny-vit", 32, 128, 3, 20, id="tiny-vit-b128"),
    pytest.param("ViT-B-32", 224, 8, 1, 8, id="ViT-B-32-b8", marks=pytest.mark.skipif(
        os.environ.get("SB_PEER_VITB32") == "0", reason="SB_PEER_VITB32=0")),
]


@pytest.mark.parametrize("model,size,batch,steps,rounds", PEERS)
def test_peer_open_clip(benchmark, figures, model, size, batch, steps, rounds):
    import peer

    def both():
        shipped = peer.compare(model, size, batch, steps_per_round=steps, rounds=rounds)
        fused = peer.compare(model, size, batch, steps_per_round=steps, rounds=rounds, peer_fused=True)
        return shipped, fused

    shipped, fused = _once(benchmark, both)
    s, f = shipped.summary(), fused.summary()
    figures(f"{model} batch {batch} at {size} px, {THREADS} threads, {rounds} rounds x {steps} steps: shieldbench "
            f"{s['shieldbench_samples_per_s']:.1f} samples/s, open_clip_train {s['open_clip_samples_per_s']:.1f} "
            f"-> ratio {s['ratio']:.3f} (rounds {s['ratio_min']:.2f}-{s['ratio_max']:.2f}); against open_clip_train "
            f"given the same fused AdamW: ratio {f['ratio']:.3f} (rounds {f['ratio_min']:.2f}-{f['ratio_max']:.2f}); "
            f"loss gap after one round {max(s['max_loss_gap'], f['max_loss_gap']):.1e}",
            peer_shipped=s, peer_fused=f)
    # Same computation: after a round on the same batches the two models give the same loss.
    assert s["max_loss_gap"] < 1e-3 and f["max_loss_gap"] < 1e-3


# -- 2. defense overheads ------------------------------------------------------------------------
def _trainer(objective, batch: int, knowledge: bool, seed: int = 0):
    from shieldbench.data.synthetic import generate_pairs, knowledge_from_caption
    from shieldbench.data.views import TrainView
    from shieldbench.models.factory import build_model
    from shieldbench.training.trainer import TrainConfig, Trainer

    images, captions, _, _ = generate_pairs(batch, 32, torch.Generator().manual_seed(seed))
    ke = [knowledge_from_caption(c, 3) for c in captions] if knowledge else None
    torch.manual_seed(0)
    model = build_model("tiny-vit", "", 32)
    trainer = Trainer(model, TrainView(images, captions, ke),
                      TrainConfig(epochs=2, batch_size=batch, lr=1e-4, precision="fp32", workers=0),
                      objective=objective, device=torch.device("cpu"), show_progress=False)
    model.train()
    return trainer


def _steps() -> dict[str, Callable[[], None]]:
    """name -> one full training step (forward, backward, clip, AdamW, the defense's step hooks)."""
    from shieldbench.defenses.base import DefenseContext
    from shieldbench.defenses.cleanclip import CleanCLIP
    from shieldbench.defenses.roclip import RoCLIP
    from shieldbench.defenses.semantic_shield import SemanticShield
    from shieldbench.defenses.semantic_shield.defense import VARIANTS
    from shieldbench.spec import PRESET_PLUGIN_DEFAULTS, DefenseSpec, TrainSpec
    from shieldbench.training.losses import ClipObjective

    ctx = DefenseContext(seed=0, train=TrainSpec(), device=torch.device("cpu"), show_progress=False)
    steps: dict[str, Callable[[], None]] = {}

    def add(name: str, trainer, epoch: int = 0, callbacks=()) -> None:
        batch = trainer.make_batch(torch.arange(len(trainer.data)), epoch)

        def step() -> None:
            out = trainer.train_step(batch)
            for cb in callbacks:
                cb.on_step_end(trainer, batch, out)

        steps[name] = step

    add("plain", _trainer(ClipObjective(), 128, False))
    for variant in VARIANTS:
        objective = SemanticShield(DefenseSpec("semantic_shield", {"variant": variant})).objective(ctx)
        add(f"semantic_shield[{variant}]", _trainer(objective, 128, True))
    # RoCLIP with the small preset's options (its crops: the whole image), as a default run trains it.
    opts = PRESET_PLUGIN_DEFAULTS["small"]["defense"]["roclip"]
    for epoch, label in ((0, "roclip[clip epoch]"), (1, "roclip[matching epoch]")):
        impl = RoCLIP(DefenseSpec("roclip", dict(opts))).training(ctx)
        trainer = _trainer(impl, 128, False)
        impl.on_train_start(trainer)  # fills the pool from the training captions
        add(label, trainer, epoch, callbacks=(impl,))
    cleanclip = CleanCLIP(DefenseSpec("cleanclip"))
    n = cleanclip.params.batch_size
    add(f"plain[batch {n}]", _trainer(ClipObjective(), n, False))
    add(f"cleanclip repair[batch {n}]", _trainer(cleanclip.make_objective(ctx), n, False))
    return steps


def test_defense_overheads(benchmark, figures):
    rounds = int(os.environ.get("SB_OVERHEAD_ROUNDS", "7"))

    def measure() -> dict[str, list[float]]:
        steps = _steps()
        names = list(steps)
        for name in names:  # warm-up: allocator, token caches, the pool
            steps[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            # Rotate the order each round so that no step always follows the same one.
            for name in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t)
        return times

    times = _once(benchmark, measure)
    plain = times["plain"]
    ratios = {}
    for name, ts in times.items():
        if name.startswith("plain"):
            continue
        # CleanCLIP's step runs at its own batch size: compared with a plain step at that size.
        base = times[next(k for k in times if k.startswith("plain[batch"))] if "cleanclip" in name else plain
        per_round = [t / b for t, b in zip(ts, base)]
        ratios[name] = {"step_s": statistics.median(ts), "ratio": statistics.median(per_round),
                        "ratio_min": min(per_round), "ratio_max": max(per_round)}
    lines = [f"plain CLIP step, tiny-vit batch 128 at 32 px, {THREADS} threads: {statistics.median(plain) * 1e3:.0f} ms "
             f"(median of {rounds} interleaved rounds)"]
    for name, r in ratios.items():
        per = " per clean sample" if "cleanclip" in name else ""
        lines.append(f"{name}: {r['step_s'] * 1e3:.0f} ms/step, {r['ratio']:.2f}x plain{per} "
                     f"(rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
    figures("; ".join(lines), overheads=ratios, plain_step_s=statistics.median(plain))


# -- 3. evaluation -------------------------------------------------------------------------------
EVAL_MODEL = os.environ.get("SB_EVAL_MODEL", "micro-vit")
EVAL_BATCH = 512  # eval.batch_size's default
EVAL_BATCHES = int(os.environ.get("SB_EVAL_BATCHES", "8"))


@torch.no_grad()
def naive_zeroshot_top1(model, test, batch_size: int, device: torch.device) -> float:
    """Top-1 of an evaluation that re-embeds every class prompt for each image batch."""
    from shieldbench.data.loader import iter_rows
    from shieldbench.data.types import to_float
    from shieldbench.evaluation.evaluate import class_embeddings

    correct = 0
    for rows in iter_rows(test.images, batch_size):
        classifier = class_embeddings(model, test.classnames, test.templates, device)
        emb = torch.nn.functional.normalize(model.encode_image(to_float(rows.images).to(device)).float(), dim=-1)
        correct += int(((emb @ classifier.t()).argmax(dim=1) == test.labels[rows.index]).sum())
    return correct / len(test)


def test_zeroshot_eval_vs_naive(benchmark, figures):
    import open_clip

    from shieldbench.data.types import LabelledSet
    from shieldbench.evaluation.evaluate import evaluate
    from shieldbench.models.factory import build_model

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(EVAL_MODEL, "", 32).eval()
    templates = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    classnames = list(open_clip.IMAGENET_CLASSNAMES)
    n = EVAL_BATCH * EVAL_BATCHES
    g = torch.Generator().manual_seed(0)
    test = LabelledSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.randint(0, len(classnames), (n,), generator=g), classnames, templates)

    def both() -> tuple[float, float, float, float]:
        t = time.perf_counter()
        ours = evaluate(model, test, None, 0, None, device, batch_size=EVAL_BATCH)["clean_top1"]
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        naive = naive_zeroshot_top1(model, test, EVAL_BATCH, device)
        return ours, t_ours, naive, time.perf_counter() - t

    ours, t_ours, naive, t_naive = _once(benchmark, both)
    assert ours == naive  # the same predictions
    figures(f"{EVAL_MODEL}, {THREADS} threads, {len(classnames)} classes x {len(templates)} templates, {n} images in {EVAL_BATCHES} "
            f"batches of {EVAL_BATCH}: evaluate {t_ours:.1f} s ({n / t_ours:.0f} images/s), naive (prompts "
            f"re-embedded per batch) {t_naive:.1f} s ({n / t_naive:.1f} images/s) -> {t_naive / t_ours:.1f}x faster",
            eval_s=t_ours, naive_s=t_naive, speedup=t_naive / t_ours, images=n)


def test_retrieval_blocked(benchmark, figures):
    from shieldbench.evaluation import metrics as M

    n_img, per, dim = 5000, 5, 512  # COCO's 5k test split, 5 captions per image, ViT-B's width
    g = torch.Generator().manual_seed(0)
    img = torch.randn(n_img, dim, generator=g)
    txt = img.repeat_interleave(per, 0) + 2.0 * torch.randn(n_img * per, dim, generator=g)
    caption_image = torch.arange(n_img).repeat_interleave(per)

    def run():
        t = time.perf_counter()
        r = M.retrieval_recall(img, txt, caption_image)
        return r, time.perf_counter() - t

    recall, seconds = _once(benchmark, run)
    block_mib = M._CHUNK * n_img * per * 4 / 2**20
    full_mib = n_img * n_img * per * 4 / 2**20
    figures(f"Recall@1/5/10 both ways, {n_img} images x {n_img * per} captions (dim {dim}), {THREADS} threads: {seconds:.2f} s "
            f"({n_img / seconds:.0f} images/s), similarity blocks of {M._CHUNK} rows ({block_mib:.0f} MiB "
            f"at a time, not the {full_mib:.0f} MiB matrix)", retrieval_s=seconds, i2t_r1=recall["i2t_R@1"])


# -- 4. GPU path ---------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_smoke(benchmark, figures):
    import gpu_smoke

    results = _once(benchmark, lambda: gpu_smoke.main([]))
    figures("; ".join(gpu_smoke.describe(r) for r in results), gpu=results)


# -- 5. memory -----------------------------------------------------------------------------------
N_CSV_ROWS = 1_000_000


@pytest.fixture(scope="module")
def csv_1m(tmp_path_factory) -> Path:
    """A 1,000,000-row caption CSV (open_clip_train's columns) over 1,000 small PNG files."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("csv1m")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(1000):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "img" / f"{i:04d}.png")
    path = root / "train.csv"
    with open(path, "w") as f:
        f.write("filepath\ttitle\n")
        f.writelines(f"img/{i % 1000:04d}.png\ta photo of a small red banana on a wooden table, number {i}.\n"
                     for i in range(N_CSV_ROWS))
    return path


def _probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "memory_probe.py"), *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, f"memory_probe.py {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_csv_1m(benchmark, figures, csv_1m):
    r = _once(benchmark, lambda: _probe("csv", str(csv_1m), "1000"))
    figures(f"{r['rows']:,}-row caption CSV through build_dataset + the training loader, first {r['items']} items "
            f"tokenised: +{r['peak_extra_mib']:.0f} MiB peak RSS over the {r['baseline_mib']:.0f} MiB of imports "
            f"and model (+{r['after_open_extra_mib']:.0f} MiB once open; open {r['open_s']:.1f} s, read "
            f"{r['read_s']:.1f} s; {r['cached_token_rows']} token rows cached) (bar: < 1024 MiB)", **r)
    assert r["peak_extra_mib"] < 1024


def test_memory_small_run(benchmark, figures, tmp_path):
    """One `small` cell in a fresh process; ``SB_RUN_BASE_FROM=RESULTS`` reuses that folder's clean base models."""
    import shutil

    results = tmp_path / "results"
    source = os.environ.get("SB_RUN_BASE_FROM", "")
    if source:
        # A finished artifact folder copied whole (its manifest included) is a cache hit like any other.
        shutil.copytree(Path(source) / "cache" / "base", results / "cache" / "base")
    r = _once(benchmark, lambda: _probe("run", str(results)))
    how = f"the clean base model reused from {source}" if source else "from an empty results folder: the base model trained too"
    figures(f"`shieldbench run -a badnets -d none` (small preset, {how}): peak RSS {r['peak_mib']:.0f} MiB, "
            f"{r['seconds']:.0f} s, clean top-1 {r['clean_top1']:.3f}", base_reused=bool(source), **r)
    assert r["status"] == "ok"
