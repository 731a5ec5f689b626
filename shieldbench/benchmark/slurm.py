"""The Slurm grid executor: cells as job arrays through ``submitit``.

The cells run in waves, one job array per wave, each wave after the last has
finished, so that no job sits on a GPU waiting for another job's artifact:

1. one cell per clean base model (it builds the base model the others share);
2. every other cell whose defense trains (``none``, Semantic Shield, RoCLIP);
3. the cells of post-training defenses (CleanCLIP), which repair the
   checkpoint a wave-2 ``none`` cell trained.

Inside a job a cell runs exactly as under ``shieldbench run``: the store's
locks still guard every artifact, so a wave that does overlap (or a second
grid on the same folder) builds nothing twice. The locks are ``flock`` locks
on the results folder, which must be on a filesystem that every node shares
(and, for the locks, one that supports them, e.g. NFSv4). Jobs run with the
submitting process's Python (submitit's rule), so the environment must be on
the shared filesystem too.

A job with ``gpus_per_job`` = G > 1 runs G tasks on one node, one GPU each,
and the cell trains data-parallel over them exactly as under
``torchrun --nproc_per_node=G`` (submitit's ``TorchDistributedEnvironment``
sets the rank variables; rank 0 writes). The global batch stays
``train.batch_size``: G GPUs make a step faster, not different.

Kill the grid and run it again: finished cells are skipped by their records;
cells whose jobs are still running are waited for through their locks.
``cluster="local"`` runs the same jobs as subprocesses here (submitit's local
executor), which is how the tests check this path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from shieldbench.benchmark.keys import base_key
from shieldbench.registry import DEFENSES
from shieldbench.spec import ExperimentSpec


def _slurm_cell(spec: ExperimentSpec, results_dir: str, force: bool, plugins: Sequence[str]) -> dict[str, Any]:
    """One job (each of its tasks): import the plugins, run the cell, return its record."""
    import submitit
    from rich.console import Console

    from shieldbench.benchmark.workers import run_timed
    from shieldbench.registry import load_plugin
    from shieldbench.training import distributed as D

    for module in plugins:
        load_plugin(module)
    if submitit.JobEnvironment().num_tasks > 1:
        # Every GPU of the node stays visible; a rank takes cuda:LOCAL_RANK (distributed.local_device).
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        D.init_from_env()
    try:
        return run_timed(spec, results_dir, force, Console(stderr=True))
    finally:
        D.shutdown()


def waves(cells: Sequence[ExperimentSpec]) -> list[list[int]]:
    """Cell indices in dependency waves (see the module docstring); empty waves are dropped."""
    first_per_base: dict[str, int] = {}
    for i, spec in enumerate(cells):
        first_per_base.setdefault(base_key(spec), i)
    wave1 = sorted(first_per_base.values())
    first = set(wave1)
    rest = [i for i in range(len(cells)) if i not in first]
    repairs = {i: DEFENSES.get(cells[i].defense.name).repairs() for i in rest}
    wave2 = [i for i in rest if not repairs[i]]
    wave3 = [i for i in rest if repairs[i]]
    return [w for w in (wave1, wave2, wave3) if w]


def run_slurm(
    cells: Sequence[ExperimentSpec],
    results_dir: str | Path,
    on_done: Callable[[int, ExperimentSpec, dict[str, Any]], None],
    partition: str = "",
    gpus_per_job: int = 1,
    time_min: int = 720,
    cpus_per_job: int = 8,
    parallelism: int = 64,
    cluster: str | None = "slurm",
    plugins: Sequence[str] = (),
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run ``cells`` as job arrays, wave by wave; ``on_done(i, spec, record)`` as each finishes."""
    import submitit

    results_dir = Path(results_dir)
    executor = submitit.AutoExecutor(folder=str(results_dir / "slurm" / "%j"), cluster=cluster)
    # One task per GPU (one task on a CPU-only job); the job's CPUs are shared among its tasks.
    tasks = max(1, gpus_per_job)
    params: dict[str, Any] = {"name": "shieldbench", "timeout_min": time_min, "gpus_per_node": gpus_per_job,
                              "cpus_per_task": max(1, cpus_per_job // tasks), "tasks_per_node": tasks, "nodes": 1,
                              "slurm_array_parallelism": parallelism}
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    records: list[dict[str, Any] | None] = [None] * len(cells)
    for wave in waves(cells):
        specs = [cells[i] for i in wave]
        jobs = executor.map_array(_slurm_cell, specs, [str(results_dir)] * len(specs), [force] * len(specs),
                                  [list(plugins)] * len(specs))
        index = {job.job_id: i for job, i in zip(jobs, wave)}
        try:
            # Polling the scheduler costs it a query: every 15 s there, every second for local subprocesses.
            for job in submitit.helpers.as_completed(jobs, poll_frequency=1 if cluster == "local" else 15):
                i = index[job.job_id]
                records[i] = job.results()[0]  # rank 0's record; a failed job raises here, with its traceback
                on_done(i, cells[i], records[i])
        except BaseException:
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)
            raise
    return [r for r in records if r is not None]


__all__ = ["run_slurm", "waves"]
