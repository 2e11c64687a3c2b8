"""`classifier train` and `attack`: classifiers to attack, and adversarial images to face
the detector and the purifier with. Thin: the maths lives in `pixeldefend.attacks` and
`pixeldefend.models.classifier`."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from rich.table import Table

from .. import __version__
from ..attacks import METHODS, default_eps, parse_eps, run_attack
from ..data import ImageSet, ImageSpec, load_images, parse_builtin, save_image, save_npz
from ..device import resolve_device
from ..errors import DataError, UsageError
from ..models.classifier import (
    PRESETS,
    ClassifierConfig,
    LoadedClassifier,
    ResNetClassifier,
    count_parameters,
    default_shift,
    error_rate,
    load_classifier,
    predict_logits,
    save_classifier,
    split_holdout,
    train_classifier,
)
from ..outputs import check_checkpoint_dir, input_paths, prepare_dir, write_marker
from ..train import CHECKPOINT_FILES, TrainSettings, remove_checkpoint
from .app import app
from .common import (
    DEVICE_HELP,
    OVERWRITE,
    TRUST_CODE_HELP,
    OutputFormat,
    RichTrainProgress,
    emit,
    err_console,
    fmt_float,
    handle_errors,
    make_progress,
    out_console,
)

classifier_app = typer.Typer(
    help="Train the classifiers that `pixeldefend attack` attacks and the purifier protects.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(classifier_app, name="classifier")

DEFAULT_CLASSIFIER = Path("models/digits-classifier")
HOLDOUT = 5000  # validation images carved from a large built-in training split
SMALL_SET = 10_000  # fewer training images than this: more epochs by default


class ClassifierProgress(RichTrainProgress):
    """Training progress worded for a classifier: loss and validation accuracy."""

    def __init__(self) -> None:
        super().__init__("train classifier")

    def batch_status(self, loss: float) -> str:
        return f"loss {loss:.3f}  val error {self.last_val:.4f}"

    def epoch_summary(self, train_metric: float, val_metric: float) -> str:
        return f"loss {train_metric:.4f}  val accuracy {1 - val_metric:.4f}"


def _default_out(data: str) -> Path:
    parsed = parse_builtin(data)
    name = parsed[0] if parsed else Path(data.rstrip("/")).stem or "model"
    return Path("runs") / f"{name}-classifier"  # untracked: never the shipped models/


def _need_labels(images: ImageSet, what: str) -> torch.Tensor:
    if images.labels is None:
        raise DataError(f"{images.source}: {what} images have no labels (use a labelled data "
                        "set, an .npz with 'labels', or one sub-folder per class)")
    return images.labels


def classifier_splits(data: str, val: str | None, test: str | None, seed: int,
                      data_root: str | None, download: bool
                      ) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(train, validation, test) for a training spec.

    digits: the fixed digits:train / :val / :test splits. Fashion-MNIST, MNIST, CIFAR-10:
    a seeded 5,000-image validation slice of the training split, test = the test split.
    Anything else: a seeded 10% validation slice, test only with --test.
    """
    def load(spec: str, expect: ImageSpec | None = None) -> ImageSet:
        return load_images(spec, expect, data_root=data_root, download=download)

    parsed = parse_builtin(data)
    test_spec = test
    if parsed is not None and parsed[0] == "digits" and parsed[1] in ("all", "train"):
        train_set = load("digits:train")
        val_set = load(val or "digits:val")
        test_spec = test or "digits:test"
    else:
        full = load(data)
        if val is not None:
            train_set, val_set = full, load(val, full.spec)
        else:
            n_val = HOLDOUT if len(full) >= 10 * HOLDOUT else max(1, len(full) // 10)
            if len(full) < 10:
                raise DataError(f"{data}: {len(full)} images are too few to hold out a "
                                "validation set (need at least 10)")
            train_idx, val_idx = split_holdout(len(full), n_val, seed)
            train_set, val_set = full.subset(train_idx.tolist()), full.subset(val_idx.tolist())
            val_set.source = f"{full.source} (seeded {n_val}-image holdout, seed {seed})"
            train_set.source = f"{full.source} (minus the holdout)"
        if test_spec is None and parsed is not None and parsed[1] == "train":
            test_spec = f"{parsed[0]}:test"
    test_set = load(test_spec, train_set.spec) if test_spec else None
    return train_set, val_set, test_set


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
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue an interrupted run from its last checkpoint."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    download: bool = typer.Option(False, "--download",
                                  help="Let torchvision download the data set if missing."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f",
                                     help="table or json."),
    overwrite: bool = OVERWRITE,
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
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    out = out or _default_out(data)
    prepare_dir(out, command="classifier train", inputs=input_paths(data, val, test, data_root),
                overwrite=overwrite, bundle=True)
    checkpoint = out.with_name(out.name + ".checkpoint")
    check_checkpoint_dir(checkpoint, CHECKPOINT_FILES)
    train_set, val_set, test_set = classifier_splits(data, val, test, seed, data_root, download)
    train_labels = _need_labels(train_set, "training")
    val_labels = _need_labels(val_set, "validation")
    test_labels = _need_labels(test_set, "test") if test_set is not None else None
    num_classes = max(len(train_set.classes or []), int(train_labels.max()) + 1, 2)
    spec = train_set.spec
    cfg = ClassifierConfig.from_preset(preset, spec.channels, spec.height, spec.width,
                                       num_classes, spec.levels)
    epochs = epochs or (40 if len(train_set) < SMALL_SET else 10)
    shift = default_shift(spec.height, spec.width) if shift is None else shift
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr,
                             lr_decay=round(0.05 ** (1 / max(1, epochs - 1)), 6),
                             weight_decay=1e-4, grad_clip=5.0, seed=seed)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = ResNetClassifier(cfg)
    err_console.print(
        f"data {data}: {len(train_set)} train, {len(val_set)} validation"
        f"{f', {len(test_set)} test' if test_set is not None else ''} images, "
        f"{spec.describe()}, {num_classes} classes; preset {preset} "
        f"({count_parameters(model):,} parameters), {epochs} epochs, shifts of up to "
        f"{shift} px, on {dev}", highlight=False)
    start = time.perf_counter()
    try:
        with ClassifierProgress() as progress:
            result = train_classifier(model, train_set.images, train_labels, val_set.images,
                                      val_labels, settings, dev, checkpoint_dir=checkpoint,
                                      resume=resume, progress=progress, shift=shift)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: continue with the same command plus "
                          f"--resume (checkpoint in {checkpoint})")
        raise
    seconds = time.perf_counter() - start
    model.eval()
    val_acc = 1.0 - result.best_val
    test_acc = None
    if test_set is not None and test_labels is not None:
        test_acc = 1.0 - error_rate(model, test_set.images, test_labels, spec.levels)
    metrics = {"val_accuracy": round(val_acc, 5),
               "test_accuracy": None if test_acc is None else round(test_acc, 5),
               "train_seconds": round(seconds, 1), "epochs": epochs,
               "best_epoch": result.best_epoch + 1}
    meta = {
        "input": "float images in [0, 1], shape (N, C, H, W) -> logits (N, num_classes); "
                 "uint8 levels x map to x / (levels - 1)",
        "classes": train_set.classes or [str(i) for i in range(num_classes)],
        "data": {"spec": data, "train": train_set.source, "n_train": len(train_set),
                 "val": val_set.source, "n_val": len(val_set),
                 "test": None if test_set is None else test_set.source,
                 "n_test": 0 if test_set is None else len(test_set)},
        "metrics": metrics,
        "training": {"settings": settings.__dict__, "preset": preset,
                     "shift": shift, "history": result.history,
                     "parameters": count_parameters(model)},
    }
    save_classifier(out, model, meta)
    remove_checkpoint(checkpoint)
    err_console.print(f"wrote bundle {out}", highlight=False)
    doc = {"bundle": str(out), **metrics, "n_test": meta["data"]["n_test"],
           "parameters": count_parameters(model)}
    if fmt == OutputFormat.json:
        emit(fmt, doc, [doc], list(doc), lambda: "")
        return
    out_console.print(
        f"test accuracy {fmt_float(test_acc, 4)}"
        f"{f' on {len(test_set)} images' if test_set is not None else ''}"
        f" (validation {val_acc:.4f}); {epochs} epochs in {seconds:.0f} s -> {out}",
        highlight=False)


# --------------------------------------------------------------------------- attack


def resolve_classifier_path(spec: str | None) -> str:
    """The default classifier: ./models/digits-classifier, else the one in the source tree."""
    if spec is not None:
        return spec
    if DEFAULT_CLASSIFIER.exists():
        return str(DEFAULT_CLASSIFIER)
    shipped = Path(__file__).resolve().parents[2] / DEFAULT_CLASSIFIER
    if shipped.exists():
        return str(shipped)
    raise UsageError(f"no --classifier given and no {DEFAULT_CLASSIFIER} here: train one with "
                     "`pixeldefend classifier train` or pass --classifier")


def parse_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError as exc:
        raise UsageError(f"{option} takes comma-separated numbers, e.g. 0.485,0.456,0.406"
                         ) from exc
    if not values:
        raise UsageError(f"{option} needs at least one number")
    return values


def _slug(name: str) -> str:
    stem = Path(name).stem if ("/" in name or "\\" in name) else name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-")
    return slug[-40:] or "image"


def _map_labels(images: ImageSet, loaded: LoadedClassifier) -> torch.Tensor | None:
    """Data labels in the classifier's class order when both sides name their classes."""
    labels = images.labels
    if labels is None or not images.classes or not loaded.classes:
        return labels
    if list(images.classes) == list(loaded.classes):
        return labels
    if all(c in loaded.classes for c in images.classes):
        lookup = torch.tensor([loaded.classes.index(c) for c in images.classes])
        return lookup[labels]
    return labels


def write_attack_output(out: Path, images: ImageSet, result: Any, manifest: dict[str, Any]
                        ) -> None:
    """PNGs, manifest.json and images.npz, all swapped in at once (an earlier run's folder
    is replaced whole, never mixed with the new one)."""
    from ..atomic import atomic_dir, write_json

    with atomic_dir(out) as tmp:
        for rec in manifest["images"]:
            save_image(tmp / rec["file"], result.adversarial[rec["index"]], images.levels)
        extra: dict[str, np.ndarray] = {
            "clean": images.images.numpy().astype(np.uint8),
            "clean_pred": result.clean_pred.numpy().astype(np.int64),
            "adv_pred": result.adv_pred.numpy().astype(np.int64),
            "names": np.array(images.names),
        }
        if result.targets is not None:
            extra["targets"] = result.targets.numpy().astype(np.int64)
        save_npz(tmp / "images.npz", result.adversarial, images.levels, result.labels, **extra)
        write_json(tmp / "manifest.json", manifest)
        write_marker(tmp, "attack")


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
    method: str = typer.Option("pgd", "--method", "-m", help=f"One of {', '.join(METHODS)}."),
    eps: str | None = typer.Option(
        None, help="Budget as a fraction of the pixel range: 8/255 or 0.03; with "
                   "--eps-levels, whole pixel levels \\[default: 8/255, at least 1 level]."),
    eps_levels: bool = typer.Option(False, "--eps-levels",
                                    help="Read --eps as a number of pixel levels."),
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
    targeted: bool = typer.Option(False, "--targeted",
                                  help="Aim for a random wrong label (seeded); fgsm, bim, "
                                       "pgd, cw."),
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
    device: str = typer.Option("auto", help=DEVICE_HELP),
    fmt: OutputFormat = typer.Option(
        OutputFormat.table, "--format", "-f",
        help="table or json: the summary; jsonl or csv: one row per image."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    resize: bool = typer.Option(False, "--resize", help="Resize images to the classifier's "
                                                        "size."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Convert colour/gray to match."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
    overwrite: bool = OVERWRITE,
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
    method = method.lower()
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}: choose from {', '.join(METHODS)}")
    if paths and data is not None:
        raise UsageError("give image paths or --data, not both")
    classifier = resolve_classifier_path(classifier)
    if out is not None:
        prepare_dir(out, command="attack", overwrite=overwrite,
                    inputs=input_paths(paths, data, classifier, classifier_weights, data_root))
    loaded = load_classifier(classifier, device=device,
                             mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                             factory_weights=classifier_weights, trust_code=trust_code)
    if not paths and data is None:
        data = (loaded.config.get("data") or {}).get("test")
        if not data:
            raise UsageError("pass --data SPEC or image paths (the classifier does not record "
                             "a test split)")
    expect = None
    if loaded.input_shape is not None and loaded.levels is not None:
        expect = ImageSpec(*loaded.input_shape, loaded.levels)
    sources: str | list[str] = list(paths) if paths else str(data)
    images = load_images(sources, expect, data_root=data_root, resize=resize,
                         grayscale=grayscale)
    for name, error in images.errors:
        err_console.print(f"[yellow]skipped[/] {name}: {error}", highlight=False)
    images = images.head(n)
    labels = _map_labels(images, loaded)
    labels_from = "data"
    if labels is None:
        pred = predict_logits(loaded.model, images.images, images.levels, batch_size).argmax(1)
        labels, labels_from = pred, "clean predictions"
        err_console.print("[yellow]note[/]: the images have no labels; attacking the "
                          "classifier's clean predictions instead", highlight=False)
    budget = parse_eps(eps, images.levels, eps_levels) if eps is not None \
        else default_eps(images.levels)
    step = None
    if alpha is not None:
        step = parse_eps(alpha, images.levels, eps_levels).fraction
    with make_progress() as progress:
        task = progress.add_task(f"attack {method}", total=len(images), status="")
        result = run_attack(
            loaded, images.images, labels, images.levels, method, budget, steps=steps,
            alpha=step, c=c, kappa=kappa, lr=lr, overshoot=overshoot, targeted=targeted,
            seed=seed, batch_size=batch_size, names=images.names,
            progress=lambda k: progress.update(task, advance=k))
    summary = {"classifier": loaded.source, "data": images.source, "labels_from": labels_from,
               **result.summary}
    for warning in summary["warnings"]:
        err_console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    if out is not None:
        records = []
        for rec in result.records:
            rec = dict(rec)
            rec["file"] = (f"{rec['index']:05d}_{_slug(rec['name'])}_label{rec['label']}"
                           f"_pred{rec['adv_pred']}.png")
            records.append(rec)
        manifest = {"tool": "pixeldefend", "version": __version__, "command": "attack",
                    **summary, "files": {"images": "images.npz"}, "images": records}
        write_attack_output(out, images, result, manifest)
        summary["out"] = str(out)
        err_console.print(f"wrote {len(records)} PNGs, manifest.json and images.npz to {out}",
                          highlight=False)
    columns = ["index", "name", "label", "clean_pred", "adv_pred", "success", "linf", "l2"]
    if targeted:
        columns.insert(5, "target")
    emit(fmt, summary, result.records, columns, lambda: attack_table(summary))
