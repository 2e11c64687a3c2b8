"""The `dose` score: statistics with known answers, the density, persistence, the gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pixeldefend.dose import DoseModel, compute_statistics, split_halves, window_size
from pixeldefend.scores import CODECS, codec_bits_per_dim
from pixeldefend.statistics import (
    ModelPass,
    hottest_window,
    location_stats,
    mass_moments,
    model_pass,
    pixel_quantile,
    pixel_spread,
    principal_subspace,
    residual_window_max,
    surprise_gap,
    window_max,
)

LN2 = math.log(2.0)


def test_surprise_gap_is_nll_minus_entropy_in_bits():
    nll = torch.full((2, 1, 2, 2), 2 * LN2)
    entropy = torch.full((2, 1, 2, 2), LN2)
    entropy[1] = 2 * LN2
    assert np.allclose(surprise_gap(nll, entropy), [1.0, 0.0])


def test_pixel_quantile_and_spread_known_answers():
    bits = np.arange(100, dtype=np.float64).reshape(1, 10, 10)
    assert pixel_quantile(bits, 0.5)[0] == pytest.approx(49.5)
    assert pixel_quantile(bits, 1.0)[0] == 99.0
    assert pixel_spread(np.array([[[1.0, 3.0], [1.0, 3.0]]]))[0] == pytest.approx(1.0)


def test_window_max_finds_a_hot_square_and_normalises_per_location():
    clean = np.zeros((4, 8, 8))
    clean[::2] += 1.0  # per-location mean 0.5, std 0.5
    mean, std = location_stats(clean)
    assert np.allclose(mean, 0.5) and np.allclose(std, 0.5)
    img = np.full((1, 8, 8), 0.5)  # exactly typical: z = 0 everywhere
    assert window_max(img, mean, std, 3)[0] == pytest.approx(0.0)
    img[0, 2:5, 4:7] = 2.5  # z = 4 on a 3x3 square
    assert window_max(img, mean, std, 3)[0] == pytest.approx(4.0)
    assert hottest_window(img, mean, std, 3)[0].tolist() == [2, 4, 5, 7]
    # the std floor keeps an always-identical location finite
    _, std0 = location_stats(np.zeros((3, 2, 2)))
    assert np.all(std0 == 0.05)


def test_codecs_are_lossless_sizes_and_rank_noise_above_flat():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    flat = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    for codec in CODECS:
        a, b = codec_bits_per_dim(np.concatenate([flat, noise]), 256, codec)
        assert a < b, codec
        assert b > 6.0, codec  # uniform noise cannot be compressed much below 8 bits


def test_grid_means_known_answer():
    from pixeldefend.statistics import grid_means

    bits = np.zeros((1, 4, 4))
    bits[0, :2, 2:] = 4.0  # top-right quarter
    assert grid_means(bits, 2)[0].tolist() == [0.0, 4.0, 0.0, 0.0]


def test_window_size_scales_with_the_image():
    assert window_size(28, 28) == 6 and window_size(8, 8) == 2


def test_dose_density_known_answers_and_round_trip():
    rng = np.random.default_rng(0)
    n = 400
    nll = torch.from_numpy(rng.gamma(2.0, 1.0, (n, 1, 6, 6))).float()
    run = ModelPass(nll=nll, entropy=nll * 0.9, feature_norm=rng.normal(5, 1, n))
    codec = rng.normal(4, 0.5, n)
    dose = DoseModel.fit(run, codec, ["bpd", "gap", "feature_norm"])
    x = dose.features(run, codec)
    assert x.shape == (n, 3)
    assert np.allclose(x[:, 0], run.bits_per_dim)
    # known answer: lambda 1 is the identity, so with an identity precision the score is
    # half the squared standardised distance
    plain = DoseModel(statistics=["bpd"], center=np.array([1.0]), scale=np.array([2.0]),
                      lambdas=np.array([1.0]), weights=np.ones(1), means=np.zeros((1, 1)),
                      precision_chol=np.ones((1, 1, 1)), location_mean=np.zeros((2, 2)),
                      location_std=np.ones((2, 2)), window=2, n_fit=10)
    const = 0.5 * np.log(2 * np.pi)
    assert np.allclose(plain.score(np.array([[1.0], [5.0], [-3.0]])),
                       np.array([0.0, 2.0, 2.0]) + const)
    # two equal components at -/+ 1 (std 1): density 0.5 N(0;-1,1) + 0.5 N(0;1,1) at 0
    two = DoseModel(statistics=["bpd"], center=np.zeros(1), scale=np.ones(1),
                    lambdas=np.ones(1), weights=np.array([0.5, 0.5]),
                    means=np.array([[-1.0], [1.0]]), precision_chol=np.ones((2, 1, 1)),
                    location_mean=np.zeros((2, 2)), location_std=np.ones((2, 2)), window=2,
                    n_fit=10)
    assert two.score(np.zeros((1, 1)))[0] == pytest.approx(0.5 + const)
    assert plain.score(np.array([[np.nan]]))[0] == np.inf  # fails closed
    far = dose.center + 10 * dose.scale
    assert dose.score(far[None])[0] > np.quantile(dose.score(x), 0.99)
    again = DoseModel.from_reference(dose.to_reference())
    assert np.array_equal(again.score(x), dose.score(x))
    with pytest.raises(ValueError):
        DoseModel.fit(run, codec, ["nope"])


def test_split_halves_is_a_seeded_partition():
    a, b = split_halves(11)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(11))
    assert len(a) == 5 and np.array_equal(split_halves(11)[0], a)


def test_model_pass_nll_matches_the_density_module(tiny_bundle):
    from pixeldefend.density import nll_map
    from pixeldefend.detector import DensityDetector

    det = DensityDetector.load(tiny_bundle, device="cpu")
    x = torch.randint(0, det.spec.levels, (5, *det.spec.shape), dtype=torch.uint8)
    run = model_pass(det.model, x)
    assert torch.allclose(run.nll, nll_map(det.model, x), atol=1e-5)
    assert (run.entropy >= 0).all() and run.feature_norm.shape == (5,)
    stats = compute_statistics(run, np.zeros(5), ["bpd", "window"], *location_stats(
        run.pixel_bits), 2)
    assert stats.shape == (5, 2)


def test_default_gate_flags_rendered_characters_that_bpd_misses(repo):
    """The shipped digits bundle: 8x8 letters and symbols rendered from system fonts look
    *more* likely than digits to the model, so bits/dim lets most through; dose does not,
    and still flags clean test images at about the calibrated rate."""
    from pixeldefend.data import load_images
    from pixeldefend.detector import DensityDetector
    from pixeldefend.ood import make_ood_set

    det = DensityDetector.load(repo / "models" / "digits", device="cpu")
    assert det.default_kind == "dose"
    clean = load_images("digits:test", det.spec)
    chars = make_ood_set("characters", det.spec, clean, 200, seed=0)
    assert det.is_anomalous(chars, "bpd").mean() < 0.4
    assert det.is_anomalous(chars).mean() > 0.85
    assert det.is_anomalous(clean).mean() < 0.12  # target 0.05 on 359 images


def test_local_map_puts_the_hottest_square_on_a_hot_region():
    from pixeldefend.localise import boxes_overlap, hottest_boxes, local_map

    rng = np.random.default_rng(0)
    nll = torch.from_numpy(rng.gamma(4.0, 0.25, (3, 1, 12, 12))).float()
    entropy = nll.clone()  # |NLL - entropy| = 0: nothing unexpected ...
    entropy[:, :, 4:7, 6:9] += 3.0  # ... except a 3x3 square
    run = ModelPass(nll=nll, entropy=entropy, feature_norm=np.zeros(3))
    dose = DoseModel(statistics=["bpd"], center=np.zeros(1), scale=np.ones(1),
                     lambdas=np.ones(1), weights=np.ones(1), means=np.zeros((1, 1)),
                     precision_chol=np.ones((1, 1, 1)), location_mean=np.zeros((12, 12)),
                     location_std=np.ones((12, 12)), window=3, n_fit=10)
    assert hottest_boxes(run, dose).tolist() == [[4, 6, 7, 9]] * 3
    heat = local_map(run, dose)
    assert heat.shape == (3, 12, 12) and np.allclose(heat[:, 4:7, 6:9], 3.0 / LN2)  # bits
    assert boxes_overlap(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3]]))[0]
    assert not boxes_overlap(np.array([[0, 0, 2, 2]]), np.array([[2, 2, 3, 3]]))[0]


def test_mixture_score_matches_sklearn_and_lw_single_component():
    from sklearn.mixture import GaussianMixture

    from pixeldefend.dose import fit_mixture

    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(-3, 1, (300, 2)), rng.normal(3, 0.5, (300, 2))])
    gm = GaussianMixture(2, covariance_type="full", random_state=0).fit(y)
    model = DoseModel(statistics=["bpd", "gap"], center=np.zeros(2), scale=np.ones(2),
                      lambdas=np.ones(2), weights=gm.weights_, means=gm.means_,
                      precision_chol=gm.precisions_cholesky_,
                      location_mean=np.zeros((2, 2)), location_std=np.ones((2, 2)),
                      window=2, n_fit=600)
    assert np.allclose(model.score(y), -gm.score_samples(y))
    weights, means, _ = fit_mixture(y)
    assert len(weights) >= 2  # BIC sees the two clusters
    weights, means, chol = fit_mixture(rng.normal(size=(30, 2)))
    assert len(weights) == 1 and chol.shape == (1, 2, 2)  # few points: one shrunk Gaussian


def test_model_pass_known_answers_on_a_model_with_fixed_outputs():
    """Zero output layer: uniform predictions, so NLL = entropy = ln(levels) everywhere;
    constant trunk: every context feature vector is elu(bias), so its norm is known."""
    from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig

    model = PixelCNN(PixelCNNConfig.from_preset("tiny", 1, 5, 5, 7))
    with torch.no_grad():
        model.trunk.weight.zero_()
        model.trunk.bias.copy_(torch.linspace(-1.0, 2.0, model.trunk.bias.numel()))
        model.channel_out[0].weight.zero_()
        model.channel_out[0].bias.zero_()
    x = torch.randint(0, 7, (3, 1, 5, 5), dtype=torch.uint8)
    run = model_pass(model, x)
    assert torch.allclose(run.nll, torch.full_like(run.nll, math.log(7)), atol=1e-5)
    assert torch.allclose(run.entropy, run.nll, atol=1e-5)
    assert np.allclose(surprise_gap(run.nll, run.entropy), 0.0, atol=1e-5)
    assert np.allclose(run.bits_per_dim, math.log2(7), atol=1e-5)
    expected = float(torch.nn.functional.elu(model.trunk.bias.detach()).norm())
    assert np.allclose(run.feature_norm, expected, atol=1e-5)


def test_mass_moments_known_answers_and_rotation():
    # equal mass at two diagonal corners: equal spreads, perfect row-column correlation,
    # no skew; a 90 degree rotation turns the correlation to -1
    diag = np.zeros((1, 3, 3))
    diag[0, 0, 0] = diag[0, 2, 2] = 1.0
    assert np.allclose(mass_moments(diag), [[0.0, 1.0, 0.0, 0.0]], atol=1e-9)
    rotated = np.rot90(diag, 1, axes=(1, 2))
    assert mass_moments(rotated)[0, 1] == pytest.approx(-1.0)
    # rows 0 and 3 carry 2/3 and 1/3 of the mass, columns 0 and 3 half each, independent:
    # skewness along rows (2/3 at -1, 1/3 at +2 in units of 3/4): 1/sqrt(2), none along
    # columns, correlation 0, log variance ratio log((1/8) / (9/64)) = log(8/9)
    mass = np.zeros((1, 4, 4))
    mass[0, 0, 0] = mass[0, 0, 3] = 1.0
    mass[0, 3, 0] = mass[0, 3, 3] = 0.5
    aspect, corr, skew_y, skew_x = mass_moments(mass)[0]
    assert aspect == pytest.approx(math.log(8 / 9))
    assert corr == pytest.approx(0.0, abs=1e-9)
    assert skew_y == pytest.approx(1 / math.sqrt(2))
    assert skew_x == pytest.approx(0.0, abs=1e-9)


def test_residual_window_max_known_answers():
    image = np.zeros((1, 1, 4, 4))
    image[0, 0, 1:3, 1:3] = 1.0
    flat_dim = 16
    # empty subspace, zero mean: the residual is the image; its hottest 2 x 2 window is 1
    none = np.zeros((0, flat_dim))
    assert residual_window_max(image, np.zeros(flat_dim), none, 2)[0] == pytest.approx(1.0)
    # a subspace that contains the block explains it: nothing left
    block = image.reshape(1, -1) / np.linalg.norm(image)
    assert residual_window_max(image, np.zeros(flat_dim), block, 2)[0] == pytest.approx(0.0)
    # darker than explained is not an excess: every 2 x 2 window covers at least one of
    # the four dark pixels, the best (a corner window) exactly one
    assert residual_window_max(-image, np.zeros(flat_dim), none, 2)[0] == pytest.approx(-0.25)
    # principal_subspace recovers the one direction clean images vary along
    rng = np.random.default_rng(0)
    clean = 0.3 + rng.normal(size=(50, 1, 1, 1)) * image
    mean, directions = principal_subspace(clean, 3)
    assert directions.shape == (3, flat_dim)  # rank capped by the data only
    assert abs(directions[0] @ block[0]) == pytest.approx(1.0)
    assert np.allclose(mean, clean.reshape(50, -1).mean(0))


def test_local_statistic_is_scored_by_its_own_tail_and_round_trips():
    # two standardised columns (identity transform and precision): the density score of
    # (0, z) is z^2 / 2 + log 2pi; the residual's tail maps z to median + scale * z
    model = DoseModel(statistics=["bpd", "residual"], center=np.zeros(2), scale=np.ones(2),
                      lambdas=np.ones(2), weights=np.ones(1), means=np.zeros((1, 2)),
                      precision_chol=np.eye(2)[None], location_mean=np.zeros((2, 2)),
                      location_std=np.ones((2, 2)), window=2, n_fit=10,
                      principal_mean=np.zeros(4), principal_directions=np.zeros((0, 4)),
                      density_median=1.0, density_scale=2.0)
    const = np.log(2 * np.pi)
    scores = model.score(np.array([[0.0, 0.0], [0.0, 3.0], [0.0, np.nan]]))
    assert scores[0] == pytest.approx(const)  # the density is the larger
    assert scores[1] == pytest.approx(7.0)  # 1 + 2 * 3 > 4.5 + log 2pi
    assert scores[2] == np.inf  # fails closed
    again = DoseModel.from_reference(model.to_reference())
    assert again.principal_directions.shape == (0, 4)
    # a reference written before the residual statistic loads and scores as before
    old = {k: v for k, v in model.to_reference().items()
           if k not in ("principal_mean", "principal_directions", "density_median",
                        "density_scale")}
    old["statistics"] = ["bpd", "gap"]
    legacy = DoseModel.from_reference(old)
    assert legacy.n_local == 0
    assert legacy.score(np.array([[0.0, 3.0]]))[0] == pytest.approx(4.5 + const)


def test_fitted_dose_flags_a_bright_patch_the_density_statistics_do_not_see():
    rng = np.random.default_rng(0)
    n = 400
    images = torch.from_numpy(rng.uniform(0.0, 0.2, (n, 1, 8, 8))).float()
    nll = torch.from_numpy(rng.gamma(2.0, 1.0, (n, 1, 8, 8))).float()
    run = ModelPass(nll=nll, entropy=nll * 0.9, feature_norm=rng.normal(5, 1, n),
                    images=images)
    codec = rng.normal(4, 0.5, n)
    dose = DoseModel.fit(run, codec, ["residual", "bpd", "moments"])
    assert dose.statistics == ["bpd", "moments", "residual"]  # local statistics last
    clean = dose.score(dose.features(run, codec))
    patched = images[:20].clone()
    patched[:, :, 3:5, 3:5] = 1.0  # same NLL maps: only the image changed
    odd = ModelPass(nll=nll[:20], entropy=nll[:20] * 0.9, feature_norm=run.feature_norm[:20],
                    images=patched)
    assert np.all(dose.score(dose.features(odd, codec[:20])) > np.quantile(clean, 0.99))
    again = DoseModel.from_reference(dose.to_reference())
    assert np.allclose(again.score(dose.features(run, codec)), clean)
    with pytest.raises(ValueError, match="images"):
        DoseModel.fit(ModelPass(nll=nll, entropy=nll, feature_norm=run.feature_norm), codec,
                      ["bpd", "residual"])
