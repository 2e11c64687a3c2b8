"""Thresholds and conformal p-values from clean calibration scores (higher = stranger).

With n clean calibration scores and a target false-positive rate alpha, the threshold is
the k-th smallest score, k = ceil((n + 1) * (1 - alpha)); an image is flagged when its
score is above it. That is exactly the images whose conformal p-value
(1 + #{calibration scores >= s}) / (n + 1) is at most alpha, so for exchangeable clean
data the false-alarm rate is at most alpha.

Fail closed: when n is too small for alpha (k > n) there is no such order statistic, and
an infinite threshold would pass every image. That is an error (`TooFewCalibrationImages`)
unless the caller asks for the largest calibration score as an explicit, finite,
conservative-looking threshold (`conservative=True`, recorded in the file), whose
false-positive rate is then only bounded by 1/(n+1) from below, not guaranteed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import CalibrationError, TooFewCalibrationImages

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
CALIBRATION_VERSION = 1


@dataclass
class Calibration:
    """Threshold for one score kind, with the clean scores it came from."""

    kind: str
    threshold: float
    fpr: float
    n: int
    quantiles: dict[str, float]
    scores: list[float] = field(repr=False)
    unit: str = "bits/dim"
    data: str = ""
    # what the score itself needs from the clean data, e.g. for `typicality` the mean clean
    # bits/dim and the clean bits/dim the batch test resamples from
    reference: dict[str, Any] = field(default_factory=dict, repr=False)
    # True when n was too small for fpr and the user asked for max(scores) as threshold
    conservative: bool = False

    @classmethod
    def fit(cls, scores: np.ndarray, fpr: float = 0.05, kind: str = "bpd",
            unit: str = "bits/dim", data: str = "",
            reference: dict[str, Any] | None = None,
            conservative: bool = False) -> Calibration:
        """Threshold at the k-th smallest score; too few scores for `fpr` raise
        `TooFewCalibrationImages` unless `conservative` (then: the largest score)."""
        scores = np.sort(np.asarray(scores, dtype=np.float64))
        if not 0.0 < fpr < 1.0:
            raise CalibrationError(f"fpr must be between 0 and 1 (exclusive), got {fpr}")
        if scores.size == 0:
            raise CalibrationError("scores: no calibration scores")
        if not np.all(np.isfinite(scores)):
            bad = int(np.sum(~np.isfinite(scores)))
            raise CalibrationError(f"scores: {bad} of {scores.size} calibration scores are "
                                   "not finite (NaN or inf): the model may be corrupt")
        n = scores.size
        k = math.ceil((n + 1) * (1.0 - fpr))
        if k > n and not conservative:
            raise TooFewCalibrationImages(n, fpr, min_calibration_images(fpr))
        threshold = float(scores[min(k, n) - 1])
        quantiles = {f"{q:g}": float(np.quantile(scores, q)) for q in QUANTILES}
        return cls(kind=kind, threshold=threshold, fpr=fpr, n=n, quantiles=quantiles,
                   scores=[float(s) for s in scores], unit=unit, data=data,
                   reference=dict(reference or {}), conservative=k > n)

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values: (1 + #{calibration scores >= s}) / (n + 1)."""
        cal = np.asarray(self.scores, dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
        at_least = cal.size - np.searchsorted(np.sort(cal), scores, side="left")
        return (1.0 + at_least) / (cal.size + 1.0)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """True where the score is above the threshold (anomalous)."""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.reference:
            del out["reference"]  # files of kinds without one stay as they were
        if not self.conservative:
            del out["conservative"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """Build from a calibration.json entry; every field is checked (schema.py), so a
        missing, NaN or infinite threshold is a ValueError, never a pass-everything gate."""
        from .schema import CALIBRATION_ENTRY

        data = CALIBRATION_ENTRY.check(data, "calibration")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def min_calibration_images(fpr: float) -> int:
    """Smallest n with ceil((n + 1)(1 - fpr)) <= n, i.e. about 1/fpr - 1."""
    n = max(1, math.ceil(1.0 / fpr - 1.0) - 1)
    while math.ceil((n + 1) * (1.0 - fpr)) > n:
        n += 1
    return n


def calibration_file(calibrations: dict[str, Calibration], default: str) -> dict:
    """The JSON document stored as calibration.json: one entry per score kind."""
    return {
        "version": CALIBRATION_VERSION,
        "default_kind": default,
        "kinds": {k: c.to_dict() for k, c in calibrations.items()},
    }


def parse_calibration_file(doc: dict) -> tuple[dict[str, Calibration], str]:
    """calibration.json -> ({kind: Calibration}, default kind); ValueError when malformed."""
    from .schema import CALIBRATION_FILE, check_calibration_entries

    doc = CALIBRATION_FILE.check(doc, "calibration.json")
    check_calibration_entries(doc)
    if doc["version"] != CALIBRATION_VERSION:
        raise ValueError(f"unsupported calibration.json version {doc['version']!r}")
    kinds = {k: Calibration.from_dict(v) for k, v in doc["kinds"].items()}
    default = doc.get("default_kind", next(iter(kinds), "bpd"))
    if kinds and default not in kinds:
        raise ValueError(f"default_kind {default!r} has no entry in kinds")
    return kinds, default
