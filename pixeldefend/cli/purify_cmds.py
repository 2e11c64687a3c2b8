"""`purify` and `defend`: PixelDefend from the command line.

`purify` writes purified copies of the inputs (same names, same lossless format) and a
manifest; `defend` scores, purifies and classifies, printing one row per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..atomic import write_json
from ..defaults import DEFAULT_BATCH, DEFAULT_MODEL
from ..rendering import json_safe
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
    from ..defend import PURIFY_COLUMNS, load_for_purify, open_stream, purify_document, purify_rows
    from ..outputs import PurifyOutputs, clear_dir, input_paths, prepare_dir
    from ..rendering import purify_table

    out_dir = prepare_dir(out, command="purify", overwrite=overwrite,
                          inputs=input_paths(paths, model, data_root))
    detector, eps = load_for_purify(model, device, eps_defend=eps_defend,
                                    need_threshold=adaptive)
    stream = open_stream(paths, detector, resize=resize, grayscale=grayscale,
                         data_root=data_root)
    plan = PurifyOutputs.plan(paths, out, detector.spec.levels)
    clear_dir(out_dir)  # ours (marker) and --overwrite: no stale copies of an earlier run
    out_dir.mark()
    with common.ProgressBar("purify", len(stream)) as bar:
        rows = purify_rows(detector, stream.batches(batch_size), eps, adaptive,
                           fast=not reference, keep=plan.add, progress=bar.advance)
    plan.flush()
    doc = purify_document(model, detector, eps, adaptive, rows,
                          implementation="reference" if reference else "fast", out=str(out))
    write_json(out / "manifest.json", json_safe(doc))
    common.emit(fmt, doc, rows, PURIFY_COLUMNS, purify_table)
    errors = doc["summary"]["errors"]
    common.log(f"wrote {out} ({doc['summary']['purified']} purified, {errors} error(s))")
    raise typer.Exit(common.EXIT_USAGE if errors else common.EXIT_OK)


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
    from ..defend import DEFEND_COLUMNS, defend, defend_document, load_for_purify, open_stream
    from ..models.loading import load_classifier
    from ..outputs import check_files, input_paths
    from ..rendering import defend_line, defend_table

    check_files((output, "--output"), overwrite=overwrite,
                inputs=input_paths(paths, model, classifier, data_root))
    detector, eps = load_for_purify(model, device, eps_defend=eps_defend,
                                    need_threshold=adaptive or fail_on != common.GateChoice.none)
    loaded = load_classifier(classifier, device=device, mean=common.parse_numbers(mean, "--mean"),
                             std=common.parse_numbers(std, "--std"),
                             input_shape=detector.spec.shape,
                             trust_code=trust_code)
    stream = open_stream(paths, detector, resize=resize, grayscale=grayscale,
                         data_root=data_root)
    classes = loaded.classes or stream.classes
    with common.ProgressBar("defend", len(stream)) as bar:
        result = defend(detector, loaded, stream.batches(batch_size), eps, adaptive=adaptive,
                        fail_on=fail_on.value, classes=classes, batch_size=batch_size,
                        progress=bar.advance)
    doc = defend_document(model, classifier, detector, eps, adaptive, classes, result)
    common.emit(fmt, doc, result.rows, DEFEND_COLUMNS, defend_table, output)
    common.log(defend_line(result.summary, result.gate_failed))
    if result.summary["errors"]:
        raise typer.Exit(common.EXIT_USAGE)
    raise typer.Exit(common.EXIT_GATE if result.gate_failed else common.EXIT_OK)
