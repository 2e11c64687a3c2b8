"""The evaluation report: tables (shared by Markdown, HTML and the terminal), matplotlib
figures, and the files in the output folder (report.md, self-contained report.html,
results.json, PNGs), all written atomically."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adaptive_report import adaptive_markdown, loss_curve_figure
from .atomic import write_bytes, write_text
from .evaluation.results import Evaluation

Table = tuple[list[str], list[list[str]], list[str]]  # header, rows, row kinds


def pct(v: float | None) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"


def num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def accuracy_table(results: dict[str, Any]) -> Table:
    """Accuracy (%) per attack x eps (rows) and defence (columns), with the strongest
    oblivious attack per eps and the adaptive BPDA rows marked as such."""
    cols = results["columns"]
    header = ["attack", "eps", "n"] + [c["label"] for c in cols]
    rows: list[list[str]] = []
    kinds: list[str] = []
    clean = results["clean"]
    rows.append(["clean (no attack)", "–", str(clean["n"])]
                + [pct(clean["accuracy"][c["key"]]) for c in cols])
    kinds.append("clean")
    bpda = [r for r in results["rows"] if r["kind"] == "adaptive"]
    if bpda and bpda[0]["n"] != clean["n"]:
        rows.append([f"clean, first {bpda[0]['n']} (BPDA subset)", "–", str(bpda[0]["n"])]
                    + [pct(bpda[0]["clean_accuracy"][c["key"]]) for c in cols])
        kinds.append("clean")
    for i, eps in enumerate(results["config"]["eps"]):
        for r in results["rows"]:
            if r["eps"] != i or r["kind"] != "oblivious":
                continue
            rows.append([r["attack"], eps["text"], str(r["n"])]
                        + [pct(r["accuracy"][c["key"]]) for c in cols])
            kinds.append("oblivious")
        for st in results["strongest"]:
            if st["eps"] == i:
                rows.append(["strongest oblivious", eps["text"], str(clean["n"])]
                            + [f"{pct(st['accuracy'][c['key']])} ({st['attack'][c['key']]})"
                               for c in cols])
                kinds.append("strongest")
        for r in results["rows"]:
            if r["eps"] == i and r["kind"] == "adaptive":
                steps = results["config"]["bpda"]["steps"]
                rows.append([f"BPDA-{steps} (adaptive)", eps["text"], str(r["n"])]
                            + [pct(r["accuracy"][c["key"]]) for c in cols])
                kinds.append("adaptive")
        for w in results.get("worst_case", []):
            if w["eps"] == i:
                rows.append(["every attack, per image", eps["text"], str(w["n"])]
                            + [pct(w["accuracy"][c["key"]]) for c in cols])
                kinds.append("adaptive" if "bpda" in w["attacks"] else "strongest")
    return header, rows, kinds


def detection_table(results: dict[str, Any]) -> Table:
    thr = results["threshold"]
    cal = "calibrated" if thr["calibrated"] is None else f"calibrated ({thr['calibrated']:.3f})"
    header = ["attack", "eps", "n", "bits/dim clean", "bits/dim adv", "AUROC",
              "AUROC fooling only", f"TPR {cal}", f"TPR @5% FPR ({thr['fpr5_clean']:.3f})"]
    rows, kinds = [], []
    for d in results["detection"]:
        rows.append([d["attack"], d["eps_text"], str(d["n"]), num(d["mean_bpd_clean"]),
                     num(d["mean_bpd_adv"]), num(d["auroc"]),
                     f"{num(d['auroc_fooled'])} ({d['n_fooled']})", pct(d["tpr_calibrated"]),
                     pct(d["tpr_fpr5"])])
        kinds.append(d["kind"])
    return header, rows, kinds


def markdown_table(table: Table) -> str:
    header, rows, kinds = table
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row, kind in zip(rows, kinds, strict=True):
        cells = [f"**{c}**" if kind in ("adaptive", "strongest") and c else c for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(table: Table) -> str:
    header, rows, kinds = table
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
           + "</tr></thead>", "<tbody>"]
    for row, kind in zip(rows, kinds, strict=True):
        out.append(f'<tr class="{kind}">' + "".join(
            f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def headline(results: dict[str, Any]) -> list[str]:
    """The sentences a reader needs first: strongest attacks and BPDA, per eps."""
    cols = results["columns"]
    lines = []
    for st in results["strongest"]:
        best = max((c for c in cols if c["key"] != "none"),
                   key=lambda c: st["accuracy"][c["key"]], default=None)
        line = (f"eps {st['eps_text']}: the strongest oblivious attack leaves "
                f"{pct(st['accuracy']['none'])}% accuracy without defence")
        if best is not None:
            line += (f" and {pct(st['accuracy'][best['key']])}% with {best['label']} "
                     f"(strongest against it: {st['attack'][best['key']]})")
        lines.append(line + ".")
    for r in results["rows"]:
        if r["kind"] == "adaptive":
            parts = ", ".join(f"{c['label']} {pct(r['accuracy'][c['key']])}%"
                              for c in cols if c["key"] != "none")
            lines.append(f"eps {r['eps_text']}: BPDA (adaptive, {r['n']} images) leaves "
                         f"{parts or pct(r['accuracy']['none']) + '%'}.")
    return lines


# ---------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _show(ax, image: torch.Tensor, levels: int) -> None:
    a = image.numpy().astype(np.float64) / (levels - 1)
    if a.shape[0] == 1:
        ax.imshow(a[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(a.transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _name(classes: list[str] | None, k: int) -> str:
    return classes[k] if classes and 0 <= k < len(classes) else str(k)


def histogram_figure(ev: Evaluation, eps_index: int) -> bytes:
    """The PixelDefend paper's density figure: bits/dim of clean vs adversarial images."""
    plt = _plt()
    res = ev.results
    eps = res["config"]["eps"][eps_index]
    dets = [d for d in res["detection"] if d["eps"] == eps_index and d["kind"] == "oblivious"]
    ncol = min(3, max(1, len(dets)))
    nrow = max(1, -(-len(dets) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    thr = res["threshold"]["calibrated"]
    for ax, d in zip(axes.flat, dets, strict=False):
        adv = ev.adversarial[f"{d['attack']}-eps{eps['ball']}"]["bpd"]
        lo = float(min(ev.clean_bpd.min(), np.min(adv)))
        hi = float(max(ev.clean_bpd.max(), np.max(adv)))
        bins = np.linspace(lo, hi, 40)
        ax.hist(ev.clean_bpd, bins=bins, alpha=0.6, label="clean", color="tab:blue")
        ax.hist(adv, bins=bins, alpha=0.6, label=d["attack"], color="tab:red")
        if thr is not None:
            ax.axvline(thr, color="k", ls="--", lw=1, label="calibrated threshold")
        ax.set_title(f"{d['attack']}, eps {eps['text']}: AUROC {num(d['auroc'])}")
        ax.set_xlabel("bits/dim")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(dets):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def examples_figure(ev: Evaluation, eps_index: int, classes: list[str] | None) -> bytes | None:
    """Per attack, one image the attack fooled: clean / adversarial / purified, each with
    its bits/dim and predicted label."""
    plt = _plt()
    res = ev.results
    eps = res["config"]["eps"][eps_index]
    e0 = next((c["eps_defend"] for c in res["columns"] if c["defence"] == "purify"), None)
    if e0 is None:
        e0 = next((c["eps_defend"] for c in res["columns"] if c["defence"] != "none"), None)
    attacks = [a for a in res["config"]["attacks"] if f"{a}-eps{eps['ball']}" in ev.adversarial]
    if not attacks:
        return None
    labels = ev.labels.numpy()
    ncol = 3 if e0 is not None else 2
    fig, axes = plt.subplots(len(attacks), ncol, figsize=(2.4 * ncol, 2.5 * len(attacks)),
                             squeeze=False)
    for row, a in zip(axes, attacks, strict=True):
        s = f"{a}-eps{eps['ball']}"
        adv = ev.adversarial[s]
        fooled = np.flatnonzero((ev.clean_pred == labels) & (adv["pred"] != labels))
        i = int(fooled[0]) if len(fooled) else 0
        panels = [("clean", ev.clean[i], ev.clean_pred[i], ev.clean_bpd[i]),
                  (a, adv["images"][i], adv["pred"][i], adv["bpd"][i])]
        if e0 is not None:
            pur = ev.purified[f"{s}|{e0}"]
            panels.append((f"purified ε_def={e0}", pur["images"][i], pur["pred"][i],
                           pur["bpd"][i]))
        for ax, (title, img, pred, bpd) in zip(row, panels, strict=True):
            _show(ax, img, ev.levels)
            ok = int(pred) == int(labels[i])
            ax.set_title(f"{title}\npred {_name(classes, int(pred))} · {bpd:.2f} bpd",
                         fontsize=8, color="black" if ok else "tab:red")
        row[0].set_ylabel(f"label {_name(classes, int(labels[i]))}", fontsize=8)
    fig.suptitle(f"eps {eps['text']} (red: wrong prediction)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def nll_figure(ev: Evaluation, detector: Any, count: int = 4) -> bytes | None:
    """Per-pixel negative log-likelihood of a few adversarial images and their clean
    originals: where the density model sees the perturbation."""
    plt = _plt()
    res = ev.results
    if not res["strongest"]:
        return None
    st = res["strongest"][0]
    eps = res["config"]["eps"][st["eps"]]
    s = f"{st['attack']['none']}-eps{eps['ball']}"
    adv = ev.adversarial[s]
    labels = ev.labels.numpy()
    pick = np.flatnonzero(adv["pred"] != labels)[:count]
    if len(pick) == 0:
        pick = np.arange(min(count, len(labels)))
    idx = torch.from_numpy(pick)
    clean_map = detector.nll_map(ev.clean[idx]).sum(1).numpy() / np.log(2)
    adv_map = detector.nll_map(adv["images"][idx]).sum(1).numpy() / np.log(2)
    fig, axes = plt.subplots(len(pick), 4, figsize=(9, 2.3 * len(pick)), squeeze=False)
    for r, i in enumerate(pick):
        vmax = float(max(clean_map[r].max(), adv_map[r].max()))
        _show(axes[r, 0], ev.clean[i], ev.levels)
        axes[r, 0].set_title(f"clean · {ev.clean_bpd[i]:.2f} bpd", fontsize=8)
        axes[r, 1].imshow(clean_map[r], cmap="magma", vmin=0, vmax=vmax)
        axes[r, 1].set_title("clean NLL (bits)", fontsize=8)
        _show(axes[r, 2], adv["images"][i], ev.levels)
        axes[r, 2].set_title(f"{st['attack']['none']} · {adv['bpd'][i]:.2f} bpd", fontsize=8)
        im = axes[r, 3].imshow(adv_map[r], cmap="magma", vmin=0, vmax=vmax)
        axes[r, 3].set_title("adversarial NLL (bits)", fontsize=8)
        for ax in axes[r, 1:]:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes[r, 3], fraction=0.046)
    fig.suptitle(f"per-pixel NLL, {st['attack']['none']} at eps {eps['text']}", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def make_figures(ev: Evaluation, detector: Any, classes: list[str] | None = None
                 ) -> dict[str, bytes]:
    """File name -> PNG bytes."""
    figs: dict[str, bytes] = {}
    for i, eps in enumerate(ev.results["config"]["eps"]):
        if any(d["eps"] == i and d["kind"] == "oblivious" for d in ev.results["detection"]):
            figs[f"bpd-hist-eps{eps['ball']}.png"] = histogram_figure(ev, i)
            ex = examples_figure(ev, i, classes)
            if ex is not None:
                figs[f"examples-eps{eps['ball']}.png"] = ex
    nll = nll_figure(ev, detector)
    if nll is not None:
        figs["nll-maps.png"] = nll
    curves = loss_curve_figure(ev.results)
    if curves is not None:
        figs["adaptive-loss-curves.png"] = curves
    return figs


# ---------------------------------------------------------------------------- documents


def _context_lines(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    eps = ", ".join(f"{e['text']} (= {e['levels']:.3g} levels, ball {e['ball']})"
                    for e in cfg["eps"])
    lines = [
        f"model `{cfg.get('model', '?')}`, classifier `{cfg.get('classifier', '?')}`, "
        f"data `{cfg.get('data', '?')}`: {cfg['n']} images, {cfg['levels']} levels",
        f"attacks {', '.join(cfg['attacks']) or 'none'}; eps {eps}; eps_defend "
        f"{', '.join(map(str, cfg['eps_defend']))} levels; seed {cfg['seed']}",
    ]
    if cfg.get("command"):
        lines.append(f"command: `{cfg['command']}`")
    t = results["timing"]
    lines.append(f"compute: {t['seconds_total']:.0f} s over all stages "
                 f"({t['seconds_this_run']:.0f} s in the last run) on {cfg['device']}")
    return lines


def render_markdown(results: dict[str, Any], figures: list[str]) -> str:
    out = ["# PixelDefend evaluation", ""]
    out += [f"- {line}" for line in _context_lines(results)]
    out += ["", f"> **{results['notes'][0]}**", "", "## Accuracy (%)", ""]
    out += [markdown_table(accuracy_table(results)), ""]
    out += [f"- {line}" for line in headline(results)]
    out += [""] + adaptive_markdown(results)
    out += ["", "## Detection (bits/dim, adversarial = positive)", ""]
    out += [markdown_table(detection_table(results)), ""]
    out += ["## Notes", ""] + [f"- {n}" for n in results["notes"][1:]] + [""]
    if figures:
        out += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}
tr.adaptive{background:#fde8e8;font-weight:bold} tr.strongest{background:#f3f3f3}
tr.clean{background:#eef6ee} .warn{background:#fff4d6;border-left:4px solid #e0a000;
padding:.6em 1em} img{max-width:100%;display:block;margin:1em 0}"""


def render_html(results: dict[str, Any], figures: dict[str, bytes]) -> str:
    """One self-contained file: figures inline as base64 PNGs."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<title>PixelDefend evaluation</title>", f"<style>{CSS}</style></head><body>",
             "<h1>PixelDefend evaluation</h1><ul>"]
    parts += [f"<li>{esc(line).replace('`', '')}</li>" for line in _context_lines(results)]
    parts += ["</ul>", f"<p class='warn'><b>{esc(results['notes'][0])}</b></p>",
              "<h2>Accuracy (%)</h2>", html_table(accuracy_table(results)), "<ul>"]
    parts += [f"<li>{esc(line)}</li>" for line in headline(results)]
    adaptive = adaptive_markdown(results)
    if adaptive:  # the section as preformatted markdown: tables stay readable
        parts += ["</ul>", "<pre>" + esc("\n".join(adaptive)) + "</pre>", "<ul>"]
    parts += ["</ul>", "<h2>Detection (bits/dim, adversarial = positive)</h2>",
              html_table(detection_table(results)), "<h2>Notes</h2><ul>"]
    parts += [f"<li>{esc(n)}</li>" for n in results["notes"][1:]]
    parts.append("</ul>")
    if figures:
        parts.append("<h2>Figures</h2>")
        for name, png in figures.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<h3>{esc(name)}</h3><img alt='{esc(name)}' "
                         f"src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def json_safe(value: Any) -> Any:
    """NaN / inf -> None and numpy scalars -> Python, so results.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


def results_json(results: dict[str, Any]) -> str:
    return json.dumps(json_safe(results), indent=2, ensure_ascii=False) + "\n"


def write_report(ev: Evaluation, detector: Any, out: Path | str,
                 classes: list[str] | None = None, figures: bool = True) -> list[Path]:
    """Write figures, results.json, report.md and report.html into `out`; returns paths."""
    out = Path(out)
    figs = make_figures(ev, detector, classes) if figures else {}
    ev.results["figures"] = list(figs)
    written = []
    for name, png in figs.items():
        write_bytes(out / name, png)
        written.append(out / name)
    write_text(out / "results.json", results_json(ev.results))
    write_text(out / "report.md", render_markdown(ev.results, list(figs)))
    write_text(out / "report.html", render_html(ev.results, figs))
    written += [out / "results.json", out / "report.md", out / "report.html"]
    return written
