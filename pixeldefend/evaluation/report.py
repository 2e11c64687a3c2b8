"""Plain-words summaries of a results document; the tables, figures and report files
are drawn by `pixeldefend.report` (and `pixeldefend.adaptive_report` for the suite)."""

from __future__ import annotations

from typing import Any

from ..report import (
    accuracy_table,
    detection_table,
    headline,
    render_markdown,
    results_json,
    write_report,
)


def strongest_summary(results: dict[str, Any]) -> list[str]:
    """Plain-words lines: strongest oblivious attack and BPDA per eps, per defence."""
    lines = []
    cols = results["columns"]
    for st in results["strongest"]:
        parts = [f"{c['label']} {100 * st['accuracy'][c['key']]:.1f}% "
                 f"({st['attack'][c['key']]})" for c in cols]
        lines.append(f"eps {st['eps_text']}: strongest oblivious attack: " + "; ".join(parts))
    for r in results["rows"]:
        if r["kind"] == "adaptive":
            parts = [f"{c['label']} {100 * r['accuracy'][c['key']]:.1f}%" for c in cols]
            lines.append(f"eps {r['eps_text']}: BPDA on {r['n']} images: " + "; ".join(parts))
    return lines


__all__ = ["accuracy_table", "detection_table", "headline", "render_markdown", "results_json",
           "strongest_summary", "write_report"]
