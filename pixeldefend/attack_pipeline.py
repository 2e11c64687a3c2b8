"""The `attack` pipeline, usable from Python: images and labels for a classifier, the
attack itself (`attacks.run_attack`), and the output folder (PNGs, manifest, npz).

The CLI only parses options, calls these and renders the summary.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import atomic_dir, write_json
from .attacks import AttackResult, default_eps, parse_eps, run_attack
from .data import ImageSet, ImageSpec, load_images, save_image, save_npz
from .defaults import DEFAULT_CLASSIFIER
from .errors import UsageError
from .models.loading import LoadedClassifier, predict_logits
from .outputs import owner, write_marker


def resolve_classifier_path(spec: str | None) -> str:
    """The default classifier: ./models/digits-classifier, else the one in the source tree."""
    if spec is not None:
        return spec
    if DEFAULT_CLASSIFIER.exists():
        return str(DEFAULT_CLASSIFIER)
    shipped = Path(__file__).resolve().parents[1] / DEFAULT_CLASSIFIER
    if shipped.exists():
        return str(shipped)
    raise UsageError(f"no classifier given and no {DEFAULT_CLASSIFIER} here: train one with "
                     "`pixeldefend classifier train` or pass classifier", param="classifier")


def map_labels(images: ImageSet, loaded: LoadedClassifier) -> torch.Tensor | None:
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


def load_attack_images(loaded: LoadedClassifier, sources: Sequence[str] | str | None, *,
                       data_root: str | None = None, resize: bool = False,
                       grayscale: bool = False, n: int | None = None) -> ImageSet:
    """The images to attack, in the classifier's shape and levels when it records them;
    no `sources`: the test split the classifier's bundle records."""
    if not sources:
        sources = (loaded.config.get("data") or {}).get("test")
        if not sources:
            raise UsageError("pass data or image paths (the classifier does not record a "
                             "test split)", param="data")
    expect = None
    if loaded.input_shape is not None and loaded.levels is not None:
        expect = ImageSpec(*loaded.input_shape, loaded.levels)
    if not isinstance(sources, str):
        sources = list(sources)
    images = load_images(sources, expect, data_root=data_root, resize=resize,
                         grayscale=grayscale)
    return images.head(n)


def load_attack_inputs(method: str, paths: Sequence[str] | None, data: str | None,
                       classifier: str | None, *, n: int | None = None,
                       out: Path | None = None, overwrite: bool = False,
                       device: str = "auto", trust_code: bool = False,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       classifier_weights: Path | None = None, data_root: str | None = None,
                       resize: bool = False, grayscale: bool = False
                       ) -> tuple[LoadedClassifier, ImageSet]:
    """The `attack` command's inputs, checked before any work: the method, the output
    folder (when given), the classifier (default: the shipped digits one) and its images
    (`paths`, else `data`, else the test split its bundle records)."""
    from .attack_registry import METHODS
    from .models.loading import load_classifier
    from .outputs import input_paths, prepare_dir

    if method.lower() not in METHODS:
        raise UsageError(f"unknown method {method!r}: choose from {', '.join(METHODS)}",
                         param="method")
    if paths and data is not None:
        raise UsageError("give image paths or data, not both", param="data")
    classifier = resolve_classifier_path(classifier)
    if out is not None:
        prepare_dir(out, command="attack", overwrite=overwrite,
                    inputs=input_paths(paths, data, classifier, classifier_weights, data_root))
    loaded = load_classifier(classifier, device=device, mean=mean, std=std,
                             factory_weights=classifier_weights, trust_code=trust_code)
    images = load_attack_images(loaded, paths or data, data_root=data_root, resize=resize,
                                grayscale=grayscale, n=n)
    return loaded, images


def attack_labels(images: ImageSet, loaded: LoadedClassifier,
                  batch_size: int = 128) -> tuple[torch.Tensor, str]:
    """(labels, where they came from): the data's, else the classifier's clean predictions."""
    labels = map_labels(images, loaded)
    if labels is not None:
        return labels, "data"
    pred = predict_logits(loaded.model, images.images, images.levels, batch_size).argmax(1)
    return pred, "clean predictions"


def attack_dataset(loaded: LoadedClassifier, images: ImageSet, method: str,
                   eps: str | float | None = None, *, eps_levels: bool = False,
                   alpha: str | float | None = None, batch_size: int = 128,
                   progress: Callable[[int], None] | None = None,
                   **params: Any) -> tuple[dict[str, Any], AttackResult]:
    """Attack a loaded image set; returns the summary (with where the labels came from)
    and the result. `eps` and `alpha` as `attacks.parse_eps` reads them (None: the
    default eps, alpha eps / 4); `params` go to `attacks.run_attack` (steps, c, kappa,
    lr, overshoot, targeted, seed, sharding: under torchrun each rank attacks its own
    whole batches and every rank gets the one-process result)."""
    labels, labels_from = attack_labels(images, loaded, batch_size)
    levels = images.levels
    budget = parse_eps(eps, levels, eps_levels) if eps is not None else default_eps(levels)
    step = None if alpha is None else parse_eps(alpha, levels, eps_levels).fraction
    result = run_attack(loaded, images.images, labels, levels, method, budget, alpha=step,
                        batch_size=batch_size, names=images.names, progress=progress,
                        **params)
    summary = {"classifier": loaded.source, "data": images.source,
               "labels_from": labels_from, **result.summary}
    return summary, result


def _slug(name: str) -> str:
    stem = Path(name).stem if ("/" in name or "\\" in name) else name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-")
    return slug[-40:] or "image"


def attack_manifest(summary: dict[str, Any], result: AttackResult) -> dict[str, Any]:
    """manifest.json for an attack's output folder: the summary and one record per image,
    with the PNG file it is saved as."""
    records = []
    for rec in result.records:
        rec = dict(rec)
        rec["file"] = (f"{rec['index']:05d}_{_slug(rec['name'])}_label{rec['label']}"
                       f"_pred{rec['adv_pred']}.png")
        records.append(rec)
    return {"tool": "pixeldefend", "version": __version__, "command": "attack", **summary,
            "files": {"images": "images.npz"}, "images": records}


def save_attack(out: Path, images: ImageSet, result: AttackResult,
                summary: dict[str, Any]) -> int:
    """Write the attack's output folder (`write_attack_output`) and record it in the
    summary; returns the number of PNGs."""
    manifest = attack_manifest(summary, result)
    write_attack_output(out, images, result, manifest)
    summary["out"] = str(out)
    return len(manifest["images"])


def write_attack_output(out: Path, images: ImageSet, result: AttackResult,
                        manifest: dict[str, Any]) -> None:
    """PNGs, manifest.json and images.npz, all swapped in at once (an earlier run's folder
    is replaced whole, never mixed with the new one; only a folder an earlier `attack`
    or another pixeldefend command marked as its output is ever replaced)."""
    with atomic_dir(out, replaceable=lambda folder: owner(folder) == "marker") as tmp:
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
