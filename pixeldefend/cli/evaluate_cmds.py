"""`pixeldefend evaluate`: attacks x defences table, detection figures, BPDA, report.

Thin: the work is in `pixeldefend.evaluation` (inputs and settings, plan, stages, cache,
numbers), `pixeldefend.bpda` (the adaptive attack) and `pixeldefend.report` (tables,
figures, files).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import DEFAULT_ATTACKS, DEFAULT_BPDA_N, DEFAULT_MODEL, DEFENCES
from ..errors import UsageError
from . import common
from .app import app


def _command_line() -> str | None:
    """The command as typed (without --resume: same results either way), for the report."""
    if not Path(sys.argv[0]).name.startswith("pixeldefend"):
        return None
    return "pixeldefend " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--resume")


@app.command("evaluate")
@common.handle_errors
def evaluate(
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", help=f"PixelCNN bundle \\[default: {DEFAULT_MODEL}].")] = None,
    classifier: common.Classifier = None,
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="Labelled images \\[default: the classifier's test split].")] = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1,
                                   help="Evaluate the first N images.")] = 1000,
    attacks: Annotated[str, typer.Option(
        help="Oblivious attacks (comma-separated); '' for none.")] = ",".join(DEFAULT_ATTACKS),
    eps: Annotated[str | None, typer.Option(
        help="Attack budgets, comma-separated fractions of the pixel range \\[default: "
             "8/255,25/255; 1,2 levels for images with fewer than 33 levels, e.g. "
             "digits].")] = None,
    eps_levels: common.EpsLevels = False,
    eps_defend: Annotated[str | None, typer.Option(
        help="Purification radii in pixel levels, comma-separated \\[default: 16,32 of 255, "
             "scaled to the levels].")] = None,
    defences: Annotated[str, typer.Option(
        help="Columns: none, purify, adaptive (purify only images above the calibrated "
             "bits/dim threshold).")] = ",".join(DEFENCES),
    adaptive_attack: Annotated[str, typer.Option(
        help="Comma-separated: bpda (PGD, identity backward pass), bpda-surrogate (exact "
             "purifier forward, differentiable surrogate backward), surrogate-pgd (PGD "
             "through the surrogate), square (gradient-free, on the images every other "
             "attack failed on), detector (adaptive PixelDefend: stay under the bits/dim "
             "threshold), cw-bs (CW with binary search over c); all; or none.")] = "bpda",
    adaptive_steps: Annotated[int, typer.Option(
        min=1, help="PGD steps of bpda-surrogate, surrogate-pgd and detector.")] = 50,
    restarts: Annotated[int, typer.Option(
        min=1, help="Random restarts of every PGD attack (BPDA included); each restart "
                    "only attacks the images not fooled yet.")] = 1,
    queries: Annotated[int, typer.Option(min=1, help="Square Attack queries.")] = 1000,
    square_n: Annotated[int | None, typer.Option(
        min=1, help="Run Square on at most the first N survivors of the other attacks (each "
                    "query purifies an image: the CPU budget) \\[default: all "
                    "survivors].")] = None,
    temperature: Annotated[str, typer.Option(
        help="Surrogate softmax temperature, annealed geometrically START,END over the "
             "steps.")] = "1,0.01",
    surrogate_passes: Annotated[int, typer.Option(
        min=1, help="Soft refinement passes of the surrogate.")] = 1,
    on_survivors: Annotated[str, typer.Option(
        help="Adaptive attacks to run only on the images every earlier attack failed on "
             "(the per-image worst case needs no more; saves purifications).")] = "square",
    adaptive_alpha: Annotated[str | None, typer.Option(
        help="Step size of the suite's PGD attacks as a fraction (0 is the deliberately "
             "broken attack the sanity checks must flag) \\[default: eps * max(2.5 / steps, "
             "0.1)].")] = None,
    cw_steps: Annotated[int, typer.Option(
        min=1, help="Adam steps per binary-search step of cw-bs.")] = 100,
    sanity_n: Annotated[int, typer.Option(
        min=0, help="Images for the sanity checks (eps sweep, fewer steps); 0 skips "
                    "them.")] = 50,
    bpda_steps: Annotated[int, typer.Option(min=1, help="BPDA PGD steps.")] = 100,
    bpda_n: Annotated[int | None, typer.Option(
        min=1, help=f"Run BPDA on the first N images: every step purifies them, so it costs "
                    f"steps x purifications \\[default: min(--n, {DEFAULT_BPDA_N})].")] = None,
    bpda_eps: Annotated[str | None, typer.Option(
        help="Run BPDA only at these of the --eps values \\[default: all].")] = None,
    bpda_alpha: Annotated[str | None, typer.Option(
        help="BPDA step size as a fraction (e.g. 1/255) \\[default: eps * max(2.5 / steps, "
             "0.1)].")] = None,
    eot: Annotated[int, typer.Option(
        min=1, help="EOT samples per BPDA step (the pipeline is deterministic: 1 is "
                    "enough).")] = 1,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Report folder \\[default: reports/evaluate-<data>].")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Attack batch size.")] = 128,
    purify_batch: Annotated[int, typer.Option(
        min=1, help="Images purified together (bigger is faster on a CPU, up to "
                    "memory).")] = 256,
    device: common.Device = "auto",
    seed: Annotated[int, typer.Option(
        help="Seed for every attack's random start and noise.")] = 0,
    resume: Annotated[bool, common.flag(
        "--resume", help="Reuse the finished stages cached in --out/cache.")] = False,
    figures: Annotated[bool, typer.Option(
        "--figures/--no-figures", help="Draw the PNG figures.")] = True,
    fmt: Annotated[common.OutputFormat, typer.Option(
        "--format", "-f", help="table (Rich, on stdout) or json (results.json).")
    ] = common.OutputFormat.table,
    data_root: common.DataRoot = None,
    trust_code: common.TrustCode = False,
    overwrite: common.Overwrite = False,
) -> None:
    from ..adaptive_report import sanity_lines
    from ..evaluation.pipeline import evaluate_to_folder
    from ..progress import RichEvalProgress
    from ..rendering import evaluation_renderables, write_result
    from ..report import results_json

    if fmt not in (common.OutputFormat.table, common.OutputFormat.json):
        raise UsageError("--format must be table or json")
    run = evaluate_to_folder(
        model, classifier, data, n, out=out, device=device, data_root=data_root,
        trust_code=trust_code, overwrite=overwrite, resume=resume, figures=figures,
        suite=dict(temperature=temperature, adaptive_alpha=adaptive_alpha,
                   on_survivors=on_survivors, steps=adaptive_steps, restarts=restarts,
                   queries=queries, passes=surrogate_passes, cw_steps=cw_steps, seed=seed,
                   square_n=square_n, batch_size=purify_batch),
        attacks=attacks, eps=eps, eps_levels=eps_levels,
        eps_defend=common.parse_numbers(eps_defend, "--eps-defend", int, "16,32",
                                        "whole pixel levels"),
        defences=defences, adaptive_attack=adaptive_attack, bpda_steps=bpda_steps,
        bpda_n=bpda_n, bpda_eps=bpda_eps, bpda_alpha=bpda_alpha, eot=eot, seed=seed,
        batch_size=batch_size, purify_batch=purify_batch, sanity_n=sanity_n,
        command=_command_line(), log=common.log, progress=RichEvalProgress,
        on_skipped=lambda skipped: common.report_skipped(skipped, summary=False))
    if run.evaluation is None:
        return
    results = run.evaluation.results
    for line in sanity_lines(results):  # on stderr whatever the format: loud
        if line.startswith("SANITY"):
            common.log(f"[bold red]{line}[/]")
    if fmt == common.OutputFormat.json:
        return write_result(results_json(results))
    for item in evaluation_renderables(results):
        common.out_console.print(item, highlight=False)
    common.out_console.print(f"report: {run.out / 'report.html'}", highlight=False)
