"""`train`, `train-background`, `calibrate`, `score`, `info` and `sample`: the density core
of the CLI. The pipelines live in the library (`training_pipeline`, `scoring`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..defaults import DEFAULT_BACKGROUND_L2, DEFAULT_MODEL, DEFAULT_MUTATION_RATE, DEFAULT_SCORE
from ..defaults import PIXELCNN_PRESETS as PRESETS
from .app import app
from .common import (
    EXIT_USAGE,
    SCORE_OPTION_HELP,
    DataRoot,
    Device,
    Download,
    Format,
    GateChoice,
    Grayscale,
    ImagePaths,
    ModelBundle,
    OutputFormat,
    Overwrite,
    Precision,
    PrecisionChoice,
    Resize,
    RichTrainProgress,
    RowStream,
    ScoreChoice,
    StdoutFormat,
    Threads,
    emit,
    err_console,
    field_rows,
    flag,
    fmt_float,
    handle_errors,
    make_progress,
    out_console,
)

if TYPE_CHECKING:
    from ..detector import DensityDetector
    from ..scoring import ScoreRun

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


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning[/]: {message}", highlight=False)


def log(message: str) -> None:
    err_console.print(message, highlight=False)


def _quiet(_message: str) -> None:
    """The log of torchrun's ranks other than 0: one rank speaks for the job."""


def report_skipped(errors: list[tuple[str, str]]) -> None:
    """List the files --skip-unreadable left out (the library refuses them otherwise)."""
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
            warn(f"{kind}: only {cal.n} calibration images for FPR {cal.fpr:g} (needs "
                 f"{min_calibration_images(cal.fpr)}): the threshold is the largest clean "
                 f"score, {cal.threshold:.4f}; its false-positive rate is not guaranteed "
                 "(--conservative-threshold)")
    err_console.print(f"calibrated {', '.join(kinds)} on {n} clean images of {source}",
                      highlight=False)


def calibrated_kinds(detector: DensityDetector) -> list[str]:
    return [k for k in detector.available_kinds if k in detector.calibrations]


def interrupted(checkpoint: Path) -> None:
    err_console.print(f"[yellow]interrupted[/]: continue with the same command plus "
                      f"--resume (checkpoint in {checkpoint})")


def default_out(data: str) -> Path:
    """runs/<data name> (see `training_pipeline.default_out`)."""
    from ..training_pipeline import default_out as library_default_out

    return library_default_out(data)


Resume = Annotated[bool, flag("--resume",
                              help="Continue an interrupted run from its last checkpoint.")]
Conservative = Annotated[bool, flag("--conservative-threshold", help=CONSERVATIVE_HELP)]


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
    lr: float = typer.Option(2e-3, min=0.0, help="Adam learning rate (see --lr-decay)."),
    lr_decay: float = typer.Option(0.97, min=0.0, max=1.0, help="Factor applied to the "
                                   "learning rate after every epoch."),
    max_minutes: float | None = typer.Option(
        None, min=0.0, help="Wall-clock budget for training the model: no epoch starts "
        "that would end past it (at the pace of the slowest so far); the best weights are "
        "kept, calibrated and written. Counted across --resume."),
    fpr: float = typer.Option(0.05, help="Target false-positive rate of the threshold."),
    max_images: int | None = typer.Option(None, min=1, help="Train on at most this many "
                                                           "images (a quicker CPU run)."),
    seed: int = typer.Option(0, help="Seed for weights, shuffling and splits."),
    skip_unreadable: Annotated[bool, flag(
        "--skip-unreadable", help="Train on the readable files of a folder even if "
        "some cannot be used (corrupt, or a different size than the first image); they are "
        "listed. Without it such files are an error.")] = False,
    conservative_threshold: Conservative = False,
    score_kind: ScoreChoice = typer.Option(
        DEFAULT_SCORE, "--score", help=SCORE_OPTION_HELP + " Every available kind is "
        "calibrated; this one is the default."),
    background: Annotated[bool, flag("--background", help="Also train the background model of the "
                            "llr score and store it in the bundle.")] = False,
    mutation_rate: float = typer.Option(DEFAULT_MUTATION_RATE, help=MUTATION_HELP),
    background_preset: str | None = typer.Option(None, help=BACKGROUND_PRESET_HELP),
    background_epochs: int | None = typer.Option(
        None, min=1, help="Background model epochs \\[default: --epochs]."),
    background_l2: float = typer.Option(DEFAULT_BACKGROUND_L2, min=0.0,
                                        help="L2 penalty (Adam weight decay) on the "
                                             "background model, as in Ren et al."),
    device: Device = "auto",
    precision: Precision = PrecisionChoice.fp32,
    resume: Resume = False,
    data_root: DataRoot = None,
    download: Download = False,
    overwrite: Overwrite = False,
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

      torchrun --nproc-per-node 4 -m pixeldefend train --data cifar10 --batch-size 256
      [dim]# data-parallel: --batch-size is the global batch (README "Scaling out")[/]
    """
    from ..distributed import is_main_process
    from ..training_pipeline import TrainJob, prepare_job, train_bundle

    job = TrainJob(
        data=data, out=out, preset=preset, dropout=dropout, epochs=epochs, patience=patience,
        batch_size=batch_size, lr=lr, lr_decay=lr_decay, max_minutes=max_minutes, fpr=fpr,
        max_images=max_images, seed=seed, skip_unreadable=skip_unreadable,
        conservative_threshold=conservative_threshold,
        score_kind=ScoreChoice(score_kind).value, background=background,
        mutation_rate=mutation_rate, background_preset=background_preset,
        background_epochs=background_epochs, background_l2=background_l2, device=device,
        precision=PrecisionChoice(precision).value, resume=resume, data_root=data_root,
        download=download, overwrite=overwrite)
    speak = is_main_process()
    training = prepare_job(job, log if speak else _quiet)
    if speak:
        report_skipped(training.skipped)
    try:
        result = train_bundle(job, training, log=log if speak else _quiet,
                              warn=warn if speak else _quiet, progress=RichTrainProgress)
    except KeyboardInterrupt:
        interrupted(job.checkpoint)
        raise
    if not result.wrote_bundle:
        return
    err_console.print(f"wrote bundle {job.bundle}", highlight=False)
    detector, metrics, calib = result.detector, result.metrics, training.calib
    cal = detector.calibrations["bpd"]
    out_console.print(
        f"test bits/dim {fmt_float(metrics.get('test_bits_per_dim'), 4)}  (validation "
        f"{metrics['val_bits_per_dim']:.4f}); threshold {cal.threshold:.4f} bits/dim at FPR "
        f"{fpr:g} from {cal.n} calibration images; {result.seconds:.0f} s", highlight=False)
    print_calibrations(detector, calibrated_kinds(detector), len(calib), calib.source)


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
    device: Device = "auto",
    precision: Precision = PrecisionChoice.fp32,
    resume: Resume = False,
    data_root: DataRoot = None,
    download: Download = False,
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
    from ..distributed import is_main_process
    from ..training_pipeline import add_background_model

    try:
        result = add_background_model(
            model, data=data, mutation_rate=mutation_rate, preset=preset, epochs=epochs,
            patience=patience, batch_size=batch_size, lr=lr, l2=l2, max_images=max_images,
            fpr=fpr, seed=seed, device=device, precision=PrecisionChoice(precision).value,
            resume=resume, data_root=data_root, download=download,
            log=log if is_main_process() else _quiet, progress=RichTrainProgress)
    except KeyboardInterrupt:
        interrupted(model.with_name(model.name + ".background.checkpoint"))
        raise
    if not result.wrote_bundle:
        return
    err_console.print(f"wrote bundle {model} (background model added, {result.seconds:.0f} s)",
                      highlight=False)
    calib = result.data.calib
    print_calibrations(result.detector, calibrated_kinds(result.detector), len(calib),
                       calib.source)


@app.command()
@handle_errors
def calibrate(
    model: ModelBundle = DEFAULT_MODEL,
    data: str | None = typer.Option(
        None, "--data", "-d",
        help="Clean held-out images \\[default: the bundle's own calibration split]."),
    fpr: float = typer.Option(0.05, help="Target false-positive rate on clean images."),
    score: ScoreChoice | None = typer.Option(
        None, "--score", help=SCORE_OPTION_HELP + " Calibrates this kind and makes it the "
        "bundle's default \\[default: recalibrate every available kind, keep the default]."),
    conservative_threshold: Conservative = False,
    skip_unreadable: Annotated[bool, flag(
        "--skip-unreadable", help="Calibrate on the readable files even if some "
        "cannot be used (they are listed); without it they are an error.")] = False,
    batch_size: int = typer.Option(256, min=1),
    device: Device = "auto",
    resize: Resize = False,
    grayscale: Grayscale = False,
    data_root: DataRoot = None,
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
    from ..training_pipeline import recalibrate_bundle

    done = recalibrate_bundle(
        model, data, fpr=fpr, kind=None if score is None else ScoreChoice(score).value,
        conservative=conservative_threshold, skip_unreadable=skip_unreadable,
        batch_size=batch_size, device=device, resize=resize, grayscale=grayscale,
        data_root=data_root, warn=warn)
    images = done.images
    report_skipped(images.errors)
    cal = done.detector.calibrations[done.headline]
    out_console.print(
        f"threshold {cal.threshold:.4f} {cal.unit} ({cal.kind}) at FPR {fpr:g} from {cal.n} "
        f"images of {images.source}; written to {model}/calibration.json", highlight=False)
    print_calibrations(done.detector, done.kinds, cal.n, images.source)


@app.command()
@handle_errors
def score(
    paths: ImagePaths,
    model: ModelBundle = DEFAULT_MODEL,
    fmt: Format = OutputFormat.table,
    output: Path | None = typer.Option(None, "--output", "-o", help="Write results here."),
    fail_on: GateChoice = typer.Option(
        GateChoice.none, help="Gate: 'anomalous' exits 1 if any image is flagged."),
    max_anomalous_fraction: float | None = typer.Option(
        None, min=0.0, max=1.0,
        help="Gate: exit 1 if more than this fraction of images is flagged."),
    junit: Path | None = typer.Option(
        None, help="Write JUnit XML: one test case per input plus a 'gate' case; it has a "
        "failure or error exactly when the exit code is not 0."),
    skip_unreadable: Annotated[bool, flag(
        "--skip-unreadable", help="Let unreadable inputs (corrupt, wrong size, "
        "unsupported files) pass the gate; they are still listed as error rows and counted "
        "as skipped. Without it any unreadable input fails a gate (exit 1), or exits 2 "
        "when no gate is set.")] = False,
    score_kind: ScoreChoice | None = typer.Option(
        None, "--score", help=SCORE_OPTION_HELP + " \\[default: the bundle's]"),
    batch_test: Annotated[bool, flag(
        "--batch-test", help="Also test the whole batch for typicality (Nalisnick et "
        "al. 2019): is its mean bits/dim consistent with clean data? Then --fail-on "
        "anomalous gates on the batch verdict instead of single images.")] = False,
    resamples: int = typer.Option(1000, min=10, help="Bootstrap resamples of --batch-test."),
    seed: int = typer.Option(0, help="Seed of the --batch-test bootstrap."),
    heatmap: Path | None = typer.Option(
        None, "--heatmap", help="Write, for each flagged image, a PNG of the image next to "
        "its per-pixel NLL heat map into this folder (<input name>.heatmap.png)."),
    batch_size: int = typer.Option(256, min=1),
    device: Device = "auto",
    precision: Precision = PrecisionChoice.fp32,
    threads: Threads = None,
    resize: Resize = False,
    grayscale: Grayscale = False,
    data_root: DataRoot = None,
    overwrite: Overwrite = False,
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
    from .. import reporting
    from ..detector import DensityDetector
    from ..gate import GatePolicy
    from ..outputs import check_files, clear_dir, input_paths, prepare_dir
    from ..precision import check_precision
    from ..scoring import score_inputs

    inputs = input_paths(paths, model)
    check_files((output, "--output"), (junit, "--junit"), inputs=inputs, overwrite=overwrite)
    heatmap_dir = None if heatmap is None else prepare_dir(
        heatmap, command="score --heatmap", inputs=inputs, overwrite=overwrite,
        option="--heatmap")
    detector = DensityDetector.load(model, device=device, batch_size=batch_size)
    detector.precision = check_precision(PrecisionChoice(precision).value, detector.device)
    policy = GatePolicy(fail_on_anomalous=fail_on == GateChoice.anomalous,
                        max_anomalous_fraction=max_anomalous_fraction, batch_test=batch_test,
                        skip_unreadable=skip_unreadable)
    streaming = fmt in (OutputFormat.jsonl, OutputFormat.csv)
    if heatmap_dir is not None:
        clear_dir(heatmap_dir)
        heatmap_dir.mark()
    with RowStream(fmt, reporting.SCORE_COLUMNS, output) if streaming else \
            contextlib.nullcontext() as rows_out, make_progress() as progress:
        task = progress.add_task("score", total=None, status="")
        run = score_inputs(
            detector, paths, policy, kind=None if score_kind is None else score_kind.value,
            model=model, batch_size=batch_size, resize=resize, grayscale=grayscale,
            data_root=data_root, heatmaps=heatmap, junit=junit, resamples=resamples, seed=seed,
            keep_rows=not streaming, on_rows=None if rows_out is None else rows_out.write,
            progress=lambda n: progress.update(task, advance=n),
            on_total=lambda n: progress.update(task, total=n))
        doc = run.document(model)
        if run.batch_line and (fmt != OutputFormat.table or output is not None):
            err_console.print(run.batch_line, highlight=False)  # else in the caption
        if not streaming:
            emit(fmt, doc, run.rows, reporting.SCORE_COLUMNS,
                 lambda: reporting.score_table(doc), output)
    if junit is not None:
        err_console.print(f"wrote {junit}", highlight=False)
    print_score_summary(run, skip_unreadable)
    raise typer.Exit(run.result.exit_code)


def print_score_summary(run: ScoreRun, skip_unreadable: bool) -> None:
    """One line on stderr: the counts and the gate's verdict."""
    summary, tally, result = run.summary, run.tally, run.result
    extra = []
    if tally.invalid:
        extra.append(f"{tally.invalid} with a non-finite score")
    if skip_unreadable and tally.unreadable:
        extra.append(f"{tally.unreadable} unreadable skipped by --skip-unreadable")
    if run.hidden:
        extra.append(f"{run.hidden} hidden file(s)/folder(s) ignored")
    err_console.print(
        f"{summary['n']} input(s): {summary['clean']} clean, {summary['anomalous']} "
        f"anomalous, {summary['errors']} error(s)"
        + (f" ({'; '.join(extra)})" if extra else "")
        + (f"; gate failed: {'; '.join(result.reasons)}" if result.failed else
           ("; gate passed" if run.policy.active else "")), highlight=False)
    if result.exit_code == EXIT_USAGE:
        err_console.print("some inputs could not be scored (see the error rows); pass "
                          "--skip-unreadable to accept unreadable ones", highlight=False)


@app.command()
@handle_errors
def info(
    model: ModelBundle = DEFAULT_MODEL,
    fmt: StdoutFormat = OutputFormat.table,
) -> None:
    """Show a bundle: architecture, data, metrics and calibration.

    [bold]Example[/]

      pixeldefend info --model models/digits --format json
    """
    from .. import reporting
    from ..detector import DensityDetector

    detector = DensityDetector.load(model, device="cpu")
    doc = reporting.info_document(detector, model)
    rows = field_rows(doc) if fmt == OutputFormat.csv else [doc]
    emit(fmt, doc, rows, ["field", "value"], lambda: reporting.info_table(doc))


@app.command()
@handle_errors
def sample(
    model: ModelBundle = DEFAULT_MODEL,
    n: int = typer.Option(16, "-n", min=1, max=4096, help="Number of images to draw."),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid to write."),
    npz: Path | None = typer.Option(None, help="Also write the samples exactly as .npz."),
    temperature: float = typer.Option(1.0, min=0.01, help="Softmax temperature (<1: tamer)."),
    scale: int = typer.Option(0, min=0, help="Pixel zoom of the grid \\[default: fit ~256 px]."),
    seed: int = typer.Option(0, help="Random seed."),
    device: Device = "auto",
    overwrite: Overwrite = False,
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
