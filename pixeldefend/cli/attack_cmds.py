"""`classifier train` and `attack`: classifiers to attack, and adversarial images to face
the detector and the purifier with. Thin: the work is in `pixeldefend.attacks`,
`pixeldefend.attack_pipeline` and `pixeldefend.models.classifier_training`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..attack_registry import ATTACKS, TARGETED_METHODS
from ..defaults import CLASSIFIER_PRESETS as PRESETS
from . import common
from .app import app

classifier_app = typer.Typer(
    help="Train the classifiers that `pixeldefend attack` attacks and the purifier protects.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(classifier_app, name="classifier")


@classifier_app.command("train")
@common.handle_errors
def classifier_train(
    data: Annotated[str, typer.Option(
        "--data", "-d", help="Labelled training images: digits, fashion-mnist, mnist, cifar10, "
                             "a folder with one sub-folder per class, or .npz.")] = "digits",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Bundle directory \\[default: runs/<data>-classifier]; an existing "
                            "bundle is replaced only with --overwrite.")] = None,
    preset: Annotated[str, typer.Option(help=f"Network size: {', '.join(PRESETS)}.")] = "small",
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Training epochs \\[default: 40 for small data sets, 10 for large].")] = None,
    batch_size: common.StepBatch = 128,
    lr: Annotated[float, typer.Option(
        min=0.0, help="Adam learning rate (decays to 5% by the last epoch).")] = 3e-3,
    shift: Annotated[int | None, typer.Option(
        min=0, help="Augmentation: random shifts of up to this many pixels \\[default: 1 for "
                    "images under 32 px, else 2; 0 = off].")] = None,
    val: Annotated[str | None, typer.Option(help="Validation images \\[default: see above].")
                   ] = None,
    test: Annotated[str | None, typer.Option(
        help="Test images \\[default: the data's test split].")] = None,
    seed: Annotated[int, typer.Option(
        help="Seed for weights, shuffling, augmentation and splits.")] = 0,
    device: common.Device = "auto",
    precision: common.Precision = common.PrecisionChoice.fp32,
    resume: common.Resume = False,
    data_root: common.DataRoot = None,
    download: common.Download = False,
    fmt: Annotated[common.OutputFormat, typer.Option(
        "--format", "-f", help="table: one line; json: the metrics; jsonl or csv: them as "
                               "one row.")] = common.OutputFormat.table,
    overwrite: common.Overwrite = False,
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
    from ..models.classifier_training import (
        classifier_checkpoint,
        default_classifier_out,
        train_classifier_bundle,
    )
    from ..progress import ClassifierProgress
    from ..rendering import classifier_line

    out = out or default_classifier_out(data)
    try:
        with ClassifierProgress() as progress:
            doc = train_classifier_bundle(
                data, out, val=val, test=test, preset=preset, epochs=epochs,
                batch_size=batch_size, lr=lr, shift=shift, seed=seed, device=device,
                precision=common.PrecisionChoice(precision).value, resume=resume,
                data_root=data_root, download=download, overwrite=overwrite,
                log=common.log, progress=progress)
    except KeyboardInterrupt:
        common.interrupted(classifier_checkpoint(out))
        raise
    if doc is None:  # torchrun's other ranks
        return
    common.log(f"wrote bundle {out}")
    common.emit(fmt, doc, [doc], list(doc), classifier_line)


@app.command("attack")
@common.handle_errors
def attack(
    paths: Annotated[list[str] | None, typer.Argument(
        help="Images, folders (labels from sub-folder names) or .npz files; instead of "
             "--data.")] = None,
    method: Annotated[str, typer.Option(
        "--method", help="; ".join(f"{k}: {v.help}" for k, v in ATTACKS.items()) + ".")
    ] = "pgd",
    eps: Annotated[str | None, typer.Option(
        help="Budget as a fraction of the pixel range: 8/255 or 0.03; with --eps-levels, "
             "whole pixel levels \\[default: 8/255, at least 1 level].")] = None,
    eps_levels: common.EpsLevels = False,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Iterations (bim, pgd, cw, deepfool).")] = None,
    alpha: Annotated[str | None, typer.Option(
        help="Step size for bim/pgd, as a fraction (2/255) or, with --eps-levels, levels "
             "\\[default: eps/4].")] = None,
    c: Annotated[float, typer.Option("--c", help="CW: weight of the misclassification term.")
                 ] = 1.0,
    kappa: Annotated[float, typer.Option(
        help="CW: confidence margin (> 0 survives clipping and rounding better).")] = 0.0,
    lr: Annotated[float, typer.Option(help="CW: Adam learning rate.")] = 0.01,
    overshoot: Annotated[float, typer.Option(
        help="DeepFool: overshoot (the clipped, quantised result keeps more of a larger one, "
             "e.g. 1).")] = 0.02,
    targeted: Annotated[bool, common.flag("--targeted", help=(
        f"Aim for a random wrong label (seeded); {', '.join(TARGETED_METHODS)}."))] = False,
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="Labelled images: digits:test, fashion-mnist:test, a folder, an "
                             ".npz \\[default: the classifier's test split].")] = None,
    classifier: common.Classifier = None,
    classifier_weights: Annotated[Path | None, typer.Option(
        help="State-dict file for a package.module:factory classifier (loaded with "
             "weights_only=True).")] = None,
    mean: common.Mean = None,
    std: common.Std = None,
    n: Annotated[int | None, typer.Option("-n", "--n", min=1,
                                          help="Attack the first N images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random starts, noise and targets.")] = 0,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write PNGs, manifest.json and images.npz to this folder.")] = None,
    batch_size: common.BatchSize = 128,
    device: common.Device = "auto",
    fmt: Annotated[common.OutputFormat, typer.Option(
        "--format", "-f", help="table or json: the summary; jsonl or csv: one row per "
                               "image.")] = common.OutputFormat.table,
    data_root: common.DataRoot = None,
    resize: Annotated[bool, common.flag("--resize", help="Resize images to the classifier's "
                                                  "size.")] = False,
    grayscale: common.Grayscale = False,
    trust_code: common.TrustCode = False,
    overwrite: common.Overwrite = False,
) -> None:
    """Attack a classifier; save quantised adversarial images and report its accuracy.

    Adversarial images are rounded to the images' pixel levels and clipped to the eps
    ball (in levels) before they are evaluated or saved; accuracy is measured on them.
    CW and DeepFool (L2 attacks) are clipped to the eps ball. With 17-level digits one
    level is 1/16 of the range, so 8/255 cannot change a pixel: use --eps-levels.
    Each batch is seeded from --seed and its position, so under torchrun (each rank
    attacks its own batches) the output equals one process's with the same --batch-size.

    [bold]Examples[/]

      pixeldefend attack --method pgd --eps 2 --eps-levels --out adv/   [dim]# digits[/]

      pixeldefend attack -c models/fashion-classifier --data fashion-mnist:test -n 1000 \\
        --method pgd --eps 8/255 --steps 20 --format json

      pixeldefend attack photos/ -c model.ts --mean 0.5 --std 0.5 --method fgsm --eps 4/255
    """
    from ..attack_pipeline import attack_dataset, load_attack_inputs, save_attack
    from ..rendering import attack_columns, attack_table
    from ..sharding import join

    sharding = join(device)  # torchrun: each rank attacks its batches, rank 0 writes
    loaded, images = load_attack_inputs(
        method, paths, data, classifier, n=n, out=out, overwrite=overwrite,
        device=str(sharding.device),
        trust_code=trust_code, mean=common.parse_numbers(mean, "--mean"),
        std=common.parse_numbers(std, "--std"), classifier_weights=classifier_weights,
        data_root=data_root, resize=resize, grayscale=grayscale)
    common.report_skipped(images.errors, summary=False)
    if images.labels is None:
        common.log("[yellow]note[/]: the images have no labels; attacking the classifier's "
                   "clean predictions instead")
    with common.ProgressBar(f"attack {method.lower()}", len(images)) as bar:
        summary, result = attack_dataset(
            loaded, images, method.lower(), eps, eps_levels=eps_levels, alpha=alpha,
            steps=steps, c=c, kappa=kappa, lr=lr, overshoot=overshoot, targeted=targeted,
            seed=seed, batch_size=batch_size, progress=bar.advance, sharding=sharding)
    for warning in summary["warnings"]:
        common.warn(common.cli_text(warning))
    if out is not None and sharding.writes:
        count = save_attack(out, images, result, summary)
        common.log(f"wrote {count} PNGs, manifest.json and images.npz to {out}")
    common.emit(fmt, summary, result.records, attack_columns(targeted), attack_table)
