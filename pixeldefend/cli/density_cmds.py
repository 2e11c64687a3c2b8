"""`train`, `train-background`, `calibrate`, `score`, `info` and `sample`: the density core
of the CLI. The pipelines live in the library (`training_pipeline`, `scoring`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..defaults import DEFAULT_BACKGROUND_L2, DEFAULT_MODEL, DEFAULT_MUTATION_RATE, DEFAULT_SCORE
from ..defaults import PIXELCNN_PRESETS as PRESETS
from . import common
from .app import app

if TYPE_CHECKING:
    from ..detector import DensityDetector

MutationRate = Annotated[float, typer.Option(help=(
    "Background model (score llr): probability that a sub-pixel of a training image is "
    "replaced by a uniformly random level. Ren et al. (2019) found 0.1-0.2 best; 0.2 wipes "
    "out shapes while keeping the local pixel statistics that confound raw likelihood, and "
    "suits short CPU training."))]
MaxImages = Annotated[int | None, typer.Option(
    min=1, help="Train on at most this many images (a quicker CPU run).")]
Conservative = Annotated[bool, common.flag("--conservative-threshold", help=(
    "When there are fewer clean calibration images than --fpr needs (about 1/fpr), use the "
    "largest calibration score as a finite threshold instead of stopping with an error; its "
    "false-positive rate is then not guaranteed, and this is printed and recorded."))]
Resamples = Annotated[int, typer.Option(min=10, help="Bootstrap resamples of --batch-test.")]
BootstrapSeed = Annotated[int, typer.Option(help="Seed of the --batch-test bootstrap.")]
BACKGROUND_PRESET_HELP = (
    "Background model size \\[default: same as the main model]. It only has to learn local "
    "statistics, so 'tiny' is a fair CPU saving on small images.")


def print_calibrations(detector: DensityDetector, kinds: list[str] | None = None,
                       n: int = 0, source: str = "") -> None:
    from ..rendering import calibration_lines

    lines, warnings, summary = calibration_lines(detector, kinds, n, source)
    for line in lines:
        common.out_console.print(line, highlight=False)
    for warning in warnings:
        common.warn(common.cli_text(warning))
    common.log(summary)


@app.command()
@common.handle_errors
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
    batch_size: common.StepBatch = 64,
    lr: float = typer.Option(2e-3, min=0.0, help="Adam learning rate (see --lr-decay)."),
    lr_decay: float = typer.Option(0.97, min=0.0, max=1.0, help="Factor applied to the "
                                   "learning rate after every epoch."),
    max_minutes: float | None = typer.Option(
        None, min=0.0, help="Wall-clock budget for training the model: no epoch starts "
        "that would end past it (at the pace of the slowest so far); the best weights are "
        "kept, calibrated and written. Counted across --resume."),
    fpr: float = typer.Option(0.05, help="Target false-positive rate of the threshold."),
    max_images: MaxImages = None,
    seed: int = typer.Option(0, help="Seed for weights, shuffling and splits."),
    skip_unreadable: Annotated[bool, common.flag(
        "--skip-unreadable", help="Train on the readable files of a folder even if "
        "some cannot be used (corrupt, or a different size than the first image); they are "
        "listed. Without it such files are an error.")] = False,
    conservative_threshold: Conservative = False,
    score_kind: common.ScoreChoice = typer.Option(
        DEFAULT_SCORE, "--score", help=common.SCORE_OPTION_HELP + " Every available kind is "
        "calibrated; this one is the default."),
    background: Annotated[bool, common.flag(
        "--background", help="Also train the background model of the llr score and store it "
        "in the bundle.")] = False,
    mutation_rate: MutationRate = DEFAULT_MUTATION_RATE,
    background_preset: str | None = typer.Option(None, help=BACKGROUND_PRESET_HELP),
    background_epochs: int | None = typer.Option(
        None, min=1, help="Background model epochs \\[default: --epochs]."),
    background_l2: float = typer.Option(DEFAULT_BACKGROUND_L2, min=0.0,
                                        help="L2 penalty (Adam weight decay) on the "
                                             "background model, as in Ren et al."),
    device: common.Device = "auto",
    precision: common.Precision = common.PrecisionChoice.fp32,
    compile_: common.Compile = False,
    resume: common.Resume = False,
    data_root: common.DataRoot = None,
    download: common.Download = False,
    overwrite: common.Overwrite = False,
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
    from ..rendering import train_line
    from ..training_pipeline import TrainJob, prepare_job, train_bundle

    job = TrainJob(
        data=data, out=out, preset=preset, dropout=dropout, epochs=epochs, patience=patience,
        batch_size=batch_size, lr=lr, lr_decay=lr_decay, max_minutes=max_minutes, fpr=fpr,
        max_images=max_images, seed=seed, skip_unreadable=skip_unreadable,
        conservative_threshold=conservative_threshold,
        score_kind=common.ScoreChoice(score_kind).value, background=background,
        mutation_rate=mutation_rate, background_preset=background_preset,
        background_epochs=background_epochs, background_l2=background_l2, device=device,
        precision=common.PrecisionChoice(precision).value, compile=compile_, resume=resume,
        data_root=data_root, download=download, overwrite=overwrite)
    training = prepare_job(job, common.log)
    common.report_skipped(training.skipped)
    try:
        result = train_bundle(job, training, log=common.log, warn=common.warn,
                              progress=common.RichTrainProgress)
    except KeyboardInterrupt:
        common.interrupted(job.checkpoint)
        raise
    if not result.wrote_bundle:  # torchrun's other ranks: rank 0 writes and reports
        return
    common.log(f"wrote bundle {job.bundle}")
    common.out_console.print(train_line(result), highlight=False)
    print_calibrations(result.detector, None, len(training.calib), training.calib.source)


@app.command("train-background")
@common.handle_errors
def train_background(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m",
                               help="Existing bundle to add a background model to."),
    data: str | None = typer.Option(
        None, "--data", "-d", help="Training images \\[default: the bundle's training data]."),
    mutation_rate: MutationRate = DEFAULT_MUTATION_RATE,
    preset: str | None = typer.Option(None, "--preset", "--background-preset",
                                      help=BACKGROUND_PRESET_HELP),
    epochs: int = typer.Option(10, min=1, help="Maximum training epochs."),
    patience: int = typer.Option(4, min=0, help="Early-stopping patience (0: never)."),
    batch_size: common.StepBatch = 64,
    lr: float = typer.Option(2e-3, min=0.0, help="Adam learning rate (decays 3% per epoch)."),
    l2: float = typer.Option(DEFAULT_BACKGROUND_L2, "--l2", "--background-l2", min=0.0,
                             help="L2 penalty (Adam weight decay), as in Ren et al."),
    max_images: MaxImages = None,
    fpr: float | None = typer.Option(None, help="Target false-positive rate of the new "
                                                "thresholds \\[default: the bundle's]."),
    seed: int | None = typer.Option(None, help="Seed for weights, mutations and splits "
                                               "\\[default: the main model's]."),
    device: common.Device = "auto",
    precision: common.Precision = common.PrecisionChoice.fp32,
    resume: common.Resume = False,
    data_root: common.DataRoot = None,
    download: common.Download = False,
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
    from ..training_pipeline import add_background_model

    try:
        result = add_background_model(
            model, data=data, mutation_rate=mutation_rate, preset=preset, epochs=epochs,
            patience=patience, batch_size=batch_size, lr=lr, l2=l2, max_images=max_images,
            fpr=fpr, seed=seed, device=device,
            precision=common.PrecisionChoice(precision).value,
            resume=resume, data_root=data_root, download=download, log=common.log,
            progress=common.RichTrainProgress)
    except KeyboardInterrupt:
        common.interrupted(model.with_name(model.name + ".background.checkpoint"))
        raise
    if not result.wrote_bundle:
        return
    common.log(f"wrote bundle {model} (background model added, {result.seconds:.0f} s)")
    print_calibrations(result.detector, None, len(result.data.calib), result.data.calib.source)


@app.command()
@common.handle_errors
def calibrate(
    model: common.ModelBundle = DEFAULT_MODEL,
    data: str | None = typer.Option(
        None, "--data", "-d",
        help="Clean held-out images \\[default: the bundle's own calibration split]."),
    fpr: float = typer.Option(0.05, help="Target false-positive rate on clean images."),
    score: common.ScoreChoice | None = typer.Option(
        None, "--score", help=common.SCORE_OPTION_HELP + " Calibrates this kind and makes it the "
        "bundle's default \\[default: recalibrate every available kind, keep the default]."),
    conservative_threshold: Conservative = False,
    skip_unreadable: Annotated[bool, common.flag(
        "--skip-unreadable", help="Calibrate on the readable files even if some "
        "cannot be used (they are listed); without it they are an error.")] = False,
    batch_size: common.BatchSize = 256,
    device: common.Device = "auto",
    resize: common.Resize = False,
    grayscale: common.Grayscale = False,
    data_root: common.DataRoot = None,
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
        model, data, fpr=fpr, kind=None if score is None else common.ScoreChoice(score).value,
        conservative=conservative_threshold, skip_unreadable=skip_unreadable,
        batch_size=batch_size, device=device, resize=resize, grayscale=grayscale,
        data_root=data_root, warn=common.warn)
    images = done.images
    common.report_skipped(images.errors)
    cal = done.detector.calibrations[done.headline]
    common.out_console.print(
        f"threshold {cal.threshold:.4f} {cal.unit} ({cal.kind}) at FPR {fpr:g} from {cal.n} "
        f"images of {images.source}; written to {model}/calibration.json", highlight=False)
    print_calibrations(done.detector, done.kinds, cal.n, images.source)


@app.command()
@common.handle_errors
def score(
    paths: common.ImagePaths,
    model: common.ModelBundle = DEFAULT_MODEL,
    fmt: common.Format = common.OutputFormat.table,
    output: common.Output = None,
    fail_on: common.FailOn = common.GateChoice.none,
    max_anomalous_fraction: common.MaxAnomalousFraction = None,
    junit: Path | None = typer.Option(
        None, help="Write JUnit XML: one test case per input plus a 'gate' case; it has a "
        "failure or error exactly when the exit code is not 0."),
    skip_unreadable: common.SkipUnreadable = False,
    score_kind: common.ScoreChoice | None = typer.Option(
        None, "--score", help=common.SCORE_OPTION_HELP + " \\[default: the bundle's]"),
    batch_test: Annotated[bool, common.flag(
        "--batch-test", help="Also test the whole batch for typicality (Nalisnick et "
        "al. 2019): is its mean bits/dim consistent with clean data? Then --fail-on "
        "anomalous gates on the batch verdict instead of single images.")] = False,
    resamples: Resamples = 1000,
    seed: BootstrapSeed = 0,
    heatmap: Path | None = typer.Option(
        None, "--heatmap", help="Write, for each flagged image, a PNG of the image next to "
        "its per-pixel NLL heat map into this folder (<input name>.heatmap.png)."),
    batch_size: common.BatchSize = 256,
    device: common.Device = "auto",
    precision: common.Precision = common.PrecisionChoice.fp32,
    compile_: common.Compile = False,
    threads: common.Threads = None,
    resize: common.Resize = False,
    grayscale: common.Grayscale = False,
    data_root: common.DataRoot = None,
    overwrite: common.Overwrite = False,
    shard: common.Shard = None,
    workers: common.Workers = 0,
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
    from ..gate import GatePolicy
    from ..scoring import prepare_score, score_inputs

    detector, sharding = prepare_score(
        paths, model, output=output, junit=junit, heatmaps=heatmap, overwrite=overwrite,
        device=device, shard=shard, batch_size=batch_size,
        precision=common.PrecisionChoice(precision).value, compile=compile_)
    policy = GatePolicy.from_options(fail_on.value, max_anomalous_fraction=max_anomalous_fraction,
                                     batch_test=batch_test, skip_unreadable=skip_unreadable)
    streaming = fmt in (common.OutputFormat.jsonl, common.OutputFormat.csv)
    with common.RowStream(fmt, reporting.SCORE_COLUMNS, output) if streaming and \
            sharding.writes else \
            contextlib.nullcontext() as rows_out, common.ProgressBar("score") as bar:
        run = score_inputs(
            detector, paths, policy, kind=None if score_kind is None else score_kind.value,
            model=model, batch_size=batch_size, resize=resize, grayscale=grayscale,
            data_root=data_root, heatmaps=heatmap, junit=junit, resamples=resamples, seed=seed,
            keep_rows=not streaming, on_rows=None if rows_out is None else rows_out.write,
            progress=bar.advance, on_total=bar.set_total, sharding=sharding, workers=workers)
        doc = run.document(model)
        if run.batch_line and (fmt != common.OutputFormat.table or output is not None):
            common.log(run.batch_line)  # else in the caption
        if not streaming and sharding.writes:
            common.emit(fmt, doc, run.rows, reporting.SCORE_COLUMNS, reporting.score_table, output)
    if junit is not None:
        common.log(f"wrote {junit}")
    for line in run.summary_lines():
        common.log(common.cli_text(line))
    raise typer.Exit(run.result.exit_code)


@app.command()
@common.handle_errors
def merge(
    paths: Annotated[list[Path], typer.Argument(help="Shard outputs, in shard order.")],
    fmt: Annotated[common.OutputFormat | None, typer.Option(
        "--format", "-f", help="Output format \\[default: the shards']; table and JSON "
        "need JSON shards.")] = None,
    output: common.Output = None,
    fail_on: common.FailOn = common.GateChoice.none,
    max_anomalous_fraction: common.MaxAnomalousFraction = None,
    skip_unreadable: common.SkipUnreadable = False,
    batch_test: common.BatchTest = False,
    model: Path | None = typer.Option(None, "--model", "-m",
                                      help="The bundle, for --batch-test."),
    resamples: Resamples = 1000,
    seed: BootstrapSeed = 0,
    overwrite: common.Overwrite = False,
) -> None:
    """Join `score --shard I/N` outputs (JSON, JSONL or CSV) into the one-process output.

    Rows are concatenated in the order given; the summary and the gate are recomputed over
    all of them with the gate options given here (the same as score's), and the exit code
    is the gate's. A JUnit report is not merged.

    [bold]Example[/]

      pixeldefend merge scores-0.jsonl scores-1.jsonl --fail-on anomalous -o scores.jsonl
    """
    from .. import reporting
    from ..gate import GatePolicy
    from ..merge import merge_score_outputs

    policy = GatePolicy.from_options(fail_on.value, max_anomalous_fraction=max_anomalous_fraction,
                                     batch_test=batch_test, skip_unreadable=skip_unreadable)
    merged = merge_score_outputs(paths, policy, model=model, resamples=resamples, seed=seed,
                                 fmt=fmt and fmt.value, output=output, overwrite=overwrite)
    common.emit(common.OutputFormat(merged.fmt), merged.document or {}, merged.rows,
                reporting.SCORE_COLUMNS, reporting.score_table, output)
    for line in merged.run.summary_lines():
        common.log(common.cli_text(line))
    raise typer.Exit(merged.run.result.exit_code)


@app.command()
@common.handle_errors
def info(
    model: common.ModelBundle = DEFAULT_MODEL,
    fmt: common.StdoutFormat = common.OutputFormat.table,
) -> None:
    """Show a bundle: architecture, data, metrics and calibration.

    [bold]Example[/]

      pixeldefend info --model models/digits --format json
    """
    from .. import reporting
    from ..detector import DensityDetector
    from ..rendering import field_rows

    detector = DensityDetector.load(model, device="cpu")
    doc = reporting.info_document(detector, model)
    rows = field_rows(doc) if fmt == common.OutputFormat.csv else [doc]
    common.emit(fmt, doc, rows, ["field", "value"], reporting.info_table)


@app.command()
@common.handle_errors
def sample(
    model: common.ModelBundle = DEFAULT_MODEL,
    n: int = typer.Option(16, "-n", min=1, max=4096, help="Number of images to draw."),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid to write."),
    npz: Path | None = typer.Option(None, help="Also write the samples exactly as .npz."),
    temperature: float = typer.Option(1.0, min=0.01, help="Softmax temperature (<1: tamer)."),
    scale: int = typer.Option(0, min=0, help="Pixel zoom of the grid \\[default: fit ~256 px]."),
    seed: int = typer.Option(0, help="Random seed."),
    device: common.Device = "auto",
    overwrite: common.Overwrite = False,
) -> None:
    """Draw images from the model and save them as a PNG grid a person can look at.

    [bold]Example[/]

      pixeldefend sample --model models/digits -n 16 --out grid.png
    """
    from ..sampling import write_samples

    with common.ProgressBar("sample") as bar:
        bpd = write_samples(model, out, n, npz=npz, temperature=temperature, scale=scale,
                            seed=seed, device=device, overwrite=overwrite,
                            progress=bar.advance, on_total=bar.set_total)
    common.out_console.print(f"wrote {out} ({n} samples, mean {bpd:.3f} bits/dim)",
                             highlight=False)
