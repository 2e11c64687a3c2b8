"""DensityDetector: a PixelCNN plus calibrated thresholds, in the spirit of scikit-learn's
outlier detectors (fit / score_samples / calibrate / predict / p_values / save / load).

Scores are "higher = more anomalous"; the default kind is bits/dim.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .bundle import (
    load_state_into,
    read_calibration,
    read_config,
    read_weights,
    save_bundle,
    write_calibration,
)
from .calibration import Calibration, calibration_file, parse_calibration_file
from .data import ImageSet, ImageSpec
from .density import LN2, bits_per_dim, nll_map
from .device import resolve_device
from .errors import BundleError, DataError, UsageError
from .models.pixelcnn import PixelCNN, PixelCNNConfig
from .train import TrainProgress, TrainResult, TrainSettings, run_training

ImagesLike = ImageSet | torch.Tensor | np.ndarray
SCORE_KINDS = ("bpd",)


def as_tensor(images: ImagesLike) -> torch.Tensor:
    """ImageSet / array / tensor -> uint8 tensor (N, C, H, W)."""
    if isinstance(images, ImageSet):
        return images.images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype != torch.uint8:
        if images.is_floating_point() or images.min() < 0 or images.max() > 255:
            raise DataError("images must hold integer pixel levels (uint8), not floats")
        images = images.to(torch.uint8)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    return images


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
        self.calibrations: dict[str, Calibration] = {}
        self.default_kind = "bpd"
        self.meta: dict[str, Any] = {}

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

    def _require_model(self) -> PixelCNN:
        if self.model is None:
            raise UsageError("this DensityDetector has no model yet: call fit() or load()")
        return self.model

    def _check(self, images: ImagesLike) -> torch.Tensor:
        x = as_tensor(images)
        spec = self.spec
        if tuple(x.shape[1:]) != spec.shape:
            raise DataError(f"images are {tuple(x.shape[1:])} (C,H,W), model expects {spec.shape}")
        if x.numel() and int(x.max()) >= spec.levels:
            raise DataError(f"pixel value {int(x.max())} out of range for {spec.levels} levels")
        return x

    # -------------------------------------------------------------------------- fit

    def fit(self, images: ImagesLike, levels: int | None = None, *,
            val: ImagesLike | None = None, settings: TrainSettings | None = None,
            progress: TrainProgress | None = None, checkpoint_dir: Path | None = None,
            resume: bool = False) -> DensityDetector:
        """Train the PixelCNN by maximum likelihood; keep the best validation weights."""
        x = as_tensor(images)
        if levels is None:
            levels = images.levels if isinstance(images, ImageSet) else int(x.max()) + 1
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
            return F.cross_entropy(m(batch), batch.long())  # mean nats per sub-pixel

        def evaluate(m: torch.nn.Module) -> float:
            return float(bits_per_dim(m, val_x, self.batch_size).mean())

        result: TrainResult = run_training(
            model, loss_fn, x, None, evaluate, settings, self.device,
            checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
            train_metric=lambda nats: nats / LN2,
        )
        model.eval()
        self.meta.update({
            "training": {
                "settings": settings.__dict__, "best_epoch": result.best_epoch,
                "val_bits_per_dim": result.best_val, "n_train": int(len(x)),
                "n_val": int(len(val_x)), "history": result.history, "dims": dims,
            }
        })
        return self

    # ----------------------------------------------------------------------- scoring

    def nll_map(self, images: ImagesLike, progress: Callable[[int], None] | None = None
                ) -> torch.Tensor:
        """Per-sub-pixel NLL in nats (N, C, H, W): where an image looks wrong."""
        return nll_map(self._require_model(), self._check(images), self.batch_size, progress)

    def score_samples(self, images: ImagesLike, kind: str | None = None,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Anomaly score per image (higher = stranger); bits/dim for the default kind."""
        kind = kind or self.default_kind
        if kind != "bpd":
            raise UsageError(f"unknown score kind {kind!r}: choose from {', '.join(SCORE_KINDS)}")
        x = self._check(images)
        return bits_per_dim(self._require_model(), x, self.batch_size, progress).numpy()

    def log_likelihood(self, images: ImagesLike) -> np.ndarray:
        """log p(x) in nats per image."""
        return -self.nll_map(images).double().flatten(1).sum(1).numpy()

    def calibrate(self, images: ImagesLike, fpr: float = 0.05, kind: str | None = None,
                  data: str = "") -> Calibration:
        """Set the threshold so that about `fpr` of clean images are flagged."""
        if not 0.0 < fpr < 1.0:
            raise UsageError(f"--fpr must be between 0 and 1 (exclusive), got {fpr}")
        kind = kind or self.default_kind
        scores = self.score_samples(images, kind)
        cal = Calibration.fit(scores, fpr=fpr, kind=kind, data=data)
        self.calibrations[kind] = cal
        self.default_kind = kind
        return cal

    def _calibration_for(self, kind: str | None) -> Calibration:
        kind = kind or self.default_kind
        if kind not in self.calibrations:
            raise UsageError(
                f"the model has no calibration for score {kind!r}: run `pixeldefend calibrate`"
            )
        return self.calibrations[kind]

    def p_values(self, images: ImagesLike, kind: str | None = None) -> np.ndarray:
        return self._calibration_for(kind).p_values(self.score_samples(images, kind))

    def predict(self, images: ImagesLike, kind: str | None = None) -> np.ndarray:
        """True where an image is anomalous (score above the calibrated threshold)."""
        return self._calibration_for(kind).predict(self.score_samples(images, kind))

    # -------------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        model = self._require_model()
        cal = calibration_file(self.calibrations, self.default_kind) if self.calibrations else None
        meta = {
            "image_shape": list(self.spec.shape),
            "levels": self.spec.levels,
            "preset": self.preset,
            **self.meta,
        }
        return save_bundle(path, "pixelcnn", model.config.to_dict(), model.state_dict(),
                           meta=meta, calibration=cal)

    def save_calibration(self, path: str | Path) -> None:
        write_calibration(path, calibration_file(self.calibrations, self.default_kind))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto",
             batch_size: int = 256) -> DensityDetector:
        config = read_config(path, kind="pixelcnn")
        try:
            model_cfg = PixelCNNConfig(**config["architecture"])
        except (TypeError, ValueError, KeyError) as exc:
            raise BundleError(f"{path}: config.json has an invalid architecture ({exc})") from exc
        model = PixelCNN(model_cfg)
        load_state_into(model, read_weights(path), path)
        det = cls(preset=config.get("preset", "custom"), device=device, batch_size=batch_size,
                  model=model)
        det.meta = {k: v for k, v in config.items()
                    if k not in ("format", "format_version", "kind", "architecture")}
        doc = read_calibration(path)
        if doc is not None:
            try:
                det.calibrations, det.default_kind = parse_calibration_file(doc)
            except (ValueError, TypeError, KeyError) as exc:
                raise BundleError(f"{path}: corrupt calibration.json ({exc})") from exc
        det.meta["path"] = str(path)
        det.meta.setdefault("package_version", __version__)
        return det
