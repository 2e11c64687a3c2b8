"""Result rows, documents, tables and JUnit XML for `score` and `info`.

Kept out of the CLI so the same shapes are available from Python and tested directly.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from . import __version__
from .atomic import write_bytes
from .calibration import Calibration
from .data import Batch
from .density import LN2
from .detector import DensityDetector

SCORE_COLUMNS = ["path", "bits_per_dim", "nll_nats", "score", "p_value", "verdict", "error"]


def score_rows(detector: DensityDetector, batch: Batch, kind: str) -> list[dict[str, Any]]:
    """One row per item of the batch, in order; unreadable items get verdict 'error'."""
    cal = detector.calibrations.get(kind)
    good = batch.images
    rows: list[dict[str, Any]] = []
    if good.shape[0]:
        nll = detector.nll_map(good).double().flatten(1).sum(1).numpy()
        bpd = nll / (good[0].numel() * LN2)
        scores = bpd if kind == "bpd" else detector.score_samples(good, kind)
        p_values = cal.p_values(scores) if cal is not None else np.full(len(scores), np.nan)
        flagged = cal.predict(scores) if cal is not None else np.zeros(len(scores), dtype=bool)
    k = 0
    for name, error in zip(batch.names, batch.errors, strict=True):
        if error is not None:
            rows.append({"path": name, "bits_per_dim": None, "nll_nats": None, "score": None,
                         "p_value": None, "verdict": "error", "error": error})
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


def score_table(doc: dict[str, Any]) -> Table:
    kind = doc["score_kind"]
    threshold = doc["threshold"]
    caption = f"threshold {threshold:.4f} ({kind}) at FPR {doc['target_fpr']:g}" \
        if threshold is not None else "uncalibrated: run `pixeldefend calibrate`"
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


def write_junit(path: Path, rows: list[dict[str, Any]], kind: str) -> None:
    """JUnit XML: one test case per image; flagged = failure, unreadable = error."""
    summary = summarise(rows)
    suite = ET.Element("testsuite", name="pixeldefend.score", tests=str(summary["n"]),
                       failures=str(summary["anomalous"]), errors=str(summary["errors"]),
                       skipped="0")
    for r in rows:
        case = ET.SubElement(suite, "testcase", classname="pixeldefend.score", name=r["path"])
        if r["verdict"] == "error":
            ET.SubElement(case, "error", message=r["error"] or "unreadable", type="unreadable")
        elif r["verdict"] == "anomalous":
            msg = (f"{kind} score {r['score']:.4f} above threshold "
                   f"(bits/dim {r['bits_per_dim']:.4f}, p-value {r['p_value']:.4f})")
            ET.SubElement(case, "failure", message=msg, type="anomalous")
        else:
            ET.SubElement(case, "system-out").text = (
                f"bits/dim {r['bits_per_dim']:.4f}" if r["bits_per_dim"] is not None else "")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))


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
        "calibration": {
            k: {kk: vv for kk, vv in c.to_dict().items() if kk != "scores"}
            for k, c in detector.calibrations.items()
        },
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
        table.add_row(key.replace("_", " "), f"{value:.4f}" if isinstance(value, float)
                      else str(value))
    for kind, cal in doc["calibration"].items():
        thr = cal["threshold"]
        table.add_row(f"threshold ({kind})",
                      f"{thr:.4f} {cal['unit']} at FPR {cal['fpr']:g}, {cal['n']} calibration "
                      f"images ({cal.get('data') or '?'})" if thr is not None else "infinite")
    table.add_row("version", str(doc.get("package_version")))
    return table
