"""The defence registry: every column of the `evaluate` table is one `DefenceSpec`.

A defence here is a way of turning the purifier's output into the defended prediction.
The evaluation plans, runs, caches and reports every registered defence the same way:
its columns (one per eps_defend, or one for a defence that does not purify), its
purification stages, its BPDA runs (through `bpda.StraightThroughPurifier`, gated at the
calibrated threshold when `gated`) and its accuracy. Adding a defence is one entry in
`DEFENCES` below (plus its name in `defaults.DEFENCES`, the CLI's choices read without
importing PyTorch; `tests/test_evaluate.py` checks they agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DefenceSpec:
    """One defence: its name, what the help and the table call it, and how it decides.

    `combine(undefended, purified, flagged)` builds the defended predictions from the bare
    classifier's predictions, the predictions on the purified images and which images
    are above the calibrated bits/dim threshold (all three per image).
    """

    name: str
    help: str
    label: str  # the column's name in the table (purifying ones add " ε_def=E")
    combine: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    purifies: bool = True  # needs purification stages, one column per eps_defend
    gated: bool = False  # purifies only images above the threshold (needs calibration)
    bpda_cost: float = 1.0  # BPDA cost per image-step, in "purify one image" units (ETA)


DEFENCES: dict[str, DefenceSpec] = {spec.name: spec for spec in (
    DefenceSpec("none", "the bare classifier (the baseline column, always there)",
                "no defence", lambda undefended, purified, flagged: undefended,
                purifies=False, bpda_cost=0.01),
    DefenceSpec("purify", "PixelDefend: purify every image (Song et al. 2018)",
                "PixelDefend", lambda undefended, purified, flagged: purified,
                bpda_cost=0.6),
    DefenceSpec("adaptive", "adaptive PixelDefend: purify only images whose bits/dim "
                "exceed the model's calibrated threshold", "adaptive PixelDefend",
                lambda undefended, purified, flagged: np.where(flagged, purified, undefended),
                gated=True, bpda_cost=1.0),
)}


def column_key(defence: str, eps_defend: int | None) -> str:
    """The column's key in results.json: ``none``, ``purify@E``, ``adaptive@E``."""
    return defence if not DEFENCES[defence].purifies else f"{defence}@{eps_defend}"


def column_label(defence: str, eps_defend: int | None) -> str:
    """The column's heading in the table."""
    spec = DEFENCES[defence]
    return spec.label if not spec.purifies else f"{spec.label} ε_def={eps_defend}"


def gate(defence: str, threshold: float | None) -> float | None:
    """The bits/dim threshold the defence purifies above (None: purifies every image)."""
    return threshold if DEFENCES[defence].gated else None
