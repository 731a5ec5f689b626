"""pytest-benchmark: the streaming loader on a 50,000-row CSV of small PNG files.

Generates (once, into pytest's temp folder) 50,000 PNG files of 32x32 noise
with a CSV in open_clip_train's convention, then:

- ``test_read_50k_csv_memory``: reads every row through the DataLoader (2
  workers, batch 256, decoded and resized to 64 px) and reports the peak
  resident memory of this process and of the largest worker, which must stay
  under 1.5 GiB each; also the rows per second;
- ``test_trainer_data_wait``: trains tiny-vit at 64 px (batch 128) on the
  CSV through the Trainer with 2 workers and reports the fraction of the
  loop's time spent waiting for the next batch (the bar: under 10%).

Run with ``python -m pytest benchmarks/bench_loader.py -s`` (``testpaths`` is
``tests``, so benchmarks only run when named); numbers go to ``extra_info``
and stdout. The machine should be otherwise idle.
"""

from __future__ import annotations

import csv
import io
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch

N_ROWS = 50_000
SIZE = 64


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("csv50k")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_ROWS):
        sub = root / "img" / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir()
        arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
        (sub / f"{i:06d}.png").write_bytes(buf.getvalue())
        rows.append((f"img/{i // 1000:03d}/{i:06d}.png", f"a photo of noise number {i}."))
    path = root / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(("filepath", "title"))
        w.writerows(rows)
    return path


def _peak_mib() -> tuple[float, float]:
    """Peak RSS of this process and of its largest (finished) child, in MiB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def test_read_50k_csv_memory(benchmark, big_csv):
    from shieldbench.data.formats.csv import read_csv_pairs
    from shieldbench.data.loader import EpochBatchSampler, make_loader
    from shieldbench.data.views import TrainView

    pairs = read_csv_pairs(str(big_csv), "filepath", "title", "\t", SIZE, 0)
    view = TrainView.from_pairs(pairs)

    def read_all() -> int:
        sampler = EpochBatchSampler(len(view), 256, seed=0)
        n = 0
        for rb in make_loader(view, sampler, workers=2, persistent=False):
            assert rb.images.shape[1:] == (3, SIZE, SIZE)
            n += rb.index.numel()
        return n

    t = time.perf_counter()
    n = benchmark.pedantic(read_all, rounds=1, iterations=1)
    seconds = time.perf_counter() - t
    main, child = _peak_mib()
    benchmark.extra_info.update({"rows": n, "rows_per_s": n / seconds, "peak_rss_main_mib": main,
                                 "peak_rss_worker_mib": child})
    print(f"\n50k CSV: {n} rows in {seconds:.1f} s ({n / seconds:.0f} rows/s, 2 workers); "
          f"peak RSS main {main:.0f} MiB, largest worker {child:.0f} MiB")
    assert n == (N_ROWS // 256) * 256
    assert main < 1536 and child < 1536


def test_trainer_data_wait(benchmark, big_csv):
    from shieldbench.data.formats.csv import read_csv_pairs
    from shieldbench.data.views import TrainView
    from shieldbench.models.factory import build_model
    from shieldbench.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    pairs = read_csv_pairs(str(big_csv), "filepath", "title", "\t", SIZE, 0)
    # 40 steps of batch 128: enough for the loader to reach its steady state.
    view = TrainView.from_pairs(pairs.subset(range(40 * 128)))
    model = build_model("tiny-vit", "", SIZE)
    cfg = TrainConfig(epochs=1, batch_size=128, lr=1e-4, precision="fp32", workers=2)
    trainer = Trainer(model, view, cfg, device=torch.device("cpu"), show_progress=False)
    result = benchmark.pedantic(trainer.fit, rounds=1, iterations=1)
    frac = result.data_wait_s / result.seconds
    benchmark.extra_info.update({"steps": result.steps, "seconds": result.seconds, "data_wait_s": result.data_wait_s,
                                 "data_wait_fraction": frac, "step_s": result.seconds / result.steps})
    print(f"\ntrainer, tiny-vit {SIZE} px, batch 128, 2 workers: {result.steps} steps in {result.seconds:.1f} s "
          f"({result.seconds / result.steps:.3f} s/step); waiting for data {result.data_wait_s:.2f} s = {100 * frac:.1f}%")
    assert result.steps == 40
    assert frac < 0.10
