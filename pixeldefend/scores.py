"""Anomaly scores beyond raw likelihood: input complexity, likelihood ratio, typicality.

Raw bits/dim is a poor out-of-distribution score on its own: a PixelCNN trained on
Fashion-MNIST gives MNIST digits *higher* likelihood, because likelihood is dominated by
low-level statistics (how much of the image is flat background) rather than by what the
image shows. Each score here removes that confound in a different way; all are
"higher = stranger" so one calibration rule (calibration.py) serves them all.

- ``bpd``: bits/dim under the model, -log2 p(x) / (C*H*W).
- ``complexity`` (Serrà et al., ICLR 2020): bits/dim under the model minus bits/dim of a
  lossless general-purpose compressor, an estimate of how much the model's likelihood
  exceeds what the image's sheer simplicity explains.
- ``llr`` (Ren et al., NeurIPS 2019): bits/dim under the model minus bits/dim under a
  *background* PixelCNN trained on randomly mutated inputs, i.e. -(log p_model(x) -
  log p_background(x)) / (C*H*W*ln 2); the background model captures the population-level
  statistics and the ratio keeps the semantic part.
- ``typicality`` (Nalisnick et al. 2019): |bpd(x) - mean calibration bpd| per image, and a
  bootstrap test on the mean bits/dim of a whole batch (`typicality_test`).

The functions work on plain arrays so they can be tested with known answers. The
registry at the end (`SCORES`, one `ScoreKind` per kind) wires them to the detector's
shared model pass (`ScorePass`): adding a score kind is one entry there (plus its name
and one-line help in `defaults.py`, which the CLI reads without PyTorch).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .defaults import DEFAULT_BACKGROUND_L2 as DEFAULT_BACKGROUND_L2
from .defaults import DEFAULT_MUTATION_RATE as DEFAULT_MUTATION_RATE
from .defaults import DEFAULT_SCORE as DEFAULT_SCORE
from .defaults import SCORE_HELP
from .pixels import to_8bit

if TYPE_CHECKING:
    from .detector import DensityDetector
    from .dose import DoseModel


# ----------------------------------------------------------------------- complexity


def png_bits_per_dim(images: torch.Tensor | np.ndarray, levels: int) -> np.ndarray:
    """Lossless-compressor bits/dim of each image: 8 * PNG bytes / (C*H*W).

    The compressor is PNG at maximum compression (Pillow, ``compress_level=9``) on the
    8-bit image (levels mapped to 0..255 exactly as files are written). Why PNG: Serrà et
    al. report similar detection results with PNG, JPEG2000 and FLIF (FLIF slightly
    ahead); PNG is lossless, deterministic, needs nothing beyond Pillow (already a
    dependency), and its row filters plus DEFLATE measure exactly the local redundancy
    (flat areas, smooth edges) that inflates likelihoods. The PNG container (signature,
    IHDR/IDAT/IEND chunk headers, zlib header and checksum) costs the same number of bytes
    for every image of one shape and mode, so it shifts all scores by the same constant
    and changes no ranking, AUROC or calibrated decision.
    """
    return codec_bits_per_dim(images, levels, "png")


def _codec_bytes(pixels: np.ndarray, codec: str) -> int:
    """Size in bytes of one 8-bit image (H, W) or (H, W, 3) under a lossless codec."""
    import bz2
    import lzma
    import zlib

    from PIL import Image

    if codec == "zlib":
        return len(zlib.compress(pixels.tobytes(), 9))
    if codec == "lzma":
        return len(lzma.compress(pixels.tobytes(), format=lzma.FORMAT_RAW,
                                 filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}]))
    if codec == "bz2":
        return len(bz2.compress(pixels.tobytes(), 9))
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if codec == "png":
        image.save(buf, format="PNG", compress_level=9)
    elif codec == "webp":
        image.save(buf, format="WEBP", lossless=True, quality=100, method=4)
    elif codec == "jpeg2000":
        image.save(buf, format="JPEG2000", irreversible=False)
    else:
        raise ValueError(f"unknown codec {codec!r}: choose from {', '.join(CODECS)}")
    return buf.getbuffer().nbytes


CODECS = ("png", "webp", "jpeg2000", "zlib", "lzma", "bz2")
# the complexity estimator of `complexity` and `dose` (measured: docs/OOD.md)
DEFAULT_CODEC = "webp"


def codec_bits_per_dim(images: torch.Tensor | np.ndarray, levels: int,
                       codec: str = "png") -> np.ndarray:
    """Bits/dim of each image under a lossless codec (CODECS), 8 * bytes / (C*H*W), on
    the 8-bit image. Container headers cost the same for every image of one shape, so
    they shift all scores alike."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    n, c, h, w = images.shape
    pixels = to_8bit(images, levels)
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        array = pixels[i, 0] if c == 1 else pixels[i].transpose(1, 2, 0)
        out[i] = 8.0 * _codec_bytes(array, codec) / (c * h * w)
    return out


def complexity_score(bpd: np.ndarray, compressed_bpd: np.ndarray) -> np.ndarray:
    """S(x) = bits/dim under the model - compressor bits/dim (higher = stranger)."""
    return np.asarray(bpd, dtype=np.float64) - np.asarray(compressed_bpd, dtype=np.float64)


# ------------------------------------------------------------------ likelihood ratio


def llr_score(bpd: np.ndarray, background_bpd: np.ndarray) -> np.ndarray:
    """-(log p_model - log p_background) in bits/dim (higher = stranger): 0 when the two
    models agree, negative where the main model explains the image better than the
    background statistics alone do."""
    return np.asarray(bpd, dtype=np.float64) - np.asarray(background_bpd, dtype=np.float64)


def mutate(images: torch.Tensor, rate: float, levels: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each sub-pixel, with probability `rate`, by a uniformly random level
    (Ren et al.'s input perturbation for training the background model)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"mutation rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return images
    device = images.device
    hit = torch.rand(images.shape, generator=generator, device=device) < rate
    noise = torch.randint(0, levels, images.shape, generator=generator, device=device,
                          dtype=images.dtype)
    return torch.where(hit, noise, images)


# ------------------------------------------------------------------------ typicality


def typicality_score(bpd: np.ndarray, reference_mean: float) -> np.ndarray:
    """Per-image typicality: distance of bits/dim from the clean mean, |bpd - mean|."""
    return np.abs(np.asarray(bpd, dtype=np.float64) - float(reference_mean))


@dataclass
class TypicalityTest:
    """Outcome of the batch typicality test (Nalisnick et al. 2019)."""

    n: int  # images in the batch
    mean_bits_per_dim: float  # of the batch
    reference_mean: float  # mean clean calibration bits/dim
    statistic: float  # |batch mean - reference mean|
    threshold: float  # (1 - alpha) quantile of the bootstrap statistic
    p_value: float  # (1 + #{bootstrap >= statistic}) / (resamples + 1)
    alpha: float
    resamples: int
    seed: int
    anomalous: bool

    def to_dict(self) -> dict:
        return asdict(self)


def typicality_test(batch_bpd: np.ndarray, reference_bpd: np.ndarray, alpha: float = 0.05,
                    resamples: int = 1000, seed: int = 0) -> TypicalityTest:
    """Is this batch, as a whole, typical of the clean data?

    Statistic: |mean bits/dim of the batch - mean clean bits/dim|. Its null distribution
    is estimated by a seeded bootstrap: `resamples` batches of the same size drawn with
    replacement from the clean calibration scores. A batch of in-distribution images has a
    mean close to the clean mean even when single images are unusual, and a batch of
    out-of-distribution images is caught even when it is *more* likely than clean data
    (the failure of raw likelihood), because the test is two-sided.
    """
    batch = np.asarray(batch_bpd, dtype=np.float64)
    ref = np.asarray(reference_bpd, dtype=np.float64)
    if batch.size == 0:
        raise ValueError("the batch test needs at least one image")
    if ref.size == 0:
        raise ValueError("the batch test needs clean calibration scores")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be between 0 and 1")
    mu = float(ref.mean())
    stat = abs(float(batch.mean()) - mu)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples, dtype=np.float64)
    # in chunks, so memory stays bounded for big batches
    chunk = max(1, 2_000_000 // batch.size)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, ref.size, size=(stop - start, batch.size))
        boot[start:stop] = np.abs(ref[idx].mean(axis=1) - mu)
    p = (1.0 + float(np.count_nonzero(boot >= stat))) / (resamples + 1.0)
    threshold = float(np.quantile(boot, 1.0 - alpha))
    return TypicalityTest(
        n=int(batch.size), mean_bits_per_dim=float(batch.mean()), reference_mean=mu,
        statistic=stat, threshold=threshold, p_value=p, alpha=alpha, resamples=resamples,
        seed=seed, anomalous=bool(p <= alpha),
    )


# ------------------------------------------------------------------------- registry


class ScorePass:
    """The model pass several score kinds share, computed once per batch of images:
    per-image NLL and bits/dim now, the rest (lossless-codec bits/dim, background-model
    bits/dim, DoSE statistics) on first use, cached in `cache`.

    `references` overrides what a kind reads from the detector's calibrations (its
    `ScoreKind.reference`), e.g. while calibrating."""

    def __init__(self, detector: DensityDetector, x: torch.Tensor, *, full_pass: bool = False,
                 references: dict[str, Any] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        from .density import LN2, nll_nats
        from .statistics import model_pass

        self.detector, self.x = detector, x
        self.references = dict(references or {})
        self.cache: dict[str, np.ndarray] = {}
        model = detector._require_model()
        self.run = None
        if full_pass:  # the statistics pass also gives the NLL
            self.run = model_pass(model, x, detector.batch_size, progress, detector.precision)
            self.nll = self.run.nll.double().flatten(1).sum(1).numpy()
        else:
            self.nll = nll_nats(model, x, detector.batch_size, progress,
                                detector.precision).numpy()
        self.bpd = self.nll / (x[0].numel() * LN2) if len(x) else np.zeros(0)

    def reference(self, kind: str) -> Any:
        """What `kind` needs from clean data (override, else the detector's calibration)."""
        if kind not in self.references:
            self.references[kind] = SCORES[kind].reference(self.detector)  # type: ignore[misc]
        return self.references[kind]

    def codec_bpd(self) -> np.ndarray:
        return self.detector.codec_bpd(self.x, self.cache)

    def background_bpd(self) -> np.ndarray:
        from .density import bits_per_dim

        if "background_bpd" not in self.cache:
            self.cache["background_bpd"] = bits_per_dim(
                self.detector.background, self.x, self.detector.batch_size,
                precision=self.detector.precision).numpy()
        return self.cache["background_bpd"]

    def dose_statistics(self) -> np.ndarray:
        if "dose_statistics" not in self.cache:
            assert self.run is not None, "dose needs the full model pass"
            self.cache["dose_statistics"] = self.reference("dose").features(
                self.run, self.codec_bpd())
        return self.cache["dose_statistics"]

    def scores(self, kinds: Sequence[str]) -> dict[str, np.ndarray]:
        """`nll_nats`, `bpd`, whatever was cached, and one array per kind."""
        out = {kind: SCORES[kind].compute(self) for kind in kinds}
        return {**self.cache, "nll_nats": self.nll, "bpd": self.bpd, **out}


@dataclass(frozen=True)
class ScoreKind:
    """One anomaly score kind, higher = stranger.

    compute: the score per image from the shared pass. needs: "background" (a background
    model in the bundle) and/or "calibration" (a statistic of clean data stored with its
    calibration, read by `reference`). full_pass: needs the model-pass statistics, not
    only the NLL. calibrate: how its calibration scores and stored reference are made,
    when that is not simply `compute` on the clean images. enough_images: whether n clean
    images suffice (detector, n, fpr, conservative); a kind without enough is left
    uncalibrated by `calibrate_all` instead of failing the others.
    """

    name: str
    compute: Callable[[ScorePass], np.ndarray]
    unit: str = "bits/dim"
    needs: frozenset[str] = field(default_factory=frozenset)
    full_pass: bool = False
    reference: Callable[[DensityDetector], Any] | None = None
    calibrate: Callable[[ScorePass], tuple[np.ndarray, dict[str, Any]]] | None = None
    enough_images: Callable[[DensityDetector, int, float, bool], bool] | None = None

    @property
    def help(self) -> str:
        return SCORE_HELP[self.name]


def _calibrate_typicality(p: ScorePass) -> tuple[np.ndarray, dict[str, Any]]:
    """Typicality is measured from the calibration images' own mean bits/dim, and the
    batch test resamples their bits/dim."""
    mean = float(p.bpd.mean())
    return typicality_score(p.bpd, mean), {
        "mean_bpd": mean, "bpd_scores": [float(v) for v in np.sort(p.bpd)]}


def _dose_score(p: ScorePass) -> np.ndarray:
    dose: DoseModel = p.reference("dose")
    return dose.score(p.dose_statistics())


SCORES: dict[str, ScoreKind] = {k.name: k for k in (
    ScoreKind("bpd", lambda p: p.bpd),
    ScoreKind("complexity", lambda p: complexity_score(p.bpd, p.codec_bpd())),
    ScoreKind("llr", lambda p: llr_score(p.bpd, p.background_bpd()),
              needs=frozenset({"background"})),
    ScoreKind("typicality", lambda p: typicality_score(p.bpd, p.reference("typicality")),
              needs=frozenset({"calibration"}),
              reference=lambda det: det.typicality_reference(),
              calibrate=_calibrate_typicality),
    ScoreKind("dose", _dose_score, unit="-log density", needs=frozenset({"calibration"}),
              full_pass=True, reference=lambda det: det.dose_model(),
              calibrate=lambda p: p.detector._calibrate_dose(p.x),
              enough_images=lambda det, n, fpr, conservative: det.can_fit_dose(
                  n, fpr, conservative)),
)}
SCORE_KINDS = tuple(SCORES)
SCORE_UNITS = {k.name: k.unit for k in SCORES.values()}
