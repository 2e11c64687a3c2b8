"""The score-kind registry (`scores.SCORES`) is the one place a kind is defined: the CLI
reads its names and help without PyTorch, and a new kind is one entry."""

from __future__ import annotations

import numpy as np
import pytest

from pixeldefend import defaults, scores
from pixeldefend.data import load_images
from pixeldefend.detector import DensityDetector
from pixeldefend.scores import SCORES, ScoreKind, complexity_score, png_bits_per_dim


def test_score_registry_is_the_one_place():
    from pixeldefend.cli.common import SCORE_OPTION_HELP, ScoreChoice

    assert tuple(SCORES) == scores.SCORE_KINDS == tuple(c.value for c in ScoreChoice)
    assert not hasattr(defaults, "SCORE_KINDS") and not hasattr(defaults, "SCORE_HELP")
    assert scores.SCORE_UNITS == {"bpd": "bits/dim", "complexity": "bits/dim",
                                  "llr": "bits/dim", "typicality": "bits/dim",
                                  "dose": "-log density"}
    for name, kind in SCORES.items():
        assert kind.name == name and f"{name} = {kind.help}" in SCORE_OPTION_HELP
        assert kind.needs <= {"background", "calibration"}
        assert ("calibration" in kind.needs) == (kind.reference is not None)


def test_background_kinds_follow_needs(tiny_bundle, tiny_bundle_background):
    plain = DensityDetector.load(tiny_bundle, device="cpu")
    assert "llr" not in plain.available_kinds
    with pytest.raises(ValueError, match="score 'llr' needs a background model"):
        plain.check_kind("llr")
    assert "llr" in DensityDetector.load(tiny_bundle_background, device="cpu").available_kinds


# The example of CONTRIBUTING.md "A new anomaly score kind", checked to run.
PNG_COMPLEXITY = ScoreKind(
    "complexity-png", "bits/dim minus PNG bits/dim (Serrà et al. 2020's first codec)",
    lambda p: complexity_score(p.bpd, png_bits_per_dim(p.x, p.detector.spec.levels)))


def test_a_new_kind_is_one_entry(tiny_bundle, monkeypatch):
    monkeypatch.setitem(SCORES, "complexity-png", PNG_COMPLEXITY)
    det = DensityDetector.load(tiny_bundle, device="cpu")
    assert "complexity-png" in det.available_kinds
    clean = load_images("digits:calib")
    cal = det.calibrate(clean, fpr=0.1, kind="complexity-png")
    assert cal.unit == "bits/dim" and cal.n == len(clean)
    test = load_images("digits:test[:20]")
    got = det.anomaly_score(test, "complexity-png")
    bpd = det.anomaly_score(test, "bpd")
    np.testing.assert_allclose(got, bpd - png_bits_per_dim(test.images, 17))
    assert det.predict(test, "complexity-png").tolist().count(1) >= 10
