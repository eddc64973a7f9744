"""Where the runs of a study train: in this process, in a local process pool, or on a Ray cluster.

Every run of a study is independent (its own seed, output folder and checkpoints), so an executor
only needs to train ``(config, data) -> summary`` for each of a list of configurations and hand
the summaries back as they finish. The study keeps the order of its table, so the results do not
depend on the executor or on which run finishes first.

* ``sequential``: one run after another in this process (``--jobs 1``, the default).
* ``local``: ``--jobs N`` processes on this machine. On a CPU each run gets ``--threads`` threads
  (default: the cores divided among the processes); with several GPUs each process takes one,
  round robin. Processes are spawned, not forked (a forked torch with threads can deadlock).
* ``ray``: each run is a Ray task asking for its threads as CPUs (and one GPU on a GPU cluster);
  ``--address`` joins an existing cluster (default: a local Ray instance). The summary comes back
  to the driver, which writes it into the study folder, so a study resumes at the granularity of
  runs; checkpoints of an unfinished run stay where its task ran (the same path on a shared file
  system, where ``--resume`` continues them).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import torch

from fastpe.train.config import TrainConfig

EXECUTORS = ("local", "ray")


def quiet(*args):
    pass


def threads_per_run(cfg: TrainConfig, jobs: int) -> int:
    """``cfg.threads`` if given, else this machine's cores shared by ``jobs`` runs (at least 1)."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // jobs)


def auto_jobs(cfg: TrainConfig, runs: int) -> int:
    """Runs at once that fill this machine: one per GPU when the runs use CUDA, else as many runs of
    ``--threads`` threads as there are cores (1 when ``--threads`` is not given: torch then uses
    every core for one run)."""
    wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        slots = torch.cuda.device_count() if cfg.device in ("auto", "cuda") else 1
    else:
        slots = (os.cpu_count() or 1) // cfg.threads if cfg.threads else 1
    return max(1, min(slots, runs))


def run_sequential(configs: list[TrainConfig], data, train):
    """Yield ``(index, summary)`` as each run finishes, one after another in this process."""
    for index, cfg in enumerate(configs):
        yield index, train(cfg, data, log=quiet)


# ------------------------------------------------------------------------------------ local pool
_worker = {}


def _init_worker(data, threads: int, devices: list[str], counter) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _worker.update(data=data, threads=threads, device=devices[index % len(devices)] if devices else None)
    torch.set_num_threads(threads)


def _run_in_worker(cfg: TrainConfig) -> dict:
    from fastpe.train.trainer import train

    cfg = replace(cfg, threads=_worker["threads"], **({"device": _worker["device"]} if _worker["device"] else {}))
    return train(cfg, _worker["data"], log=quiet)


def local_devices(cfg: TrainConfig) -> list[str]:
    """One GPU per process on a multi-GPU machine when the runs would use CUDA; else none to assign."""
    wants_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not wants_cuda or torch.cuda.device_count() < 2:
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def run_local(configs: list[TrainConfig], data, jobs: int):
    """Yield ``(index, summary)`` as each run finishes, ``jobs`` processes at a time."""
    if not configs:
        return
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    threads = threads_per_run(configs[0], jobs)
    with ProcessPoolExecutor(max_workers=min(jobs, len(configs)), mp_context=context, initializer=_init_worker,
                             initargs=(data, threads, local_devices(configs[0]), counter)) as pool:
        pending = {pool.submit(_run_in_worker, cfg): index for index, cfg in enumerate(configs)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                yield index, future.result()


# ------------------------------------------------------------------------------------------- Ray
def _run_as_ray_task(cfg: TrainConfig, data) -> dict:
    from fastpe.train.trainer import train

    return train(cfg, data, log=quiet)


def run_ray(configs: list[TrainConfig], data, address: str | None, jobs: int):
    """Yield ``(index, summary)`` as each Ray task finishes. ``address``: an existing cluster
    (``host:6379``, ``ray://host:10001`` or ``auto``), or None for a local instance of ``jobs`` CPUs
    (1 or fewer: every core). Each task asks for ``--threads`` CPUs (default 1)."""
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'fastpe[ray]'") from None
    if not configs:
        return
    started_here = not ray.is_initialized()
    if started_here:
        # A local instance's workers import the same fastpe as this process (a cluster needs it installed).
        here = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, (str(Path(__file__).parents[2]),
                                                                           os.environ.get("PYTHONPATH"))))}}
        options = ({"address": address} if address else
                   {"num_cpus": jobs if jobs > 1 else None, "include_dashboard": False, "runtime_env": here})
        ray.init(log_to_driver=False, **options)
    try:
        threads = configs[0].threads or 1
        gpus = 1 if configs[0].device in ("auto", "cuda") and ray.cluster_resources().get("GPU", 0) else 0
        task = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=1)(_run_as_ray_task)
        data_ref = ray.put(data)
        device = {"device": "cuda"} if gpus else {}
        pending = {task.remote(replace(cfg, threads=threads, **device), data_ref): index
                   for index, cfg in enumerate(configs)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)
    finally:
        if started_here:
            ray.shutdown()
