"""`bench`: purification, scoring and training throughput on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..defaults import CASE_NAMES, DEFAULT_MODEL
from . import common
from .app import app


@app.command("bench")
@common.handle_errors
def bench_cmd(
    model: Annotated[Path, typer.Option(
        "--model", "-m", help="Digits model bundle for the first case (a small random "
        "model stands in if it is missing).")] = DEFAULT_MODEL,
    batch_size: int = typer.Option(64, min=1, help="Images per batch in every case."),
    quick: Annotated[bool, common.flag("--quick", help="A 4 s "
                                "reference budget per case (unless --reference-budget is "
                                "given): a couple of minutes in all.")] = False,
    cases: str = typer.Option(",".join(CASE_NAMES), help="Comma-separated cases to run."),
    reference_budget: float | None = typer.Option(
        None, min=0.0, help="Seconds of reference purification per case before "
        "extrapolating \\[default: 20, 4 with --quick]; 0: no budget, always run it in full "
        "(figures then never depend on machine load)."),
    threads: int | None = typer.Option(None, min=1, help="Intra-op threads (default: "
                                       "torch's). On a busy machine 1 is often fastest."),
    train_step: Annotated[bool, typer.Option("--train-step/--no-train-step", metavar="",
                                             help="Also time one training step.")] = True,
    profile: Annotated[bool, common.flag("--profile", help="Also profile fast purification per "
                                  "torch operator (one extra run per case).")] = False,
    train_ranks: str = typer.Option(
        "1,2", help="Also time data-parallel training with each of these numbers of ranks "
        "(processes; gloo on the CPU, a GPU each when there are enough) and report the "
        "scaling efficiency; '' skips it, as does --no-train-step."),
    fmt: common.Format = common.OutputFormat.table,
    output: common.Output = None,
    overwrite: common.Overwrite = False,
    sharded_score: common.ShardedScore = None,
) -> None:
    """Measure purification throughput (fast and reference), scoring and training speed.

    Cases: the digits model, and the `small` preset at 28x28x1 and 32x32x3 (256 levels,
    random weights). The reference purification (one full forward pass per sub-pixel)
    is timed on its first sub-pixels and extrapolated when the whole run would exceed
    --reference-budget; such figures are marked. "fast ÷ score time" is the cost of fast
    purification in scoring passes of the same batch (1 would be the floor).

    [bold]Examples[/]

      pixeldefend bench

      pixeldefend bench --quick --threads 1

      pixeldefend bench --cases 28x28x1 --batch-size 64 --format json -o bench.json
    """
    from ..bench import BenchSettings, parse_cases, parse_ranks, run_bench, run_training_scaling
    from ..outputs import check_files, input_paths
    from ..rendering import BENCH_COLUMNS, bench_rows, bench_table

    chosen = parse_cases(cases)
    check_files((output, "--output"), inputs=input_paths(model), overwrite=overwrite)
    settings = BenchSettings(batch_size=batch_size, quick=quick, threads=threads,
                             reference_budget=reference_budget, train_step=train_step,
                             cases=chosen, model=model, profile=profile)
    if sharded_score:  # a throughput line per rank instead of the cases (under torchrun)
        from ..bench import sharded_scoring, sharded_scoring_lines
        from ..sharding import join

        sharding = join("cpu")  # bench's cases run on the CPU
        doc = sharded_scoring(settings, sharded_score, sharding)
        if sharding.writes:
            common.emit(fmt, doc, doc["ranks"], ["rank", "images", "seconds", "images_per_s"],
                        lambda _: "\n".join(sharded_scoring_lines(doc)), output)
        return
    ranks = parse_ranks(train_ranks)
    dim = lambda msg: common.err_console.print(f"[dim]{msg}[/]")  # noqa: E731
    doc = run_bench(settings, log=dim)
    if train_step and ranks:
        doc["training_scaling"] = run_training_scaling(ranks, batch_size, quick, threads, dim)
    common.emit(fmt, doc, bench_rows(doc), BENCH_COLUMNS, bench_table, output)
