"""Data-parallel training across processes started by ``torchrun`` (``torch.distributed``).

A launch with ``WORLD_SIZE`` > 1 in the environment initialises one process group (NCCL on CUDA,
gloo on the CPU) the first time :func:`setup` is called; every later run in the same process
(a study) reuses it. With one process nothing is initialised and every helper answers as for a
single process (rank 0 of 1), so the same code runs unchanged.
"""

from __future__ import annotations

import atexit
import inspect
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started as one of several (torchrun sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: torch.device) -> torch.device:
    """Join the process group of a multi-process launch (once) and return this process's device:
    ``cuda:LOCAL_RANK`` for a CUDA device, else ``device``. Without a launch, returns ``device``."""
    if not launched():
        return device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(teardown)
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave() -> None:
    """Leave the process group after a job that finished, once every process has: one that
    destroyed its gloo group while the first still wrote its results was seen to abort at exit
    (SIGABRT, "terminate called without an active exception"). After an error the processes
    leave at once (atexit's teardown): the others may never reach a barrier."""
    barrier()
    teardown()


def barrier() -> None:
    if not active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` (which averages the gradients over processes)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # The model's buffers are constants (tables, item features; no batch statistics): no broadcast
    # before every forward. Recent torch (2.13 here) renamed the option and deprecated broadcast_buffers.
    renamed = "forward_sync_buffers" in inspect.signature(ddp).parameters
    option = "forward_sync_buffers" if renamed else "broadcast_buffers"
    return ddp(model, device_ids=[device] if device.type == "cuda" else None, **{option: False})


def local_rows(batch_size: int, world: int, rank: int) -> tuple[int, int]:
    """This rank's contiguous rows ``[start, stop)`` of a global batch of ``batch_size`` rows."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes (WORLD_SIZE): each "
                         f"process trains on batch_size / {world} rows of every global batch; choose a multiple "
                         f"of {world}")
    per = batch_size // world
    return rank * per, (rank + 1) * per


def from_main(obj):
    """The first process's ``obj`` (picklable), on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (a no-op with one process)."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate, in rank order, every rank's ``local`` (rank ``r`` holds ``counts[r]`` rows of the
    same trailing shape and dtype); every rank gets the whole."""
    if not active():
        return local
    size = max(counts)
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])
