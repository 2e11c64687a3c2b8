"""Thresholds and conformal p-values from clean calibration scores (higher = stranger).

With n clean calibration scores and a target false-positive rate alpha, the threshold is
the k-th smallest score, k = ceil((n + 1) * (1 - alpha)); an image is flagged when its
score is above it. That is exactly the images whose conformal p-value
(1 + #{calibration scores >= s}) / (n + 1) is at most alpha, so for exchangeable clean
data the false-alarm rate is at most alpha.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

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

    @classmethod
    def fit(cls, scores: np.ndarray, fpr: float = 0.05, kind: str = "bpd",
            unit: str = "bits/dim", data: str = "",
            reference: dict[str, Any] | None = None) -> Calibration:
        scores = np.sort(np.asarray(scores, dtype=np.float64))
        if not 0.0 < fpr < 1.0:
            raise ValueError("fpr must be between 0 and 1")
        if scores.size == 0:
            raise ValueError("no calibration scores")
        if not np.all(np.isfinite(scores)):
            raise ValueError("calibration scores must be finite")
        n = scores.size
        k = math.ceil((n + 1) * (1.0 - fpr))
        threshold = float(scores[k - 1]) if k <= n else float("inf")
        quantiles = {f"{q:g}": float(np.quantile(scores, q)) for q in QUANTILES}
        return cls(kind=kind, threshold=threshold, fpr=fpr, n=n, quantiles=quantiles,
                   scores=[float(s) for s in scores], unit=unit, data=data,
                   reference=dict(reference or {}))

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
        if math.isinf(self.threshold):
            out["threshold"] = None  # JSON has no infinity
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        data = dict(data)
        if data.get("threshold") is None:
            data["threshold"] = float("inf")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def calibration_file(calibrations: dict[str, Calibration], default: str) -> dict:
    """The JSON document stored as calibration.json: one entry per score kind."""
    return {
        "version": CALIBRATION_VERSION,
        "default_kind": default,
        "kinds": {k: c.to_dict() for k, c in calibrations.items()},
    }


def parse_calibration_file(doc: dict) -> tuple[dict[str, Calibration], str]:
    if doc.get("version") != CALIBRATION_VERSION or "kinds" not in doc:
        raise ValueError("unsupported calibration.json version")
    kinds = {k: Calibration.from_dict(v) for k, v in doc["kinds"].items()}
    return kinds, doc.get("default_kind", next(iter(kinds), "bpd"))
