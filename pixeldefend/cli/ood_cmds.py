"""`evaluate-ood`: which anomaly score separates clean images from foreign ones?"""

from __future__ import annotations

from pathlib import Path

import typer

from ..defaults import BUILTIN_OOD, DEFAULT_MODEL
from ..scores import SCORES
from . import common
from .app import app


@app.command("evaluate-ood")
@common.handle_errors
def evaluate_ood_cmd(
    model: common.ModelBundle = DEFAULT_MODEL,
    in_spec: str | None = typer.Option(
        None, "--in", help="In-distribution (clean) test images \\[default: the bundle's test "
                           "split, else its calibration split]."),
    out_sets: str = typer.Option(
        ",".join(BUILTIN_OOD), "--out-sets",
        help=f"Comma-separated OOD sets: built-in {', '.join(BUILTIN_OOD)}, or any data spec "
             "(mnist:test, a folder, an .npz; converted to the model's shape)."),
    n: int = typer.Option(1000, "--n", "-n", min=1, help="Images per set (seeded subset)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write report.md, results.json and hist_<kind>.png here."),
    fmt: common.OutputFormat = typer.Option(common.OutputFormat.table, "--format", "-f",
                                     help="table, json, jsonl or csv (one row per set x kind)."),
    score: str | None = typer.Option(
        None, "--score", help=f"Comma-separated score kinds ({', '.join(SCORES)}) "
                              "\\[default: every kind the bundle supports]."),
    seed: int = typer.Option(0, help="Seed for subsets and the random OOD sets."),
    batch_size: common.BatchSize = 256,
    device: common.Device = "auto",
    data_root: common.DataRoot = None,
    download: common.Download = False,
    overwrite: common.Overwrite = False,
) -> None:
    """Benchmark every score kind against out-of-distribution sets.

    For each OOD set and score kind: ROC AUC, AUPRC and the false-positive rate at 95%
    true-positive rate, with OOD images as the positive class. Raw likelihood (bpd) often
    fails here (models prefer simple images); complexity, llr and typicality are the
    published fixes.

    [bold]Examples[/]

      pixeldefend evaluate-ood --model models/digits --n 300

      pixeldefend evaluate-ood -m models/fashion-mnist --in fashion-mnist:test \\
        --out-sets digits,noise,constant,photos --out reports/ood
    """
    from ..ood import METRICS, run_ood_benchmark
    from ..rendering import ood_table

    with common.ProgressBar("score") as bar:
        report, files = run_ood_benchmark(
            model, in_spec=in_spec, out_sets=out_sets, n=n, kinds=score, seed=seed, out=out,
            batch_size=batch_size, device=device, data_root=data_root, download=download,
            overwrite=overwrite, log=common.log, progress=lambda name, k: bar.advance(k, name),
            on_total=bar.set_total)
    common.emit(fmt, report.to_dict(), report.rows(), ["out_set", "kind", *METRICS],
                lambda _: ood_table(report))
    if files:
        common.log(f"wrote {', '.join(str(f) for f in files)}")
