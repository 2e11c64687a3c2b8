"""Localisation: where an image looks wrong, as a picture a person reads at a glance.

A PixelCNN's log-likelihood is a sum over sub-pixels, so its per-pixel negative
log-likelihood (`DensityDetector.nll_map`) says which pixels the model found surprising.
`heatmap_png` draws the image next to that map (in bits per pixel, with a colour bar),
upscaled with nearest-neighbour so an 8x8 or 28x28 image is still readable.

Raw per-pixel NLL points at the *edges* of a pasted patch, not at the patch (inside it
"white continues" is cheap). When the bundle has a `dose` calibration, the heat map shows
the local-anomaly map instead (`local_map`): the per-location z-score of |NLL - predicted
entropy| averaged over k x k windows (the `window` statistic of dose.py), each pixel
showing the hottest window that covers it, so the hottest square is the suspicious area.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch

from .atomic import write_bytes
from .data import IMAGE_EXTENSIONS, to_8bit
from .density import LN2
from .dose import DoseModel
from .statistics import ModelPass, hottest_window, window_map

DISPLAY_PIXELS = 280  # each panel is drawn about this many screen pixels wide


def pixel_bits(nll: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) per-sub-pixel NLL in nats -> (H, W) bits per pixel (channels summed)."""
    if isinstance(nll, torch.Tensor):
        nll = nll.detach().cpu().numpy()
    return np.asarray(nll, dtype=np.float64).sum(axis=0) / LN2


def local_map(run: ModelPass, dose: DoseModel) -> np.ndarray:
    """(N, H, W) local-anomaly map: at each pixel, the largest k x k window mean of the
    per-location z-scored |NLL - entropy| over the windows that contain the pixel."""
    k = dose.window
    windows = torch.from_numpy(window_map(run.surprise_bits, dose.location_mean,
                                          dose.location_std, k))[:, None]
    spread = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(windows, (k - 1, k - 1, k - 1, k - 1), value=-np.inf),
        kernel_size=k, stride=1)
    return spread[:, 0].numpy()


def hottest_boxes(run: ModelPass, dose: DoseModel) -> np.ndarray:
    """(N, 4) box (top, left, bottom, right) of each image's hottest k x k window."""
    return hottest_window(run.surprise_bits, dose.location_mean, dose.location_std,
                          dose.window)


def boxes_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Do boxes (top, left, bottom, right; exclusive ends) a[i] and b[i] intersect?"""
    a, b = np.asarray(a), np.asarray(b)
    return ((np.minimum(a[:, 2], b[:, 2]) > np.maximum(a[:, 0], b[:, 0]))
            & (np.minimum(a[:, 3], b[:, 3]) > np.maximum(a[:, 1], b[:, 1])))


def heatmap_png(image: torch.Tensor | np.ndarray, levels: int, nll: torch.Tensor | np.ndarray,
                title: str = "", local: np.ndarray | None = None) -> bytes:
    """PNG bytes: the image (left) and a heat map (right, 'inferno'): the local-anomaly
    map (H, W) when `local` is given, else the per-pixel NLL in bits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pixels = to_8bit(image, levels)  # (C, H, W) uint8
    c, h, w = pixels.shape
    bits = pixel_bits(nll) if local is None else np.maximum(np.asarray(local, np.float64), 0.0)
    label = ("-log2 p per pixel (bits)" if local is None
             else "local anomaly (window z-score, hottest square)")
    dpi = 100
    panel = DISPLAY_PIXELS / dpi
    fig = Figure(figsize=(2 * panel + 1.4, panel * h / w + 0.9), dpi=dpi)
    FigureCanvasAgg(fig)  # attaches a non-GUI canvas: no pyplot, no global state
    left, right = fig.subplots(1, 2)
    if c == 1:
        left.imshow(pixels[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        left.imshow(pixels.transpose(1, 2, 0), interpolation="nearest")
    left.set_title("image", fontsize=9)
    shown = right.imshow(bits, cmap="inferno", vmin=0.0, vmax=max(float(bits.max()), 1e-6),
                         interpolation="nearest")
    right.set_title(label, fontsize=9)
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()


def heatmap_name(source: str, taken: set[str]) -> str:
    """File name for the heat map of input `source`: its base name, made file-system safe,
    plus `.heatmap.png`; `-2`, `-3`, ... when two inputs share a base name."""
    base = Path(source.rstrip("/")).name or "image"
    stem, suffix = Path(base).stem, Path(base).suffix
    if suffix.lower() not in IMAGE_EXTENSIONS:
        stem = base  # keep 'x.npz[3]' or 'digits:test:5' whole
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    name, k = f"{stem}.heatmap.png", 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}.heatmap.png"
    taken.add(name)
    return name


def write_heatmap(path: str | Path, image: torch.Tensor | np.ndarray, levels: int,
                  nll: torch.Tensor | np.ndarray, title: str = "",
                  local: np.ndarray | None = None) -> Path:
    """Write one heat map PNG atomically."""
    write_bytes(path, heatmap_png(image, levels, nll, title, local))
    return Path(path)
