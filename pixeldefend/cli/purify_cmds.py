"""`purify` and `defend`: PixelDefend from the command line.

`purify` writes purified copies of the inputs (same names, same lossless format) and a
manifest; `defend` scores, purifies and classifies, printing one row per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from ..atomic import write_json
from ..data import Batch, ImageStream
from ..detector import DensityDetector
from ..errors import UsageError
from ..outputs import PurifyOutputs, check_files, clear_dir, input_paths, prepare_dir
from ..purify import DEFAULT_BATCH, PurifyResult, default_eps_defend, purify
from .app import app
from .common import (
    DEVICE_HELP,
    EXIT_GATE,
    EXIT_OK,
    EXIT_USAGE,
    FORMAT_HELP,
    OVERWRITE,
    TRUST_CODE_HELP,
    OutputFormat,
    emit,
    err_console,
    fmt_float,
    handle_errors,
    json_safe,
    make_progress,
)

DEFAULT_MODEL = Path("models/digits")
GATE_CHOICES = ("none", "anomalous")
PURIFY_COLUMNS = ["path", "output", "bits_per_dim_before", "bits_per_dim_after", "purified",
                  "changed", "verdict", "error"]
DEFEND_COLUMNS = ["path", "label", "bits_per_dim_before", "p_value", "verdict", "purified",
                  "bits_per_dim_after", "changed", "pred_before", "pred", "prob", "correct",
                  "error"]

EPS_HELP = ("Purification radius in pixel levels (default: 16/255 of the level range, as "
            "in the paper: 16 for 8-bit images, 1 for 17-level digits).")
ADAPTIVE_HELP = ("Purify only images whose bits/dim exceed the model's calibrated threshold; "
                 "the rest pass through untouched (adaptive PixelDefend).")


def _verdict(bpd: float, threshold: float | None) -> str:
    if threshold is None:
        return "uncalibrated"
    return "anomalous" if bpd > threshold else "clean"


def _run_purify(detector: DensityDetector, batch: Batch, eps: int, adaptive: bool,
                fast: bool) -> PurifyResult | None:
    if batch.images.shape[0] == 0:
        return None
    return purify(detector, batch.images, eps, adaptive=adaptive or None, fast=fast,
                  batch_size=DEFAULT_BATCH)


def _load(model: Path, device: str, adaptive: bool, eps_defend: int | None,
          need_calibration: bool = False) -> tuple[DensityDetector, int]:
    detector = DensityDetector.load(model, device=device)
    if (adaptive or need_calibration) and detector.bpd_threshold is None:
        raise UsageError(f"{model} has no calibrated threshold: run `pixeldefend calibrate` "
                         "first (needed by --adaptive and --fail-on)")
    eps = default_eps_defend(detector.spec.levels) if eps_defend is None else eps_defend
    return detector, eps


# -------------------------------------------------------------------------- purify


def _purify_table(doc: dict[str, Any]) -> Table:
    s = doc["summary"]
    table = Table(title=f"purified with eps_defend {doc['eps_defend']} "
                        f"({'adaptive' if doc['adaptive'] else 'all images'}) -> {doc['out']}")
    for col in ("path", "bits/dim before", "after", "purified", "changed", "verdict"):
        table.add_column(col, justify="left" if col in ("path", "verdict") else "right",
                         overflow="fold")
    for r in doc["images"]:
        table.add_row(r["path"], fmt_float(r["bits_per_dim_before"]),
                      fmt_float(r["bits_per_dim_after"]),
                      "-" if r["purified"] is None else ("yes" if r["purified"] else "no"),
                      "-" if r["changed"] is None else str(r["changed"]),
                      r["verdict"] if r["error"] is None else f"error: {r['error']}")
    table.caption = (f"{s['n']} image(s): {s['purified']} purified, {s['errors']} error(s); "
                     f"mean bits/dim {fmt_float(s['mean_bpd_before'])} -> "
                     f"{fmt_float(s['mean_bpd_after'])}")
    return table


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


@app.command("purify")
@handle_errors
def purify_cmd(
    paths: list[str] = typer.Argument(..., help="Images, folders, .npz/.npy files or built-in "
                                               "data specs such as digits:test."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the purified images and "
                                                      "manifest.json."),
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model bundle directory."),
    eps_defend: int | None = typer.Option(None, "--eps-defend", "-e", min=0, help=EPS_HELP),
    adaptive: bool = typer.Option(False, "--adaptive", help=ADAPTIVE_HELP),
    reference: bool = typer.Option(False, "--reference", help="Use the slow reference "
                                   "implementation (one forward pass per sub-pixel)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
    batch_size: int = typer.Option(DEFAULT_BATCH, min=1, help="Images read per batch."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resize: bool = typer.Option(False, "--resize", help="Resize images to the model's size."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Convert colour/gray to match."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Purify images (PixelDefend): move each sub-pixel, within +-eps_defend levels of its
    value, to the most likely value given the already purified pixels.

    Writes every input to --out under the same name (folders keep their layout; .npz stays
    .npz with levels and labels; lossy JPEG/WebP/GIF inputs are written as .png, since a
    lossy format would undo the purification) and --out/manifest.json with bits/dim before
    and after. Exit codes: 0 done, 2 bad usage or an unreadable input (the rest are still
    purified).

    [bold]Examples[/]

      pixeldefend purify suspicious/ --model models/digits --eps-defend 1 --out clean/

      pixeldefend purify adv.npz --model models/fmnist --eps-defend 16 --adaptive --out pur/

      pixeldefend purify digits:test --out pur/ --format json
    """
    out_dir = prepare_dir(out, command="purify", overwrite=overwrite,
                          inputs=input_paths(paths, model, data_root))
    detector, eps = _load(model, device, adaptive, eps_defend)
    spec = detector.spec
    stream = ImageStream(paths, spec, resize=resize, grayscale=grayscale, data_root=data_root)
    if len(stream) == 0:
        raise UsageError(f"no images found in {', '.join(paths)}")
    plan = PurifyOutputs.plan(paths, out, spec.levels)
    clear_dir(out_dir)  # ours (marker) and --overwrite: no stale copies of an earlier run
    out_dir.mark()
    rows: list[dict[str, Any]] = []
    threshold = detector.bpd_threshold
    with make_progress() as progress:
        task = progress.add_task("purify", total=len(stream), status="")
        for batch in stream.batches(batch_size):
            result = _run_purify(detector, batch, eps, adaptive, not reference)
            labels = batch.labels.tolist() if batch.labels is not None else None
            k = 0
            for name, error in zip(batch.names, batch.errors, strict=True):
                if error is not None:
                    rows.append({"path": name, "output": None, "bits_per_dim_before": None,
                                 "bits_per_dim_after": None, "purified": None, "changed": None,
                                 "verdict": "error", "error": error})
                    continue
                assert result is not None
                target = plan.add(name, result.images[k], labels[k] if labels else None)
                rows.append({
                    "path": name, "output": target,
                    "bits_per_dim_before": float(result.bpd_before[k]),
                    "bits_per_dim_after": float(result.bpd_after[k]),
                    "purified": bool(result.purified[k]), "changed": int(result.changed[k]),
                    "verdict": _verdict(float(result.bpd_before[k]), threshold), "error": None,
                })
                k += 1
            progress.update(task, advance=len(batch.names), status="")
    plan.flush()
    errors = sum(r["error"] is not None for r in rows)
    doc = {
        "model": str(model), "eps_defend": eps, "adaptive": adaptive, "threshold": threshold,
        "implementation": "reference" if reference else "fast", "out": str(out),
        "summary": {
            "n": len(rows), "purified": sum(bool(r["purified"]) for r in rows),
            "errors": errors,
            "mean_bpd_before": _mean([r["bits_per_dim_before"] for r in rows]),
            "mean_bpd_after": _mean([r["bits_per_dim_after"] for r in rows]),
        },
        "images": rows,
    }
    write_json(out / "manifest.json", json_safe(doc))
    emit(fmt, doc, rows, PURIFY_COLUMNS, lambda: _purify_table(doc))
    err_console.print(f"wrote {out} ({doc['summary']['purified']} purified, {errors} error(s))",
                      highlight=False)
    raise typer.Exit(EXIT_USAGE if errors else EXIT_OK)


# -------------------------------------------------------------------------- defend


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError as exc:
        raise UsageError(f"{option} takes comma-separated numbers, got {text!r}") from exc


def _defend_table(doc: dict[str, Any]) -> Table:
    s = doc["summary"]
    table = Table(title=f"defend: eps_defend {doc['eps_defend']}"
                        f"{' (adaptive)' if doc['adaptive'] else ''}, classifier "
                        f"{doc['classifier']}")
    for col in ("path", "bits/dim", "verdict", "purified", "after", "pred before", "pred",
                "prob", "label"):
        table.add_column(col, justify="left" if col in ("path", "verdict") else "right",
                         overflow="fold")
    for r in doc["images"]:
        if r["error"] is not None:
            table.add_row(r["path"], "-", f"error: {r['error']}", *["-"] * 6)
            continue
        mark = "" if r["correct"] is None else (" ok" if r["correct"] else " x")
        table.add_row(r["path"], fmt_float(r["bits_per_dim_before"]), r["verdict"],
                      "yes" if r["purified"] else "no", fmt_float(r["bits_per_dim_after"]),
                      str(r["pred_before_name"]), str(r["pred_name"]), fmt_float(r["prob"]),
                      ("-" if r["label"] is None else str(r["label"])) + mark)
    parts = [f"{s['n']} image(s)", f"{s['anomalous']} anomalous", f"{s['purified']} purified",
             f"{s['errors']} error(s)"]
    if s["accuracy_before"] is not None:
        parts.append(f"accuracy {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f}")
    table.caption = ", ".join(parts)
    return table


@app.command("defend")
@handle_errors
def defend_cmd(
    paths: list[str] = typer.Argument(..., help="Images, folders, .npz/.npy files or built-in "
                                               "data specs such as digits:test."),
    classifier: str = typer.Option(..., "--classifier", "-c", help="Classifier: bundle "
                                   "directory, TorchScript file or package.module:factory "
                                   "(these two run code: need --trust-code)."),
    model: Path = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model bundle directory."),
    eps_defend: int | None = typer.Option(None, "--eps-defend", "-e", min=0, help=EPS_HELP),
    adaptive: bool = typer.Option(False, "--adaptive", help=ADAPTIVE_HELP),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help=FORMAT_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write results here."),
    fail_on: str = typer.Option("none", help="Gate: 'anomalous' exits 1 if any input was "
                                "flagged (bits/dim above the calibrated threshold)."),
    mean: str | None = typer.Option(None, help="Per-channel mean the classifier expects, "
                                    "e.g. 0.49,0.48,0.45."),
    std: str | None = typer.Option(None, help="Per-channel std the classifier expects."),
    batch_size: int = typer.Option(DEFAULT_BATCH, min=1, help="Images read per batch."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    resize: bool = typer.Option(False, "--resize", help="Resize images to the model's size."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Convert colour/gray to match."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
    overwrite: bool = OVERWRITE,
) -> None:
    """Score, purify and classify: the PixelDefend pipeline in front of a classifier.

    Per image: bits/dim and verdict before purification, whether it was purified (all
    images, or with --adaptive only the anomalous ones), bits/dim after, and the
    classifier's prediction (and probability) before and after; with labels (class
    folders, .npz labels, built-in data) the accuracy before and after. Exit codes: 0
    pass, 1 the gate failed (--fail-on anomalous and an input was flagged), 2 bad usage
    or an unreadable input.

    [bold]Examples[/]

      pixeldefend defend adv/images.npz --model models/digits --classifier models/digits-classifier

      pixeldefend defend incoming/ -c models/digits-classifier --adaptive --fail-on anomalous

      pixeldefend defend digits:test -c models/digits-classifier --eps-defend 2 --format json
    """
    from ..models.classifier import check_inputs, classify, load_classifier

    if fail_on not in GATE_CHOICES:
        raise UsageError(f"--fail-on must be one of {', '.join(GATE_CHOICES)}, not {fail_on!r}")
    check_files((output, "--output"), overwrite=overwrite,
                inputs=input_paths(paths, model, classifier, data_root))
    detector, eps = _load(model, device, adaptive, eps_defend,
                          need_calibration=fail_on != "none")
    spec = detector.spec
    loaded = load_classifier(classifier, device=device, mean=_floats(mean, "--mean"),
                             std=_floats(std, "--std"), input_shape=spec.shape,
                             trust_code=trust_code)
    classes = loaded.classes
    stream = ImageStream(paths, spec, resize=resize, grayscale=grayscale, data_root=data_root)
    if len(stream) == 0:
        raise UsageError(f"no images found in {', '.join(paths)}")
    classes = classes or stream.classes
    cal = detector.calibrations.get("bpd")  # verdicts here are on bits/dim
    threshold = detector.bpd_threshold
    rows: list[dict[str, Any]] = []

    def name_of(label: int) -> str | int:
        return classes[label] if classes and 0 <= label < len(classes) else label

    with make_progress() as progress:
        task = progress.add_task("defend", total=len(stream), status="")
        for batch in stream.batches(batch_size):
            result = _run_purify(detector, batch, eps, adaptive, True)
            if result is not None:
                check_inputs(loaded, batch.images, batch.labels)
                pred_before, _ = classify(loaded, batch.images, spec.levels, batch_size)
                pred, probs = classify(loaded, result.images, spec.levels, batch_size)
                p_values = cal.p_values(result.bpd_before) if cal is not None else None
            labels = batch.labels.tolist() if batch.labels is not None else None
            k = 0
            for name, error in zip(batch.names, batch.errors, strict=True):
                if error is not None:
                    rows.append({c: None for c in DEFEND_COLUMNS} | {
                        "path": name, "verdict": "error", "error": error,
                        "pred_before_name": None, "pred_name": None})
                    continue
                assert result is not None
                label = labels[k] if labels else None
                p = int(pred[k])
                rows.append({
                    "path": name, "label": label,
                    "bits_per_dim_before": float(result.bpd_before[k]),
                    "p_value": None if p_values is None else float(p_values[k]),
                    "verdict": _verdict(float(result.bpd_before[k]), threshold),
                    "purified": bool(result.purified[k]),
                    "bits_per_dim_after": float(result.bpd_after[k]),
                    "changed": int(result.changed[k]),
                    "pred_before": int(pred_before[k]), "pred": p,
                    "pred_before_name": name_of(int(pred_before[k])), "pred_name": name_of(p),
                    "prob": float(probs[k, p]),
                    "correct": None if label is None else p == label,
                    "error": None,
                })
                k += 1
            progress.update(task, advance=len(batch.names), status="")
    ok = [r for r in rows if r["error"] is None]
    labelled = [r for r in ok if r["label"] is not None]
    summary = {
        "n": len(rows), "anomalous": sum(r["verdict"] == "anomalous" for r in ok),
        "purified": sum(bool(r["purified"]) for r in ok),
        "errors": len(rows) - len(ok),
        "mean_bpd_before": _mean([r["bits_per_dim_before"] for r in ok]),
        "mean_bpd_after": _mean([r["bits_per_dim_after"] for r in ok]),
        "labelled": len(labelled),
        "accuracy_before": (float(np.mean([r["pred_before"] == r["label"] for r in labelled]))
                            if labelled else None),
        "accuracy_after": float(np.mean([r["correct"] for r in labelled])) if labelled else None,
    }
    gate_failed = fail_on == "anomalous" and summary["anomalous"] > 0
    doc = {
        "model": str(model), "classifier": str(classifier), "eps_defend": eps,
        "adaptive": adaptive, "threshold": threshold, "classes": classes, "summary": summary,
        "gate": {"failed": gate_failed,
                 "reasons": [f"{summary['anomalous']} anomalous image(s)"] if gate_failed
                 else []},
        "images": rows,
    }
    emit(fmt, doc, rows, DEFEND_COLUMNS, lambda: _defend_table(doc), output)
    acc = "" if summary["accuracy_before"] is None else \
        f"; accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}"
    err_console.print(
        f"{summary['n']} image(s): {summary['anomalous']} anomalous, {summary['purified']} "
        f"purified, {summary['errors']} error(s){acc}"
        + ("; gate failed" if gate_failed else ""), highlight=False)
    if summary["errors"]:
        raise typer.Exit(EXIT_USAGE)
    raise typer.Exit(EXIT_GATE if gate_failed else EXIT_OK)
