"""The Python API: fit / score_samples / calibrate / predict / p_values / save / load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixeldefend import DensityDetector
from pixeldefend.data import load_images
from pixeldefend.errors import DataError, UsageError
from pixeldefend.train import TrainSettings


def test_trained_model_beats_uniform_and_flags_foreign_images(tiny_bundle):
    det = DensityDetector.load(tiny_bundle, device="cpu")
    clean = load_images("digits:test")
    bpd = det.anomaly_score(clean)
    assert bpd.mean() < np.log2(17) - 1.0  # far below the 4.09 bits of a uniform guess
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 17, (50, 1, 8, 8), generator=rng, dtype=torch.uint8)
    inverted = 16 - clean.images[:50]
    assert det.is_anomalous(noise).mean() > 0.95
    assert det.is_anomalous(inverted).mean() > 0.8
    assert det.is_anomalous(clean).mean() < 0.15  # about the 5% target on clean test images
    p = det.p_values(noise)
    assert p.max() <= 1.0 and p.min() >= 1 / 181


def test_log_likelihood_and_bits_per_dim_agree(tiny_bundle):
    det = DensityDetector.load(tiny_bundle, device="cpu")
    x = load_images("digits:test[:10]")
    assert np.allclose(-det.log_likelihood(x) / (64 * np.log(2)), det.anomaly_score(x))
    assert det.nll_map(x).shape == (10, 1, 8, 8)


def test_fit_calibrate_predict_save_load_on_arrays(tmp_path):
    rng = np.random.default_rng(0)
    # two-level images whose left half is always 0: an easy density to learn
    train = rng.integers(0, 2, (256, 1, 4, 4)).astype(np.uint8)
    train[:, :, :, :2] = 0
    det = DensityDetector(preset="tiny", device="cpu")
    det.fit(train, levels=2, settings=TrainSettings(epochs=30, lr=1e-2, batch_size=64))
    cal = det.calibrate(train[:100], fpr=0.1)
    assert cal.n == 100
    odd = np.ones((20, 1, 4, 4), dtype=np.uint8)
    assert det.is_anomalous(odd).all()
    # half the dims are deterministic and half are fair coins: 0.5 bits/dim is optimal
    assert abs(det.anomaly_score(train).mean() - 0.5) < 0.1
    det.save(tmp_path / "m")
    again = DensityDetector.load(tmp_path / "m", device="cpu")
    assert np.array_equal(again.is_anomalous(odd), det.is_anomalous(odd))


def test_clear_errors(tiny_bundle):
    det = DensityDetector.load(tiny_bundle, device="cpu")
    with pytest.raises(DataError, match="model expects"):
        det.anomaly_score(np.zeros((2, 1, 9, 9), dtype=np.uint8))
    with pytest.raises(DataError, match=r"must lie in \[0, 16\]"):
        det.anomaly_score(np.full((2, 1, 8, 8), 17, dtype=np.uint8))
    with pytest.raises(UsageError, match="no model"):
        DensityDetector().anomaly_score(np.zeros((1, 1, 8, 8), dtype=np.uint8))
    with pytest.raises(UsageError, match="fpr"):
        det.calibrate(np.zeros((5, 1, 8, 8), dtype=np.uint8), fpr=1.5)


def test_adaptive_purification_uses_the_bpd_threshold_whatever_the_default(tiny_bundle):
    from pixeldefend import purify

    det = DensityDetector.load(tiny_bundle, device="cpu")
    det.calibrate(load_images("digits:calib"), fpr=0.05, kind="complexity")
    det.default_kind = "complexity"
    assert det.threshold != det.calibrations["bpd"].threshold
    result = purify(det, load_images("digits:test[:8]"), 1, adaptive=True)
    assert result.threshold == det.calibrations["bpd"].threshold == det.bpd_threshold
    assert np.array_equal(result.purified, result.bpd_before > det.bpd_threshold)


def test_scikit_learn_outlier_conventions(tiny_bundle):
    """score_samples: lower = more abnormal; decision_function < 0 exactly for outliers;
    predict: -1 outlier / +1 inlier (as IsolationForest and LocalOutlierFactor)."""
    det = DensityDetector.load(tiny_bundle, device="cpu")
    clean = load_images("digits:test[:40]")
    noise = np.random.default_rng(1).integers(0, 17, (10, 1, 8, 8)).astype(np.uint8)
    x = np.concatenate([clean.images.numpy(), noise])
    assert np.array_equal(det.score_samples(x), -det.anomaly_score(x))
    assert det.score_samples(noise).max() < np.median(det.score_samples(clean))
    decision, pred = det.decision_function(x), det.predict(x)
    assert set(np.unique(pred)) <= {-1, 1} and (pred[-10:] == -1).all()
    assert np.array_equal(pred == -1, decision < 0)
    assert np.array_equal(pred == -1, det.is_anomalous(x))


def test_fit_needs_levels_for_plain_arrays():
    det = DensityDetector(preset="tiny", device="cpu")
    with pytest.raises(ValueError, match="levels is required"):
        det.fit(np.zeros((4, 1, 4, 4), dtype=np.uint8))


def test_as_tensor_keeps_the_pixel_contract():
    """Images enter the detector through pixels.check_images / check_range."""
    import numpy as np
    import torch

    from pixeldefend.detector import as_tensor
    from pixeldefend.errors import DataError

    x = as_tensor(np.arange(64, dtype=np.int64).reshape(1, 8, 8))
    assert x.dtype == torch.uint8 and x.shape == (1, 1, 8, 8)
    with pytest.raises(DataError, match="not floats"):
        as_tensor(np.zeros((1, 1, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"lie in \[0, 255\]"):
        as_tensor(np.full((1, 1, 8, 8), 300))
    with pytest.raises(DataError, match="must be \\(N, C, H, W\\)"):
        as_tensor(np.zeros((1, 1, 1, 8, 8), dtype=np.uint8))
