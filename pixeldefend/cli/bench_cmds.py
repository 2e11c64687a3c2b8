"""`bench`: purification, scoring and training throughput on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..defaults import CASE_NAMES, DEFAULT_MODEL
from ..errors import UsageError
from .app import app
from .common import Format, OutputFormat, Overwrite, emit, err_console, flag, handle_errors

BENCH_COLUMNS = ["case", "shape", "levels", "batch", "eps_defend", "score_images_per_s",
                 "fast_images_per_s", "reference_images_per_s", "reference_extrapolated",
                 "speedup_fast_vs_reference", "fast_over_score", "train_step_s", "identical",
                 "peak_memory_mb"] + ["matmul_gflops", "score_gflops", "score_vs_matmul",
                                      "train_gflops", "train_vs_matmul", "purify_gflops",
                                      "purify_vs_matmul", "score_speedup_vs_plain",
                                      "train_speedup_vs_plain"]


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


def _bench_table(doc: dict[str, Any]) -> Table:
    sysinfo = doc["system"]
    table = Table(title=f"pixeldefend bench: torch {sysinfo['torch']}, {sysinfo['threads']} "
                        f"thread(s), {sysinfo['cpu_count']} CPU(s), batch "
                        f"{doc['settings']['batch_size']}")
    for col in ("case", "score img/s", "dose img/s", "fast img/s", "reference img/s",
                "speed-up vs ref",
                "fast ÷ score time", "train step s", "fast time split", "identical",
                "peak MB", "matmul GFLOP/s", "GFLOP/s score / train / purify (% of matmul)",
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


def parse_ranks(text: str) -> tuple[int, ...]:
    """--train-ranks '1,2' -> (1, 2); '' or '0' -> () (skip the scaling runs)."""
    try:
        ranks = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"--train-ranks takes comma-separated rank counts, e.g. 1,2, not "
                         f"{text!r}") from None
    if any(r < 0 for r in ranks):
        raise UsageError("--train-ranks: rank counts must be positive")
    return tuple(r for r in ranks if r > 0)


@app.command("bench")
@handle_errors
def bench_cmd(
    model: Annotated[Path, typer.Option(
        "--model", "-m", help="Digits model bundle for the first case (a small random "
        "model stands in if it is missing).")] = DEFAULT_MODEL,
    batch_size: int = typer.Option(64, min=1, help="Images per batch in every case."),
    quick: Annotated[bool, flag("--quick", help="One timing per figure and a 4 s "
                                "reference budget per case (unless --reference-budget is "
                                "given): about a minute in all.")] = False,
    cases: str = typer.Option(",".join(CASE_NAMES), help="Comma-separated cases to run."),
    reference_budget: float | None = typer.Option(
        None, min=0.0, help="Seconds of reference purification per case before "
        "extrapolating \\[default: 20, 4 with --quick]; 0: no budget, always run it in full "
        "(figures then never depend on machine load)."),
    threads: int | None = typer.Option(None, min=1, help="Intra-op threads (default: "
                                       "torch's). On a busy machine 1 is often fastest."),
    train_step: Annotated[bool, typer.Option("--train-step/--no-train-step", metavar="",
                                             help="Also time one training step.")] = True,
    profile: Annotated[bool, flag("--profile", help="Also profile fast purification per "
                                  "torch operator (one extra run per case).")] = False,
    train_ranks: str = typer.Option(
        "1,2", help="Also time data-parallel training with each of these numbers of ranks "
        "(processes; gloo on the CPU, a GPU each when there are enough) and report the "
        "scaling efficiency; '' skips it, as does --no-train-step."),
    fmt: Format = OutputFormat.table,
    output: Path | None = typer.Option(None, "--output", "-o", help="Write results here."),
    overwrite: Overwrite = False,
) -> None:
    """Measure purification throughput (fast and reference), scoring and training speed.

    Cases: the digits model, and the `small` preset at 28x28x1 and 32x32x3 (256 levels,
    random weights). The reference purification (one full forward pass per sub-pixel)
    is timed on its first sub-pixels and extrapolated when the whole run would exceed
    --reference-budget; such figures are marked. "fast ÷ score time" is the cost of fast
    purification in scoring passes of the same batch (1 would be the floor). With the
    training step it also times data-parallel training with --train-ranks processes
    (the same loop as `torchrun ... train`) and reports images/s and scaling efficiency.

    [bold]Examples[/]

      pixeldefend bench

      pixeldefend bench --quick --threads 1

      pixeldefend bench --cases 28x28x1 --batch-size 64 --format json -o bench.json

      pixeldefend bench --cases digits --train-ranks 1,2,4  [dim]# data-parallel scaling[/]
    """
    from ..bench import BenchSettings, run_bench
    from ..outputs import check_files, input_paths

    chosen = tuple(c.strip() for c in cases.split(",") if c.strip())
    unknown = [c for c in chosen if c not in CASE_NAMES]
    if unknown or not chosen:
        raise UsageError(f"--cases takes {', '.join(CASE_NAMES)}, not {', '.join(unknown)}")
    check_files((output, "--output"), inputs=input_paths(model), overwrite=overwrite)
    settings = BenchSettings(batch_size=batch_size, quick=quick, threads=threads,
                             reference_budget=reference_budget, train_step=train_step,
                             cases=chosen, model=model, profile=profile)
    ranks = parse_ranks(train_ranks)
    doc = run_bench(settings, log=lambda msg: err_console.print(f"[dim]{msg}[/]"))
    if train_step and ranks:
        doc["training_scaling"] = run_training_scaling(ranks, batch_size, quick, threads)
    emit(fmt, doc, bench_rows(doc), BENCH_COLUMNS, lambda: _bench_table(doc), output)


def run_training_scaling(ranks: tuple[int, ...], batch_size: int, quick: bool,
                         threads: int | None) -> dict[str, Any]:
    from ..bench import ScalingSettings, training_scaling

    settings = ScalingSettings(ranks=ranks, batch_size=batch_size, threads=threads or 1,
                               steps=4 if quick else 8, warmup=1 if quick else 2)
    return training_scaling(settings, log=lambda msg: err_console.print(f"[dim]{msg}[/]"))


def bench_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The result rows with the shape as CxHxW (one CSV cell)."""
    return [{**r, "shape": "x".join(str(d) for d in r["shape"])} for r in doc["results"]]
