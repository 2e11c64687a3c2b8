"""`pixeldefend evaluate`: kept importable for old code; the evaluation lives in the
`pixeldefend.evaluation` package (plan / run / results / report / defences)."""

from __future__ import annotations

from .evaluation import *  # noqa: F403
from .evaluation import __all__ as __all__
from .evaluation.report import strongest_summary as strongest_summary
