"""One view of the process group, whether or not the tool runs under `torchrun`.

`torchrun` (torch.distributed.run) starts one process per rank and sets RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT; `init()` turns that into an initialised process group
(nccl on CUDA, gloo on the CPU) and a `Dist` the rest of the tool asks "am I the writer?",
"which shard is mine?", "gather this in rank order". Without torchrun, `Dist` is the
one-process world (rank 0 of 1) and every call is a no-op, so library code needs no
branches for the single-process case.

Written against `torch.distributed` directly: it is the engine; this module only chooses
the backend, pins each rank to its device and keeps the one-process case free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import UsageError

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """True when the environment carries torchrun's rendezvous variables."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class Dist:
    """The process group as the tool sees it: `rank` of `world`, on `device`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        """More than one process: collectives do something."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and draws progress."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's items of 0..n-1: a contiguous block, ranks in order, so gathering
        the blocks in rank order restores the input order."""
        return shard_range(n, self.rank, self.world)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def gather(self, item: T) -> list[T]:
        """Every rank's `item` (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [item]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, item)
        return out

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; the input is left alone)."""
        out = values.detach().clone()
        if self.active:
            moved = out.to(self.device)
            torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM)
            out = moved.to(values.device)
        return out

    def broadcast(self, item: T) -> T:
        """Rank 0's `item` on every rank."""
        if not self.active:
            return item
        box: list[Any] = [item]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def shard_range(n: int, index: int, count: int) -> range:
    """Block `index` of `count` near-equal contiguous blocks of 0..n-1 (the first n % count
    blocks one item longer)."""
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard {index}/{count}: need 0 <= index < count", param="shard")
    size, extra = divmod(n, count)
    start = index * size + min(index, extra)
    return range(start, start + size + (1 if index < extra else 0))


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), e.g. '0/4' for the first of four job-array tasks."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"shard must look like I/N (e.g. 0/4), not {text!r}",
                         param="shard") from None
    shard_range(0, index, count)  # validates
    return index, count


def init(device: torch.device) -> Dist:
    """Join torchrun's process group if launched by it, else the one-process world.

    On CUDA each rank takes GPU LOCAL_RANK (nccl); elsewhere gloo. Idempotent."""
    if not launched_by_torchrun():
        return Dist(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group (torchrun expects each rank to exit cleanly)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of torchrun's job, or the only process; asks the environment, so it needs no
    initialised process group (the CLI decides early whether to print)."""
    from .ranks import follower_rank  # the one rule, torch-free for the CLI

    return follower_rank() is None
