"""`train`, `train-background`, `calibrate`, `score`, `info` and `sample`: the density core
of the CLI."""

from __future__ import annotations

import contextlib
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..defaults import (
    DEFAULT_BACKGROUND_L2,
    DEFAULT_MUTATION_RATE,
    DEFAULT_SCORE,
    SCORE_HELP,
    SCORE_KINDS,
)
from ..defaults import PIXELCNN_PRESETS as PRESETS
from ..errors import TooFewCalibrationImages, UsageError
from .app import app
from .common import (
    DEVICE_HELP,
    EXIT_USAGE,
    FORMAT_HELP,
    OVERWRITE,
    OutputFormat,
    RichTrainProgress,
    RowStream,
    emit,
    err_console,
    fmt_float,
    handle_errors,
    make_progress,
    out_console,
)

if TYPE_CHECKING:
    from ..data import Batch, ImageSet
    from ..detector import DensityDetector
    from ..train import TrainSettings

DEFAULT_MODEL = Path("models/digits")


SCORE_OPTION_HELP = "Score kind: " + "; ".join(f"{k} = {v}" for k, v in SCORE_HELP.items()) + "."
MUTATION_HELP = (
    "Background model (score llr): probability that a sub-pixel of a training image is "
    "replaced by a uniformly random level. Ren et al. (2019) found 0.1-0.2 best; 0.2 wipes "
    "out shapes while keeping the local pixel statistics that confound raw likelihood, and "
    "suits short CPU training.")
CONSERVATIVE_HELP = (
    "When there are fewer clean calibration images than --fpr needs (about 1/fpr), use the "
    "largest calibration score as a finite threshold instead of stopping with an error; its "
    "false-positive rate is then not guaranteed, and this is printed and recorded.")
BACKGROUND_PRESET_HELP = (
    "Background model size \\[default: same as the main model]. It only has to learn local "
    "statistics, so 'tiny' is a fair CPU saving on small images.")


def check_score_kind(kind: str) -> str:
    if kind not in SCORE_KINDS:
        raise UsageError(f"--score must be one of {', '.join(SCORE_KINDS)}, not {kind!r}")
    return kind


def train_background_model(detector: DensityDetector, train_set: ImageSet, val_set: ImageSet,
                           *, mutation_rate: float, preset: str | None,
                           settings: TrainSettings, checkpoint: Path, resume: bool) -> None:
    """Fit the llr background model with a progress bar; Ctrl-C says how to resume."""
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--background-preset must be one of {', '.join(PRESETS)}, "
                         f"not {preset!r}")
    err_console.print(
        f"background model: mutation rate {mutation_rate:g}, preset "
        f"{preset or 'same as the main model'}, L2 {settings.weight_decay:g}, "
        f"{len(train_set)} images, checkpoint {checkpoint}", highlight=False)
    try:
        with RichTrainProgress("background") as progress:
            detector.fit_background(train_set, mutation_rate=mutation_rate, preset=preset,
                                    val=val_set, settings=settings, progress=progress,
                                    checkpoint_dir=checkpoint, resume=resume)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: continue with the same command plus "
                          f"--resume (checkpoint in {checkpoint})")
        raise


def check_calibration_size(n: int, fpr: float, conservative: bool) -> None:
    """Before any training: are there enough calibration images for --fpr?"""
    from ..calibration import min_calibration_images

    needed = min_calibration_images(fpr)
    if n < needed and not conservative:
        raise TooFewCalibrationImages(n, fpr, needed)


def report_skipped(images: ImageSet | str) -> None:
    """List the files --skip-unreadable left out (the library refuses them otherwise)."""
    from ..data import ImageSet

    errors = images.errors if isinstance(images, ImageSet) else []
    for name, error in errors:
        err_console.print(f"[yellow]skipped[/] {name}: {error}", highlight=False)
    if errors:
        err_console.print(f"[yellow]skipped {len(errors)} unreadable file(s)[/] "
                          "(--skip-unreadable)", highlight=False)


def print_calibrations(detector: DensityDetector, kinds: list[str], n: int, source: str) -> None:
    from ..calibration import min_calibration_images

    for kind in kinds:
        cal = detector.calibrations[kind]
        default = " (default)" if kind == detector.default_kind else ""
        out_console.print(f"  {kind:<10} threshold {cal.threshold:.4f} {cal.unit} at FPR "
                          f"{cal.fpr:g}{default}", highlight=False)
        if cal.conservative:
            err_console.print(
                f"[yellow]warning[/]: {kind}: only {cal.n} calibration images for FPR "
                f"{cal.fpr:g} (needs {min_calibration_images(cal.fpr)}): the threshold is the "
                f"largest clean score, {cal.threshold:.4f}; its false-positive rate is not "
                "guaranteed (--conservative-threshold)", highlight=False)
    err_console.print(f"calibrated {', '.join(kinds)} on {n} clean images of {source}",
                      highlight=False)


def fall_back_if_uncalibrated(detector: DensityDetector, n: int) -> None:
    """When the default score could not be calibrated (`dose` needs about 50 clean
    images: half fit its density), make bits/dim the default, loudly."""
    if detector.default_kind in detector.calibrations or "bpd" not in detector.calibrations:
        return
    err_console.print(
        f"[yellow]warning[/]: {n} clean images are too few to calibrate score "
        f"{detector.default_kind!r}; the default score is now 'bpd' (calibrate with more "
        "clean images and --score dose to restore it)", highlight=False)
    detector.default_kind = "bpd"


def default_out(data: str) -> Path:
    """runs/<data name>: untracked (git-ignored), so a bare `train` in a clone never
    modifies the shipped bundles in models/."""
    from ..data import parse_builtin, split_slice

    parsed = parse_builtin(split_slice(data)[0])
    name = parsed[0] if parsed else Path(data.rstrip("/")).stem or "model"
    return Path("runs") / name


@app.command()
@handle_errors
def train(
    data: str = typer.Option("digits", "--data", "-d",
                             help="Training images: digits, fashion-mnist, mnist, cifar10, a "
                                  "folder, or an .npz file."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Bundle directory \\[default: runs/<data name>]. "
                                         "An existing bundle is replaced only with "
                                         "--overwrite; any other non-empty folder never."),
    preset: str = typer.Option("small", help=f"Model size: {', '.join(PRESETS)}."),
    dropout: float = typer.Option(0.1, min=0.0, max=0.9,
                                  help="Dropout on the gated units (helps on small data)."),
    epochs: int = typer.Option(40, min=1, help="Maximum training epochs."),
    patience: int = typer.Option(8, min=0, help="Stop after this many epochs without a better "
                                                "validation bits/dim (0: never stop early)."),
    batch_size: int = typer.Option(64, min=1, help="Images per optimisation step."),
    lr: float = typer.Option(2e-3, min=0.0, help="Adam learning rate (decays 3% per epoch)."),
    fpr: float = typer.Option(0.05, help="Target false-positive rate of the threshold."),
    max_images: int | None = typer.Option(None, min=1, help="Train on at most this many "
                                                           "images (a quicker CPU run)."),
    seed: int = typer.Option(0, help="Seed for weights, shuffling and splits."),
    skip_unreadable: bool = typer.Option(
        False, "--skip-unreadable", help="Train on the readable files of a folder even if "
        "some cannot be used (corrupt, or a different size than the first image); they are "
        "listed. Without it such files are an error."),
    conservative_threshold: bool = typer.Option(
        False, "--conservative-threshold", help=CONSERVATIVE_HELP),
    score_kind: str = typer.Option(DEFAULT_SCORE, "--score", help=SCORE_OPTION_HELP + " Every "
                                   "available kind is calibrated; this one is the default."),
    background: bool = typer.Option(False, "--background", help="Also train the background "
                                    "model of the llr score and store it in the bundle."),
    mutation_rate: float = typer.Option(DEFAULT_MUTATION_RATE, help=MUTATION_HELP),
    background_preset: str | None = typer.Option(None, help=BACKGROUND_PRESET_HELP),
    background_epochs: int | None = typer.Option(
        None, min=1, help="Background model epochs \\[default: --epochs]."),
    background_l2: float = typer.Option(DEFAULT_BACKGROUND_L2, min=0.0,
                                        help="L2 penalty (Adam weight decay) on the "
                                             "background model, as in Ren et al."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue an interrupted run from its last checkpoint."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    download: bool = typer.Option(False, "--download",
                                  help="Let torchvision download the data set if missing."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Train a PixelCNN on clean images, calibrate its thresholds and write a bundle.

    Holds out validation and calibration images, checkpoints every epoch (Ctrl-C loses at
    most one epoch; continue with --resume), keeps the weights with the best validation
    bits/dim, calibrates every score kind and prints test bits/dim at the end. With
    --background it also trains the likelihood-ratio background model on mutated images.

    [bold]Examples[/]

      pixeldefend train                                  [dim]# digits -> runs/digits[/]

      pixeldefend train --data fashion-mnist --epochs 5  [dim]# -> runs/fashion-mnist[/]

      pixeldefend train --out models/mine --overwrite    [dim]# replace an earlier bundle[/]

      pixeldefend train --data fashion-mnist --resume    [dim]# after an interruption[/]

      pixeldefend train --background --score llr         [dim]# + background model[/]
    """
    from ..data import resolve, training_splits
    from ..detector import DensityDetector
    from ..outputs import check_checkpoint_dir, input_paths, prepare_dir
    from ..train import CHECKPOINT_FILES, TrainSettings, remove_checkpoint

    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    if not 0.0 < fpr < 1.0:
        raise UsageError(f"--fpr must be between 0 and 1, got {fpr}")
    check_score_kind(score_kind)
    if score_kind == "llr" and not background:
        raise UsageError("--score llr needs a background model: add --background")
    if background_preset is not None and background_preset not in PRESETS:
        raise UsageError(f"--background-preset must be one of {', '.join(PRESETS)}, "
                         f"not {background_preset!r}")
    out = out or default_out(data)
    prepare_dir(out, command="train", inputs=input_paths(data, data_root), overwrite=overwrite,
                bundle=True)
    checkpoint = out.with_name(out.name + ".checkpoint")
    for folder in (checkpoint, out.with_name(out.name + ".background.checkpoint")):
        check_checkpoint_dir(folder, CHECKPOINT_FILES)
    splits = training_splits(data, data_root, download, seed, skip_unreadable=skip_unreadable)
    train_set = resolve(splits["train"], None, data_root, download).head(max_images)
    report_skipped(splits["train"])
    expect = train_set.spec
    val_set = resolve(splits["val"], expect, data_root, download)
    calib_set = resolve(splits["calib"], expect, data_root, download)
    check_calibration_size(len(calib_set), fpr, conservative_threshold)
    test_set = resolve(splits["test"], expect, data_root, download) if "test" in splits else None
    err_console.print(
        f"data {data}: {len(train_set)} train, {len(val_set)} validation, {len(calib_set)} "
        f"calibration{f', {len(test_set)} test' if test_set else ''} images, "
        f"{expect.describe()}", highlight=False)
    detector = DensityDetector(preset=preset, device=device, dropout=dropout)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             patience=patience)
    err_console.print(f"device {detector.device}, preset {preset}, checkpoint {checkpoint}",
                      highlight=False)
    start = time.perf_counter()
    try:
        with RichTrainProgress() as progress:
            detector.fit(train_set, val=val_set, settings=settings, progress=progress,
                         checkpoint_dir=checkpoint, resume=resume)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: continue with the same command plus "
                          f"--resume (checkpoint in {checkpoint})")
        raise
    seconds = time.perf_counter() - start
    background_checkpoint = out.with_name(out.name + ".background.checkpoint")
    if background:
        bg_settings = TrainSettings(epochs=background_epochs or epochs, batch_size=batch_size,
                                    lr=lr, seed=seed, patience=patience,
                                    weight_decay=background_l2)
        train_background_model(detector, train_set, val_set, mutation_rate=mutation_rate,
                               preset=background_preset, settings=bg_settings,
                               checkpoint=background_checkpoint, resume=resume)
    detector.calibrate_all(calib_set, fpr=fpr, data=calib_set.source,
                           conservative=conservative_threshold)
    detector.default_kind = score_kind
    fall_back_if_uncalibrated(detector, len(calib_set))
    cal = detector.calibrations["bpd"]
    metrics: dict[str, Any] = {"val_bits_per_dim": detector.meta["training"]["val_bits_per_dim"],
                               "train_seconds": round(time.perf_counter() - start, 1)}
    if test_set is not None:
        metrics["test_bits_per_dim"] = float(detector.anomaly_score(test_set, "bpd").mean())
    detector.meta["data"] = {
        "spec": data,
        "train": train_set.source, "n_train": len(train_set),
        "val": val_set.source, "n_val": len(val_set),
        "calib": calib_set.source if isinstance(splits["calib"], str) else None,
        "n_calib": len(calib_set),
        "test": test_set.source if test_set is not None else None,
        "n_test": len(test_set) if test_set is not None else 0,
    }
    detector.meta["metrics"] = metrics
    detector.save(out)
    remove_checkpoint(checkpoint)
    remove_checkpoint(background_checkpoint)
    err_console.print(f"wrote bundle {out}", highlight=False)
    test = metrics.get("test_bits_per_dim")
    out_console.print(
        f"test bits/dim {fmt_float(test, 4)}  (validation {metrics['val_bits_per_dim']:.4f}); "
        f"threshold {cal.threshold:.4f} bits/dim at FPR {fpr:g} from {cal.n} calibration "
        f"images; {seconds:.0f} s", highlight=False)
    print_calibrations(detector, [k for k in detector.available_kinds
                                  if k in detector.calibrations], len(calib_set),
                       calib_set.source)


@app.command("train-background")
@handle_errors
def train_background(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m",
                               help="Existing bundle to add a background model to."),
    data: str | None = typer.Option(
        None, "--data", "-d", help="Training images \\[default: the bundle's training data]."),
    mutation_rate: float = typer.Option(DEFAULT_MUTATION_RATE, help=MUTATION_HELP),
    preset: str | None = typer.Option(None, "--preset", "--background-preset",
                                      help=BACKGROUND_PRESET_HELP),
    epochs: int = typer.Option(10, min=1, help="Maximum training epochs."),
    patience: int = typer.Option(4, min=0, help="Early-stopping patience (0: never)."),
    batch_size: int = typer.Option(64, min=1, help="Images per optimisation step."),
    lr: float = typer.Option(2e-3, min=0.0, help="Adam learning rate (decays 3% per epoch)."),
    l2: float = typer.Option(DEFAULT_BACKGROUND_L2, "--l2", "--background-l2", min=0.0,
                             help="L2 penalty (Adam weight decay), as in Ren et al."),
    max_images: int | None = typer.Option(None, min=1, help="Train on at most this many "
                                                           "images (a quicker CPU run)."),
    fpr: float | None = typer.Option(None, help="Target false-positive rate of the new "
                                                "thresholds \\[default: the bundle's]."),
    seed: int | None = typer.Option(None, help="Seed for weights, mutations and splits "
                                               "\\[default: the main model's]."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue an interrupted run from its last checkpoint."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    download: bool = typer.Option(False, "--download",
                                  help="Let torchvision download the data set if missing."),
) -> None:
    """Add the likelihood-ratio background model to an existing bundle (score llr).

    Trains a PixelCNN on the bundle's training split with every sub-pixel replaced by a
    random level with probability --mutation-rate (Ren et al. 2019), stores it in the same
    bundle (weights under 'background.' in model.safetensors, its config under
    'background' in config.json) and recalibrates every score kind on the calibration
    split. The main model is not touched.

    [bold]Examples[/]

      pixeldefend train-background --model models/digits

      pixeldefend train-background --model models/fashion-mnist --max-images 10000 --epochs 3
    """
    from ..data import resolve, training_splits
    from ..detector import DensityDetector
    from ..outputs import check_checkpoint_dir, prepare_dir
    from ..train import CHECKPOINT_FILES, TrainSettings, remove_checkpoint

    prepare_dir(model, command="train-background", bundle=True, overwrite=True,
                option="--model")  # the bundle is rewritten whole: it may hold nothing else
    detector = DensityDetector.load(model, device=device)
    recorded = detector.meta.get("data") or {}
    data = data or recorded.get("spec")
    if not data:
        raise UsageError(f"{model} does not record its training data: pass --data")
    if fpr is None:
        cal = detector.calibration
        fpr = cal.fpr if cal is not None else 0.05
    if not 0.0 < fpr < 1.0:
        raise UsageError(f"--fpr must be between 0 and 1, got {fpr}")
    if seed is None:
        seed = int(((detector.meta.get("training") or {}).get("settings") or {}).get("seed", 0))
    splits = training_splits(data, data_root, download, seed)
    expect = detector.spec
    train_set = resolve(splits["train"], expect, data_root, download).head(max_images)
    val_set = resolve(splits["val"], expect, data_root, download)
    calib_set = resolve(splits["calib"], expect, data_root, download)
    check_calibration_size(len(calib_set), fpr, False)
    checkpoint = model.with_name(model.name + ".background.checkpoint")
    check_checkpoint_dir(checkpoint, CHECKPOINT_FILES)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             patience=patience, weight_decay=l2)
    start = time.perf_counter()
    train_background_model(detector, train_set, val_set, mutation_rate=mutation_rate,
                           preset=preset, settings=settings, checkpoint=checkpoint,
                           resume=resume)
    seconds = time.perf_counter() - start
    detector.background_meta["train_seconds"] = round(seconds, 1)
    detector.background_meta["data"] = {"train": train_set.source, "n_train": len(train_set)}
    detector.calibrate_all(calib_set, fpr=fpr, data=calib_set.source)
    detector.save(model)
    remove_checkpoint(checkpoint)
    err_console.print(f"wrote bundle {model} (background model added, {seconds:.0f} s)",
                      highlight=False)
    print_calibrations(detector, [k for k in detector.available_kinds
                                  if k in detector.calibrations], len(calib_set),
                       calib_set.source)


@app.command()
@handle_errors
def calibrate(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model bundle directory."),
    data: str | None = typer.Option(
        None, "--data", "-d",
        help="Clean held-out images \\[default: the bundle's own calibration split]."),
    fpr: float = typer.Option(0.05, help="Target false-positive rate on clean images."),
    score: str | None = typer.Option(
        None, "--score", help=SCORE_OPTION_HELP + " Calibrates this kind and makes it the "
        "bundle's default \\[default: recalibrate every available kind, keep the default]."),
    conservative_threshold: bool = typer.Option(
        False, "--conservative-threshold", help=CONSERVATIVE_HELP),
    skip_unreadable: bool = typer.Option(
        False, "--skip-unreadable", help="Calibrate on the readable files even if some "
        "cannot be used (they are listed); without it they are an error."),
    batch_size: int = typer.Option(256, min=1),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resize: bool = typer.Option(False, "--resize", help="Resize images to the model's size."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Convert colour/gray to match."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
) -> None:
    """Recompute thresholds on clean images and store them in the bundle (atomically).

    Each score kind gets its own threshold and clean calibration scores (conformal
    p-values); `typicality` also stores the clean bits/dim its batch test resamples;
    `dose` fits its statistics density on a seeded half of the images and sets its
    threshold on the other half (split conformal).

    [bold]Examples[/]

      pixeldefend calibrate --model models/digits --fpr 0.01

      pixeldefend calibrate --model models/mine --data clean_holdout/ --fpr 0.05

      pixeldefend calibrate --model models/digits --score complexity  [dim]# new default[/]
    """
    from ..data import load_images, refuse_unreadable
    from ..detector import DensityDetector

    if score is not None:
        check_score_kind(score)
    if not 0.0 < fpr < 1.0:
        raise UsageError(f"--fpr must be between 0 and 1 (exclusive), got {fpr}")
    detector = DensityDetector.load(model, device=device, batch_size=batch_size,
                                    ignore_bad_calibration=True)
    if "calibration_error" in detector.meta:
        err_console.print(f"[yellow]warning[/]: replacing the invalid calibration.json of "
                          f"{model} ({detector.meta.pop('calibration_error')})",
                          highlight=False)
    if score is not None:
        detector.check_kind(score)
    if data is None:
        data = (detector.meta.get("data") or {}).get("calib")
        if not data:
            raise UsageError("the bundle does not record its calibration data: pass --data")
    images = load_images(data, detector.spec, data_root=data_root, resize=resize,
                         grayscale=grayscale)
    refuse_unreadable(images, "calibration", skip_unreadable)
    report_skipped(images)
    if score is not None:
        detector.calibrate(images, fpr=fpr, kind=score, data=images.source,
                           conservative=conservative_threshold)
        kinds = [score]
    else:
        kinds = list(detector.calibrate_all(images, fpr=fpr, data=images.source,
                                            conservative=conservative_threshold))
        fall_back_if_uncalibrated(detector, len(images))
    detector.save_calibration(model)
    headline = detector.default_kind if detector.default_kind in kinds else kinds[0]
    cal = detector.calibrations[headline]
    out_console.print(
        f"threshold {cal.threshold:.4f} {cal.unit} ({cal.kind}) at FPR {fpr:g} from {cal.n} "
        f"images of {images.source}; written to {model}/calibration.json", highlight=False)
    print_calibrations(detector, kinds, cal.n, images.source)


GATE_CHOICES = ("none", "anomalous")


@app.command()
@handle_errors
def score(
    paths: list[str] = typer.Argument(..., help="Images, folders, .npz/.npy files or built-in "
                                               "data specs such as digits:test."),
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model bundle directory."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write results here."),
    fail_on: str = typer.Option("none", help="Gate: 'anomalous' exits 1 if any image is flagged."),
    max_anomalous_fraction: float | None = typer.Option(
        None, help="Gate: exit 1 if more than this fraction of images is flagged."),
    junit: Path | None = typer.Option(
        None, help="Write JUnit XML: one test case per input plus a 'gate' case; it has a "
        "failure or error exactly when the exit code is not 0."),
    skip_unreadable: bool = typer.Option(
        False, "--skip-unreadable", help="Let unreadable inputs (corrupt, wrong size, "
        "unsupported files) pass the gate; they are still listed as error rows and counted "
        "as skipped. Without it any unreadable input fails a gate (exit 1), or exits 2 "
        "when no gate is set."),
    score_kind: str | None = typer.Option(
        None, "--score", help=SCORE_OPTION_HELP + " \\[default: the bundle's]"),
    batch_test: bool = typer.Option(
        False, "--batch-test", help="Also test the whole batch for typicality (Nalisnick et "
        "al. 2019): is its mean bits/dim consistent with clean data? Then --fail-on "
        "anomalous gates on the batch verdict instead of single images."),
    resamples: int = typer.Option(1000, min=10, help="Bootstrap resamples of --batch-test."),
    seed: int = typer.Option(0, help="Seed of the --batch-test bootstrap."),
    heatmap: Path | None = typer.Option(
        None, "--heatmap", help="Write, for each flagged image, a PNG of the image next to "
        "its per-pixel NLL heat map into this folder (<input name>.heatmap.png)."),
    batch_size: int = typer.Option(256, min=1),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resize: bool = typer.Option(False, "--resize", help="Resize images to the model's size."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Convert colour/gray to match."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Score images: bits/dim, log-likelihood, score, conformal p-value and a verdict.

    Verdicts: clean, anomalous (score above the calibrated threshold) or error (the file
    could not be read, or its score is NaN/infinite; the rest are still scored). Exit
    codes: 0 pass, 1 a gate failed (an unscored input fails a gate unless
    --skip-unreadable), 2 bad usage, or an unreadable input when no gate is set. Folder
    scans read image and array files; hidden entries are ignored and counted, every other
    file is an error row. JSONL and CSV rows are written as they are scored.

    [bold]Examples[/]

      pixeldefend score data/samples --model models/digits

      pixeldefend score incoming/ --fail-on anomalous --junit report.xml

      pixeldefend score incoming/ --max-anomalous-fraction 0.1 --format json -o scores.json

      pixeldefend score incoming/ --score complexity --heatmap heatmaps/

      pixeldefend score incoming/ --batch-test --fail-on anomalous  [dim]# whole-set gate[/]
    """
    import numpy as np

    from .. import reporting
    from ..data import ImageStream
    from ..detector import DensityDetector
    from ..gate import GatePolicy, JUnitWriter, Tally, decide
    from ..outputs import OutputError, check_files, clear_dir, input_paths, prepare_dir

    if fail_on not in GATE_CHOICES:
        raise UsageError(f"--fail-on must be one of {', '.join(GATE_CHOICES)}, not {fail_on!r}")
    if max_anomalous_fraction is not None and not 0.0 <= max_anomalous_fraction <= 1.0:
        raise UsageError("--max-anomalous-fraction must be between 0 and 1")
    if score_kind is not None:
        check_score_kind(score_kind)
    inputs = input_paths(paths, model)
    check_files((output, "--output"), (junit, "--junit"), inputs=inputs, overwrite=overwrite)
    heatmap_dir = None if heatmap is None else prepare_dir(
        heatmap, command="score --heatmap", inputs=inputs, overwrite=overwrite,
        option="--heatmap")
    detector = DensityDetector.load(model, device=device, batch_size=batch_size)
    kind = detector.check_kind(score_kind or detector.default_kind)
    if kind == "typicality":
        detector.typicality_reference()  # a clear error now rather than per batch
    cal = detector.calibrations.get(kind)
    image_gate = (fail_on != "none" and not batch_test) or max_anomalous_fraction is not None
    if cal is None and image_gate:
        raise UsageError(f"{model} has no calibration for {kind!r}: run `pixeldefend calibrate`")
    if batch_test and not ({"bpd", "typicality"} & set(detector.calibrations)):
        raise UsageError(f"--batch-test: {model} has no clean calibration bits/dim: run "
                         "`pixeldefend calibrate`")
    stream = ImageStream(paths, detector.spec, resize=resize, grayscale=grayscale,
                         data_root=data_root)
    if len(stream) == 0:
        raise UsageError(f"no images found in {', '.join(paths)}")
    policy = GatePolicy(fail_on_anomalous=fail_on == "anomalous",
                        max_anomalous_fraction=max_anomalous_fraction, batch_test=batch_test,
                        skip_unreadable=skip_unreadable)
    tally = Tally()
    streaming = fmt in (OutputFormat.jsonl, OutputFormat.csv)
    results: list[dict[str, Any]] = []  # kept only for table / json output
    bpd_values = array("d")  # for --batch-test only
    taken: set[str] = set()
    if heatmap_dir is not None:
        clear_dir(heatmap_dir)
        heatmap_dir.mark()
    junit_writer = JUnitWriter(junit, kind, policy) if junit is not None else None
    with contextlib.ExitStack() as stack:
        rows_out = stack.enter_context(RowStream(fmt, reporting.SCORE_COLUMNS, output)) \
            if streaming else None
        progress = stack.enter_context(make_progress())
        task = progress.add_task("score", total=len(stream), status="")
        for batch in stream.batches(batch_size):
            rows = reporting.score_rows(detector, batch, kind)
            if heatmap is not None:
                write_heatmaps(detector, batch, rows, kind, heatmap, taken)
            for row in rows:
                tally.add(row)
                if junit_writer is not None:
                    junit_writer.add(row)
                if batch_test and row["verdict"] in ("clean", "anomalous", "uncalibrated"):
                    bpd_values.append(row["bits_per_dim"])
            if rows_out is not None:
                rows_out.write(rows)
            else:
                results.extend(rows)
            progress.update(task, advance=len(batch.names), status="")
        doc = reporting.score_document([], model, cal, kind)
        doc["results"] = results
        doc["summary"] = tally.summary(policy, stream.hidden)
        batch_anomalous, batch_reason, batch_line = None, "", ""
        if batch_test:
            doc["batch_test"] = None
            if len(bpd_values):
                test = detector.batch_test(bpd=np.asarray(bpd_values), resamples=resamples,
                                           seed=seed)
                doc["batch_test"] = reporting.batch_test_entry(test)
                batch_line = reporting.batch_test_line(doc["batch_test"])
                if fmt != OutputFormat.table or output is not None:  # else in the caption
                    err_console.print(batch_line, highlight=False)
                batch_anomalous = test.anomalous
                batch_reason = (f"batch is atypical (p-value {test.p_value:.4f} <= "
                                f"{test.alpha:g})")
        result = decide(tally, policy, batch_anomalous, batch_reason)
        doc["gate"] = result.to_dict()
        if not streaming:
            emit(fmt, doc, results, reporting.SCORE_COLUMNS,
                 lambda: reporting.score_table(doc), output)
    if junit_writer is not None:
        try:
            junit_writer.close(result, doc.get("batch_test"), batch_line)
        except OSError as exc:  # checked up front; a disk that filled up since
            raise OutputError(f"cannot write {junit}: {exc.strerror or exc}") from None
        err_console.print(f"wrote {junit}", highlight=False)
    summary = doc["summary"]
    extra = []
    if tally.invalid:
        extra.append(f"{tally.invalid} with a non-finite score")
    if skip_unreadable and tally.unreadable:
        extra.append(f"{tally.unreadable} unreadable skipped by --skip-unreadable")
    if stream.hidden:
        extra.append(f"{stream.hidden} hidden file(s)/folder(s) ignored")
    err_console.print(
        f"{summary['n']} input(s): {summary['clean']} clean, {summary['anomalous']} "
        f"anomalous, {summary['errors']} error(s)"
        + (f" ({'; '.join(extra)})" if extra else "")
        + (f"; gate failed: {'; '.join(result.reasons)}" if result.failed else
           ("; gate passed" if policy.active else "")), highlight=False)
    if result.exit_code == EXIT_USAGE:
        err_console.print("some inputs could not be scored (see the error rows); pass "
                          "--skip-unreadable to accept unreadable ones", highlight=False)
    raise typer.Exit(result.exit_code)


def write_heatmaps(detector: DensityDetector, batch: Batch, rows: list[dict[str, Any]],
                   kind: str, folder: Path, taken: set[str]) -> None:
    """A heat map PNG for every flagged image of the batch; its path goes into the row."""
    from ..localise import heatmap_name, write_heatmap

    readable = [r for r in rows if r.get("error_kind") != "read"]  # rows with an image
    flagged = [k for k, r in enumerate(readable) if r["verdict"] == "anomalous"]
    for r in rows:
        r["heatmap"] = None
    if not flagged:
        return
    images = batch.images[flagged]
    local = None
    if "dose" in detector.calibrations:  # the local-anomaly map (localise.py)
        from ..localise import local_map

        run = detector.model_pass(images)
        nll, local = run.nll, local_map(run, detector.dose_model())
    else:
        nll = detector.nll_map(images)
    for j, k in enumerate(flagged):
        r = readable[k]
        path = folder / heatmap_name(r["path"], taken)
        p = r["p_value"]
        title = (f"{r['path']}\nbits/dim {r['bits_per_dim']:.3f}"
                 + (f"   {kind} {r['score']:.3f}" if kind != "bpd" else "")
                 + (f"   p-value {p:.3f}" if p is not None else ""))
        write_heatmap(path, images[j], detector.spec.levels, nll[j], title,
                      None if local is None else local[j])
        r["heatmap"] = str(path)


@app.command()
@handle_errors
def info(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model bundle directory."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f",
                                     help="table or json."),
) -> None:
    """Show a bundle: architecture, data, metrics and calibration.

    [bold]Example[/]

      pixeldefend info --model models/digits --format json
    """
    from .. import reporting
    from ..detector import DensityDetector

    detector = DensityDetector.load(model, device="cpu")
    doc = reporting.info_document(detector, model)
    emit(fmt, doc, [doc], list(doc), lambda: reporting.info_table(doc))


@app.command()
@handle_errors
def sample(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model bundle directory."),
    n: int = typer.Option(16, "-n", min=1, max=4096, help="Number of images to draw."),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid to write."),
    npz: Path | None = typer.Option(None, help="Also write the samples exactly as .npz."),
    temperature: float = typer.Option(1.0, min=0.01, help="Softmax temperature (<1: tamer)."),
    scale: int = typer.Option(0, min=0, help="Pixel zoom of the grid \\[default: fit ~256 px]."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    overwrite: bool = OVERWRITE,
) -> None:
    """Draw images from the model and save them as a PNG grid a person can look at.

    [bold]Example[/]

      pixeldefend sample --model models/digits -n 16 --out grid.png
    """
    import numpy as np
    import torch

    from ..data import image_grid, save_npz
    from ..detector import DensityDetector
    from ..outputs import check_files, input_paths
    from ..purify import sample as fast_sample

    check_files((out, "--out"), (npz, "--npz"), inputs=input_paths(model),
                overwrite=overwrite)
    detector = DensityDetector.load(model, device=device)
    generator = torch.Generator().manual_seed(seed)
    with make_progress() as progress:  # the cached decoder reports once per image row
        task = progress.add_task("sample", total=detector.spec.height, status="")
        images = fast_sample(detector.model, n, generator=generator, temperature=temperature,
                             batch_size=n, progress=lambda: progress.update(task, advance=1))
    spec = detector.spec
    zoom = scale or max(1, 256 // (int(np.ceil(np.sqrt(n))) * (spec.width + 1)))
    grid = image_grid(images, spec.levels, scale=zoom)
    from PIL import Image

    from ..atomic import atomic_path

    with atomic_path(out, suffix=".png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    if npz is not None:
        save_npz(npz, images, spec.levels)
    bpd = detector.anomaly_score(images, "bpd")
    out_console.print(f"wrote {out} ({n} samples, mean {bpd.mean():.3f} bits/dim)",
                      highlight=False)
