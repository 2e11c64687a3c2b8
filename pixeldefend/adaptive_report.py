"""The adaptive-attack section of the evaluation report: per-attack accuracy with 95%
Wilson intervals, the per-image worst case, the detector-aware attack's gate figures,
surrogate agreement, cost per attack step, sanity checks (loudly when they fail) and the
loss-curve figure. `report.py` calls this; the numbers come from `adaptive.run_suite`."""

from __future__ import annotations

import io
from typing import Any


def _pct(v: float | None) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"


def _ci(entry: dict[str, Any]) -> str:
    lo, hi = entry.get("ci95", [None, None])
    return f"{_pct(entry['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"


def sanity_lines(results: dict[str, Any]) -> list[str]:
    """One line per failed check (starting 'SANITY CHECK FAILED'), else one summary line."""
    lines = []
    for sr in results.get("adaptive", []):
        san = sr.get("sanity")
        if not san:
            continue
        failed = [c for c in san["checks"] if not c["passed"]]
        for c in failed:
            lines.append(f"SANITY CHECK FAILED (eps {sr['eps_text']}, {san['attack']} vs "
                         f"{san['column']}): {c['name']}: {c['detail']}. The adaptive "
                         "numbers of this run are not trustworthy.")
        if not failed:
            lines.append(f"sanity checks passed (eps {sr['eps_text']}): "
                         + "; ".join(f"{c['name']} ({c['detail']})" for c in san["checks"]))
    return lines


def _eps_table(sr: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The heading and accuracy table of one eps."""
    cols = list(sr["columns"])
    out = [f"### eps {sr['eps_text']} ({sr['ball']} levels), {sr['n']} images", ""]
    out.append("| attack | " + " | ".join(labels.get(k, k) for k in cols) + " |")
    out.append("|---|" + "---:|" * len(cols))
    names: list[str] = []
    for c in sr["columns"].values():
        names += [a for a in c["attacks"] if a not in names]
    out.append("| clean | " + " | ".join(_ci(sr["columns"][k]["clean"]) for k in cols)
               + " |")
    if any("prior" in sr["columns"][k] for k in cols):
        out.append("| earlier attacks, per image | " + " | ".join(
            _ci(sr["columns"][k]["prior"]) if "prior" in sr["columns"][k] else "–"
            for k in cols) + " |")
    for a in names:
        cells = []
        for k in cols:
            e = sr["columns"][k]["attacks"].get(a)
            if e is None:
                cells.append("–")
            elif "n_attacked" in e:
                cells.append(f"{e.get('fooled_of_attacked', 0)} of "
                             f"{e.get('n_attacked', 0)} attacked fooled "
                             f"({e.get('survivors', '?')} survivors)")
            else:
                cells.append(_ci(e))
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    out.append("| **worst case per image, every attack** | " + " | ".join(
        f"**{_ci(sr['columns'][k]['worst_case'])}**" for k in cols) + " |")
    out.append("")
    return out


def _eps_notes(sr: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Detector-aware results, cost, surrogate agreement and sanity checks of one eps."""
    cols = list(sr["columns"])
    out: list[str] = []
    for k in cols:
        for dname in ("detector", "detector-random"):
            det = sr["columns"][k]["attacks"].get(dname)
            if det is None:
                continue
            out.append(
                f"- {dname} (detector-aware) vs {labels.get(k, k)}: accuracy "
                f"{_pct(det['accuracy'])}% (fools the classifier through the defence: "
                f"{_pct(1 - det['accuracy'])}%); adversarial images under the bits/dim "
                f"threshold (pass the gate): {_pct(det['passes_gate'])}%; fool the "
                f"classifier *and* pass the gate: {_pct(det['fooled_and_passes_gate'])}%.")
    cost = []
    for k in cols:
        for a, e in sr["columns"][k]["attacks"].items():
            if "seconds_per_image_step" in e:
                cost.append(f"{a} vs {labels.get(k, k)} "
                            f"{1000 * e['seconds_per_image_step']:.1f} ms")
            elif a == "square" and e.get("n_attacked"):  # no steps: whole run
                secs = e["summary"].get("seconds", 0)
                cost.append(f"square vs {labels.get(k, k)} {secs:.0f} s for "
                            f"{e['n_attacked']} images × ≤ {e['summary'].get('queries')} "
                            "queries")
    if cost:
        out += ["", "Cost per attack step per image (wall clock, one thread, including "
                    "the exact purification of every iterate): " + "; ".join(cost) + "."]
    agree = sr.get("agreement") or {}
    if agree:
        out += ["", "Surrogate vs exact purifier (round(surrogate) == exact):", "",
                "| column | forward | temperature | passes | sub-pixels | sub-pixels the "
                "purifier changed | classifier |", "|---|---|---:|---:|---:|---:|---:|"]
        for k, rows in agree.items():
            for r in rows:
                out.append(f"| {labels.get(k, k)} | "
                           f"{'anchored at exact (bpda-surrogate)' if r['anchored'] else 'from input (surrogate-pgd)'} | "  # noqa: E501
                           f"{r['temperature']:g} | {r['passes']} | {_pct(r['subpixels'])} | "
                           f"{_pct(r['changed_subpixels'])} | {_pct(r['classifier'])} |")
    san = sr.get("sanity")
    if san:
        out += ["", f"Sanity checks ({san['attack']} vs {labels.get(san['column'])}, "
                    f"first {san['n']} images):", ""]
        for c in san["checks"]:
            mark = "passed" if c["passed"] else "**FAILED**"
            out.append(f"- {mark}: {c['name']}: {c['detail']}")
    return out


def adaptive_markdown(results: dict[str, Any]) -> list[str]:
    """Markdown lines of the adaptive section (empty when the suite did not run)."""
    suite = results.get("adaptive") or []
    if not suite:
        return []
    labels = {c["key"]: c["label"] for c in results["columns"]}
    out = ["## Adaptive attacks (pixeldefend.adaptive)", "",
           "Accuracy (%) of the exact pipeline (quantised image → exact purifier → "
           "classifier), with 95% Wilson score intervals. Square runs only on the images "
           "every earlier attack (oblivious, BPDA and the attacks above it) failed on: the "
           "per-image worst case needs nothing else; its row counts the survivors it fooled "
           "(so do the rows of any attack the suite runs on survivors only). "
           "cw-bs is oblivious (it attacks the bare classifier) with a binary search over c.",
           ""]
    for sr in suite:
        out += _eps_table(sr, labels) + _eps_notes(sr, labels)
        out.append("")
    for line in sanity_lines(results):
        if line.startswith("SANITY"):
            out += [f"> **{line}**", ""]
    return out


def loss_curve_figure(results: dict[str, Any]) -> bytes | None:
    """Mean loss per step (first restart) per attack, one line per defence column."""
    suite = [sr for sr in results.get("adaptive", [])
             if any("loss_curve" in e for c in sr["columns"].values()
                    for e in c["attacks"].values())]
    if not suite:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = {c["key"]: c["label"] for c in results["columns"]}
    names: list[str] = []
    for sr in suite:
        for c in sr["columns"].values():
            names += [a for a, e in c["attacks"].items() if "loss_curve" in e and a not in names]
    fig, axes = plt.subplots(len(suite), len(names), figsize=(4 * len(names), 3 * len(suite)),
                             squeeze=False)
    for r, sr in enumerate(suite):
        for j, a in enumerate(names):
            ax = axes[r, j]
            for k, c in sr["columns"].items():
                e = c["attacks"].get(a)
                if e and e.get("loss_curve"):
                    ax.plot(e["loss_curve"], label=labels.get(k, k))
            ax.set_title(f"{a}, eps {sr['eps_text']}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("mean loss (maximised)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
