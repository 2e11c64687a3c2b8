"""`purify` and `defend`: PixelDefend from the command line.

`purify` writes purified copies of the inputs (same names, same lossless format) and a
manifest; `defend` scores, purifies and classifies, printing one row per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ..atomic import write_json
from ..defaults import DEFAULT_BATCH, DEFAULT_MODEL
from ..errors import UsageError
from .app import app
from .common import (
    EXIT_GATE,
    EXIT_OK,
    EXIT_USAGE,
    DataRoot,
    Device,
    Format,
    GateChoice,
    Grayscale,
    ImagePaths,
    ModelBundle,
    OutputFormat,
    Overwrite,
    Resize,
    Shard,
    StdoutFormat,
    TrustCode,
    Workers,
    emit,
    err_console,
    flag,
    fmt_float,
    handle_errors,
    json_safe,
    make_progress,
    parse_floats,
)

if TYPE_CHECKING:
    from ..detector import DensityDetector


EPS_HELP = ("Purification radius in pixel levels (default: 16/255 of the level range, as "
            "in the paper: 16 for 8-bit images, 1 for 17-level digits).")
ADAPTIVE_HELP = ("Purify only images whose bits/dim exceed the model's calibrated threshold; "
                 "the rest pass through untouched (adaptive PixelDefend).")
EpsDefend = Annotated[int | None, typer.Option("--eps-defend", "-e", min=0, help=EPS_HELP)]
Adaptive = Annotated[bool, flag("--adaptive", help=ADAPTIVE_HELP)]


def _load(model: Path, device: Any, adaptive: bool, eps_defend: int | None,
          need_calibration: bool = False) -> tuple[DensityDetector, int]:
    from ..defend import eps_for
    from ..detector import DensityDetector

    detector = DensityDetector.load(model, device=device)
    if (adaptive or need_calibration) and detector.bpd_threshold is None:
        raise UsageError(f"{model} has no calibrated threshold: run `pixeldefend calibrate` "
                         "first (needed by --adaptive and --fail-on)")
    return detector, eps_for(detector, eps_defend)


# -------------------------------------------------------------------------- purify


def _purify_table(doc: dict[str, Any]) -> Table:
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


@app.command("purify")
@handle_errors
def purify_cmd(
    paths: ImagePaths,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the purified images and "
                                                      "manifest.json."),
    model: ModelBundle = DEFAULT_MODEL,
    eps_defend: EpsDefend = None,
    adaptive: Adaptive = False,
    reference: Annotated[bool, flag("--reference", help="Use the slow reference "
                                    "implementation (one forward pass per sub-pixel).")] = False,
    fmt: StdoutFormat = OutputFormat.table,
    batch_size: int = typer.Option(DEFAULT_BATCH, min=1, help="Images read per batch."),
    device: Device = "auto",
    resize: Resize = False,
    grayscale: Grayscale = False,
    data_root: DataRoot = None,
    overwrite: Overwrite = False,
    shard: Shard = None,
    workers: Workers = 0,
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
    from ..data import ImageStream
    from ..defend import PURIFY_COLUMNS, purify_rows, summarise_purify
    from ..outputs import PurifyOutputs, clear_dir, input_paths, prepare_dir
    from ..sharding import join

    out_dir = prepare_dir(out, command="purify", overwrite=overwrite,
                          inputs=input_paths(paths, model, data_root))
    sharding = join(device, shard)  # torchrun's ranks meet here, after the output checks
    detector, eps = _load(model, sharding.device, adaptive, eps_defend)
    spec = detector.spec
    stream = ImageStream(paths, spec, resize=resize, grayscale=grayscale, data_root=data_root,
                         workers=workers)
    if len(stream) == 0:
        raise UsageError(f"no images found in {', '.join(paths)}")
    sharding.split(stream)
    plan = PurifyOutputs.plan(paths, out, spec.levels)
    if sharding.writes:
        clear_dir(out_dir)  # ours (marker) and --overwrite: no stale copies of an earlier run
        out_dir.mark()
    with make_progress() as progress:
        task = progress.add_task("purify", total=len(stream), status="")
        rows = purify_rows(detector, stream.batches(batch_size), eps, adaptive,
                           fast=not reference, keep=plan.add, sharding=sharding,
                           progress=lambda k: progress.update(task, advance=k))
    summary = summarise_purify(rows)
    errors = sharding.agree(summary["errors"])
    if not sharding.writes:
        raise typer.Exit(EXIT_USAGE if errors else EXIT_OK)
    plan.flush()
    doc = {
        "model": str(model), "eps_defend": eps, "adaptive": adaptive,
        "threshold": detector.bpd_threshold,
        "implementation": "reference" if reference else "fast", "out": str(out),
        "summary": summary, "images": rows,
    }
    write_json(out / "manifest.json", json_safe(doc))
    emit(fmt, doc, rows, PURIFY_COLUMNS, lambda: _purify_table(doc))
    err_console.print(f"wrote {out} ({doc['summary']['purified']} purified, {errors} error(s))",
                      highlight=False)
    raise typer.Exit(EXIT_USAGE if errors else EXIT_OK)


# -------------------------------------------------------------------------- defend


def _defend_table(doc: dict[str, Any]) -> Table:
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


@app.command("defend")
@handle_errors
def defend_cmd(
    paths: ImagePaths,
    classifier: str = typer.Option(..., "--classifier", "-c", help="Classifier: bundle "
                                   "directory, TorchScript file or package.module:factory "
                                   "(these two run code: need --trust-code)."),
    model: ModelBundle = DEFAULT_MODEL,
    eps_defend: EpsDefend = None,
    adaptive: Adaptive = False,
    fmt: Format = OutputFormat.table,
    output: Path | None = typer.Option(None, "--output", "-o", help="Write results here."),
    fail_on: Annotated[GateChoice, typer.Option(
        "--fail-on", help="Gate: 'anomalous' exits 1 if any input was flagged (bits/dim "
                          "above the calibrated threshold).")] = GateChoice.none,
    mean: str | None = typer.Option(None, help="Per-channel mean the classifier expects, "
                                    "e.g. 0.49,0.48,0.45."),
    std: str | None = typer.Option(None, help="Per-channel std the classifier expects."),
    batch_size: int = typer.Option(DEFAULT_BATCH, min=1, help="Images read per batch."),
    device: Device = "auto",
    resize: Resize = False,
    grayscale: Grayscale = False,
    data_root: DataRoot = None,
    trust_code: TrustCode = False,
    overwrite: Overwrite = False,
    shard: Shard = None,
    workers: Workers = 0,
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
    from ..data import ImageStream
    from ..defend import DEFEND_COLUMNS, defend
    from ..models.loading import load_classifier
    from ..outputs import check_files, input_paths
    from ..sharding import join

    check_files((output, "--output"), overwrite=overwrite,
                inputs=input_paths(paths, model, classifier, data_root))
    sharding = join(device, shard)  # torchrun's ranks meet here, after the output checks
    detector, eps = _load(model, sharding.device, adaptive, eps_defend,
                          need_calibration=fail_on != GateChoice.none)
    spec = detector.spec
    loaded = load_classifier(classifier, device=sharding.device, mean=parse_floats(mean, "--mean"),
                             std=parse_floats(std, "--std"), input_shape=spec.shape,
                             trust_code=trust_code)
    stream = ImageStream(paths, spec, resize=resize, grayscale=grayscale, data_root=data_root,
                         workers=workers)
    if len(stream) == 0:
        raise UsageError(f"no images found in {', '.join(paths)}")
    classes = loaded.classes or stream.classes
    sharding.split(stream)
    with make_progress() as progress:
        task = progress.add_task("defend", total=len(stream), status="")
        result = defend(detector, loaded, stream.batches(batch_size), eps, adaptive=adaptive,
                        fail_on=fail_on.value, classes=classes, batch_size=batch_size,
                        progress=lambda k: progress.update(task, advance=k),
                        sharding=sharding)
    rows, summary, gate_failed = result.rows, result.summary, result.gate_failed
    doc = {
        "model": str(model), "classifier": str(classifier), "eps_defend": eps,
        "adaptive": adaptive, "threshold": detector.bpd_threshold, "classes": classes,
        "summary": summary, "gate": {"failed": gate_failed, "reasons": result.gate_reasons},
        "images": rows,
    }
    if sharding.writes:
        emit(fmt, doc, rows, DEFEND_COLUMNS, lambda: _defend_table(doc), output)
    acc = "" if summary["accuracy_before"] is None else \
        f"; accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}"
    err_console.print(
        f"{summary['n']} image(s): {summary['anomalous']} anomalous, {summary['purified']} "
        f"purified, {summary['errors']} error(s){acc}"
        + ("; gate failed" if gate_failed else ""), highlight=False)
    if summary["errors"]:
        raise typer.Exit(EXIT_USAGE)
    raise typer.Exit(EXIT_GATE if gate_failed else EXIT_OK)
