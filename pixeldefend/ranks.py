"""Where this process stands under torchrun, read without importing PyTorch: the CLI asks
before every command whether to print (rank 0 only) and, at the end, waits for the other
ranks so that all of them exit at once with the same code."""

from __future__ import annotations

import os
import sys


def follower_rank() -> int | None:
    """The torchrun rank of a process other than rank 0 (None on rank 0 or without
    torchrun): it computes its share of the inputs but prints and writes nothing."""
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    return int(rank) if rank.isdigit() and rank != "0" else None


def silence_stdout() -> None:
    """Results go to stdout from rank 0 alone."""
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the process)


def leave_together(code: int) -> None:
    """Under torchrun, once a command has finished on every rank: wait for all ranks, then
    exit at once with the (agreed) code. torchrun stops the other ranks (SIGTERM) as soon
    as it sees one exit non-zero, so a rank lingering in interpreter teardown would
    otherwise report a signal instead of the gate's code. A no-op without a process group."""
    if "WORLD_SIZE" not in os.environ:
        return
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
