"""Split one run's inputs across processes and bring the results back in input order.

Two ways to scale inference out, which combine:

- `torchrun --nproc-per-node N -m pixeldefend score ...`: N ranks of one job. Each rank
  reads and scores (or purifies) one contiguous block of the input items; the results are
  gathered batch by batch, in rank order, on rank 0, which alone writes output and decides
  the gate; the decision is then shared so every rank exits with the same code.
- `--shard I/N` (a job array, a batch scheduler): independent processes, each handling
  block I of N and writing its own output; `pixeldefend merge` joins the outputs.

Blocks are contiguous and in order (`distributed.shard_range`), so concatenating shard
results in shard order is the one-process result. Under torchrun with `--shard I/N`,
block I is split again among the ranks.
"""

from __future__ import annotations

import atexit
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, TypeVar

from .distributed import Dist, parse_shard, shard_range
from .errors import PixelDefendError, UsageError

if TYPE_CHECKING:
    from .data import ImageStream

T = TypeVar("T")


@dataclass(frozen=True)
class _Done:
    """A rank has no more results."""


@dataclass(frozen=True)
class _Failed:
    """A rank failed; every rank stops with this message instead of waiting forever."""

    rank: int
    message: str


@dataclass(frozen=True)
class Sharding:
    """Which block of the inputs this process handles and who writes the results."""

    dist: Dist = field(default_factory=Dist)
    part: tuple[int, int] = (0, 1)  # --shard I/N

    @property
    def device(self) -> Any:
        return self.dist.device

    @property
    def writes(self) -> bool:
        """Only rank 0 writes files and prints results."""
        return self.dist.is_main

    @property
    def active(self) -> bool:
        """Does this process see only part of the inputs?"""
        return self.dist.active or self.part[1] > 1

    def part_range(self, n: int) -> range:
        """The items of 0..n-1 that this job (all ranks together) handles: --shard's block."""
        return shard_range(n, *self.part)

    def window(self, n: int) -> range:
        """The items of 0..n-1 that this process reads: its rank's block of the job's."""
        outer = self.part_range(n)
        inner = self.dist.shard(len(outer))
        return outer[inner.start:inner.stop]

    def split(self, stream: ImageStream) -> ImageStream:
        """Narrow an image stream to this process's block (before anything is decoded)."""
        if self.active:
            stream.restrict(self.window)
        return stream

    def in_order(self, local: Iterable[T]) -> Iterator[T]:
        """Every rank's items, rank 0's first, then rank 1's, ... (input order), yielded on
        rank 0 only; the other ranks yield nothing but must iterate to the end too.

        Items are gathered one per step (a batch's rows, say), so rank 0 streams its own
        as they come and spools the other ranks' to temporary files, keeping memory flat.
        An exception on any rank stops every rank with an error (no rank waits forever)."""
        if not self.dist.active:
            yield from local
            return
        spools: list[IO[bytes]] = [tempfile.TemporaryFile() for _ in range(self.dist.world)]
        try:
            yield from self._gather_steps(iter(local), spools)
            if self.writes:
                for spool in spools[1:]:
                    spool.seek(0)
                    while True:
                        try:
                            yield pickle.load(spool)
                        except EOFError:
                            break
        finally:
            for spool in spools:
                spool.close()

    def _gather_steps(self, local: Iterator[T], spools: list[IO[bytes]]) -> Iterator[T]:
        done = False
        while True:
            mine: Any = _Done()
            error: BaseException | None = None
            if not done:
                try:
                    mine = next(local)
                except StopIteration:
                    done = True
                except Exception as exc:  # noqa: BLE001 (re-raised below, after telling the others)
                    error, mine = exc, _Failed(self.dist.rank, str(exc) or type(exc).__name__)
            parts = self.dist.gather(mine)
            failed = [p for p in parts if isinstance(p, _Failed)]
            if error is not None:
                raise error
            if failed:
                raise PixelDefendError(f"rank {failed[0].rank} failed: {failed[0].message}")
            if all(isinstance(p, _Done) for p in parts):
                return
            if not self.writes:
                continue
            if not isinstance(parts[0], _Done):
                yield parts[0]
            for rank in range(1, self.dist.world):
                if not isinstance(parts[rank], _Done):
                    pickle.dump(parts[rank], spools[rank])

    def all_parts(self, compute: Callable[[], T]) -> list[T]:
        """Every rank's `compute()`, in rank order, on every rank (each rank's share of a
        result all of them need). An exception on any rank stops every rank with an
        error instead of leaving the others waiting in the gather."""
        try:
            mine: Any = compute()
            error: BaseException | None = None
        except Exception as exc:  # noqa: BLE001 (re-raised below, after telling the others)
            error, mine = exc, _Failed(self.dist.rank, str(exc) or type(exc).__name__)
        parts = self.dist.gather(mine)
        if error is not None:
            raise error
        failed = [p for p in parts if isinstance(p, _Failed)]
        if failed:
            raise PixelDefendError(f"rank {failed[0].rank} failed: {failed[0].message}")
        return parts

    def agree(self, value: T) -> T:
        """Rank 0's value on every rank (the gate's decision, the exit code)."""
        return self.dist.broadcast(value)


def join(device: str = "auto", shard: str | None = None) -> Sharding:
    """This process's place: torchrun's process group if launched by it (each rank on
    its own GPU), and the --shard I/N block if given. Leaves the group at exit."""
    from .device import resolve_device
    from .distributed import init, launched_by_torchrun, shutdown

    part = parse_shard(shard) if shard else (0, 1)
    dist = init(resolve_device(device))
    if launched_by_torchrun():
        atexit.register(_leave, dist, shutdown)
    return Sharding(dist, part)


def _leave(dist: Dist, shutdown: Callable[[], None]) -> None:
    """Wait for every rank before leaving: torchrun stops the others as soon as one rank
    exits with a non-zero code (a failed gate), which must not cut rank 0's writing short."""
    try:
        dist.barrier()
    finally:
        shutdown()


def refuse_when_split(sharding: Sharding, what: str) -> None:
    """An option whose output cannot yet be split across torchrun ranks."""
    if sharding.dist.active:
        raise UsageError(f"{what} does not split over torchrun ranks yet: run it in one "
                         "process")
