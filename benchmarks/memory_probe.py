"""Peak resident memory of one job in a fresh interpreter (run by ``bench_performance.py``).

    python benchmarks/memory_probe.py csv PATH [N_ITEMS]   # open a caption CSV through the data layer, read N items
    python benchmarks/memory_probe.py run RESULTS_DIR      # one `small`-preset cell (badnets, none)

Each prints one JSON line. A job of its own, because a process's peak RSS
is the peak over its whole life: measured inside pytest it would be the
largest of every benchmark before it. The peak is the kernel's high-water
mark of this process's memory map (``VmHWM``), not ``ru_maxrss``: Linux
carries the parent's high-water mark into ``ru_maxrss`` across the exec of a
child started by fork or vfork, so a probe started by a 6 GiB pytest process
would report 6 GiB whatever it did.

``csv`` takes its baseline after the imports and the model (torch, open_clip,
the tokenizer: fixed costs of any run, ~0.75 GiB of them), then builds the
dataset the way a run does (``build_dataset``: the reader, the clean subset,
the manifest fingerprint), makes the TrainView, and reads the first
``N_ITEMS`` items of an epoch through the training loader (in this process:
``workers=0``), tokenising each batch's captions lazily with the model's
bounded cache, as the Trainer does. It reports the peak RSS above the
baseline.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Resident memory now (``VmRSS``), MiB."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else peak_mib()


def peak_mib() -> float:
    """Peak resident memory of this process's memory map so far (``VmHWM``), MiB.

    Falls back to ``ru_maxrss`` (KiB on Linux) where /proc is not there.
    """
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_csv(path: str, n_items: int = 1000) -> dict:
    import torch

    from shieldbench.data.datasets import build_dataset
    from shieldbench.data.images import preprocess_for
    from shieldbench.data.loader import EpochBatchSampler, make_loader
    from shieldbench.data.views import TrainView
    from shieldbench.models.factory import build_model
    from shieldbench.spec import DataSpec, EvalSpec

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = build_model("tiny-vit", "", 32)
    preprocess_for(32)  # imports open_clip's transforms: a fixed cost, not the CSV's
    base = rss_mib()
    t = time.perf_counter()
    bundle = build_dataset(DataSpec(dataset="csv", path=path, image_size=32), EvalSpec())
    view = TrainView.from_pairs(bundle.train)
    open_s = time.perf_counter() - t
    after_open = rss_mib()
    sampler = EpochBatchSampler(len(view), 100, seed=0)
    n = 0
    t = time.perf_counter()
    for rows in make_loader(view, sampler, workers=0):
        model.tokenize(view.captions_at(rows.index))
        n += int(rows.index.numel())
        if n >= n_items:
            break
    read_s = time.perf_counter() - t
    return {"rows": len(view), "items": n, "baseline_mib": base, "after_open_extra_mib": after_open - base,
            "peak_extra_mib": peak_mib() - base, "open_s": open_s, "read_s": read_s,
            "cached_token_rows": len(model._token_cache)}


def probe_run(results_dir: str) -> dict:
    from shieldbench import api

    t = time.perf_counter()
    spec = api.make_spec(attack="badnets", defense="none")
    record = api.run(spec, results_dir, show_progress=False)
    return {"peak_mib": peak_mib(), "seconds": time.perf_counter() - t, "status": record.get("status"),
            "clean_top1": record.get("metrics", {}).get("clean_top1")}


def main(argv: list[str]) -> None:
    if argv and argv[0] == "csv":
        out = probe_csv(argv[1], int(argv[2]) if len(argv) > 2 else 1000)
    elif argv and argv[0] == "run":
        out = probe_run(argv[1])
    else:
        raise SystemExit(__doc__)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
