"""torch.distributed, when a run is started by torchrun: ranks, and the few collectives discovery needs."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .data.batching import Shard

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_shard() -> Shard:
    """This process's rank and the world size (rank 0 of 1 outside torch.distributed)."""
    if not is_distributed():
        return Shard()
    return Shard(dist.get_rank(), dist.get_world_size())


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def device_for_rank(requested: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; other devices are kept."""
    if requested == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return requested


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Shard]:
    """Join torchrun's process group (NCCL on CUDA, gloo otherwise) for the length of a run.

    Outside torchrun, or when a group is already initialised, it does nothing.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield current_shard()
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend)
    log.info("rank %d of %d, %s backend", dist.get_rank(), dist.get_world_size(), backend)
    try:
        yield current_shard()
    finally:
        dist.destroy_process_group()


def all_gather_objects(value) -> list:
    """Every rank's ``value``, in rank order (just ``[value]`` outside torch.distributed)."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> None:
    """In place: the sum (or max) of ``tensor`` over every rank."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)


def broadcast_object(value, source: int = 0):
    """Rank ``source``'s ``value`` on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]
