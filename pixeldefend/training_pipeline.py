"""The `train` pipeline: splits, PixelCNN training, the optional llr background model,
calibration of every score kind and the bundle's metadata. Usable from Python:

    job = TrainJob(data="digits", out=Path("runs/digits"), preset="tiny", epochs=2)
    result = train_bundle(job)          # writes the bundle, returns the detector

`log` and `warn` receive one-line messages; `progress(label)` ("train", "background")
opens a context that receives the training loop's reports (`train.TrainProgress`).

Under `torchrun` every rank trains (DistributedDataParallel, see `train.py`); rank 0 alone
then calibrates, measures test bits/dim and writes the bundle, from the same weights and
the same images as one process would, so the bundle does not depend on the number of
ranks. The other ranks return without writing (`TrainResult.wrote_bundle` False).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .defaults import DEFAULT_BACKGROUND_L2, DEFAULT_MUTATION_RATE, DEFAULT_SCORE
from .defaults import PIXELCNN_PRESETS as PRESETS
from .errors import TooFewCalibrationImages, UsageError
from .scores import SCORES

if TYPE_CHECKING:
    from .data import ImageSet
    from .detector import DensityDetector
    from .train import TrainProgress, TrainSettings

Log = Callable[[str], None]
ProgressFactory = Callable[[str], contextlib.AbstractContextManager[Any]]


def _quiet(_message: str) -> None:
    pass


@dataclass
class TrainJob:
    """Everything `train` needs; the defaults are the CLI's."""

    data: str = "digits"
    out: Path | None = None  # default: default_out(data)
    preset: str = "small"
    dropout: float = 0.1
    epochs: int = 40
    patience: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    lr_decay: float = 0.97  # multiplied into the learning rate after every epoch
    max_minutes: float | None = None  # wall-clock budget of the main model's training
    fpr: float = 0.05
    max_images: int | None = None
    seed: int = 0
    skip_unreadable: bool = False
    conservative_threshold: bool = False
    score_kind: str = DEFAULT_SCORE
    background: bool = False
    mutation_rate: float = DEFAULT_MUTATION_RATE
    background_preset: str | None = None
    background_epochs: int | None = None
    background_l2: float = DEFAULT_BACKGROUND_L2
    device: str = "auto"
    precision: str = "fp32"  # training's forward pass (precision.py); calibration is fp32
    compile: bool = False  # training's forward pass through torch.compile (compilation.py)
    resume: bool = False
    data_root: str | None = None
    download: bool = False
    overwrite: bool = False

    @property
    def bundle(self) -> Path:
        return self.out or default_out(self.data)

    @property
    def checkpoint(self) -> Path:
        return self.bundle.with_name(self.bundle.name + ".checkpoint")

    @property
    def background_checkpoint(self) -> Path:
        return self.bundle.with_name(self.bundle.name + ".background.checkpoint")


@dataclass
class TrainingData:
    train: ImageSet
    val: ImageSet
    calib: ImageSet
    test: ImageSet | None
    calib_recorded: bool  # the calibration split has a spec of its own (a data set split)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable, skipped

    def metadata(self, spec: str) -> dict[str, Any]:
        """The bundle's `data` entry: where each split came from and its size."""
        return {
            "spec": spec,
            "train": self.train.source, "n_train": len(self.train),
            "val": self.val.source, "n_val": len(self.val),
            "calib": self.calib.source if self.calib_recorded else None,
            "n_calib": len(self.calib),
            "test": self.test.source if self.test is not None else None,
            "n_test": len(self.test) if self.test is not None else 0,
        }


@dataclass
class TrainResult:
    detector: DensityDetector
    data: TrainingData
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # main model only
    wrote_bundle: bool = True  # False on torchrun's ranks other than 0


def default_out(data: str) -> Path:
    """runs/<data name>: untracked (git-ignored), so a bare `train` in a clone never
    modifies the shipped bundles in models/."""
    from .data import parse_builtin, split_slice

    parsed = parse_builtin(split_slice(data)[0])
    name = parsed[0] if parsed else Path(data.rstrip("/")).stem or "model"
    return Path("runs") / name


def check_preset(preset: str | None, param: str = "preset") -> None:
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"{param} must be one of {', '.join(PRESETS)}, not {preset!r}",
                         param=param)


def check_fpr(fpr: float) -> float:
    if not 0.0 < fpr < 1.0:
        raise UsageError(f"fpr must be between 0 and 1, got {fpr}", param="fpr")
    return fpr


def check_calibration_size(n: int, fpr: float, conservative: bool) -> None:
    """Before any training: are there enough calibration images for `fpr`?"""
    from .calibration import min_calibration_images

    needed = min_calibration_images(fpr)
    if n < needed and not conservative:
        raise TooFewCalibrationImages(n, fpr, needed)


def check_job(job: TrainJob) -> None:
    """Usage errors before anything is read or written."""
    from .device import resolve_device
    from .precision import check_precision

    check_preset(job.preset)
    check_fpr(job.fpr)
    check_precision(job.precision, resolve_device(job.device))
    if job.score_kind not in SCORES:
        raise UsageError(f"score_kind must be one of {', '.join(SCORES)}, not "
                         f"{job.score_kind!r}", param="score_kind")
    if job.score_kind == "llr" and not job.background:
        raise UsageError("score_kind llr needs a background model: set background",
                         param=("score_kind", "background"))
    check_preset(job.background_preset, "background_preset")
    if job.max_minutes is not None and job.max_minutes <= 0:
        raise UsageError(f"max_minutes must be positive, got {job.max_minutes}",
                         param="max_minutes")
    if not 0.0 < job.lr_decay <= 1.0:
        raise UsageError(f"lr_decay must be in (0, 1], got {job.lr_decay}", param="lr_decay")


def load_training_data(job: TrainJob) -> TrainingData:
    from .data import resolve, training_splits

    splits = training_splits(job.data, job.data_root, job.download, job.seed,
                             skip_unreadable=job.skip_unreadable)
    train_set = resolve(splits["train"], None, job.data_root, job.download).head(job.max_images)
    expect = train_set.spec

    def load(name: str) -> ImageSet:
        return resolve(splits[name], expect, job.data_root, job.download)

    skipped = list(getattr(splits["train"], "errors", []))
    return TrainingData(train_set, load("val"), load("calib"),
                        load("test") if "test" in splits else None,
                        isinstance(splits["calib"], str), skipped)


def fall_back_if_uncalibrated(detector: DensityDetector, n: int, warn: Log = _quiet) -> None:
    """When the default score could not be calibrated (`dose` needs about 50 clean
    images: half fit its density), make bits/dim the default, loudly."""
    if detector.default_kind in detector.calibrations or "bpd" not in detector.calibrations:
        return
    warn(f"{n} clean images are too few to calibrate score {detector.default_kind!r}; the "
         f"default score is now 'bpd' (calibrate {detector.default_kind!r} on more clean "
         "images to restore it)")
    detector.default_kind = "bpd"


def train_background(detector: DensityDetector, train_set: ImageSet, val_set: ImageSet, *,
                     mutation_rate: float, preset: str | None, settings: TrainSettings,
                     checkpoint: Path, resume: bool, log: Log = _quiet,
                     progress: ProgressFactory | None = None) -> None:
    """Fit the llr background model (Ren et al. 2019) on mutated training images."""
    check_preset(preset, "background_preset")
    log(f"background model: mutation rate {mutation_rate:g}, preset "
        f"{preset or 'same as the main model'}, L2 {settings.weight_decay:g}, "
        f"{len(train_set)} images, checkpoint {checkpoint}")
    with _opened(progress, "background") as reports:
        detector.fit_background(train_set, mutation_rate=mutation_rate, preset=preset,
                                val=val_set, settings=settings, progress=reports,
                                checkpoint_dir=checkpoint, resume=resume)


def _opened(progress: ProgressFactory | None,
            label: str) -> contextlib.AbstractContextManager[TrainProgress | None]:
    return contextlib.nullcontext() if progress is None else progress(label)


def prepare_job(job: TrainJob, log: Log = _quiet) -> TrainingData:
    """Check the job, plan the bundle folder and checkpoints, read the splits."""
    from .outputs import check_checkpoint_dir, input_paths, prepare_dir
    from .train import CHECKPOINT_FILES

    check_job(job)
    prepare_dir(job.bundle, command="train", inputs=input_paths(job.data, job.data_root),
                overwrite=job.overwrite, bundle=True)
    for folder in (job.checkpoint, job.background_checkpoint):
        check_checkpoint_dir(folder, CHECKPOINT_FILES)
    data = load_training_data(job)
    check_calibration_size(len(data.calib), job.fpr, job.conservative_threshold)
    test = f", {len(data.test)} test" if data.test else ""
    log(f"data {job.data}: {len(data.train)} train, {len(data.val)} validation, "
        f"{len(data.calib)} calibration{test} images, {data.train.spec.describe()}")
    return data


def train_bundle(job: TrainJob, data: TrainingData | None = None, *, log: Log = _quiet,
                 warn: Log = _quiet, progress: ProgressFactory | None = None) -> TrainResult:
    """Train, calibrate every score kind and write the bundle to `job.bundle`."""
    from .compilation import compile_errors
    from .detector import DensityDetector
    from .distributed import is_main_process
    from .train import TrainSettings, remove_checkpoint

    data = data or prepare_job(job, log)
    detector = DensityDetector(preset=job.preset, device=job.device, dropout=job.dropout)
    settings = TrainSettings(epochs=job.epochs, batch_size=job.batch_size, lr=job.lr,
                             lr_decay=job.lr_decay, seed=job.seed, patience=job.patience,
                             precision=job.precision, compile=job.compile)
    budget = None if job.max_minutes is None else 60.0 * job.max_minutes
    log(f"device {detector.device}, preset {job.preset}, checkpoint {job.checkpoint}"
        + ("" if budget is None else f", budget {job.max_minutes:g} min of training"))
    start = time.perf_counter()
    with _opened(progress, "train") as reports, compile_errors(job.compile):
        detector.fit(data.train, val=data.val, settings=settings, progress=reports,
                     checkpoint_dir=job.checkpoint, resume=job.resume, max_seconds=budget)
    seconds = time.perf_counter() - start
    if detector.meta["training"].get("stopped_by_budget"):
        log(f"stopped after {len(detector.meta['training']['history'])} epochs: the next "
            f"would end past --max-minutes {job.max_minutes:g}; best weights kept")
    if job.background:
        bg_settings = TrainSettings(epochs=job.background_epochs or job.epochs,
                                    batch_size=job.batch_size, lr=job.lr, seed=job.seed,
                                    patience=job.patience, weight_decay=job.background_l2,
                                    precision=job.precision, compile=job.compile)
        train_background(detector, data.train, data.val, mutation_rate=job.mutation_rate,
                         preset=job.background_preset, settings=bg_settings,
                         checkpoint=job.background_checkpoint, resume=job.resume, log=log,
                         progress=progress)
    if not is_main_process():  # rank 0 calibrates and writes, from the same weights
        return TrainResult(detector, data, seconds=seconds, wrote_bundle=False)
    detector.calibrate_all(data.calib, fpr=job.fpr, data=data.calib.source,
                           conservative=job.conservative_threshold)
    detector.default_kind = job.score_kind
    fall_back_if_uncalibrated(detector, len(data.calib), warn)
    metrics: dict[str, Any] = {"val_bits_per_dim": detector.meta["training"]["val_bits_per_dim"],
                               "train_seconds": round(time.perf_counter() - start, 1)}
    if data.test is not None:
        metrics["test_bits_per_dim"] = float(detector.anomaly_score(data.test, "bpd").mean())
    detector.meta["data"] = data.metadata(job.data)
    detector.meta["metrics"] = metrics
    detector.save(job.bundle)
    remove_checkpoint(job.checkpoint)
    remove_checkpoint(job.background_checkpoint)
    return TrainResult(detector, data, metrics, seconds)


def add_background_model(model: Path, *, data: str | None = None,
                         mutation_rate: float = DEFAULT_MUTATION_RATE,
                         preset: str | None = None, epochs: int = 10, patience: int = 4,
                         batch_size: int = 64, lr: float = 2e-3,
                         l2: float = DEFAULT_BACKGROUND_L2, max_images: int | None = None,
                         fpr: float | None = None, seed: int | None = None,
                         device: str = "auto", precision: str = "fp32", resume: bool = False,
                         data_root: str | None = None, download: bool = False,
                         log: Log = _quiet,
                         progress: ProgressFactory | None = None) -> TrainResult:
    """Train the llr background model on a bundle's training split (data, fpr and seed
    default to the bundle's), recalibrate every kind and rewrite the bundle."""
    from .data import resolve, training_splits
    from .detector import DensityDetector
    from .distributed import is_main_process
    from .outputs import check_checkpoint_dir, prepare_dir
    from .precision import check_precision
    from .train import CHECKPOINT_FILES, TrainSettings, remove_checkpoint

    prepare_dir(model, command="train-background", bundle=True, overwrite=True,
                option="model")  # the bundle is rewritten whole: it may hold nothing else
    detector = DensityDetector.load(model, device=device)
    check_precision(precision, detector.device)
    data = data or (detector.meta.get("data") or {}).get("spec")
    if not data:
        raise UsageError(f"{model} does not record its training data: pass data", param="data")
    if fpr is None:
        fpr = detector.calibration.fpr if detector.calibration is not None else 0.05
    check_fpr(fpr)
    if seed is None:
        seed = int(((detector.meta.get("training") or {}).get("settings") or {}).get("seed", 0))
    splits = training_splits(data, data_root, download, seed)
    sets = {name: resolve(splits[name], detector.spec, data_root, download)
            for name in ("train", "val", "calib")}
    train_set = sets["train"].head(max_images)
    check_calibration_size(len(sets["calib"]), fpr, False)
    checkpoint = model.with_name(model.name + ".background.checkpoint")
    check_checkpoint_dir(checkpoint, CHECKPOINT_FILES)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             patience=patience, weight_decay=l2, precision=precision)
    start = time.perf_counter()
    train_background(detector, train_set, sets["val"], mutation_rate=mutation_rate,
                     preset=preset, settings=settings, checkpoint=checkpoint, resume=resume,
                     log=log, progress=progress)
    seconds = time.perf_counter() - start
    trained = TrainingData(train_set, sets["val"], sets["calib"], None, True)
    if not is_main_process():  # rank 0 recalibrates and rewrites the bundle
        return TrainResult(detector, trained, seconds=seconds, wrote_bundle=False)
    detector.background_meta["train_seconds"] = round(seconds, 1)
    detector.background_meta["data"] = {"train": train_set.source, "n_train": len(train_set)}
    detector.calibrate_all(sets["calib"], fpr=fpr, data=sets["calib"].source)
    detector.save(model)
    remove_checkpoint(checkpoint)
    return TrainResult(detector, trained, seconds=seconds)


@dataclass
class Recalibration:
    detector: DensityDetector
    images: ImageSet
    kinds: list[str]  # the kinds calibrated

    @property
    def headline(self) -> str:
        """The default kind if it was calibrated, else the first one."""
        default = self.detector.default_kind
        return default if default in self.kinds else self.kinds[0]


def recalibrate_bundle(model: Path, data: str | None = None, *, fpr: float = 0.05,
                       kind: str | None = None, conservative: bool = False,
                       skip_unreadable: bool = False, batch_size: int = 256,
                       device: str = "auto", resize: bool = False, grayscale: bool = False,
                       data_root: str | None = None, warn: Log = _quiet) -> Recalibration:
    """Recompute a bundle's thresholds on clean images (default: its own calibration
    split) and store them (atomically). `kind`: calibrate only it and make it the
    default; None recalibrates every available kind and keeps the default."""
    from .data import load_images, refuse_unreadable
    from .detector import DensityDetector

    check_fpr(fpr)
    detector = DensityDetector.load(model, device=device, batch_size=batch_size,
                                    ignore_bad_calibration=True)
    if "calibration_error" in detector.meta:
        warn(f"replacing the invalid calibration.json of {model} "
             f"({detector.meta.pop('calibration_error')})")
    if kind is not None:
        detector.check_kind(kind)
    data = data or (detector.meta.get("data") or {}).get("calib")
    if not data:
        raise UsageError("the bundle does not record its calibration data: pass data",
                         param="data")
    images = load_images(data, detector.spec, data_root=data_root, resize=resize,
                         grayscale=grayscale)
    refuse_unreadable(images, "calibration", skip_unreadable)
    if kind is not None:
        detector.calibrate(images, fpr=fpr, kind=kind, data=images.source,
                           conservative=conservative)
        kinds = [kind]
    else:
        kinds = list(detector.calibrate_all(images, fpr=fpr, data=images.source,
                                            conservative=conservative))
        fall_back_if_uncalibrated(detector, len(images), warn)
    detector.save_calibration(model)
    return Recalibration(detector, images, kinds)
