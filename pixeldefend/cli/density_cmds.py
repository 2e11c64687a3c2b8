"""`train`, `calibrate`, `score`, `info` and `sample`: the density core of the CLI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from .. import reporting
from ..data import ImageStream, load_images, parse_builtin, resolve, split_slice, training_splits
from ..detector import DensityDetector
from ..errors import UsageError
from ..models.pixelcnn import PRESETS
from ..train import TrainSettings, remove_checkpoint
from .app import app
from .common import (
    DEVICE_HELP,
    EXIT_GATE,
    EXIT_OK,
    EXIT_USAGE,
    FORMAT_HELP,
    OutputFormat,
    emit,
    err_console,
    fmt_float,
    handle_errors,
    make_progress,
    out_console,
)

DEFAULT_MODEL = Path("models/digits")


class RichTrainProgress:
    """Renders the training loop's reports as a Rich progress bar with loss and bits/dim."""

    def __init__(self, label: str = "train") -> None:
        self.progress = make_progress()
        self.label = label
        self.task: Any = None
        self.last_val = float("nan")

    def __enter__(self) -> RichTrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start(self, total_epochs: int, batches_per_epoch: int, first_epoch: int) -> None:
        self.task = self.progress.add_task(
            self.label, total=total_epochs * batches_per_epoch,
            completed=first_epoch * batches_per_epoch, status="")
        self.epochs = total_epochs

    def batch(self, loss: float) -> None:
        self.progress.update(self.task, advance=1,
                             status=f"loss {loss:.3f} bits/dim  val {self.last_val:.3f}")

    def epoch(self, epoch: int, train_metric: float, val_metric: float, best: bool) -> None:
        self.last_val = val_metric
        mark = " *" if best else ""
        err_console.print(
            f"epoch {epoch + 1:>3}/{self.epochs}  train {train_metric:.4f}  "
            f"val {val_metric:.4f} bits/dim{mark}", highlight=False)


def default_out(data: str) -> Path:
    parsed = parse_builtin(split_slice(data)[0])
    name = parsed[0] if parsed else Path(data.rstrip("/")).stem or "model"
    return Path("models") / name


@app.command()
@handle_errors
def train(
    data: str = typer.Option("digits", "--data", "-d",
                             help="Training images: digits, fashion-mnist, mnist, cifar10, a "
                                  "folder, or an .npz file."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Bundle directory [default: models/<data name>]."),
    preset: str = typer.Option("small", help=f"Model size: {', '.join(PRESETS)}."),
    dropout: float = typer.Option(0.0, min=0.0, max=0.9,
                                  help="Dropout on the gated units (helps on small data)."),
    epochs: int = typer.Option(40, min=1, help="Maximum training epochs."),
    patience: int = typer.Option(8, min=0, help="Stop after this many epochs without a better "
                                                "validation bits/dim (0: never stop early)."),
    batch_size: int = typer.Option(64, min=1, help="Images per optimisation step."),
    lr: float = typer.Option(2e-3, min=0.0, help="Adam learning rate (decays 3% per epoch)."),
    fpr: float = typer.Option(0.05, help="Target false-positive rate of the threshold."),
    seed: int = typer.Option(0, help="Seed for weights, shuffling and splits."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue an interrupted run from its last checkpoint."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    download: bool = typer.Option(False, "--download",
                                  help="Let torchvision download the data set if missing."),
) -> None:
    """Train a PixelCNN on clean images, calibrate its threshold and write a bundle.

    Holds out validation and calibration images, checkpoints every epoch (Ctrl-C loses at
    most one epoch; continue with --resume), keeps the weights with the best validation
    bits/dim, and prints test bits/dim at the end.

    [bold]Examples[/]

      pixeldefend train                                  [dim]# digits -> models/digits[/]

      pixeldefend train --data fashion-mnist --epochs 5  [dim]# -> models/fashion-mnist[/]

      pixeldefend train --data fashion-mnist --resume    [dim]# after an interruption[/]
    """
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    if not 0.0 < fpr < 1.0:
        raise UsageError(f"--fpr must be between 0 and 1, got {fpr}")
    out = out or default_out(data)
    checkpoint = out.with_name(out.name + ".checkpoint")
    splits = training_splits(data, data_root, download, seed)
    train_set = resolve(splits["train"], None, data_root, download)
    expect = train_set.spec
    val_set = resolve(splits["val"], expect, data_root, download)
    calib_set = resolve(splits["calib"], expect, data_root, download)
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
    cal = detector.calibrate(calib_set, fpr=fpr, data=calib_set.source)
    metrics: dict[str, Any] = {"val_bits_per_dim": detector.meta["training"]["val_bits_per_dim"],
                               "train_seconds": round(seconds, 1)}
    if test_set is not None:
        metrics["test_bits_per_dim"] = float(detector.score_samples(test_set).mean())
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
    err_console.print(f"wrote bundle {out}", highlight=False)
    test = metrics.get("test_bits_per_dim")
    out_console.print(
        f"test bits/dim {fmt_float(test, 4)}  (validation {metrics['val_bits_per_dim']:.4f}); "
        f"threshold {cal.threshold:.4f} bits/dim at FPR {fpr:g} from {cal.n} calibration "
        f"images; {seconds:.0f} s", highlight=False)


@app.command()
@handle_errors
def calibrate(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model bundle directory."),
    data: str | None = typer.Option(
        None, "--data", "-d",
        help="Clean held-out images [default: the bundle's own calibration split]."),
    fpr: float = typer.Option(0.05, help="Target false-positive rate on clean images."),
    score: str | None = typer.Option(None, "--score", help="Score kind [default: bundle's]."),
    batch_size: int = typer.Option(256, min=1),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resize: bool = typer.Option(False, "--resize", help="Resize images to the model's size."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Convert colour/gray to match."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
) -> None:
    """Recompute the threshold on clean images and store it in the bundle (atomically).

    [bold]Examples[/]

      pixeldefend calibrate --model models/digits --fpr 0.01

      pixeldefend calibrate --model models/mine --data clean_holdout/ --fpr 0.05
    """
    detector = DensityDetector.load(model, device=device, batch_size=batch_size)
    if data is None:
        data = (detector.meta.get("data") or {}).get("calib")
        if not data:
            raise UsageError("the bundle does not record its calibration data: pass --data")
    images = load_images(data, detector.spec, data_root=data_root, resize=resize,
                         grayscale=grayscale)
    for name, error in images.errors:
        err_console.print(f"[yellow]skipped[/] {name}: {error}", highlight=False)
    cal = detector.calibrate(images, fpr=fpr, kind=score, data=images.source)
    detector.save_calibration(model)
    out_console.print(
        f"threshold {cal.threshold:.4f} {cal.unit} ({cal.kind}) at FPR {fpr:g} from {cal.n} "
        f"images of {images.source}; written to {model}/calibration.json", highlight=False)


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
    junit: Path | None = typer.Option(None, help="Write JUnit XML (one test case per image)."),
    score_kind: str | None = typer.Option(None, "--score", help="Score kind [default: bundle's]."),
    batch_size: int = typer.Option(256, min=1),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resize: bool = typer.Option(False, "--resize", help="Resize images to the model's size."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Convert colour/gray to match."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
) -> None:
    """Score images: bits/dim, log-likelihood, conformal p-value and a verdict.

    Verdicts: clean, anomalous (score above the calibrated threshold) or error (the file
    could not be read; the rest are still scored). Exit codes: 0 pass, 1 a gate failed,
    2 bad usage or an unreadable input.

    [bold]Examples[/]

      pixeldefend score data/samples --model models/digits

      pixeldefend score incoming/ --fail-on anomalous --junit report.xml

      pixeldefend score incoming/ --max-anomalous-fraction 0.1 --format json -o scores.json
    """
    if fail_on not in GATE_CHOICES:
        raise UsageError(f"--fail-on must be one of {', '.join(GATE_CHOICES)}, not {fail_on!r}")
    if max_anomalous_fraction is not None and not 0.0 <= max_anomalous_fraction <= 1.0:
        raise UsageError("--max-anomalous-fraction must be between 0 and 1")
    detector = DensityDetector.load(model, device=device, batch_size=batch_size)
    kind = score_kind or detector.default_kind
    cal = detector.calibrations.get(kind)
    if cal is None and (fail_on != "none" or max_anomalous_fraction is not None):
        raise UsageError(f"{model} has no calibration for {kind!r}: run `pixeldefend calibrate`")
    stream = ImageStream(paths, detector.spec, resize=resize, grayscale=grayscale,
                         data_root=data_root)
    if len(stream) == 0:
        raise UsageError(f"no images found in {', '.join(paths)}")
    results: list[dict[str, Any]] = []
    with make_progress() as progress:
        task = progress.add_task("score", total=len(stream), status="")
        for batch in stream.batches(batch_size):
            rows = reporting.score_rows(detector, batch, kind)
            results.extend(rows)
            progress.update(task, advance=len(batch.names), status="")
    doc = reporting.score_document(results, model, cal, kind)
    summary = doc["summary"]
    gate_failed = False
    reasons = []
    if fail_on == "anomalous" and summary["anomalous"] > 0:
        gate_failed = True
        reasons.append(f"{summary['anomalous']} anomalous image(s)")
    scored = summary["clean"] + summary["anomalous"]
    if max_anomalous_fraction is not None and scored:
        fraction = summary["anomalous"] / scored
        if fraction > max_anomalous_fraction:
            gate_failed = True
            reasons.append(f"anomalous fraction {fraction:.3f} > {max_anomalous_fraction:g}")
    doc["gate"] = {"failed": gate_failed, "reasons": reasons}
    emit(fmt, doc, results, reporting.SCORE_COLUMNS,
         lambda: reporting.score_table(doc), output)
    if junit is not None:
        reporting.write_junit(junit, results, kind)
        err_console.print(f"wrote {junit}", highlight=False)
    err_console.print(
        f"{summary['n']} image(s): {summary['clean']} clean, {summary['anomalous']} anomalous, "
        f"{summary['errors']} error(s)" + (f"; gate failed: {', '.join(reasons)}" if reasons
                                           else ""), highlight=False)
    if summary["errors"]:
        raise typer.Exit(EXIT_USAGE)
    raise typer.Exit(EXIT_GATE if gate_failed else EXIT_OK)


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
    scale: int = typer.Option(0, min=0, help="Pixel zoom of the grid [default: fit ~256 px]."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Draw images from the model and save them as a PNG grid a person can look at.

    [bold]Example[/]

      pixeldefend sample --model models/digits -n 16 --out grid.png
    """
    import torch

    from ..data import image_grid, save_npz
    from ..sampling import draw_samples

    detector = DensityDetector.load(model, device=device)
    generator = torch.Generator().manual_seed(seed)
    with make_progress() as progress:
        task = progress.add_task("sample", total=detector.spec.height, status="")
        images = draw_samples(detector.model, n, generator=generator, temperature=temperature,
                              progress=lambda: progress.update(task, advance=1))
    spec = detector.spec
    zoom = scale or max(1, 256 // (int(np.ceil(np.sqrt(n))) * (spec.width + 1)))
    grid = image_grid(images, spec.levels, scale=zoom)
    from PIL import Image

    from ..atomic import atomic_path

    with atomic_path(out, suffix=".png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    if npz is not None:
        save_npz(npz, images, spec.levels)
    bpd = detector.score_samples(images)
    out_console.print(f"wrote {out} ({n} samples, mean {bpd.mean():.3f} bits/dim)",
                      highlight=False)
