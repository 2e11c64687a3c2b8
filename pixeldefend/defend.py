"""PixelDefend as pipelines over a stream of images: purify, and defend (score, purify,
classify), one row per input, usable from Python; the CLI only parses options and renders.

Rows keep unreadable inputs (with their error) in input order, so a caller can report
them and fail closed; `summarise_*` turn rows into the figures the CLI prints and writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import Batch, ImageStream
from .defaults import DEFAULT_BATCH, GATE_CHOICES
from .detector import DensityDetector
from .errors import UsageError
from .models.loading import LoadedClassifier, check_inputs, classify
from .purify import PurifyResult, default_eps_defend, purify
from .sharding import Sharding

PURIFY_COLUMNS = ["path", "output", "bits_per_dim_before", "bits_per_dim_after", "purified",
                  "changed", "verdict", "error"]
DEFEND_COLUMNS = ["path", "label", "bits_per_dim_before", "p_value", "verdict", "purified",
                  "bits_per_dim_after", "changed", "pred_before", "pred", "prob", "correct",
                  "error"]


def verdict(bpd: float, threshold: float | None) -> str:
    """'anomalous' above the calibrated bits/dim threshold, 'clean' at or below it,
    'uncalibrated' without one."""
    if threshold is None:
        return "uncalibrated"
    return "anomalous" if bpd > threshold else "clean"


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def eps_for(detector: DensityDetector, eps_defend: int | None) -> int:
    """The purification radius: given, or the paper's default for the model's levels."""
    return default_eps_defend(detector.spec.levels) if eps_defend is None else eps_defend


def require_threshold(detector: DensityDetector, source: object) -> None:
    """Adaptive purification and the anomaly gate need a calibrated bits/dim threshold."""
    if detector.bpd_threshold is None:
        raise UsageError(f"{source} has no calibrated threshold: run `pixeldefend calibrate` "
                         "first (adaptive purification and the anomalous gate need it)")


def load_for_purify(model: Path, device: str = "auto", *, eps_defend: int | None = None,
                    need_threshold: bool = False) -> tuple[DensityDetector, int]:
    """The bundle's detector and the purification radius (`eps_for`); `need_threshold`
    (adaptive purification, the anomaly gate) requires its calibrated threshold."""
    detector = DensityDetector.load(model, device=device)
    if need_threshold:
        require_threshold(detector, model)
    return detector, eps_for(detector, eps_defend)


def open_stream(paths: list[str], detector: DensityDetector, *, resize: bool = False,
                grayscale: bool = False, data_root: str | None = None, workers: int = 0,
                sharding: Sharding | None = None) -> ImageStream:
    """The inputs as a stream in the model's shape, narrowed to this process's block when
    `sharding` splits them (nothing outside it is decoded); a UsageError when there are
    none. `workers` processes decode image files."""
    stream = ImageStream(paths, detector.spec, resize=resize, grayscale=grayscale,
                         data_root=data_root, workers=workers)
    if len(stream) == 0:
        raise UsageError(f"no images found in {', '.join(paths)}")
    if sharding is not None:
        sharding.split(stream)
    return stream


def purify_document(model: Path, detector: DensityDetector, eps: int, adaptive: bool,
                    rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """`purify`'s manifest and JSON output; `extra`: implementation and out."""
    return {"model": str(model), "eps_defend": eps, "adaptive": adaptive,
            "threshold": detector.bpd_threshold, **extra,
            "summary": summarise_purify(rows), "images": rows}


def purify_batch(detector: DensityDetector, batch: Batch, eps: int, adaptive: bool,
                 fast: bool = True) -> PurifyResult | None:
    """Purify the readable images of a batch (None when it has none)."""
    if batch.images.shape[0] == 0:
        return None
    return purify(detector, batch.images, eps, adaptive=adaptive or None, fast=fast,
                  batch_size=DEFAULT_BATCH)


def _error_row(columns: list[str], name: str, error: str) -> dict[str, Any]:
    return {c: None for c in columns} | {"path": name, "verdict": "error", "error": error}


# -------------------------------------------------------------------------- purify


def purify_rows(detector: DensityDetector, batches: Iterable[Batch], eps: int,
                adaptive: bool, fast: bool = True,
                keep: Callable[[str, Any, int | None], str] | None = None,
                progress: Callable[[int], None] | None = None,
                sharding: Sharding | None = None) -> list[dict[str, Any]]:
    """One PURIFY_COLUMNS row per input. `keep(name, purified_image, label)` stores each
    purified image and returns where it went (the row's `output`). Under torchrun
    (`sharding`) each rank purifies its own batches and rank 0 gets every rank's purified
    images in input order, rows and `keep` calls included; the other ranks get no rows."""
    threshold = detector.bpd_threshold

    def purified() -> Iterator[tuple[Batch, PurifyResult | None]]:
        for batch in batches:
            result = purify_batch(detector, batch, eps, adaptive, fast)
            if result is not None:
                result.images = result.images.cpu()
            yield batch, result

    rows: list[dict[str, Any]] = []
    for batch, result in (sharding or Sharding()).in_order(purified()):
        labels = batch.labels.tolist() if batch.labels is not None else None
        k = 0
        for name, error in zip(batch.names, batch.errors, strict=True):
            if error is not None:
                rows.append(_error_row(PURIFY_COLUMNS, name, error))
                continue
            assert result is not None
            label = labels[k] if labels else None
            rows.append({
                "path": name,
                "output": keep(name, result.images[k], label) if keep else None,
                "bits_per_dim_before": float(result.bpd_before[k]),
                "bits_per_dim_after": float(result.bpd_after[k]),
                "purified": bool(result.purified[k]), "changed": int(result.changed[k]),
                "verdict": verdict(float(result.bpd_before[k]), threshold), "error": None,
            })
            k += 1
        if progress is not None:
            progress(len(batch.names))
    return rows


def summarise_purify(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and mean bits/dim before and after, over the rows."""
    return {
        "n": len(rows), "purified": sum(bool(r["purified"]) for r in rows),
        "errors": sum(r["error"] is not None for r in rows),
        "mean_bpd_before": mean_or_none(r["bits_per_dim_before"] for r in rows),
        "mean_bpd_after": mean_or_none(r["bits_per_dim_after"] for r in rows),
    }


@dataclass
class PurifyRun:
    """What `purify_to_folder` did: the manifest (None on torchrun's other ranks, which
    write nothing), its rows and the number of unreadable inputs over every rank."""

    document: dict[str, Any] | None
    rows: list[dict[str, Any]]
    errors: int


def purify_to_folder(paths: list[str], out: Path, model: Path, *,
                     eps_defend: int | None = None, adaptive: bool = False, fast: bool = True,
                     batch_size: int = DEFAULT_BATCH, device: str = "auto",
                     resize: bool = False, grayscale: bool = False,
                     data_root: str | None = None, overwrite: bool = False,
                     shard: str | None = None, workers: int = 0,
                     progress: Callable[[int], None] | None = None,
                     on_total: Callable[[int], None] | None = None) -> PurifyRun:
    """`pixeldefend purify`: purified copies of the inputs in `out` (same names, lossless
    formats) plus out/manifest.json. `out` must be new or a folder pixeldefend made (then
    `overwrite` clears it); `shard` ("I/N") or torchrun ranks split the inputs."""
    from .atomic import write_json
    from .outputs import PurifyOutputs, clear_dir, input_paths, prepare_dir
    from .rendering import json_safe
    from .sharding import join

    out_dir = prepare_dir(out, command="purify", overwrite=overwrite,
                          inputs=input_paths(paths, model, data_root))
    sharding = join(device, shard)  # torchrun's ranks meet here, after the output checks
    detector, eps = load_for_purify(model, sharding.device, eps_defend=eps_defend,
                                    need_threshold=adaptive)
    stream = open_stream(paths, detector, resize=resize, grayscale=grayscale,
                         data_root=data_root, workers=workers, sharding=sharding)
    plan = PurifyOutputs.plan(paths, out, detector.spec.levels)
    if sharding.writes:
        clear_dir(out_dir)  # ours (marker) and --overwrite: no stale copies of an earlier run
        out_dir.mark()
    if on_total is not None:
        on_total(len(stream))
    rows = purify_rows(detector, stream.batches(batch_size), eps, adaptive, fast=fast,
                       keep=plan.add, progress=progress, sharding=sharding)
    errors = sharding.agree(sum(r["error"] is not None for r in rows))  # rank 0 has all rows
    if not sharding.writes:
        return PurifyRun(None, rows, errors)
    plan.flush()
    doc = purify_document(model, detector, eps, adaptive, rows,
                          implementation="fast" if fast else "reference", out=str(out))
    write_json(out / "manifest.json", json_safe(doc))
    return PurifyRun(doc, rows, errors)


# -------------------------------------------------------------------------- defend


@dataclass
class DefendResult:
    """The defend pipeline's rows (DEFEND_COLUMNS plus class names), summary and gate."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    gate_failed: bool = False
    gate_reasons: list[str] = field(default_factory=list)


def _defend_batch(detector: DensityDetector, loaded: LoadedClassifier, batch: Batch,
                  eps: int, adaptive: bool, batch_size: int,
                  name_of: Callable[[int], str | int]) -> list[dict[str, Any]]:
    levels = detector.spec.levels
    result = purify_batch(detector, batch, eps, adaptive)
    if result is not None:
        check_inputs(loaded, batch.images, batch.labels)
        pred_before, _ = classify(loaded, batch.images, levels, batch_size)
        pred, probs = classify(loaded, result.images, levels, batch_size)
        cal = detector.calibrations.get("bpd")  # verdicts here are on bits/dim
        p_values = cal.p_values(result.bpd_before) if cal is not None else None
    labels = batch.labels.tolist() if batch.labels is not None else None
    rows: list[dict[str, Any]] = []
    k = 0
    for name, error in zip(batch.names, batch.errors, strict=True):
        if error is not None:
            rows.append(_error_row(DEFEND_COLUMNS, name, error)
                        | {"pred_before_name": None, "pred_name": None})
            continue
        assert result is not None
        label = labels[k] if labels else None
        p, before = int(pred[k]), int(pred_before[k])
        rows.append({
            "path": name, "label": label,
            "bits_per_dim_before": float(result.bpd_before[k]),
            "p_value": None if p_values is None else float(p_values[k]),
            "verdict": verdict(float(result.bpd_before[k]), detector.bpd_threshold),
            "purified": bool(result.purified[k]),
            "bits_per_dim_after": float(result.bpd_after[k]),
            "changed": int(result.changed[k]),
            "pred_before": before, "pred": p,
            "pred_before_name": name_of(before), "pred_name": name_of(p),
            "prob": float(probs[k, p]),
            "correct": None if label is None else p == label,
            "error": None,
        })
        k += 1
    return rows


def summarise_defend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, mean bits/dim and (on labelled rows) accuracy before and after."""
    ok = [r for r in rows if r["error"] is None]
    labelled = [r for r in ok if r["label"] is not None]
    return {
        "n": len(rows), "anomalous": sum(r["verdict"] == "anomalous" for r in ok),
        "purified": sum(bool(r["purified"]) for r in ok),
        "errors": len(rows) - len(ok),
        "mean_bpd_before": mean_or_none(r["bits_per_dim_before"] for r in ok),
        "mean_bpd_after": mean_or_none(r["bits_per_dim_after"] for r in ok),
        "labelled": len(labelled),
        "accuracy_before": (float(np.mean([r["pred_before"] == r["label"] for r in labelled]))
                            if labelled else None),
        "accuracy_after": float(np.mean([r["correct"] for r in labelled])) if labelled else None,
    }


def defend(detector: DensityDetector, loaded: LoadedClassifier, batches: Iterable[Batch],
           eps_defend: int | None = None, *, adaptive: bool = False, fail_on: str = "none",
           classes: list[str] | None = None, batch_size: int = DEFAULT_BATCH,
           progress: Callable[[int], None] | None = None,
           sharding: Sharding | None = None) -> DefendResult:
    """Score, purify (all images, or with `adaptive` only the anomalous ones) and classify
    each input before and after; `fail_on="anomalous"` fails the gate if any input was
    flagged. `progress(k)` is called as each batch of k inputs is done. Under torchrun
    (`sharding`) rank 0 gets every rank's rows in input order; every rank gets the same
    summary and gate."""
    if fail_on not in GATE_CHOICES:
        raise UsageError(f"fail_on must be one of {', '.join(GATE_CHOICES)}, not {fail_on!r}")
    if adaptive or fail_on != "none":
        require_threshold(detector, "the model")
    eps = eps_for(detector, eps_defend)
    classes = classes or loaded.classes

    def name_of(label: int) -> str | int:
        return classes[label] if classes and 0 <= label < len(classes) else label

    sharding = sharding or Sharding()
    rows: list[dict[str, Any]] = []
    local = (_defend_batch(detector, loaded, batch, eps, adaptive, batch_size, name_of)
             for batch in batches)
    for batch_rows in sharding.in_order(local):
        rows += batch_rows
        if progress is not None:
            progress(len(batch_rows))
    summary = summarise_defend(rows)
    failed = fail_on == "anomalous" and summary["anomalous"] > 0
    reasons = [f"{summary['anomalous']} anomalous image(s)"] if failed else []
    summary, failed, reasons = sharding.agree((summary, failed, reasons))
    return DefendResult(rows, summary, failed, reasons)


def defend_document(model: Path, classifier: str, detector: DensityDetector, eps: int,
                    adaptive: bool, classes: list[str] | None,
                    result: DefendResult) -> dict[str, Any]:
    """`defend`'s JSON output: settings, summary, gate and one row per input."""
    return {"model": str(model), "classifier": str(classifier), "eps_defend": eps,
            "adaptive": adaptive, "threshold": detector.bpd_threshold, "classes": classes,
            "summary": result.summary,
            "gate": {"failed": result.gate_failed, "reasons": result.gate_reasons},
            "images": result.rows}


@dataclass
class DefendRun:
    """What `defend_inputs` did: the result, its JSON document and whether this process
    writes the output (False on torchrun's other ranks)."""

    result: DefendResult
    document: dict[str, Any]
    writes: bool = True


def defend_inputs(paths: list[str], classifier: str, model: Path, *,
                  eps_defend: int | None = None, adaptive: bool = False,
                  fail_on: str = "none", mean: list[float] | None = None,
                  std: list[float] | None = None, batch_size: int = DEFAULT_BATCH,
                  device: str = "auto", resize: bool = False, grayscale: bool = False,
                  data_root: str | None = None, trust_code: bool = False,
                  output: Path | None = None, overwrite: bool = False,
                  shard: str | None = None, workers: int = 0,
                  progress: Callable[[int], None] | None = None,
                  on_total: Callable[[int], None] | None = None) -> DefendRun:
    """`pixeldefend defend`: check `output` (before any work), load the bundle and the
    classifier (`mean`/`std`: the normalisation it expects), then `defend` the inputs;
    `shard` ("I/N") or torchrun ranks split them."""
    from .models.loading import load_classifier
    from .outputs import check_files, input_paths
    from .sharding import join

    check_files((output, "--output"), overwrite=overwrite,
                inputs=input_paths(paths, model, classifier, data_root))
    sharding = join(device, shard)  # torchrun's ranks meet here, after the output checks
    detector, eps = load_for_purify(model, sharding.device, eps_defend=eps_defend,
                                    need_threshold=adaptive or fail_on != "none")
    loaded = load_classifier(classifier, device=sharding.device, mean=mean, std=std,
                             input_shape=detector.spec.shape, trust_code=trust_code)
    stream = open_stream(paths, detector, resize=resize, grayscale=grayscale,
                         data_root=data_root, workers=workers)
    classes = loaded.classes or stream.classes
    sharding.split(stream)  # after the classes: every rank names them alike
    if on_total is not None:
        on_total(len(stream))
    result = defend(detector, loaded, stream.batches(batch_size), eps, adaptive=adaptive,
                    fail_on=fail_on, classes=classes, batch_size=batch_size,
                    progress=progress, sharding=sharding)
    doc = defend_document(model, classifier, detector, eps, adaptive, classes, result)
    return DefendRun(result, doc, sharding.writes)
