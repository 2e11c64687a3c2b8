"""Thresholds and conformal p-values agree, and keep the false-alarm rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pixeldefend.calibration import Calibration, min_calibration_images
from pixeldefend.errors import TooFewCalibrationImages


def test_threshold_is_the_conformal_order_statistic():
    scores = np.arange(1, 20, dtype=float)  # n = 19
    cal = Calibration.fit(scores, fpr=0.1)
    # k = ceil(20 * 0.9) = 18 -> 18th smallest score
    assert cal.threshold == 18.0 and cal.n == 19
    assert cal.quantiles["0.5"] == 10.0


def test_flagged_exactly_when_p_value_at_most_fpr():
    rng = np.random.default_rng(0)
    cal = Calibration.fit(rng.normal(size=199), fpr=0.05)
    test = rng.normal(size=2000) * 2
    flagged = cal.predict(test)
    assert np.array_equal(flagged, cal.p_values(test) <= 0.05)


def test_p_values_formula():
    cal = Calibration.fit(np.array([1.0, 2.0, 3.0, 4.0]), fpr=0.25)
    p = cal.p_values(np.array([0.0, 2.0, 2.5, 5.0]))
    assert np.allclose(p, [5 / 5, 4 / 5, 3 / 5, 1 / 5])


def test_false_positive_rate_is_kept_on_exchangeable_data():
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(200):
        cal = Calibration.fit(rng.normal(size=100), fpr=0.1)
        rates.append(cal.predict(rng.normal(size=200)).mean())
    assert np.mean(rates) <= 0.1 + 0.01
    assert np.mean(rates) > 0.07  # and not absurdly conservative


def test_too_few_scores_is_an_error_naming_fpr_and_the_number_needed():
    """Fail closed: k > n used to give an infinite threshold that passed everything."""
    with pytest.raises(TooFewCalibrationImages, match=r"fpr=0.05 needs at least 19 .* got 2"):
        Calibration.fit(np.array([1.0, 2.0]), fpr=0.05)
    with pytest.raises(ValueError):  # scikit-learn convention: a ValueError subclass
        Calibration.fit(np.arange(98.0), fpr=0.01)
    assert Calibration.fit(np.arange(99.0), fpr=0.01).threshold == 98.0


@pytest.mark.parametrize("fpr", [0.5, 0.2, 0.1, 0.07, 0.05, 0.01, 0.001])
def test_min_calibration_images_is_the_smallest_n_with_a_finite_threshold(fpr):
    n = min_calibration_images(fpr)
    assert math.ceil((n + 1) * (1 - fpr)) <= n
    assert n == 1 or math.ceil(n * (1 - fpr)) > n - 1


def test_conservative_threshold_is_the_largest_score_finite_and_recorded():
    cal = Calibration.fit(np.array([1.0, 3.0, 2.0]), fpr=0.05, conservative=True)
    assert cal.threshold == 3.0 and cal.conservative and cal.predict(np.array([3.5]))[0]
    doc = cal.to_dict()
    assert doc["threshold"] == 3.0 and doc["conservative"] is True
    assert Calibration.from_dict(doc).conservative


@pytest.mark.parametrize("threshold", [None, float("nan"), float("inf"), "1.5", True])
def test_a_missing_or_non_finite_threshold_is_refused(threshold):
    doc = Calibration.fit(np.arange(40.0), fpr=0.05).to_dict()
    doc["threshold"] = threshold
    with pytest.raises(ValueError, match="threshold"):
        Calibration.from_dict(doc)
    del doc["threshold"]
    with pytest.raises(ValueError, match="threshold: missing"):
        Calibration.from_dict(doc)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1])
def test_invalid_fpr(fpr):
    with pytest.raises(ValueError):
        Calibration.fit(np.ones(10), fpr=fpr)
