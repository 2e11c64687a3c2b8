"""`run_training(max_seconds=...)`: a wall-clock budget, judged by an injected clock (no
test depends on real time), kept across --resume, with the best weights kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pixeldefend.train import TrainSettings, out_of_budget, run_training


class FakeClock:
    """Time stands still except where the test's loss function moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fit(tmp_path, clock: FakeClock, max_seconds: float | None, epochs: int = 10,
        resume: bool = False, seconds_per_epoch: float = 60.0):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(32, 3)
    y = x.sum(1, keepdim=True)

    def loss_fn(m, xb, yb):
        clock.now += seconds_per_epoch / 4  # 4 batches of 8 per epoch
        return ((m(xb) - yb) ** 2).mean()

    def evaluate(m, block):  # (sum, count) of the validation metric over a block
        with torch.no_grad():
            return float(((m(x[block]) - y[block]) ** 2).sum()), len(x[block])

    settings = TrainSettings(epochs=epochs, batch_size=8, lr=0.05, patience=0)
    return run_training(model, loss_fn, x, y, evaluate, settings, torch.device("cpu"),
                        checkpoint_dir=tmp_path / "ckpt", resume=resume, val_size=len(x),
                        max_seconds=max_seconds, clock=clock)


def test_no_epoch_starts_that_would_end_past_the_budget(tmp_path):
    result = fit(tmp_path, FakeClock(), max_seconds=200.0)
    assert result.epochs_run == 3  # a 4th 60 s epoch would end at 240 s > 200 s
    assert result.stopped_by_budget
    assert result.seconds == pytest.approx(180.0)
    assert result.best_epoch == 2  # still learning: the last epoch is the best


def test_without_budget_every_epoch_runs(tmp_path):
    result = fit(tmp_path, FakeClock(), max_seconds=None, epochs=5)
    assert result.epochs_run == 5 and not result.stopped_by_budget


def test_budget_counts_the_time_before_a_resume(tmp_path):
    first = fit(tmp_path, FakeClock(), max_seconds=130.0)  # as if stopped after 2 epochs
    assert first.epochs_run == 2
    resumed = fit(tmp_path, FakeClock(), max_seconds=200.0, resume=True)  # a new budget
    assert resumed.epochs_run == 3  # 2 before the resume + 1 more fits in 200 s
    assert resumed.stopped_by_budget and resumed.seconds == pytest.approx(180.0)


def test_out_of_budget_uses_the_slowest_epoch():
    assert not out_of_budget(0.0, [], 10.0)
    assert out_of_budget(10.0, [], 10.0)
    assert out_of_budget(50.0, [10.0, 55.0], 100.0)
    assert not out_of_budget(40.0, [10.0, 55.0], 100.0)
    assert not out_of_budget(1e9, [1.0], None)


def test_remove_checkpoint_deletes_only_what_the_loop_wrote(tmp_path):
    from pixeldefend.train import CHECKPOINT_FILES, remove_checkpoint

    ours = tmp_path / "ours.checkpoint"
    ours.mkdir()
    for name in CHECKPOINT_FILES:
        (ours / name).write_text("x")
    remove_checkpoint(ours)
    assert not ours.exists()
    shared = tmp_path / "shared.checkpoint"
    shared.mkdir()
    for name in CHECKPOINT_FILES:
        (shared / name).write_text("x")
    (shared / "notes.txt").write_text("the user's")
    remove_checkpoint(shared)
    assert [p.name for p in shared.iterdir()] == ["notes.txt"]
