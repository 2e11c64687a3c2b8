"""The process-group view: shards cover the input once, in order; one process is a no-op."""

from __future__ import annotations

import pytest
import torch

from pixeldefend.distributed import Dist, init, parse_shard, shard_range, shutdown
from pixeldefend.errors import UsageError


@pytest.mark.parametrize("n", [0, 1, 5, 7, 100])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_shards_partition_the_input_in_order(n, count):
    blocks = [list(shard_range(n, i, count)) for i in range(count)]
    assert sum(blocks, []) == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_parse_shard_accepts_i_of_n_and_refuses_the_rest():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UsageError, match="shard"):
            parse_shard(bad)


def test_one_process_world_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = init(torch.device("cpu"))
    assert (dist.rank, dist.world, dist.is_main, dist.active) == (0, 1, True, False)
    assert dist.gather("x") == ["x"]
    assert dist.broadcast(3) == 3
    assert torch.equal(dist.all_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    assert list(dist.shard(5)) == [0, 1, 2, 3, 4]
    dist.barrier()
    assert Dist().is_main
    shutdown()  # nothing to leave: a no-op
