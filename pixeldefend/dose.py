"""The `dose` score: how typical is an image's *vector* of model statistics?

DoSE (Morningstar et al., "Density of States Estimation for Out-of-Distribution
Detection", AISTATS 2021): raw likelihood fails as an out-of-distribution score because
simple foreign images (characters, shapes, flat areas) get *higher* likelihood than the
training data. DoSE computes several summary statistics of the model on each input
(statistics.py), fits a one-class density to their joint distribution on clean data
only, and scores an input by the negative log density of its statistics vector: an image
is anomalous when its combination of statistics is unlike clean images, in whichever
direction (too likely is as suspicious as too unlikely).

Density: each statistic is standardised and made closer to normal by a Yeo-Johnson power
transform (scipy; lambdas fitted by maximum likelihood on the clean data), then the vector
is modelled by a Gaussian mixture with full covariances (sklearn), its number of
components (1 to 5) chosen by BIC on the clean data alone; the score is the negative log
density. Measured on the dev sets (docs/OOD.md), this beat a single Gaussian with or
without the transform, a robust (MCD) Gaussian and a KDE with a cross-validated
bandwidth; it stores only means, lambdas, weights and precision factors in
calibration.json (re-evaluated by hand here, so loading needs no pickle), and BIC falls
back to one component when there are few clean images (the digits model has 90).

The statistics (statistics.py) are scalars of the per-pixel NLL and entropy maps, a
compressor's bits/dim, the model's feature norm, and a coarse 4 x 4 grid of mean per-pixel
NLL (where in the frame the model is surprised): the grid is what separates characters,
shapes and shifted images whose total likelihood looks clean.
The `moments` statistic (layout of the per-pixel NLL mass: aspect, orientation,
skewness) sees rotations; `residual` (the largest local brightness excess that the clean
images' principal subspace does not explain) sees pasted bright patches. A single strong
local cue is diluted among the density's ~28 dimensions, so `residual` is also scored on
its own: the score is the larger of the negative log density and the residual's tail
z-value mapped onto the density score's scale (measured on the dev sets, docs/OOD.md).

Conformal validity: `fit_and_calibrate` splits the clean calibration images in two with a
seeded permutation: the first half fits the density and the per-location statistics, the
second half only provides the calibration scores of the conformal threshold. Given the
first half, the second-half scores are exchangeable with the scores of new clean images,
so the p-values of calibration.py stay valid (split conformal prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .statistics import (
    ModelPass,
    grid_means,
    location_stats,
    mass_moments,
    pixel_quantile,
    pixel_spread,
    principal_subspace,
    residual_window_max,
    surprise_gap,
    window_max,
)

# k of the k x k local-window statistic at 28 x 28 (scaled with the image): chosen on the
# dev variant of the pasted-patch set (k = 3, 4, 6 tried; 6 found the patch most often)
WINDOW = 6
STATISTICS = ("bpd", "complexity", "gap", "q99", "spread", "window", "feature_norm", "grid",
              "moments", "residual")
GRID = 4  # the `grid` statistic: GRID x GRID cells of mean per-pixel bits
MOMENTS = 4  # columns of the `moments` statistic
# statistics also scored by their own upper tail, besides being in the joint density (a
# single strong local cue is diluted among ~28 density dimensions; docs/OOD.md measures it)
LOCAL_STATISTICS = ("residual",)
# rank of the clean principal subspace of the `residual` statistic (5-80 tried on the dev
# sets; 10 keeps the 8 x 8 digits model's characters above target with 90 fitting images)
PRINCIPAL_RANK = 10
STATISTIC_HELP = {
    "bpd": "bits/dim under the model",
    "complexity": "bits/dim minus lossless-codec bits/dim (Serrà et al. 2020)",
    "gap": "mean per-pixel NLL minus predicted entropy (surprise beyond what the model "
           "expected), bits/dim",
    "q99": "99th percentile of per-pixel bits",
    "spread": "standard deviation of per-pixel bits",
    "window": "largest k x k window mean of the per-location z-score of |NLL - predicted "
              "entropy| per pixel",
    "feature_norm": "mean L2 norm of the PixelCNN's per-pixel context features",
    "grid": f"mean per-pixel bits in each cell of a {GRID} x {GRID} grid ({GRID * GRID} "
            "columns)",
    "moments": "layout of the per-pixel bits over the frame: log vertical / horizontal "
               "variance, row-column correlation, skewness along rows and along columns",
    "residual": "largest k x k window mean of the image's brightness that the top "
                f"{PRINCIPAL_RANK} principal components of clean images do not explain; "
                "also scored by its own upper tail",
}
DEFAULT_STATISTICS = STATISTICS


def statistic_columns(statistics: Sequence[str]) -> int:
    """How many columns the named statistics give (`grid` and `moments` give several)."""
    sizes = {"grid": GRID * GRID, "moments": MOMENTS}
    return sum(sizes.get(name, 1) for name in statistics)


def window_size(height: int, width: int) -> int:
    """k of the local-window statistic: 6 at 28 x 28, at least 2."""
    return max(2, round(WINDOW * min(height, width) / 28))


@dataclass
class DoseModel:
    """Standardisation, power transform and Gaussian over the statistics, plus the
    per-location clean pixel statistics the `window` statistic needs."""

    statistics: list[str]
    center: np.ndarray  # (d,) mean of the raw statistic columns
    scale: np.ndarray  # (d,) their standard deviation
    lambdas: np.ndarray  # (d,) Yeo-Johnson lambdas of the standardised columns
    weights: np.ndarray  # (k,) mixture weights
    means: np.ndarray  # (k, d) component means in the transformed space
    precision_chol: np.ndarray  # (k, d, d) Cholesky factors of the component precisions
    location_mean: np.ndarray  # (H, W) clean |NLL - entropy| bits, per location
    location_std: np.ndarray  # (H, W)
    window: int
    n_fit: int
    # the `residual` statistic: clean mean image and principal directions, both flattened
    principal_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    principal_directions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    # local statistics' z (after the transform) are mapped onto the density score's scale
    # with these (median and IQR / 1.349 of the fitting images' density scores)
    density_median: float = 0.0
    density_scale: float = 1.0

    @property
    def n_local(self) -> int:
        """Trailing columns also scored by their own upper tail (LOCAL_STATISTICS)."""
        return sum(name in LOCAL_STATISTICS for name in self.statistics)

    # ---------------------------------------------------------------- statistics

    def features(self, run: ModelPass, codec_bpd: np.ndarray) -> np.ndarray:
        """(N, d) raw statistics of the images of one model pass."""
        return compute_statistics(run, codec_bpd, self.statistics, self.location_mean,
                                  self.location_std, self.window, self.principal_mean,
                                  self.principal_directions)

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Raw statistic columns -> the space the Gaussian lives in."""
        return yeo_johnson((np.asarray(features, dtype=np.float64) - self.center) / self.scale,
                           self.lambdas)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Negative log density of the transformed statistics under the mixture, or, when
        a local statistic (`residual`) is more extreme, that statistic's transformed
        z-value mapped onto the density score's scale (median + z x robust spread of the
        fitting images' scores): the larger of the two, so either kind of evidence flags.
        Non-finite statistics give +inf (an image the model cannot summarise is flagged)."""
        y = self.transform(features)
        local = self.n_local
        density = self._neg_log_density(y)
        if local:
            with np.errstate(all="ignore"):
                tail = self.density_median + self.density_scale * y[:, -local:].max(axis=1)
                density = np.maximum(density, np.where(np.isnan(tail), np.inf, tail))
        return np.where(np.isfinite(density), density, np.inf)

    def _neg_log_density(self, y: np.ndarray) -> np.ndarray:
        d = y.shape[1]
        with np.errstate(all="ignore"):
            # log N(y; mu_k, P_k^-1) = -d/2 log 2pi + log|L_k| - |(y - mu_k) L_k|^2 / 2
            logdet = np.log(np.diagonal(self.precision_chol, axis1=1, axis2=2)).sum(1)
            z = np.einsum("nd,kde->nke", y, self.precision_chol) \
                - np.einsum("kd,kde->ke", self.means, self.precision_chol)[None]
            log_comp = (np.log(self.weights) + logdet - 0.5 * d * np.log(2 * np.pi))[None] \
                - 0.5 * (z ** 2).sum(-1)
            top = log_comp.max(axis=1, keepdims=True)
            out = -(top[:, 0] + np.log(np.exp(log_comp - top).sum(axis=1)))
        return np.where(np.isfinite(out), out, np.inf)

    @classmethod
    def fit(cls, run: ModelPass, codec_bpd: np.ndarray,
            statistics: Sequence[str] = DEFAULT_STATISTICS) -> DoseModel:
        """Fit on clean images only (one model pass over them)."""
        from scipy import stats

        unknown = [s for s in statistics if s not in STATISTICS]
        if unknown:
            raise ValueError(f"unknown statistics {unknown}: choose from {STATISTICS}")
        # local statistics last: they are the trailing columns `score` treats separately
        statistics = [s for s in statistics if s not in LOCAL_STATISTICS] \
            + [s for s in statistics if s in LOCAL_STATISTICS]
        n = len(codec_bpd)
        mean, std = location_stats(run.surprise_bits)
        h, w = mean.shape
        k = window_size(h, w)
        p_mean, p_dirs = np.zeros(0), np.zeros((0, 0))
        if "residual" in statistics:
            if run.images is None:
                raise ValueError("the residual statistic needs the images of the model pass")
            p_mean, p_dirs = principal_subspace(run.images.numpy(), PRINCIPAL_RANK)
        x = compute_statistics(run, codec_bpd, statistics, mean, std, k, p_mean, p_dirs)
        if n < x.shape[1] + 2:
            raise ValueError(f"the density of {x.shape[1]} statistics needs at least "
                             f"{x.shape[1] + 2} clean images to fit (half of the calibration "
                             f"images), got {n}")
        if not np.all(np.isfinite(x)):
            raise ValueError("clean statistics are not finite")
        center = x.mean(axis=0)
        scale = np.maximum(x.std(axis=0), 1e-9)
        z = (x - center) / scale
        lambdas = np.array([stats.yeojohnson_normmax(col) for col in z.T])
        y = yeo_johnson(z, lambdas)
        weights, means, precision_chol = fit_mixture(y)
        model = cls(statistics=statistics, center=center, scale=scale, lambdas=lambdas,
                    weights=weights, means=means, precision_chol=precision_chol,
                    location_mean=mean, location_std=std, window=k, n_fit=n,
                    principal_mean=p_mean, principal_directions=p_dirs)
        if model.n_local:
            fitted = model._neg_log_density(y)
            q25, q50, q75 = np.quantile(fitted, [0.25, 0.5, 0.75])
            model.density_median = float(q50)
            model.density_scale = float(max((q75 - q25) / 1.349, 1e-9))
        return model

    # ---------------------------------------------------------------- persistence

    def to_reference(self) -> dict[str, Any]:
        """JSON-ready parameters (stored under the kind's `reference`)."""
        return {
            "statistics": list(self.statistics),
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "lambdas": self.lambdas.tolist(),
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "precision_chol": self.precision_chol.tolist(),
            "location_mean": self.location_mean.tolist(),
            "location_std": self.location_std.tolist(),
            "window": self.window,
            "n_fit": self.n_fit,
            "principal_mean": self.principal_mean.tolist(),
            "principal_directions": self.principal_directions.tolist(),
            "density_median": self.density_median,
            "density_scale": self.density_scale,
            "density": f"gaussian mixture ({len(self.weights)} components by BIC) on "
                       "Yeo-Johnson-transformed standardised statistics",
        }

    @classmethod
    def from_reference(cls, ref: dict[str, Any]) -> DoseModel:
        return cls(statistics=list(ref["statistics"]),
                   center=np.asarray(ref["center"], dtype=np.float64),
                   scale=np.asarray(ref["scale"], dtype=np.float64),
                   lambdas=np.asarray(ref["lambdas"], dtype=np.float64),
                   weights=np.asarray(ref["weights"], dtype=np.float64),
                   means=np.asarray(ref["means"], dtype=np.float64),
                   precision_chol=np.asarray(ref["precision_chol"], dtype=np.float64),
                   location_mean=np.asarray(ref["location_mean"], dtype=np.float64),
                   location_std=np.asarray(ref["location_std"], dtype=np.float64),
                   window=int(ref["window"]), n_fit=int(ref["n_fit"]),
                   # references written before the `residual` statistic have none of these
                   principal_mean=np.asarray(ref.get("principal_mean", []), dtype=np.float64),
                   principal_directions=np.asarray(ref.get("principal_directions", []),
                                                   dtype=np.float64).reshape(
                       len(ref.get("principal_directions", [])),
                       len(ref.get("principal_mean", []))),
                   density_median=float(ref.get("density_median", 0.0)),
                   density_scale=float(ref.get("density_scale", 1.0)))


def compute_statistics(run: ModelPass, codec_bpd: np.ndarray, statistics: Sequence[str],
                       location_mean: np.ndarray, location_std: np.ndarray,
                       window: int, principal_mean: np.ndarray | None = None,
                       principal_directions: np.ndarray | None = None) -> np.ndarray:
    """(N, d) matrix, one column per named statistic."""
    bits = run.pixel_bits
    bpd = run.bits_per_dim
    columns = []
    for name in statistics:
        if name == "bpd":
            columns.append(bpd)
        elif name == "complexity":
            columns.append(bpd - np.asarray(codec_bpd, dtype=np.float64))
        elif name == "gap":
            columns.append(surprise_gap(run.nll, run.entropy))
        elif name == "q99":
            columns.append(pixel_quantile(bits, 0.99))
        elif name == "spread":
            columns.append(pixel_spread(bits))
        elif name == "window":
            columns.append(window_max(run.surprise_bits, location_mean, location_std, window))
        elif name == "feature_norm":
            columns.append(np.asarray(run.feature_norm, dtype=np.float64))
        elif name == "grid":
            columns.extend(grid_means(bits, GRID).T)
        elif name == "moments":
            columns.extend(mass_moments(bits).T)
        elif name == "residual":
            if run.images is None or principal_mean is None or principal_directions is None:
                raise ValueError("the residual statistic needs the images and a principal "
                                 "subspace")
            columns.append(residual_window_max(run.images.numpy(), principal_mean,
                                               principal_directions, window))
        else:
            raise ValueError(f"unknown statistic {name!r}")
    return np.stack(columns, axis=1) if columns else np.zeros((len(bpd), 0))


MAX_COMPONENTS = 5
REG_COVAR = 1e-3  # added to each covariance diagonal (the columns have unit variance)


def fit_mixture(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights, means, precision Cholesky factors) of a Gaussian mixture with full
    covariances and 1..MAX_COMPONENTS components, the number chosen by BIC on these
    (clean) points; seeded, so a calibration is reproducible. A single component uses the
    Ledoit-Wolf shrunk covariance instead of the maximum-likelihood one: with few images
    (90 for the digits model, 23 statistics) that is the better-conditioned estimate."""
    from sklearn.covariance import LedoitWolf
    from sklearn.mixture import GaussianMixture

    best, best_bic = None, np.inf
    for k in range(1, MAX_COMPONENTS + 1):
        if len(y) < 2 * k * (y.shape[1] + 1):
            break  # too few points to place another full-covariance component
        gm = GaussianMixture(k, covariance_type="full", reg_covar=REG_COVAR, n_init=2,
                             random_state=0).fit(y)
        bic = gm.bic(y)
        if bic < best_bic:
            best, best_bic = gm, bic
    if best is not None and best.n_components > 1:
        return (np.asarray(best.weights_), np.asarray(best.means_),
                np.asarray(best.precisions_cholesky_))
    lw = LedoitWolf().fit(y)
    chol = np.linalg.cholesky(np.asarray(lw.precision_))  # P = L L^T, as sklearn stores it
    return np.ones(1), np.asarray(lw.location_)[None], chol[None]


def yeo_johnson(z: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """Yeo-Johnson transform of each column of z with its lambda (scipy's formula)."""
    from scipy import stats

    z = np.atleast_2d(z)
    with np.errstate(all="ignore"):
        return np.stack([stats.yeojohnson(col, lmbda=float(lam))
                         for col, lam in zip(z.T, lambdas, strict=True)], axis=1) \
            if z.shape[0] else np.zeros((0, len(lambdas)))


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of n calibration images: (density-fit indices, threshold indices)."""
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return np.sort(order[:half]), np.sort(order[half:])
