"""Progress protocols the library reports through and the CLI renders with Rich.

Kept free of heavy imports so the CLI can subclass them without loading PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .evaluation.plan import Stage


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
