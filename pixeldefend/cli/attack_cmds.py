"""`classifier train` and `attack`: classifiers to attack, and adversarial images to face
the detector and the purifier with. Thin: the maths lives in `pixeldefend.attacks` and
`pixeldefend.models.classifier`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..defaults import CLASSIFIER_PRESETS as PRESETS
from ..defaults import DEFAULT_CLASSIFIER, METHODS
from ..errors import UsageError
from .app import app
from .common import (
    DataRoot,
    Device,
    Download,
    Grayscale,
    OutputFormat,
    Overwrite,
    Precision,
    PrecisionChoice,
    RichTrainProgress,
    TrustCode,
    emit,
    err_console,
    flag,
    fmt_float,
    handle_errors,
    make_progress,
    parse_floats,
)

classifier_app = typer.Typer(
    help="Train the classifiers that `pixeldefend attack` attacks and the purifier protects.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(classifier_app, name="classifier")

class ClassifierProgress(RichTrainProgress):
    """Training progress worded for a classifier: loss and validation accuracy."""

    def __init__(self) -> None:
        super().__init__("train classifier")

    def batch_status(self, loss: float) -> str:
        return f"loss {loss:.3f}  val error {self.last_val:.4f}"

    def epoch_summary(self, train_metric: float, val_metric: float) -> str:
        return f"loss {train_metric:.4f}  val accuracy {1 - val_metric:.4f}"


def _default_out(data: str) -> Path:
    from ..data import parse_builtin

    parsed = parse_builtin(data)
    name = parsed[0] if parsed else Path(data.rstrip("/")).stem or "model"
    return Path("runs") / f"{name}-classifier"  # untracked: never the shipped models/


@classifier_app.command("train")
@handle_errors
def classifier_train(
    data: str = typer.Option("digits", "--data", "-d",
                             help="Labelled training images: digits, fashion-mnist, mnist, "
                                  "cifar10, a folder with one sub-folder per class, or .npz."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Bundle directory \\[default: runs/<data>-classifier]; "
                                         "an existing bundle is replaced only with "
                                         "--overwrite."),
    preset: str = typer.Option("small", help=f"Network size: {', '.join(PRESETS)}."),
    epochs: int | None = typer.Option(
        None, min=1, help="Training epochs \\[default: 40 for small data sets, 10 for large]."),
    batch_size: int = typer.Option(128, min=1, help="Images per optimisation step."),
    lr: float = typer.Option(3e-3, min=0.0,
                             help="Adam learning rate (decays to 5% by the last epoch)."),
    shift: int | None = typer.Option(
        None, min=0, help="Augmentation: random shifts of up to this many pixels "
                          "\\[default: 1 for images under 32 px, else 2; 0 = off]."),
    val: str | None = typer.Option(None, help="Validation images \\[default: see above]."),
    test: str | None = typer.Option(None, help="Test images \\[default: the data's test split]."),
    seed: int = typer.Option(0, help="Seed for weights, shuffling, augmentation and splits."),
    device: Device = "auto",
    precision: Precision = PrecisionChoice.fp32,
    resume: Annotated[bool, flag("--resume", help="Continue an interrupted run from its "
                                                  "last checkpoint.")] = False,
    data_root: DataRoot = None,
    download: Download = False,
    fmt: Annotated[OutputFormat, typer.Option(
        "--format", "-f", help="table: one line; json: the metrics; jsonl or csv: them as "
                               "one row.")] = OutputFormat.table,
    overwrite: Overwrite = False,
) -> None:
    """Train a small ResNet classifier and write it as a bundle (safetensors + JSON).

    The network takes float images in [0, 1], shape (N, C, H, W), and returns logits.
    Validation: digits:val for digits, a seeded 5,000-image slice of the training split
    for Fashion-MNIST / MNIST / CIFAR-10, else a seeded 10%. Checkpoints every epoch
    (continue with --resume), keeps the best validation weights, prints test accuracy.

    [bold]Examples[/]

      pixeldefend classifier train                     [dim]# digits -> runs/digits-classifier[/]

      pixeldefend classifier train --data fashion-mnist --out models/fashion-classifier

      pixeldefend classifier train --data my_images/ --epochs 20   [dim]# one folder per class[/]
    """
    from ..data import classifier_splits
    from ..device import resolve_device
    from ..distributed import is_main_process
    from ..models.classifier import count_parameters, save_classifier
    from ..models.classifier_training import fit_classifier, plan_classifier
    from ..outputs import check_checkpoint_dir, input_paths, prepare_dir
    from ..precision import check_precision
    from ..train import CHECKPOINT_FILES, remove_checkpoint

    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    out = out or _default_out(data)
    prepare_dir(out, command="classifier train", inputs=input_paths(data, val, test, data_root),
                overwrite=overwrite, bundle=True)
    checkpoint = out.with_name(out.name + ".checkpoint")
    check_checkpoint_dir(checkpoint, CHECKPOINT_FILES)
    splits = classifier_splits(data, val, test, seed, data_root, download)
    dev = resolve_device(device)
    plan = plan_classifier(*splits, preset=preset, epochs=epochs, batch_size=batch_size,
                           lr=lr, shift=shift, seed=seed,
                           precision=check_precision(PrecisionChoice(precision).value, dev))
    train_set, val_set, test_set = splits
    speak = is_main_process()  # under torchrun rank 0 alone prints and writes
    if speak:
        err_console.print(
            f"data {data}: {len(train_set)} train, {len(val_set)} validation"
            f"{f', {len(test_set)} test' if test_set is not None else ''} images, "
            f"{train_set.spec.describe()}, {plan.model.config.num_classes} classes; preset "
            f"{preset} ({count_parameters(plan.model):,} parameters), {plan.settings.epochs} "
            f"epochs, shifts of up to {plan.shift} px, on {dev}", highlight=False)
    try:
        with ClassifierProgress() as progress:
            meta = fit_classifier(plan, data, dev, checkpoint_dir=checkpoint, resume=resume,
                                  progress=progress)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: continue with the same command plus "
                          f"--resume (checkpoint in {checkpoint})")
        raise
    if not speak:
        return
    save_classifier(out, plan.model, meta)
    remove_checkpoint(checkpoint)
    err_console.print(f"wrote bundle {out}", highlight=False)
    metrics = meta["metrics"]
    doc = {"bundle": str(out), **metrics, "n_test": meta["data"]["n_test"],
           "parameters": count_parameters(plan.model)}
    line = (f"test accuracy {fmt_float(metrics['test_accuracy'], 4)}"
            f"{f' on {len(test_set)} images' if test_set is not None else ''}"
            f" (validation {metrics['val_accuracy']:.4f}); {metrics['epochs']} epochs in "
            f"{metrics['train_seconds']:.0f} s -> {out}")
    emit(fmt, doc, [doc], list(doc), lambda: line)


# --------------------------------------------------------------------------- attack


def attack_table(summary: dict[str, Any]) -> Table:
    s = summary
    table = Table(title=f"{s['method']} attack, eps {s['eps']:.4g} "
                        f"(= {s['eps_levels']:.3g} levels, ball {s['eps_ball_levels']}), "
                        f"{s['n']} images", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    table.add_row("clean accuracy", pct(s["clean_accuracy"]))
    table.add_row("adversarial accuracy", pct(s["adversarial_accuracy"]))
    table.add_row("attack success rate" + (" (targeted)" if s["targeted"] else ""),
                  pct(s["attack_success_rate"]))
    table.add_row("mean / max L-inf (levels)", f"{s['mean_linf']:.2f} / {s['max_linf']}")
    table.add_row("mean / max L2 (levels)", f"{s['mean_l2']:.2f} / {s['max_l2']:.2f}")
    table.add_row("images changed", f"{s['n_changed']} / {s['n']}")
    if s["clipped_to_eps_ball"]:
        table.add_row("note", f"{s['method']} is an L2 attack: clipped to the eps ball")
    return table


@app.command("attack")
@handle_errors
def attack(
    paths: list[str] | None = typer.Argument(
        None, help="Images, folders (labels from sub-folder names) or .npz files; "
                   "instead of --data."),
    method: str = typer.Option("pgd", "--method", help=f"One of {', '.join(METHODS)}."),
    eps: str | None = typer.Option(
        None, help="Budget as a fraction of the pixel range: 8/255 or 0.03; with "
                   "--eps-levels, whole pixel levels \\[default: 8/255, at least 1 level]."),
    eps_levels: Annotated[bool, flag("--eps-levels",
                                     help="Read --eps as a number of pixel levels.")] = False,
    steps: int | None = typer.Option(None, min=1, help="Iterations (bim, pgd, cw, deepfool)."),
    alpha: str | None = typer.Option(
        None, help="Step size for bim/pgd, as a fraction (2/255) or, with --eps-levels, "
                   "levels \\[default: eps/4]."),
    c: float = typer.Option(1.0, "--c", help="CW: weight of the misclassification term."),
    kappa: float = typer.Option(0.0, help="CW: confidence margin (> 0 survives clipping "
                                           "and rounding better)."),
    lr: float = typer.Option(0.01, help="CW: Adam learning rate."),
    overshoot: float = typer.Option(
        0.02, help="DeepFool: overshoot (the clipped, quantised result keeps more of a "
                   "larger one, e.g. 1)."),
    targeted: Annotated[bool, flag("--targeted", help="Aim for a random wrong label "
                                   "(seeded); fgsm, bim, pgd, cw.")] = False,
    data: str | None = typer.Option(
        None, "--data", "-d",
        help="Labelled images: digits:test, fashion-mnist:test, a folder, an .npz "
             "\\[default: the classifier's test split]."),
    classifier: str | None = typer.Option(
        None, "--classifier", "-c",
        help="Classifier bundle dir, TorchScript file, or package.module:factory "
             f"(these two run code: need --trust-code) \\[default: {DEFAULT_CLASSIFIER}]."),
    classifier_weights: Path | None = typer.Option(
        None, help="State-dict file for a package.module:factory classifier "
                   "(loaded with weights_only=True)."),
    mean: str | None = typer.Option(None, help="Per-channel mean the classifier expects "
                                               "(e.g. 0.4914,0.4822,0.4465)."),
    std: str | None = typer.Option(None, help="Per-channel std the classifier expects."),
    n: int | None = typer.Option(None, "-n", "--n", min=1, help="Attack the first N images."),
    seed: int = typer.Option(0, help="Seed for random starts, noise and targets."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write PNGs, manifest.json and images.npz to this folder."),
    batch_size: int = typer.Option(128, min=1),
    device: Device = "auto",
    fmt: Annotated[OutputFormat, typer.Option(
        "--format", "-f", help="table or json: the summary; jsonl or csv: one row per "
                               "image.")] = OutputFormat.table,
    data_root: DataRoot = None,
    resize: Annotated[bool, flag("--resize", help="Resize images to the classifier's "
                                                  "size.")] = False,
    grayscale: Grayscale = False,
    trust_code: TrustCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Attack a classifier; save quantised adversarial images and report its accuracy.

    Adversarial images are rounded to the images' pixel levels and clipped to the eps
    ball (in levels) before they are evaluated or saved; accuracy is measured on them.
    CW and DeepFool (L2 attacks) are clipped to the eps ball. With 17-level digits one
    level is 1/16 of the range, so 8/255 cannot change a pixel: use --eps-levels.

    Methods: rand (random +-eps noise), fgsm, bim, pgd, cw, deepfool, autoattack.

    [bold]Examples[/]

      pixeldefend attack --method pgd --eps 2 --eps-levels --out adv/   [dim]# digits[/]

      pixeldefend attack -c models/fashion-classifier --data fashion-mnist:test -n 1000 \\
        --method pgd --eps 8/255 --steps 20 --format json

      pixeldefend attack photos/ -c model.ts --mean 0.5 --std 0.5 --method fgsm --eps 4/255
    """
    from ..attack_pipeline import (
        attack_dataset,
        attack_manifest,
        load_attack_images,
        resolve_classifier_path,
        write_attack_output,
    )
    from ..models.loading import load_classifier
    from ..outputs import input_paths, prepare_dir

    method = method.lower()
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}: choose from {', '.join(METHODS)}")
    if paths and data is not None:
        raise UsageError("give image paths or --data, not both")
    try:
        classifier = resolve_classifier_path(classifier)
    except UsageError as exc:  # the library's message does not know the flag
        raise UsageError(f"no --classifier given and no {DEFAULT_CLASSIFIER} here: train "
                         "one with `pixeldefend classifier train` or pass --classifier"
                         ) from exc
    if out is not None:
        prepare_dir(out, command="attack", overwrite=overwrite,
                    inputs=input_paths(paths, data, classifier, classifier_weights, data_root))
    loaded = load_classifier(classifier, device=device,
                             mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                             factory_weights=classifier_weights, trust_code=trust_code)
    if not paths and data is None and not (loaded.config.get("data") or {}).get("test"):
        raise UsageError("pass --data SPEC or image paths (the classifier does not record "
                         "a test split)")
    images = load_attack_images(loaded, paths or data, data_root=data_root, resize=resize,
                                grayscale=grayscale, n=n)
    for name, error in images.errors:
        err_console.print(f"[yellow]skipped[/] {name}: {error}", highlight=False)
    if images.labels is None:
        err_console.print("[yellow]note[/]: the images have no labels; attacking the "
                          "classifier's clean predictions instead", highlight=False)
    with make_progress() as progress:
        task = progress.add_task(f"attack {method}", total=len(images), status="")
        summary, result = attack_dataset(
            loaded, images, method, eps, eps_levels=eps_levels, alpha=alpha, steps=steps,
            c=c, kappa=kappa, lr=lr, overshoot=overshoot, targeted=targeted, seed=seed,
            batch_size=batch_size, progress=lambda k: progress.update(task, advance=k))
    for warning in summary["warnings"]:
        err_console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    if out is not None:
        manifest = attack_manifest(summary, result)
        write_attack_output(out, images, result, manifest)
        summary["out"] = str(out)
        err_console.print(f"wrote {len(manifest['images'])} PNGs, manifest.json and "
                          f"images.npz to {out}", highlight=False)
    columns = ["index", "name", "label", "clean_pred", "adv_pred", "success", "linf", "l2"]
    if targeted:
        columns.insert(5, "target")
    emit(fmt, summary, result.records, columns, lambda: attack_table(summary))
