"""Progress: the protocols the library reports through, and their Rich renderings on
stderr that the CLI (or a Python caller) passes in.

Kept free of heavy imports so the CLI can use them without loading PyTorch.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from .evaluation.plan import Stage

# everything that is not a result goes to stderr
err_console = Console(stderr=True, soft_wrap=True)


class EvalProgress:
    """Receives progress reports; the CLI renders them with Rich. Does nothing here."""

    def plan(self, stages: list[Stage]) -> None:
        """All stages, known up front (cached ones marked), so the ETA covers the run."""

    def begin(self, stage: Stage) -> None:
        """A stage starts running (never called for cached stages)."""

    def advance(self, stage: Stage, items: float, status: str = "") -> None:
        """`items` more of the stage's items are done."""

    def end(self, stage: Stage, cached: bool) -> None:
        """A stage finished (ran, or loaded from the cache)."""

    def note(self, message: str) -> None:
        """A line of news from work outside the planned stages (the adaptive suite)."""


def make_progress(transient: bool = False) -> Progress:
    """A Rich progress bar on stderr with count, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=not err_console.is_terminal and not _force_progress(),
    )


def _force_progress() -> bool:
    return os.environ.get("PIXELDEFEND_PROGRESS") == "1"


class ProgressBar:
    """One Rich bar on stderr; `advance` is the `progress(k)` callback the library's
    pipelines take, `set_total` their `on_total(n)`. The bar appears with the first
    report, so a command that stops at a usage error draws no empty bar."""

    def __init__(self, label: str, total: float | None = None) -> None:
        self.progress, self.label, self.total = make_progress(), label, total
        self.task: TaskID | None = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.__exit__(*exc)

    def _task(self) -> TaskID:
        if self.task is None:
            self.progress.__enter__()
            self.task = self.progress.add_task(self.label, total=self.total, status="")
        return self.task

    def advance(self, k: float = 1, status: str = "") -> None:
        self.progress.update(self._task(), advance=k, status=status)

    def set_total(self, n: float) -> None:
        self.progress.update(self._task(), total=n)


class RichTrainProgress:
    """Renders the training loop's reports (`train.TrainProgress`): a Rich bar on stderr
    plus one line per epoch. Subclasses change only how the metrics are worded."""

    def __init__(self, label: str = "train") -> None:
        self.progress = make_progress()
        self.label = label
        self.task: Any = None
        self.epochs = 0
        self.last_val = float("nan")

    def __enter__(self) -> RichTrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def batch_status(self, loss: float) -> str:
        return f"loss {loss:.3f} bits/dim  val {self.last_val:.3f}"

    def epoch_summary(self, train_metric: float, val_metric: float) -> str:
        return f"train {train_metric:.4f}  val {val_metric:.4f} bits/dim"

    def start(self, total_epochs: int, batches_per_epoch: int, first_epoch: int) -> None:
        self.epochs = total_epochs
        self.task = self.progress.add_task(
            self.label, total=total_epochs * batches_per_epoch,
            completed=first_epoch * batches_per_epoch, status="")

    def batch(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, status=self.batch_status(loss))

    def epoch(self, epoch: int, train_metric: float, val_metric: float, best: bool) -> None:
        self.last_val = val_metric
        err_console.print(
            f"epoch {epoch + 1:>3}/{self.epochs}  {self.epoch_summary(train_metric, val_metric)}"
            f"{' *' if best else ''}", highlight=False)


class ClassifierProgress(RichTrainProgress):
    """Training progress worded for a classifier: loss and validation accuracy."""

    def __init__(self) -> None:
        super().__init__("train classifier")

    def batch_status(self, loss: float) -> str:
        return f"loss {loss:.3f}  val error {self.last_val:.4f}"

    def epoch_summary(self, train_metric: float, val_metric: float) -> str:
        return f"loss {train_metric:.4f}  val accuracy {1 - val_metric:.4f}"


class RichEvalProgress(EvalProgress):
    """Two Rich bars on stderr: the whole run (weighted by estimated cost, with an ETA
    that covers only the stages left to run) and the current stage. Without a terminal,
    one log line per finished stage, with the same ETA."""

    def __init__(self) -> None:
        self.progress = make_progress()
        self.total = 0.0
        self.done = 0.0
        self.count = 0
        self.finished = 0
        self.overall: TaskID | None = None
        self.current: TaskID | None = None
        self.stage_done: dict[str, float] = {}
        self.started = time.perf_counter()

    def __enter__(self) -> RichEvalProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.overall is not None and exc[0] is None:
            self.progress.update(self.overall, completed=100)  # float rounding
        self.progress.__exit__(*exc)

    def plan(self, stages: list[Stage]) -> None:
        todo = [s for s in stages if not s.cached]
        self.total = sum(s.items * s.weight for s in todo)
        self.count = len(stages)
        cached = len(stages) - len(todo)
        err_console.print(f"evaluate: {len(stages)} stages, {len(todo)} to run"
                          f"{f', {cached} from the cache' if cached else ''}", highlight=False)
        # the overall bar counts percent of the estimated cost of what is left to run
        self.overall = self.progress.add_task("evaluate (%)", total=100, status="")
        self.started = time.perf_counter()

    def begin(self, stage: Stage) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.stage_done[stage.name] = 0.0
        self.current = self.progress.add_task(stage.label, total=stage.items, status="")

    def advance(self, stage: Stage, items: float, status: str = "") -> None:
        units = items * stage.weight
        self.stage_done[stage.name] = self.stage_done.get(stage.name, 0.0) + units
        self.done += units
        if self.current is not None:
            self.progress.update(self.current, advance=items, status=status)
        self._overall(units, stage)

    def note(self, message: str) -> None:
        elapsed = (time.perf_counter() - self.started) / 60
        err_console.print(f"adaptive: {message} ({elapsed:.1f} min)", highlight=False)

    def _overall(self, units: float, stage: Stage) -> None:
        if self.overall is not None and self.total > 0:
            self.progress.update(self.overall, advance=100 * units / self.total,
                                 status=f"stage {self.finished + 1}/{self.count}")

    def end(self, stage: Stage, cached: bool) -> None:
        self.finished += 1
        if not cached:
            rest = stage.items * stage.weight - self.stage_done.get(stage.name, 0.0)
            if rest > 0:
                self.done += rest
                self._overall(rest, stage)
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None
        elapsed = time.perf_counter() - self.started
        eta = ""
        if self.done > 0 and self.total > self.done:
            eta = f", eta {(self.total - self.done) * elapsed / self.done / 60:.1f} min"
        if not self.progress.disable or cached:  # the plan line counted the cached ones
            return
        err_console.print(f"[{self.finished}/{self.count}] {stage.label}: "
                          f"{'cached' if cached else 'done'} ({elapsed / 60:.1f} min{eta})",
                          highlight=False)
