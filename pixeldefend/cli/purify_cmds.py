"""`purify` and `defend`: PixelDefend from the command line.

`purify` writes purified copies of the inputs (same names, same lossless format) and a
manifest; `defend` scores, purifies and classifies, printing one row per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..defaults import DEFAULT_BATCH, DEFAULT_MODEL
from . import common
from .app import app

EPS_HELP = ("Purification radius in pixel levels (default: 16/255 of the level range, as "
            "in the paper: 16 for 8-bit images, 1 for 17-level digits).")
ADAPTIVE_HELP = ("Purify only images whose bits/dim exceed the model's calibrated threshold; "
                 "the rest pass through untouched (adaptive PixelDefend).")
EpsDefend = Annotated[int | None, typer.Option("--eps-defend", "-e", min=0, help=EPS_HELP)]
Adaptive = Annotated[bool, common.flag("--adaptive", help=ADAPTIVE_HELP)]


@app.command("purify")
@common.handle_errors
def purify_cmd(
    paths: common.ImagePaths,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the purified images and "
                                                      "manifest.json."),
    model: common.ModelBundle = DEFAULT_MODEL,
    eps_defend: EpsDefend = None,
    adaptive: Adaptive = False,
    reference: Annotated[bool, common.flag("--reference", help="Use the slow reference "
                                    "implementation (one forward pass per sub-pixel).")] = False,
    fmt: common.StdoutFormat = common.OutputFormat.table,
    batch_size: common.BatchSize = DEFAULT_BATCH,
    device: common.Device = "auto",
    resize: common.Resize = False,
    grayscale: common.Grayscale = False,
    data_root: common.DataRoot = None,
    overwrite: common.Overwrite = False,
    shard: common.Shard = None,
    workers: common.Workers = 0,
) -> None:
    """Purify images (PixelDefend): move each sub-pixel, within +-eps_defend levels of its
    value, to the most likely value given the already purified pixels.

    Writes every input to --out under the same name (folders keep their layout; .npz stays
    .npz with levels and labels; lossy JPEG/WebP/GIF inputs are written as .png, since a
    lossy format would undo the purification) and --out/manifest.json with bits/dim before
    and after. Exit codes: 0 done, 2 bad usage or an unreadable input (the rest are still
    purified).

    [bold]Examples[/]

      pixeldefend purify suspicious/ --model models/digits --eps-defend 1 --out clean/

      pixeldefend purify adv.npz --model models/fmnist --eps-defend 16 --adaptive --out pur/

      pixeldefend purify digits:test --out pur/ --format json
    """
    from ..defend import PURIFY_COLUMNS, purify_to_folder
    from ..rendering import purify_table

    with common.ProgressBar("purify") as bar:
        run = purify_to_folder(
            paths, out, model, eps_defend=eps_defend, adaptive=adaptive, fast=not reference,
            batch_size=batch_size, device=device, resize=resize, grayscale=grayscale,
            data_root=data_root, overwrite=overwrite, shard=shard, workers=workers,
            progress=bar.advance, on_total=bar.set_total)
    if run.document is not None:
        common.emit(fmt, run.document, run.rows, PURIFY_COLUMNS, purify_table)
        common.log(f"wrote {out} ({run.document['summary']['purified']} purified, "
                   f"{run.errors} error(s))")
    raise typer.Exit(common.EXIT_USAGE if run.errors else common.EXIT_OK)


@app.command("defend")
@common.handle_errors
def defend_cmd(
    paths: common.ImagePaths,
    classifier: Annotated[str, typer.Option("--classifier", "-c",
                                            help=common.CLASSIFIER_HELP + ".")],
    model: common.ModelBundle = DEFAULT_MODEL,
    eps_defend: EpsDefend = None,
    adaptive: Adaptive = False,
    fmt: common.Format = common.OutputFormat.table,
    output: common.Output = None,
    fail_on: Annotated[common.GateChoice, typer.Option(
        "--fail-on", help="Gate: 'anomalous' exits 1 if any input was flagged (bits/dim "
                          "above the calibrated threshold).")] = common.GateChoice.none,
    mean: common.Mean = None,
    std: common.Std = None,
    batch_size: common.BatchSize = DEFAULT_BATCH,
    device: common.Device = "auto",
    resize: common.Resize = False,
    grayscale: common.Grayscale = False,
    data_root: common.DataRoot = None,
    trust_code: common.TrustCode = False,
    overwrite: common.Overwrite = False,
    shard: common.Shard = None,
    workers: common.Workers = 0,
) -> None:
    """Score, purify and classify: the PixelDefend pipeline in front of a classifier.

    Per image: bits/dim and verdict before purification, whether it was purified (all
    images, or with --adaptive only the anomalous ones), bits/dim after, and the
    classifier's prediction (and probability) before and after; with labels (class
    folders, .npz labels, built-in data) the accuracy before and after. Exit codes: 0
    pass, 1 the gate failed (--fail-on anomalous and an input was flagged), 2 bad usage
    or an unreadable input.

    [bold]Examples[/]

      pixeldefend defend adv/images.npz --model models/digits --classifier models/digits-classifier

      pixeldefend defend incoming/ -c models/digits-classifier --adaptive --fail-on anomalous

      pixeldefend defend digits:test -c models/digits-classifier --eps-defend 2 --format json
    """
    from ..defend import DEFEND_COLUMNS, defend_inputs
    from ..rendering import defend_line, defend_table

    with common.ProgressBar("defend") as bar:
        run = defend_inputs(
            paths, classifier, model, eps_defend=eps_defend, adaptive=adaptive,
            fail_on=fail_on.value, mean=common.parse_numbers(mean, "--mean"),
            std=common.parse_numbers(std, "--std"), batch_size=batch_size, device=device,
            resize=resize, grayscale=grayscale, data_root=data_root, trust_code=trust_code,
            output=output, overwrite=overwrite, shard=shard, workers=workers,
            progress=bar.advance, on_total=bar.set_total)
    result = run.result
    if run.writes:
        common.emit(fmt, run.document, result.rows, DEFEND_COLUMNS, defend_table, output)
    common.log(defend_line(result.summary, result.gate_failed))
    if result.summary["errors"]:
        raise typer.Exit(common.EXIT_USAGE)
    raise typer.Exit(common.EXIT_GATE if result.gate_failed else common.EXIT_OK)
