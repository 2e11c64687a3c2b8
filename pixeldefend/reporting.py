"""Result rows, documents, tables and JUnit XML for `score` and `info`.

Kept out of the CLI so the same shapes are available from Python and tested directly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from . import __version__
from .calibration import Calibration
from .data import Batch
from .detector import DensityDetector
from .scores import TypicalityTest

SCORE_COLUMNS = ["path", "bits_per_dim", "nll_nats", "score", "p_value", "verdict", "error"]


def score_rows(detector: DensityDetector, batch: Batch, kind: str) -> list[dict[str, Any]]:
    """One row per item of the batch, in order. Unreadable items get verdict 'error' with
    error_kind 'read'; an image whose score is NaN or infinite gets verdict 'error' with
    error_kind 'score' (never 'clean': a NaN compares false against any threshold)."""
    cal = detector.calibrations.get(kind)
    good = batch.images
    rows: list[dict[str, Any]] = []
    if good.shape[0]:
        computed = detector.compute_scores(good, [kind])  # one model pass for all columns
        nll, bpd, scores = computed["nll_nats"], computed["bpd"], computed[kind]
        p_values = cal.p_values(scores) if cal is not None else np.full(len(scores), np.nan)
        flagged = cal.predict(scores) if cal is not None else np.zeros(len(scores), dtype=bool)
    k = 0
    for name, error in zip(batch.names, batch.errors, strict=True):
        if error is not None:
            rows.append({"path": name, "bits_per_dim": None, "nll_nats": None, "score": None,
                         "p_value": None, "verdict": "error", "error": error,
                         "error_kind": "read"})
            continue
        values = (float(bpd[k]), float(nll[k]), float(scores[k]))
        if not all(math.isfinite(v) for v in values):
            rows.append({"path": name, "bits_per_dim": None, "nll_nats": None, "score": None,
                         "p_value": None, "verdict": "error",
                         "error": f"non-finite score ({kind} {values[2]}, bits/dim "
                                  f"{values[0]}): the model's weights may be corrupt",
                         "error_kind": "score"})
            k += 1
            continue
        verdict = "anomalous" if flagged[k] else ("clean" if cal is not None else "uncalibrated")
        rows.append({
            "path": name,
            "bits_per_dim": float(bpd[k]),
            "nll_nats": float(nll[k]),
            "score": float(scores[k]),
            "p_value": None if math.isnan(p_values[k]) else float(p_values[k]),
            "verdict": verdict,
            "error": None,
            "error_kind": None,
        })
        k += 1
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, int]:
    verdicts = [r["verdict"] for r in rows]
    return {
        "n": len(rows),
        "clean": verdicts.count("clean"),
        "anomalous": verdicts.count("anomalous"),
        "errors": verdicts.count("error"),
    }


def score_document(rows: list[dict[str, Any]], model: Path | str, cal: Calibration | None,
                   kind: str) -> dict[str, Any]:
    return {
        "model": str(model),
        "score_kind": kind,
        "threshold": None if cal is None or math.isinf(cal.threshold) else cal.threshold,
        "target_fpr": None if cal is None else cal.fpr,
        "results": rows,
        "summary": summarise(rows),
        "pixeldefend_version": __version__,
    }


def batch_test_entry(test: TypicalityTest) -> dict[str, Any]:
    """The `batch_test` field of the score document."""
    return {**test.to_dict(), "kind": "typicality",
            "verdict": "anomalous" if test.anomalous else "typical"}


def batch_test_line(entry: dict[str, Any]) -> str:
    return (f"batch typicality test: {entry['n']} images, mean {entry['mean_bits_per_dim']:.4f} "
            f"bits/dim vs clean {entry['reference_mean']:.4f} (|diff| {entry['statistic']:.4f}, "
            f"bootstrap threshold {entry['threshold']:.4f}), p-value {entry['p_value']:.4f}: "
            f"{entry['verdict']}")


def score_table(doc: dict[str, Any]) -> Table:
    kind = doc["score_kind"]
    threshold = doc["threshold"]
    caption = f"threshold {threshold:.4f} ({kind}) at FPR {doc['target_fpr']:g}" \
        if threshold is not None else "uncalibrated: run `pixeldefend calibrate`"
    if doc.get("batch_test"):
        caption += "\n" + batch_test_line(doc["batch_test"])
    table = Table(title=f"pixeldefend score — {doc['model']}", caption=caption)
    table.add_column("path", overflow="fold")
    table.add_column("bits/dim", justify="right")
    table.add_column("log p (nats)", justify="right")
    if kind != "bpd":
        table.add_column(kind, justify="right")
    table.add_column("p-value", justify="right")
    table.add_column("verdict")
    style = {"clean": "green", "anomalous": "bold red", "error": "yellow"}
    for r in doc["results"]:
        cells = [r["path"]]
        if r["verdict"] == "error":
            cells += ["-", "-"] + (["-"] if kind != "bpd" else []) + ["-"]
            cells.append(f"[yellow]error[/]: {r['error']}")
        else:
            cells += [f"{r['bits_per_dim']:.4f}", f"{-r['nll_nats']:.2f}"]
            if kind != "bpd":
                cells.append(f"{r['score']:.4f}")
            cells.append("-" if r["p_value"] is None else f"{r['p_value']:.3f}")
            cells.append(f"[{style.get(r['verdict'], '')}]{r['verdict']}[/]")
        table.add_row(*cells)
    return table


def info_document(detector: DensityDetector, path: Path | str) -> dict[str, Any]:
    model = detector.model
    assert model is not None
    params = sum(p.numel() for p in model.parameters())
    meta = detector.meta
    return {
        "model": str(path),
        "package_version": meta.get("package_version"),
        "preset": meta.get("preset"),
        "image_shape": list(detector.spec.shape),
        "levels": detector.spec.levels,
        "parameters": params,
        "architecture": model.config.to_dict(),
        "data": meta.get("data"),
        "metrics": meta.get("metrics"),
        "default_score": detector.default_kind,
        "score_kinds": list(detector.available_kinds),
        "background": background_summary(detector),
        "calibration": {
            k: {kk: vv for kk, vv in c.to_dict().items() if kk not in ("scores", "reference")}
            for k, c in detector.calibrations.items()
        },
    }


def background_summary(detector: DensityDetector) -> dict[str, Any] | None:
    """What `info` shows about the likelihood-ratio background model (None if absent)."""
    if detector.background is None:
        return None
    training = detector.background_meta.get("training") or {}
    return {
        "preset": detector.background_meta.get("preset"),
        "mutation_rate": detector.background_meta.get("mutation_rate"),
        "parameters": sum(p.numel() for p in detector.background.parameters()),
        "n_train": training.get("n_train"),
        "epochs": len(training.get("history") or []),
        "val_bits_per_dim_mutated": training.get("val_bits_per_dim_mutated"),
    }


def info_table(doc: dict[str, Any]) -> Table:
    table = Table(title=f"pixeldefend model — {doc['model']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    c, h, w = doc["image_shape"]
    table.add_row("images", f"{c}x{h}x{w}, {doc['levels']} levels")
    arch = doc["architecture"]
    table.add_row("model", f"gated PixelCNN, preset {doc['preset']}, {doc['parameters']:,} "
                           f"parameters ({arch['layers']} layers x {arch['filters']} filters)")
    data = doc.get("data") or {}
    if data:
        table.add_row("trained on", f"{data.get('train')} ({data.get('n_train')} images)")
    for key, value in (doc.get("metrics") or {}).items():
        if key.endswith("seconds") and isinstance(value, int | float):
            value = f"{value:.0f} s"
        table.add_row(key.replace("_", " "), f"{value:.4f}" if isinstance(value, float)
                      else str(value))
    bg = doc.get("background")
    if bg:
        table.add_row("background model",
                      f"preset {bg['preset']}, {bg['parameters']:,} parameters, mutation rate "
                      f"{bg['mutation_rate']:g}, {bg['epochs']} epoch(s) on {bg['n_train']} "
                      f"images (enables score 'llr')")
    table.add_row("score kinds", ", ".join(doc.get("score_kinds") or []))
    for kind, cal in doc["calibration"].items():
        thr = cal["threshold"]
        table.add_row(f"threshold ({kind})",
                      f"{thr:.4f} {cal['unit']} at FPR {cal['fpr']:g}, {cal['n']} calibration "
                      f"images ({cal.get('data') or '?'})" if thr is not None else "infinite")
    table.add_row("version", str(doc.get("package_version")))
    return table
