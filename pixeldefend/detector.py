"""DensityDetector: a PixelCNN plus calibrated thresholds, in the spirit of scikit-learn's
outlier detectors: fit / score_samples (lower = more abnormal) / decision_function
(negative = outlier) / predict (-1 outlier, +1 inlier), plus calibrate / p_values / save /
load.

`anomaly_score` and `is_anomalous` are the "higher = more anomalous" forms the gate uses.
All kinds (bits/dim, input complexity, likelihood ratio against a background model,
typicality; maths in scores.py; and `dose`, the default gate score, dose.py) are computed
from the same single model pass, each with its own calibration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .bundle import (
    load_state_into,
    read_calibration,
    read_config,
    read_weights,
    save_bundle,
    write_calibration,
)
from .calibration import (
    Calibration,
    calibration_file,
    min_calibration_images,
    parse_calibration_file,
)
from .data import ImageSet, ImageSpec
from .density import LN2, bits_per_dim, nll_map
from .device import resolve_device
from .dose import DoseModel, split_halves
from .errors import BundleError, DataError, TooFewCalibrationImages, UsageError
from .models.pixelcnn import PixelCNN, PixelCNNConfig
from .pixels import check_images, check_range
from .schema import PIXELCNN_CONFIG, check_pixelcnn_architecture
from .scores import (
    DEFAULT_CODEC,
    DEFAULT_MUTATION_RATE,
    SCORES,
    ScorePass,
    TypicalityTest,
    codec_bits_per_dim,
    mutate,
    typicality_test,
)
from .statistics import ModelPass, model_pass
from .train import TrainProgress, TrainResult, TrainSettings, run_training

ImagesLike = ImageSet | torch.Tensor | np.ndarray
BACKGROUND_PREFIX = "background."


def as_tensor(images: ImagesLike) -> torch.Tensor:
    """ImageSet / array / tensor -> uint8 tensor (N, C, H, W) (the pixel contract:
    pixels.check_images; integer arrays of another dtype are converted if in 0..255)."""
    if isinstance(images, ImageSet):
        return images.images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dtype != torch.uint8:
        check_range(images, 256)
        images = images.to(torch.uint8)
    return check_images(images, 256)


class DensityDetector:
    """Learns p(x) of clean images and flags images that are unlikely under it."""

    def __init__(self, preset: str = "small", device: str | torch.device = "auto",
                 batch_size: int = 256, model: PixelCNN | None = None,
                 dropout: float = 0.0) -> None:
        self.preset = preset
        self.dropout = dropout
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.batch_size = batch_size
        self.model = model.to(self.device).eval() if model is not None else None
        # the likelihood-ratio score's background PixelCNN (trained on mutated inputs)
        self.background: PixelCNN | None = None
        self.background_meta: dict[str, Any] = {}
        self.calibrations: dict[str, Calibration] = {}
        self.default_kind = "bpd"
        self.meta: dict[str, Any] = {}
        # the scoring pass's forward precision (precision.py); calibration is always fp32
        self.precision = "fp32"

    # --------------------------------------------------------------------- properties

    @property
    def spec(self) -> ImageSpec:
        cfg = self._require_model().config
        return ImageSpec(cfg.channels, cfg.height, cfg.width, cfg.levels)

    @property
    def calibration(self) -> Calibration | None:
        return self.calibrations.get(self.default_kind)

    @property
    def threshold(self) -> float | None:
        cal = self.calibration
        return None if cal is None else cal.threshold

    @property
    def bpd_threshold(self) -> float | None:
        """The bits/dim threshold, whatever the default score kind: purification and
        adaptive PixelDefend compare bits/dim, so they must use this one."""
        cal = self.calibrations.get("bpd")
        return None if cal is None else cal.threshold

    @property
    def available_kinds(self) -> tuple[str, ...]:
        """Score kinds this detector can compute (`llr` needs a background model)."""
        return tuple(k for k, spec in SCORES.items()
                     if "background" not in spec.needs or self.background is not None)

    def _require_model(self) -> PixelCNN:
        if self.model is None:
            raise UsageError("this DensityDetector has no model yet: call fit() or load()")
        return self.model

    def _check(self, images: ImagesLike) -> torch.Tensor:
        x = as_tensor(images)
        spec = self.spec
        if tuple(x.shape[1:]) != spec.shape:
            raise DataError(f"images are {tuple(x.shape[1:])} (C,H,W), model expects {spec.shape}")
        check_range(x, spec.levels)
        return x

    # -------------------------------------------------------------------------- fit

    def fit(self, images: ImagesLike, levels: int | None = None, *,
            val: ImagesLike | None = None, settings: TrainSettings | None = None,
            progress: TrainProgress | None = None, checkpoint_dir: Path | None = None,
            resume: bool = False, max_seconds: float | None = None) -> DensityDetector:
        """Train the PixelCNN by maximum likelihood; keep the best validation weights.
        `max_seconds`: a wall-clock budget for training (see `train.run_training`)."""
        x = as_tensor(images)
        if levels is None:
            if not isinstance(images, ImageSet):
                # guessing from x.max() + 1 silently builds a wrong model when the
                # brightest level is absent from the training data
                raise UsageError("levels is required for plain arrays (256 for 8-bit "
                                 "images, 17 for scikit-learn digits); an ImageSet carries it")
            levels = images.levels
        settings = settings or TrainSettings()
        torch.manual_seed(settings.seed)
        if self.model is None:
            c, h, w = x.shape[1:]
            cfg = PixelCNNConfig.from_preset(self.preset, int(c), int(h), int(w), levels,
                                             dropout=self.dropout)
            self.model = PixelCNN(cfg)
        model = self._require_model()
        x = self._check(x)
        val_x = self._check(val) if val is not None else x[: min(len(x), 512)]
        dims = x[0].numel()

        def loss_fn(m: torch.nn.Module, batch: torch.Tensor, _labels) -> torch.Tensor:
            # mean nats per sub-pixel: the fast fused path (through DDP's forward too),
            # its softmax in float32 whatever the precision
            return m(batch, nll=True).mean()

        result: TrainResult = run_training(
            model, loss_fn, x, None, self._bpd_sum(val_x), settings, self.device,
            checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
            train_metric=lambda nats: nats / LN2, val_size=len(val_x),
            max_seconds=max_seconds, micro_batch=model.images_per_pass(),
        )
        model.eval()
        self.meta.update({
            "training": {
                "settings": settings.__dict__, "best_epoch": result.best_epoch,
                "val_bits_per_dim": result.best_val, "n_train": int(len(x)),
                "n_val": int(len(val_x)), "history": result.history, "dims": dims,
                "seconds": round(result.seconds, 1),
                "stopped_by_budget": result.stopped_by_budget,
            }
        })
        return self

    def fit_background(self, images: ImagesLike, *, mutation_rate: float = DEFAULT_MUTATION_RATE,
                       preset: str | None = None, val: ImagesLike | None = None,
                       settings: TrainSettings | None = None,
                       progress: TrainProgress | None = None,
                       checkpoint_dir: Path | None = None, resume: bool = False
                       ) -> DensityDetector:
        """Train the background PixelCNN of the `llr` score (Ren et al. 2019).

        Same likelihood objective as `fit`, but every batch is freshly mutated: each
        sub-pixel is replaced by a uniformly random level with probability
        `mutation_rate`, so the model can only learn the population-level statistics that
        survive the noise, not the shapes. Use `settings.weight_decay` for the L2 penalty.
        `preset` None copies the main model's architecture.
        """
        if not 0.0 < mutation_rate < 1.0:
            raise UsageError(f"mutation_rate must be between 0 and 1, got {mutation_rate}",
                             param="mutation_rate")
        main = self._require_model().config
        settings = settings or TrainSettings()
        torch.manual_seed(settings.seed)
        if preset is None:
            cfg = dataclasses.replace(main, dropout=0.0)
        else:
            try:
                cfg = PixelCNNConfig.from_preset(preset, main.channels, main.height, main.width,
                                                 main.levels)
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
        background = PixelCNN(cfg)
        x = self._check(images)
        levels = main.levels
        val_x = self._check(val) if val is not None else x[: min(len(x), 512)]
        # one fixed mutation of the validation images, so epochs are compared fairly
        val_x = mutate(val_x, mutation_rate, levels,
                       torch.Generator().manual_seed(settings.seed + 7919))

        def loss_fn(m: torch.nn.Module, batch: torch.Tensor, _labels) -> torch.Tensor:
            # global RNG: restored by --resume checkpoints, so a resumed run is identical
            noisy = mutate(batch, mutation_rate, levels)
            return m(noisy, nll=True).mean()

        result = run_training(
            background, loss_fn, x, None, self._bpd_sum(val_x), settings, self.device,
            checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
            train_metric=lambda nats: nats / LN2, val_size=len(val_x),
            micro_batch=background.images_per_pass(),
        )
        self.background = background.eval()
        self.background_meta = {
            "preset": preset or self.preset,
            "mutation_rate": mutation_rate,
            "training": {
                "settings": settings.__dict__, "best_epoch": result.best_epoch,
                "val_bits_per_dim_mutated": result.best_val, "n_train": int(len(x)),
                "n_val": int(len(val_x)), "history": result.history,
            },
        }
        return self

    def _bpd_sum(self, val_x: torch.Tensor) -> Callable[[torch.nn.Module, range],
                                                         tuple[float, int]]:
        """Validation for the training loop: summed bits/dim of a block of `val_x`."""

        def evaluate(m: torch.nn.Module, block: range) -> tuple[float, int]:
            bpd = bits_per_dim(m, val_x[block.start : block.stop], self.batch_size)
            return float(bpd.sum()), len(bpd)

        return evaluate

    # ----------------------------------------------------------------------- scoring

    def nll_map(self, images: ImagesLike, progress: Callable[[int], None] | None = None
                ) -> torch.Tensor:
        """Per-sub-pixel NLL in nats (N, C, H, W): where an image looks wrong."""
        return nll_map(self._require_model(), self._check(images), self.batch_size, progress,
                       self.precision)

    def check_kind(self, kind: str) -> str:
        """`kind` if this detector can compute it, else a UsageError that says why not."""
        if kind not in SCORES:
            raise UsageError(f"unknown score kind {kind!r}: choose from {', '.join(SCORES)}",
                             param="kind")
        if "background" in SCORES[kind].needs and self.background is None:
            raise UsageError(f"score {kind!r} needs a background model: train one with "
                             "`pixeldefend train-background --model M` (or `pixeldefend "
                             "train --background`)")
        return kind

    def check_ready(self, kind: str) -> str:
        """`check_kind`, and what `kind` needs from its calibration is there (a clear
        error before any scoring, rather than per batch)."""
        reference = SCORES[self.check_kind(kind)].reference
        if reference is not None:
            reference(self)
        return kind

    def typicality_reference(self) -> float:
        """Mean clean bits/dim that per-image typicality is measured from."""
        cal = self.calibrations.get("typicality")
        if cal is not None and "mean_bpd" in cal.reference:
            return float(cal.reference["mean_bpd"])
        if "bpd" in self.calibrations:
            return float(np.mean(self.calibrations["bpd"].scores))
        raise UsageError("score 'typicality' needs clean calibration bits/dim: run "
                         "`pixeldefend calibrate`")

    def dose_model(self) -> DoseModel:
        """The fitted statistics density of the `dose` score (from its calibration)."""
        cal = self.calibrations.get("dose")
        if cal is None or "statistics" not in cal.reference:
            raise UsageError("score 'dose' needs a calibration (its density is fitted on "
                             "clean images): run `pixeldefend calibrate`")
        return DoseModel.from_reference(cal.reference)

    def model_pass(self, images: ImagesLike, progress: Callable[[int], None] | None = None
                   ) -> ModelPass:
        """Per-pixel NLL, predictive entropy and feature norms from one model pass."""
        return model_pass(self._require_model(), self._check(images), self.batch_size,
                          progress, self.precision)

    def compute_scores(self, images: ImagesLike, kinds: Sequence[str] | None = None,
                       progress: Callable[[int], None] | None = None,
                       typicality_mean: float | None = None,
                       dose: DoseModel | None = None) -> dict[str, np.ndarray]:
        """Several score kinds from one model pass (plus one background pass for `llr`).

        Returns a dict with `nll_nats` and `bpd` always, and one array per kind asked for
        (all available kinds when `kinds` is None). `typicality_mean` and `dose` override
        the stored clean mean and statistics density (used while calibrating).
        """
        kinds = list(self.available_kinds if kinds is None else kinds)
        for kind in kinds:
            self.check_kind(kind)
        references = {k: v for k, v in (("typicality", typicality_mean), ("dose", dose))
                      if v is not None}
        return self.score_pass(images, kinds, progress, references).scores(kinds)

    def score_pass(self, images: ImagesLike, kinds: Sequence[str],
                   progress: Callable[[int], None] | None = None,
                   references: dict[str, Any] | None = None) -> ScorePass:
        """The shared model pass the `kinds` are computed from (scores.ScorePass)."""
        return ScorePass(self, self._check(images), references=references, progress=progress,
                         full_pass=any(SCORES[k].full_pass for k in kinds))

    def codec_bpd(self, x: torch.Tensor, cache: dict[str, np.ndarray]) -> np.ndarray:
        """Lossless-codec bits/dim of the images (the complexity estimator), computed once
        per `compute_scores` call and kept in `cache` under `codec_bpd`."""
        if "codec_bpd" not in cache:
            cache["codec_bpd"] = codec_bits_per_dim(x, self.spec.levels, DEFAULT_CODEC)
        return cache["codec_bpd"]

    def anomaly_score(self, images: ImagesLike, kind: str | None = None,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Anomaly score per image, higher = stranger (what calibration thresholds).

        kind: bpd, complexity, llr (needs a background model), typicality or dose (need a
        calibration); None is the bundle's default kind.
        """
        kind = self.check_kind(kind or self.default_kind)
        return self.compute_scores(images, [kind], progress)[kind]

    def score_samples(self, images: ImagesLike, kind: str | None = None) -> np.ndarray:
        """scikit-learn's convention: lower = more abnormal, i.e. -anomaly_score."""
        return -self.anomaly_score(images, kind)

    def batch_test(self, images: ImagesLike | None = None, *, bpd: np.ndarray | None = None,
                   alpha: float | None = None, resamples: int = 1000, seed: int = 0
                   ) -> TypicalityTest:
        """Typicality test of a whole batch against the clean calibration bits/dim.

        Pass the images, or their bits/dim if already computed. alpha defaults to the
        typicality (else bpd) calibration's target false-positive rate.
        """
        cal = self.calibrations.get("typicality")
        if cal is not None and "bpd_scores" in cal.reference:
            reference = np.asarray(cal.reference["bpd_scores"], dtype=np.float64)
        elif "bpd" in self.calibrations:
            cal = cal or self.calibrations["bpd"]
            reference = np.asarray(self.calibrations["bpd"].scores, dtype=np.float64)
        else:
            raise UsageError("the batch test needs clean calibration bits/dim: run "
                             "`pixeldefend calibrate`")
        if bpd is None:
            if images is None:
                raise UsageError("batch_test needs images or their bits/dim")
            bpd = self.anomaly_score(images, "bpd")
        try:
            return typicality_test(bpd, reference, alpha=cal.fpr if alpha is None else alpha,
                                   resamples=resamples, seed=seed)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc

    def log_likelihood(self, images: ImagesLike) -> np.ndarray:
        """log p(x) in nats per image."""
        return -self.nll_map(images).double().flatten(1).sum(1).numpy()

    def calibrate(self, images: ImagesLike, fpr: float = 0.05, kind: str | None = None,
                  data: str = "", conservative: bool = False) -> Calibration:
        """Set the threshold so that at most `fpr` of clean images are flagged.

        Too few images for `fpr` raise `TooFewCalibrationImages` (a ValueError) unless
        `conservative`, which takes the largest clean score as the threshold instead."""
        if not 0.0 < fpr < 1.0:
            raise UsageError(f"fpr must be between 0 and 1 (exclusive), got {fpr}",
                             param="fpr")
        kind = self.check_kind(kind or self.default_kind)
        cal = self.calibrate_all(images, fpr=fpr, kinds=[kind], data=data,
                                 conservative=conservative)[kind]
        self.default_kind = kind
        return cal

    def calibrate_all(self, images: ImagesLike, fpr: float = 0.05,
                      kinds: Sequence[str] | None = None, data: str = "",
                      conservative: bool = False) -> dict[str, Calibration]:
        """Calibrate several kinds (default: all available) from one pass; keeps the
        default kind. Typicality is measured from these images' own mean bits/dim.
        Always scored in fp32, whatever `self.precision`: thresholds are exact."""
        scoring_precision, self.precision = self.precision, "fp32"
        try:
            return self._calibrate_all(images, fpr, kinds, data, conservative)
        finally:
            self.precision = scoring_precision

    def _calibrate_all(self, images: ImagesLike, fpr: float, kinds: Sequence[str] | None,
                       data: str, conservative: bool) -> dict[str, Calibration]:
        if not 0.0 < fpr < 1.0:
            raise UsageError(f"fpr must be between 0 and 1 (exclusive), got {fpr}",
                             param="fpr")
        implicit = kinds is None
        kinds = list(self.available_kinds if kinds is None else kinds)
        x = self._check(images)
        if len(x) == 0:
            raise UsageError("no calibration images")
        needed = min_calibration_images(fpr)
        if len(x) < needed and not conservative:  # before the (possibly long) model pass
            raise TooFewCalibrationImages(len(x), fpr, needed)
        for kind in list(kinds):
            enough = SCORES[kind].enough_images
            if implicit and enough is not None and not enough(self, len(x), fpr, conservative):
                # too few images for it (dose: its statistics density and its half-size
                # calibration): leave it uncalibrated (a gate on it then fails with a
                # clear error) rather than lose the others
                kinds.remove(kind)
                self.calibrations.pop(kind, None)
        probe = [k for k in kinds if SCORES[k].calibrate is None]
        for kind in probe:
            self.check_kind(kind)
        shared = self.score_pass(x, probe)
        scores = shared.scores(probe)
        out = {}
        for kind in kinds:
            spec, reference = SCORES[kind], {}
            if spec.calibrate is not None:
                kind_scores, reference = spec.calibrate(shared)
            else:
                kind_scores = scores[kind]
            out[kind] = Calibration.fit(kind_scores, fpr=fpr, kind=kind, data=data,
                                        unit=spec.unit, reference=reference,
                                        conservative=conservative)
        self.calibrations.update(out)
        return out

    def can_fit_dose(self, n_images: int, fpr: float = 0.05,
                     conservative: bool = False) -> bool:
        """Enough clean images for `dose`: half fit its density (more images than
        statistics), the other half calibrate its threshold at `fpr`."""
        from .dose import DEFAULT_STATISTICS, statistic_columns

        columns = statistic_columns(DEFAULT_STATISTICS)
        held_out = n_images - n_images // 2
        return (n_images // 2 >= columns + 2
                and (conservative or held_out >= min_calibration_images(fpr)))

    def _calibrate_dose(self, x: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
        """Split conformal: fit the statistics density on one seeded half of the clean
        images, return the other half's scores (the conformal calibration scores)."""
        fit_idx, cal_idx = split_halves(len(x))
        try:
            dose = DoseModel.fit(self.model_pass(x[torch.from_numpy(fit_idx)]),
                                 self.codec_bpd(x[torch.from_numpy(fit_idx)], {}))
        except ValueError as exc:
            raise UsageError(f"score 'dose': {exc}") from exc
        held = self.compute_scores(x[torch.from_numpy(cal_idx)], ["dose"], dose=dose)
        reference = {**dose.to_reference(), "n_calibration": int(len(cal_idx))}
        return held["dose"], reference

    def _calibration_for(self, kind: str | None) -> Calibration:
        kind = kind or self.default_kind
        if kind not in self.calibrations:
            raise UsageError(
                f"the model has no calibration for score {kind!r}: run `pixeldefend calibrate`"
            )
        return self.calibrations[kind]

    def p_values(self, images: ImagesLike, kind: str | None = None) -> np.ndarray:
        """Conformal p-values against the clean calibration scores (small = anomalous)."""
        return self._calibration_for(kind).p_values(self.anomaly_score(images, kind))

    def is_anomalous(self, images: ImagesLike, kind: str | None = None) -> np.ndarray:
        """True where an image is anomalous (score above the calibrated threshold)."""
        return self._calibration_for(kind).predict(self.anomaly_score(images, kind))

    def decision_function(self, images: ImagesLike, kind: str | None = None) -> np.ndarray:
        """threshold - anomaly score: negative for outliers, as in scikit-learn."""
        cal = self._calibration_for(kind)
        return cal.threshold - self.anomaly_score(images, kind)

    def predict(self, images: ImagesLike, kind: str | None = None) -> np.ndarray:
        """-1 for outliers, +1 for inliers (scikit-learn's outlier-detector convention)."""
        return np.where(self.is_anomalous(images, kind), -1, 1)

    # -------------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        model = self._require_model()
        cal = calibration_file(self.calibrations, self.default_kind) if self.calibrations else None
        meta = {
            "image_shape": list(self.spec.shape),
            "levels": self.spec.levels,
            "preset": self.preset,
            **{k: v for k, v in self.meta.items()
               if k not in ("background", "path", "calibration_error")},
        }
        state = dict(model.state_dict())
        if self.background is not None:
            # one weights file: the background's tensors under a prefix, its config beside
            meta["background"] = {"architecture": self.background.config.to_dict(),
                                  **self.background_meta}
            state.update({BACKGROUND_PREFIX + k: v
                          for k, v in self.background.state_dict().items()})
        return save_bundle(path, "pixelcnn", model.config.to_dict(), state,
                           meta=meta, calibration=cal)

    def save_calibration(self, path: str | Path) -> None:
        write_calibration(path, calibration_file(self.calibrations, self.default_kind))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto",
             batch_size: int = 256, ignore_bad_calibration: bool = False) -> DensityDetector:
        """Load a bundle. A malformed calibration.json is a BundleError, unless
        `ignore_bad_calibration` (for recalibrating): then it is dropped and the reason
        kept in `meta["calibration_error"]`."""
        config = read_config(path, kind="pixelcnn")
        try:
            PIXELCNN_CONFIG.check(config, "config.json")
            model_cfg = PixelCNNConfig(**check_pixelcnn_architecture(config.get("architecture")))
        except (TypeError, ValueError, KeyError) as exc:
            raise BundleError(f"{path}: config.json has an invalid architecture ({exc})") from exc
        model = PixelCNN(model_cfg)
        state = read_weights(path)
        load_state_into(model, {k: v for k, v in state.items()
                                if not k.startswith(BACKGROUND_PREFIX)}, path)
        det = cls(preset=config.get("preset", "custom"), device=device, batch_size=batch_size,
                  model=model)
        det.meta = {k: v for k, v in config.items()
                    if k not in ("format", "format_version", "kind", "architecture",
                                 "background")}
        if config.get("background") is not None:
            try:
                bg = dict(config["background"])
                background = PixelCNN(PixelCNNConfig(**check_pixelcnn_architecture(
                    bg.pop("architecture", None), "config.json background.architecture")))
            except (TypeError, ValueError, KeyError) as exc:
                raise BundleError(f"{path}: config.json has an invalid background "
                                  f"architecture ({exc})") from exc
            load_state_into(background, state, path, prefix=BACKGROUND_PREFIX)
            det.background = background.to(det.device).eval()
            det.background_meta = bg
        try:
            doc = read_calibration(path)
            if doc is not None:
                det.calibrations, det.default_kind = parse_calibration_file(doc)
        except (ValueError, TypeError, KeyError, BundleError) as exc:
            if not ignore_bad_calibration:
                detail = str(exc).removeprefix(f"{Path(path) / 'calibration.json'}: ")
                raise BundleError(f"{path}: invalid calibration.json ({detail}); run "
                                  "`pixeldefend calibrate` to replace it") from exc
            det.calibrations, det.default_kind = {}, "bpd"
            det.meta["calibration_error"] = str(exc)
        det.meta["path"] = str(path)
        det.meta.setdefault("package_version", __version__)
        return det
