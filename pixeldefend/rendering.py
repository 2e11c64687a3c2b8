"""Result documents as text: strict JSON, JSON lines, CSV, and each command's Rich table.

One place for rendering, shared by the CLI and usable from Python; light (no numpy, no
PyTorch at import), so the CLI can import it before any work.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .progress import err_console

if TYPE_CHECKING:
    from .ood import OODReport

FORMATS = ("table", "json", "jsonl", "csv")


# Library text names Python parameters (`fpr`, `resize=True`); the command line shows
# them as flags (`--fpr`, `--resize`). The parameters whose flag is not `--` plus the
# dashed name:
FLAG_OF_PARAM = {"kind": "--score", "score_kind": "--score", "l2": "--l2",
                 "factory_weights": "--classifier-weights", "in_spec": "--in",
                 "fmt": "--format"}


def option_flag(param: str) -> str:
    """The flag that sets the library parameter `param` (`fpr` -> `--fpr`)."""
    return FLAG_OF_PARAM.get(param, "--" + param.replace("_", "-"))


def cli_text(text: str, params: str | tuple[str, ...] | None = ()) -> str:
    """Library text as the command line says it: each Python parameter in `params`, and
    every `name=True` (an on/off parameter), shown as its flag (`fpr` -> `--fpr`)."""
    text = re.sub(r"(?<![\w-])([a-z][a-z0-9_]*)=True(?![\w-])",
                  lambda m: option_flag(m[1]), text)
    for param in (params,) if isinstance(params, str) else params or ():
        text = re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w-])",
                      lambda _, f=option_flag(param): f, text)
    return text


def cli_message(exc: Exception) -> str:
    """A library error's message, with the parameters it names (`param`, an output's
    leading `label`) as flags."""
    message, label = str(exc), getattr(exc, "label", None)
    if label and not label.startswith("-") and message.startswith(label + " "):
        message = option_flag(label) + message[len(label):]
    return cli_text(message, getattr(exc, "param", None))


def cli_strings(value: Any) -> Any:
    """`cli_text` on every string of a result document or row (per-file errors, gate
    reasons) before it is shown."""
    if isinstance(value, str):
        return cli_text(value)
    if isinstance(value, dict):
        return {k: cli_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [cli_strings(v) for v in value]
    return value


def json_safe(value: Any) -> Any:
    """NaN / inf -> None, numpy scalars -> Python numbers, keys -> str: strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def dumps(doc: Any) -> str:
    """A document as indented strict JSON."""
    return json.dumps(json_safe(doc), indent=2) + "\n"


def render_text(fmt: str, doc: dict[str, Any], rows: list[dict[str, Any]],
                columns: list[str], table: Callable[[dict[str, Any]], Any] | None = None
                ) -> str:
    """The json (whole document), jsonl (a line per row), csv (a line per row) or table
    (`table(doc)` rendered 160 columns wide) text."""
    if fmt == "table" and table is not None:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=160, soft_wrap=True).print(table(doc))
        return buf.getvalue()
    if fmt == "json":
        return dumps(doc)
    if fmt == "jsonl":
        return "".join(json.dumps(json_safe(r)) + "\n" for r in rows)
    if fmt == "csv":
        return rows_to_csv(rows, columns)
    raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")


def write_result(text: str, output: Path | None = None) -> None:
    """`text` to stdout, or atomically to `output`."""
    from .atomic import write_text
    from .outputs import OutputError

    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        write_text(output, text)
    except OSError as exc:  # checked up front; this is a disk that filled up since
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None


class RowWriter:
    """Writes JSONL / CSV result rows as they come, to stdout or (atomically, published
    when the run ends) to `output`, so memory does not grow with the number of rows.
    `prepare` may rewrite each row before it is written."""

    def __init__(self, fmt: str, columns: list[str], output: Path | None,
                 prepare: Callable[[Any], Any] = lambda row: row) -> None:
        from .atomic import atomic_path

        self.columns, self.output, self.prepare = columns, output, prepare
        self._stack = contextlib.ExitStack()
        if output is None:
            self.fh: Any = sys.stdout
        else:
            tmp = self._stack.enter_context(atomic_path(output))
            self.fh = self._stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        self.writer = None
        if fmt == "csv":
            self.writer = csv.DictWriter(self.fh, fieldnames=columns, extrasaction="ignore",
                                         lineterminator="\n")
            self.writer.writeheader()

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in map(self.prepare, rows):
            if self.writer is not None:
                self.writer.writerow({k: ("" if row.get(k) is None else row.get(k))
                                      for k in self.columns})
            else:
                self.fh.write(json.dumps(json_safe(row)) + "\n")
        self.fh.flush()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        from .outputs import OutputError

        try:
            self._stack.__exit__(*exc)  # on success the file is published, else removed
        except OSError as error:  # checked up front; a disk that filled up since
            raise OutputError(f"cannot write {self.output}: {error.strerror or error}") \
                from None


def rows_to_csv(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def field_rows(doc: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """A nested document as `field,value` rows for CSV (`calibration.bpd.threshold`);
    lists of plain values become one space-separated value."""
    rows: list[dict[str, Any]] = []
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(field_rows(value, name + "."))
        elif isinstance(value, list | tuple) and not any(isinstance(v, dict | list)
                                                          for v in value):
            rows.append({"field": name, "value": " ".join(str(v) for v in value)})
        elif isinstance(value, list | tuple):
            rows.extend(field_rows({str(i): v for i, v in enumerate(value)}, name + "."))
        else:
            rows.append({"field": name, "value": json_safe(value)})
    return rows


def fmt_float(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------ command tables


def calibration_lines(detector: Any, kinds: list[str] | None, n: int, source: str
                      ) -> tuple[list[str], list[str], str]:
    """A line per calibrated kind (default: every available calibrated one), a warning per
    conservative threshold, and what was calibrated on."""
    from .calibration import min_calibration_images

    if kinds is None:
        kinds = [k for k in detector.available_kinds if k in detector.calibrations]
    lines, warnings = [], []
    for kind in kinds:
        cal = detector.calibrations[kind]
        default = " (default)" if kind == detector.default_kind else ""
        lines.append(f"  {kind:<10} threshold {cal.threshold:.4f} {cal.unit} at FPR "
                     f"{cal.fpr:g}{default}")
        if cal.conservative:
            warnings.append(
                f"{kind}: only {cal.n} calibration images for FPR {cal.fpr:g} (needs "
                f"{min_calibration_images(cal.fpr)}): the threshold is the largest clean "
                f"score, {cal.threshold:.4f}; its false-positive rate is not guaranteed "
                "(conservative_threshold=True)")
    return lines, warnings, f"calibrated {', '.join(kinds)} on {n} clean images of {source}"


def train_line(result: Any) -> str:
    """`train`'s result line: test bits/dim and the bits/dim threshold."""
    metrics, cal = result.metrics, result.detector.calibrations["bpd"]
    return (f"test bits/dim {fmt_float(metrics.get('test_bits_per_dim'), 4)}  (validation "
            f"{metrics['val_bits_per_dim']:.4f}); threshold {cal.threshold:.4f} bits/dim at "
            f"FPR {cal.fpr:g} from {cal.n} calibration images; {result.seconds:.0f} s")


def attack_table(summary: dict[str, Any]) -> Table:
    """`attack`: the summary as metric / value rows."""
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


def attack_columns(targeted: bool) -> list[str]:
    """`attack`'s per-image row columns (jsonl, csv)."""
    columns = ["index", "name", "label", "clean_pred", "adv_pred", "success", "linf", "l2"]
    return columns[:5] + ["target"] + columns[5:] if targeted else columns


def classifier_line(doc: dict[str, Any]) -> str:
    """`classifier train`'s table format: one line."""
    tested = f" on {doc['n_test']} images" if doc["n_test"] else ""
    return (f"test accuracy {fmt_float(doc['test_accuracy'], 4)}{tested} (validation "
            f"{doc['val_accuracy']:.4f}); {doc['epochs']} epochs in "
            f"{doc['train_seconds']:.0f} s -> {doc['bundle']}")


def purify_table(doc: dict[str, Any]) -> Table:
    """`purify`: a row per image, bits/dim before and after."""
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


def defend_table(doc: dict[str, Any]) -> Table:
    """`defend`: a row per image, verdict and predictions before and after."""
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


def defend_line(summary: dict[str, Any], gate_failed: bool) -> str:
    """`defend`'s one-line summary on stderr."""
    acc = "" if summary["accuracy_before"] is None else \
        f"; accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}"
    return (f"{summary['n']} image(s): {summary['anomalous']} anomalous, "
            f"{summary['purified']} purified, {summary['errors']} error(s){acc}"
            + ("; gate failed" if gate_failed else ""))


def ood_table(report: OODReport) -> Table:
    """A row per OOD set, a column per score kind; the best ROC AUC of a row in bold."""
    doc = report.to_dict()
    table = Table(
        title=f"pixeldefend evaluate-ood — {report.model}, in: {report.in_source} "
              f"({doc['in']['n']} images)",
        caption="cells: ROC AUC / AUPRC / FPR at 95% TPR (OOD = positive class; "
                "higher score = more anomalous)" + "".join(f"\n{n}" for n in report.notes))
    table.add_column("OOD set")
    table.add_column("n", justify="right")
    for kind in report.kinds:
        table.add_column(kind, justify="right")
    for name, entry in report.out.items():
        metrics = entry["metrics"]
        best = max(metrics[k]["auroc"] for k in report.kinds)
        cells = []
        for kind in report.kinds:
            m = metrics[kind]
            text = f"{m['auroc']:.3f} / {m['auprc']:.3f} / {m['fpr_at_95_tpr']:.3f}"
            cells.append(f"[bold]{text}[/]" if m["auroc"] == best else text)
        table.add_row(name, str(entry["n"]), *cells)
    return table


BENCH_COLUMNS = ["case", "shape", "levels", "batch", "eps_defend", "score_images_per_s",
                 "fast_images_per_s", "reference_images_per_s", "reference_extrapolated",
                 "speedup_fast_vs_reference", "fast_over_score", "approx_images_per_s",
                 "fast_over_approx", "approx_mismatch", "train_step_s", "identical",
                 "peak_memory_mb", "matmul_gflops", "score_gflops", "score_vs_matmul",
                 "train_gflops", "train_vs_matmul", "purify_gflops", "purify_vs_matmul",
                 "score_speedup_vs_plain", "train_speedup_vs_plain"]


def _roofline_cell(r: dict[str, Any]) -> str:
    """GFLOP/s of scoring, training and fast purification, each with its share of the
    matmul rate (bench's roofline columns)."""
    parts = []
    for key in ("score", "train", "purify"):
        rate = r.get(f"{key}_gflops")
        parts.append("-" if rate is None else f"{rate:.3g} ({r[f'{key}_vs_matmul']:.0%})")
    return " / ".join(parts)


def _speedup_cell(r: dict[str, Any]) -> str:
    """Scoring and training-step speed-up of the fast path over the plain one."""
    train = r.get("train_speedup_vs_plain")
    return (f"{r['score_speedup_vs_plain']:.2f}x / "
            + ("-" if train is None else f"{train:.2f}x"))


def _rate(value: float) -> str:
    return f"{value:,.3g}" if value < 100 else f"{value:,.0f}"


def bench_table(doc: dict[str, Any]) -> Table:
    """`bench`: a row per case, the measurement notes as caption."""
    sysinfo = doc["system"]
    table = Table(title=f"pixeldefend bench: torch {sysinfo['torch']}, {sysinfo['threads']} "
                        f"thread(s), {sysinfo['cpu_count']} CPU(s), batch "
                        f"{doc['settings']['batch_size']}")
    for col in ("case", "score img/s", "dose img/s", "fast img/s", "reference img/s",
                "speed-up vs ref",
                "fast ÷ score time", "fast ÷ approx time", "train step s", "fast time split",
                "identical", "peak MB", "matmul GFLOP/s",
                "GFLOP/s score / train / purify (% of matmul)",
                "fast path vs plain: score / train"):
        table.add_column(col, justify="left" if col in ("case", "fast time split") else "right",
                         overflow="fold")
    for r in doc["results"]:
        c, h, w = r["shape"]
        ref = _rate(r["reference_images_per_s"]) + ("*" if r["reference_extrapolated"] else "")
        split = " ".join(f"{k} {v:.0%}" for k, v in r["fast_split"].items())
        table.add_row(
            f"{r['case']} {c}x{h}x{w}, {r['levels']} lv, eps {r['eps_defend']}",
            _rate(r["score_images_per_s"]),
            f"{_rate(r['dose_images_per_s'])} ({1 / r['dose_over_score']:.2f}x)",
            _rate(r["fast_images_per_s"]), ref,
            f"{r['speedup_fast_vs_reference']:,.0f}x",
            f"{r['fast_over_score']:.2f}x",
            _approx_cell(r),
            "-" if r["train_step_s"] is None else f"{r['train_step_s']:.2f}",
            split,
            "-" if r["identical"] is None else ("yes" if r["identical"] else "NO"),
            "-" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:,.0f}",
            f"{r['matmul_gflops']:.3g}", _roofline_cell(r), _speedup_cell(r),
        )
    notes = []
    if any(r["reference_extrapolated"] for r in doc["results"]):
        notes.append("* extrapolated: " + ", ".join(
            f"{r['case']} from {r['reference_steps_timed']} of {r['reference_steps_total']} "
            "sub-pixels" for r in doc["results"] if r["reference_extrapolated"]))
    notes += [f"{r['case']}: {r['note']}" for r in doc["results"] if r["note"]]
    notes.append(f"{sysinfo['threads']} thread(s) used; the default here would be "
                 f"{sysinfo.get('threads_default')}")
    load = sysinfo.get("load_average_1m")
    if load is not None:
        notes.append(f"load average {load:.1f} before, "
                     f"{sysinfo.get('load_average_1m_after') or 0:.1f} after "
                     "(other work on the machine slows every figure)")
    for r in doc["results"]:
        if r.get("fast_top_ops"):
            notes.append(f"{r['case']} fast, top ops: " + ", ".join(
                f"{o['op'].removeprefix('aten::')} {o['share']:.0%}" for o in r["fast_top_ops"]))
    notes += scaling_notes(doc)
    table.caption = "\n".join(notes)
    return table


def _approx_cell(r: dict[str, Any]) -> str:
    """Exact purification's time over the one-pass approximation's, and how often that
    approximation is wrong."""
    return (f"{r['fast_over_approx']:.2f}x (approx {_rate(r['approx_images_per_s'])} "
            f"img/s, {r['approx_mismatch']:.1%} wrong)")


def scaling_notes(doc: dict[str, Any]) -> list[str]:
    """Data-parallel training throughput per number of ranks, as caption lines."""
    scaling = doc.get("training_scaling")
    if not scaling:
        return []
    c, h, w = scaling["shape"]
    lines = [f"data-parallel training ({scaling['backend']}, {scaling['preset']} preset "
             f"{c}x{h}x{w}, global batch {scaling['batch_size']}, "
             f"{scaling['threads_per_rank']} thread(s) per rank, {scaling['steps']} steps):"]
    for row in scaling["rows"]:
        efficiency = "" if row["efficiency"] is None else \
            f", scaling efficiency {row['efficiency']:.0%}"
        lines.append(f"  {row['ranks']} rank(s): {_rate(row['images_per_s'])} images/s "
                     f"({row['step_s']:.3f} s/step{efficiency})")
    return lines


def bench_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The result rows with the shape as CxHxW (one CSV cell)."""
    return [{**r, "shape": "x".join(str(d) for d in r["shape"])} for r in doc["results"]]


def evaluation_table(table: tuple[list[str], list[list[str]], list[str]], title: str) -> Table:
    """`evaluate`: a (header, rows, row kinds) table of `report`, styled by row kind."""
    header, rows, kinds = table
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i < 3 else "right")
    style = {"adaptive": "bold red", "strongest": "bold", "clean": "green"}
    for row, kind in zip(rows, kinds, strict=True):
        t.add_row(*row, style=style.get(kind))
    return t


def evaluation_renderables(results: dict[str, Any]) -> list[Table | str]:
    """`evaluate`'s table format: the first caveat, accuracy, headline, detection, and the
    sanity lines that are not alarms (those go to stderr)."""
    from .adaptive_report import sanity_lines
    from .report import accuracy_table, detection_table, headline

    return [f"[bold]{results['notes'][0]}[/]",
            evaluation_table(accuracy_table(results),
                             f"accuracy (%) on {results['config']['n']} images"),
            *(f"• {line}" for line in headline(results)),
            evaluation_table(detection_table(results), "detection by bits/dim"),
            *(line for line in sanity_lines(results) if not line.startswith("SANITY"))]


# ------------------------------------------------------------- the CLI's stdout

# results on a pipe or file are not squeezed into 80 columns
out_console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def emit(fmt: str, doc: dict[str, Any], rows: list[dict[str, Any]], columns: list[str],
         table: Callable[[dict[str, Any]], Table | str], output: Path | None = None) -> None:
    """The CLI's results in the chosen format (a FORMATS name) on stdout or, atomically,
    in `output`; library text in them (per-file errors, gate reasons) names flags."""
    fmt, doc, rows = getattr(fmt, "value", fmt), cli_strings(doc), cli_strings(rows)
    if fmt == "table" and output is None:
        out_console.print(table(doc))
        return
    write_result(render_text(fmt, doc, rows, columns, table), output)
    if output is not None:
        err_console.print(f"wrote {output}")


class RowStream(RowWriter):
    """`RowWriter` whose rows name flags (`cli_strings`) and which says what it wrote."""

    def __init__(self, fmt: str, columns: list[str], output: Path | None) -> None:
        super().__init__(getattr(fmt, "value", fmt), columns, output, prepare=cli_strings)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.output is not None and exc[0] is None:
            err_console.print(f"wrote {self.output}", highlight=False)
