"""pytest-benchmark: speed of the synthetic world generator.

Run with ``python -m pytest benchmarks/bench_synthetic.py`` (``testpaths`` is
``tests``, so benchmarks only run when named).
"""

from __future__ import annotations

import torch

from shieldbench.data.synthetic import generate_pairs


def test_generate_pairs_4096_32px(benchmark):
    torch.set_num_threads(1)

    def run():
        return generate_pairs(4096, 32, torch.Generator().manual_seed(0))

    images, captions, labels, _ = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert images.shape == (4096, 3, 32, 32) and len(captions) == 4096
    assert labels.shape == (4096,)
