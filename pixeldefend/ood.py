"""Out-of-distribution benchmark: which score kind separates clean images from foreign ones?

`evaluate_ood` scores an in-distribution set and any number of out-of-distribution (OOD)
sets with every score kind from one model pass per set, and measures, with OOD as the
positive class: ROC AUC, area under the precision-recall curve (average precision) and
the false-positive rate at 95% true-positive rate (scikit-learn's metrics).

Built-in OOD sets need no download (`BUILTIN_OOD`):

- ``noise``: uniformly random levels; ``constant``: one random level per image;
- ``inverted``, ``hflip``, ``vflip``, ``shuffled`` (pixel positions permuted): made from
  the in-distribution images themselves, so low-level statistics match and only the
  structure differs;
- ``digits``: scikit-learn's 8x8 digits resized to the model's size and levels;
- ``photos``: crops of scikit-image's bundled sample photographs, converted to the model's
  shape (gray or colour, size, levels);
- ``characters``, ``rendered-digits``, ``strokes``, ``shapes``, ``blobs`` (synthetic.py:
  glyphs from system fonts, pen strokes, geometric shapes, smooth images) and the
  near-OOD transforms ``rot90``, ``shift``, ``contrast``, ``patch`` of the
  in-distribution images. ``NAME:dev`` is the same recipe with other fonts, photographs
  and seeds, for choosing settings without touching the reported sets.

Any data spec (``mnist:test``, a folder, an .npz) works too, converted to the model's
shape when it differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import write_bytes, write_json, write_text
from .data import DIGITS_LEVELS, ImageSet, ImageSpec, from_8bit, load_images, to_8bit
from .defaults import BUILTIN_OOD as BUILTIN_OOD
from .detector import DensityDetector
from .errors import DataError, UsageError
from .scores import SCORES
from .synthetic import GENERATED, TRANSFORMS, generate, transform

# far-OOD sets (foreign content) and near-OOD transforms of in-distribution images
FAR_OOD = ("characters", "rendered-digits", "strokes", "shapes", "blobs", "photos", "noise",
           "constant")
NEAR_OOD = TRANSFORMS
# scikit-image's bundled photographs that need no download (skimage.data loaders)
PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee",
          "coins", "colorwheel", "grass", "gravel", "hubble_deep_field",
          "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket", "text")
METRICS = ("auroc", "auprc", "fpr_at_95_tpr")
METRIC_NAMES = {"auroc": "ROC AUC", "auprc": "AUPRC", "fpr_at_95_tpr": "FPR at 95% TPR"}


# --------------------------------------------------------------------- conversions


def convert_8bit(arrays: Sequence[np.ndarray], spec: ImageSpec) -> torch.Tensor:
    """8-bit images (H, W) or (H, W, 3), any size -> uint8 (N, C, H, W) in spec's levels:
    gray/colour converted, resized with Pillow's antialiased bilinear filter."""
    from PIL import Image

    out = np.empty((len(arrays), *spec.shape), dtype=np.uint8)
    for i, array in enumerate(arrays):
        img = Image.fromarray(np.ascontiguousarray(array))
        img = img.convert("L" if spec.channels == 1 else "RGB")
        if img.size != (spec.width, spec.height):
            img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out[i] = from_8bit(pixels, spec.levels)
    return torch.from_numpy(out)


def conform_any(images: ImageSet, spec: ImageSpec) -> ImageSet:
    """Bring any image set to the model's shape and levels (resize, gray <-> colour)."""
    if images.spec == spec:
        return images
    pixels = to_8bit(images.images, images.levels)  # (N, C, H, W) 8-bit
    arrays = [p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0) for p in pixels]
    return ImageSet(images=convert_8bit(arrays, spec), levels=spec.levels,
                    names=images.names, labels=images.labels, classes=images.classes,
                    source=f"{images.source} (converted to {spec.describe()})")


def subsample(images: ImageSet, n: int | None, seed: int = 0) -> ImageSet:
    """A seeded random subset of n images (all of them when n is None or larger)."""
    if n is None or n >= len(images):
        return images
    index = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    return images.subset(index.tolist())


# -------------------------------------------------------------------- built-in sets


def _named(images: torch.Tensor, spec: ImageSpec, name: str, source: str) -> ImageSet:
    return ImageSet(images=images, levels=spec.levels,
                    names=[f"{name}:{i}" for i in range(len(images))], source=source)


def digits_images(spec: ImageSpec) -> torch.Tensor:
    """All 1,797 scikit-learn digits, resized to the model's size and levels."""
    from sklearn.datasets import load_digits

    raw = load_digits().images.astype(np.uint8)  # 0..16
    return convert_8bit(list(to_8bit(raw, DIGITS_LEVELS)), spec)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    return array.astype(np.uint8)


def photo_crops(spec: ImageSpec, n: int, seed: int = 0, variant: str | None = None
                ) -> torch.Tensor:
    """n random square crops (1 to 8 times the model's size) of scikit-image's sample
    photographs, converted to the model's shape. variant ``dev`` / ``test`` draws only
    from the even / odd photographs of PHOTOS (None: all of them)."""
    try:
        import skimage.data  # noqa: F401
    except ImportError as exc:
        raise DataError("the 'photos' set needs scikit-image (pip install scikit-image)") from exc
    rng = np.random.default_rng(seed)
    names = {None: PHOTOS, "dev": PHOTOS[0::2], "test": PHOTOS[1::2]}[variant]
    photos = [_photo(name) for name in names]
    target = max(spec.height, spec.width)
    crops = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = int(rng.integers(target, 8 * target + 1))
        side = max(1, min(side, h, w))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crops.append(photo[y : y + side, x : x + side])
    return convert_8bit(crops, spec)


def make_ood_set(name: str, spec: ImageSpec, in_set: ImageSet, n: int, seed: int = 0,
                 data_root: str | None = None, download: bool = False) -> ImageSet:
    """One OOD set by name (see BUILTIN_OOD) or data spec, n images at most.

    A built-in name may end in ``:dev``: the same recipe with other seeds, fonts and
    photographs (synthetic.py), for choosing settings without touching the reported sets.
    """
    variant = "test"
    if name.endswith(":dev") and name[:-4] in BUILTIN_OOD:
        name, variant = name[:-4], "dev"
        seed = seed + 1_000_003
    gen = torch.Generator().manual_seed(seed)
    x = in_set.images[:n]
    levels = spec.levels
    if name == "noise":
        images = torch.randint(0, levels, (n, *spec.shape), generator=gen, dtype=torch.uint8)
        return _named(images, spec, name, "uniform noise")
    if name == "constant":
        values = torch.randint(0, levels, (n, 1, 1, 1), generator=gen, dtype=torch.uint8)
        return _named(values.expand(n, *spec.shape).clone(), spec, name,
                      "constant images (one random level each)")
    if name == "inverted":
        return _named((levels - 1) - x, spec, name, f"inverted {in_set.source}")
    if name == "hflip":
        return _named(x.flip(-1).contiguous(), spec, name, f"horizontally flipped {in_set.source}")
    if name == "vflip":
        return _named(x.flip(-2).contiguous(), spec, name, f"vertically flipped {in_set.source}")
    if name == "shuffled":
        flat = x.flatten(2)  # (N, C, H*W): one permutation of pixel positions per image
        order = torch.stack([torch.randperm(flat.shape[2], generator=gen) for _ in range(len(x))])
        shuffled = torch.gather(flat, 2, order[:, None, :].expand_as(flat))
        return _named(shuffled.reshape(x.shape), spec, name, f"pixel-shuffled {in_set.source}")
    if name == "digits":
        images = digits_images(spec)
        keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
        return _named(images[torch.from_numpy(keep)], spec, name,
                      f"scikit-learn digits resized to {spec.describe()}")
    if name == "photos":
        return _named(photo_crops(spec, n, seed, variant), spec, name,
                      f"crops of scikit-image sample photographs (set {variant})")
    if name in GENERATED:
        return _named(generate(name, spec, n, seed, variant), spec, name,
                      f"{name} (synthetic, variant {variant})")
    if name in TRANSFORMS:
        return _named(transform(name, x, spec, seed, variant), spec, name,
                      f"{name} of {in_set.source}")
    try:
        images = load_images(name, data_root=data_root, download=download)
    except DataError as exc:
        raise DataError(f"OOD set {name!r}: not one of {', '.join(BUILTIN_OOD)} and not "
                        f"readable as data ({exc})") from exc
    return subsample(conform_any(images, spec), n, seed)


# -------------------------------------------------------------------------- metrics


def ood_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """ROC AUC, AUPRC and FPR at 95% TPR, OOD = positive class, higher score = more OOD."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.concatenate([in_scores, out_scores]).astype(np.float64)
    labels = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


@dataclass
class OODReport:
    """Everything `evaluate-ood` prints and writes; `scores` stay out of the JSON."""

    model: str
    in_source: str
    kinds: list[str]
    in_scores: dict[str, np.ndarray]
    out: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> source, n, ...
    out_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # fraction of the in-distribution images flagged at each calibrated threshold
    in_flagged: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "in": {"source": self.in_source, "n": int(len(self.in_scores["bpd"])),
                   "mean": {k: float(np.mean(self.in_scores[k])) for k in self.kinds},
                   "flagged": self.in_flagged},
            "kinds": self.kinds,
            "metrics": list(METRICS),
            "out_sets": [{"name": name, **entry} for name, entry in self.out.items()],
            "notes": self.notes,
            "pixeldefend_version": __version__,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per (OOD set, score kind), for CSV and tests."""
        return [{"out_set": name, "kind": kind, **entry["metrics"][kind]}
                for name, entry in self.out.items() for kind in self.kinds]


def flagged_fractions(detector: DensityDetector, scores: dict[str, np.ndarray],
                      kinds: Sequence[str]) -> dict[str, float]:
    """Fraction of images above each calibrated kind's threshold (the gate's verdict)."""
    return {k: float(detector.calibrations[k].predict(scores[k]).mean())
            for k in kinds if k in detector.calibrations and len(scores[k])}


def benchmark_sets(detector: DensityDetector, in_spec: str | None, out_sets: str, n: int,
                   seed: int = 0, data_root: str | None = None, download: bool = False,
                   model: object = "the bundle") -> tuple[ImageSet, dict[str, ImageSet]]:
    """The in-distribution set (default: the bundle's test split, else its calibration
    split) and each comma-separated OOD set, `n` images each (seeded subsets)."""
    names = [v.strip() for v in out_sets.split(",") if v.strip()]
    if not names:
        raise UsageError("out_sets names no set", param="out_sets")
    if in_spec is None:
        recorded = detector.meta.get("data") or {}
        in_spec = recorded.get("test") or recorded.get("calib")
        if not in_spec:
            raise UsageError(f"{model} does not record its test data: pass in_spec",
                             param="in_spec")
    in_set = subsample(load_images(in_spec, detector.spec, data_root=data_root,
                                   download=download), n, seed)
    return in_set, {name: make_ood_set(name, detector.spec, in_set, n, seed, data_root,
                                       download) for name in names}


def usable_kinds(detector: DensityDetector, kinds: Sequence[str] | None
                 ) -> tuple[list[str], list[str]]:
    """The kinds asked for (default: all available) whose calibration references are in
    the bundle, and a note for each kind left out (registry `needs`)."""
    kinds, notes = list(kinds or detector.available_kinds), []
    for kind in list(kinds):
        detector.check_kind(kind)
        try:
            detector.check_ready(kind)  # what a "calibration" kind reads from clean data
        except UsageError:
            kinds.remove(kind)
            notes.append(f"{kind} skipped: the bundle has no calibration (run `pixeldefend "
                         "calibrate`)")
    notes += [f"{kind} skipped: the bundle has no background model (add one with "
              "`pixeldefend train-background`)" for kind, spec in SCORES.items()
              if "background" in spec.needs and kind not in detector.available_kinds
              and kind not in kinds]
    return kinds, notes


def evaluate_ood(detector: DensityDetector, in_set: ImageSet, out_sets: dict[str, ImageSet],
                 kinds: Sequence[str] | None = None, model: str = "",
                 progress: Callable[[str, int], None] | None = None) -> OODReport:
    """Score the in-distribution set and every OOD set with every kind; compare."""
    kinds, notes = usable_kinds(detector, kinds)

    def run(name: str, images: ImageSet) -> dict[str, np.ndarray]:
        step = (lambda k: progress(name, k)) if progress is not None else None
        return detector.compute_scores(images, kinds, progress=step)

    in_scores = run("in", in_set)
    report = OODReport(model=model, in_source=in_set.source, kinds=kinds, in_scores=in_scores,
                       notes=notes, in_flagged=flagged_fractions(detector, in_scores, kinds))
    for name, images in out_sets.items():
        scores = run(name, images)
        report.out_scores[name] = scores
        report.out[name] = {
            "source": images.source,
            "n": len(images),
            "mean": {k: float(np.mean(scores[k])) for k in kinds},
            "metrics": {k: ood_metrics(in_scores[k], scores[k]) for k in kinds},
            "flagged": flagged_fractions(detector, scores, kinds),
        }
    return report


def run_ood_benchmark(model: Path, *, in_spec: str | None = None, out_sets: str = "",
                      n: int = 1000, kinds: str | None = None, seed: int = 0,
                      out: Path | None = None, batch_size: int = 256, device: str = "auto",
                      data_root: str | None = None, download: bool = False,
                      overwrite: bool = False, log: Callable[[str], None] = print,
                      progress: Callable[[str, int], None] | None = None,
                      on_total: Callable[[int], None] | None = None
                      ) -> tuple[OODReport, list[Path]]:
    """`pixeldefend evaluate-ood`: check `out` (before any work), load the bundle, build
    the sets (`benchmark_sets`), score them with each of the comma-separated `kinds`
    (default: every kind the bundle supports), compare, and write the report into `out`
    (emptied first: a folder pixeldefend made). Returns the report and the files."""
    from .outputs import clear_dir, input_paths, prepare_dir

    out_dir = None if out is None else prepare_dir(
        out, command="evaluate-ood", overwrite=overwrite,
        inputs=input_paths(model, in_spec, [v.strip() for v in out_sets.split(",")], data_root))
    detector = DensityDetector.load(model, device=device, batch_size=batch_size)
    chosen = [k.strip() for k in (kinds or "").split(",") if k.strip()] or \
        list(detector.available_kinds)
    for kind in chosen:
        detector.check_kind(kind)
    in_set, sets = benchmark_sets(detector, in_spec, out_sets, n, seed, data_root, download,
                                  model)
    log(f"in: {in_set.source} ({len(in_set)} images); out: "
        + ", ".join(f"{k} ({len(v)})" for k, v in sets.items()) + f"; scores: {', '.join(chosen)}")
    if on_total is not None:
        on_total(len(in_set) + sum(map(len, sets.values())))
    report = evaluate_ood(detector, in_set, sets, chosen, model=str(model), progress=progress)
    if out_dir is None:
        return report, []
    clear_dir(out_dir)
    out_dir.mark()
    return report, write_report(report, out)


# --------------------------------------------------------------------------- report


def markdown_table(report: OODReport, metric: str = "auroc") -> str:
    """One metric as a Markdown table: a row per OOD set, a column per score kind."""
    lines = ["| OOD set | n | " + " | ".join(f"`{k}`" for k in report.kinds) + " |",
             "|---|---:|" + "---:|" * len(report.kinds)]
    for name, entry in report.out.items():
        cells = [f"{entry['metrics'][k][metric]:.3f}" for k in report.kinds]
        lines.append(f"| {name} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flagged_table(report: OODReport) -> str:
    """Fraction flagged at each calibrated threshold: in-distribution first, then OOD."""
    kinds = [k for k in report.kinds if k in report.in_flagged]
    lines = ["| set | n | " + " | ".join(f"`{k}`" for k in kinds) + " |",
             "|---|---:|" + "---:|" * len(kinds),
             f"| in-distribution | {len(report.in_scores['bpd'])} | "
             + " | ".join(f"{report.in_flagged[k]:.3f}" for k in kinds) + " |"]
    for name, entry in report.out.items():
        cells = [f"{entry.get('flagged', {}).get(k, float('nan')):.3f}" for k in kinds]
        lines.append(f"| {name} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def histogram_png(report: OODReport, kind: str) -> bytes:
    """Score histograms of one kind: in-distribution against each OOD set (a panel each)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report.out)
    cols = min(3, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    height = 2.8 * rows + 0.5
    # no layout engine and single-polygon histograms: several times faster to draw
    fig = Figure(figsize=(4 * cols, height), dpi=100)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1 / rows, top=1 - 0.55 / height,
                        hspace=0.45, wspace=0.22)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    base = report.in_scores[kind]
    for ax, name in zip(axes, names, strict=False):
        other = report.out_scores[name][kind]
        both = np.concatenate([base, other])
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
        ax.hist(base, bins=bins, alpha=0.6, density=True, label="in-distribution",
                histtype="stepfilled")
        ax.hist(other, bins=bins, alpha=0.6, density=True, label=name, histtype="stepfilled")
        auroc = report.out[name]["metrics"][kind]["auroc"]
        ax.set_title(f"{name}: ROC AUC {auroc:.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"score '{kind}' (higher = more anomalous)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def ood_type(name: str) -> str:
    """'far' (foreign content), 'near' (a transform of in-distribution images) or 'other'."""
    base = name.split(":")[0]
    return "far" if base in FAR_OOD else "near" if base in NEAR_OOD else "other"


def report_markdown(report: OODReport, histograms: dict[str, str]) -> str:
    doc = report.to_dict()
    parts = [
        "# Out-of-distribution benchmark",
        "",
        f"- model: `{report.model}`",
        f"- in-distribution: {report.in_source} ({doc['in']['n']} images)",
        f"- score kinds: {', '.join(report.kinds)} (higher = more anomalous); OOD = positive "
        "class",
        f"- pixeldefend {__version__}",
        "",
    ]
    for metric in METRICS:
        parts += [f"## {METRIC_NAMES[metric]}", "", markdown_table(report, metric), ""]
    if report.in_flagged:
        parts += ["## Flagged at the calibrated threshold", "",
                  flagged_table(report), ""]
    parts += ["## OOD sets", ""]
    parts += [f"- **{name}** ({ood_type(name)}): {entry['source']}"
              for name, entry in report.out.items()]
    if "dose" in report.kinds:
        from .dose import STATISTIC_HELP

        parts += ["", "## Statistics behind `dose`", ""]
        parts += [f"- `{name}`: {text}" for name, text in STATISTIC_HELP.items()]
    if report.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    parts += ["", "## Histograms", ""]
    parts += [f"![{kind}]({file})" for kind, file in histograms.items()]
    return "\n".join(parts) + "\n"


def write_report(report: OODReport, out_dir: str | Path) -> list[Path]:
    """report.md, results.json and one histogram PNG per score kind, each atomically."""
    out_dir = Path(out_dir)
    written = []
    histograms = {}
    for kind in report.kinds:
        file = f"hist_{kind}.png"
        write_bytes(out_dir / file, histogram_png(report, kind))
        histograms[kind] = file
        written.append(out_dir / file)
    write_json(out_dir / "results.json", report.to_dict())
    write_text(out_dir / "report.md", report_markdown(report, histograms))
    return [out_dir / "report.md", out_dir / "results.json", *written]
