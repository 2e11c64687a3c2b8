"""Localisation: where an image looks wrong, as a picture a person reads at a glance.

A PixelCNN's log-likelihood is a sum over sub-pixels, so its per-pixel negative
log-likelihood (`DensityDetector.nll_map`) says which pixels the model found surprising.
`heatmap_png` draws the image next to that map (in bits per pixel, with a colour bar),
upscaled with nearest-neighbour so an 8x8 or 28x28 image is still readable.
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

DISPLAY_PIXELS = 280  # each panel is drawn about this many screen pixels wide


def pixel_bits(nll: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) per-sub-pixel NLL in nats -> (H, W) bits per pixel (channels summed)."""
    if isinstance(nll, torch.Tensor):
        nll = nll.detach().cpu().numpy()
    return np.asarray(nll, dtype=np.float64).sum(axis=0) / LN2


def heatmap_png(image: torch.Tensor | np.ndarray, levels: int, nll: torch.Tensor | np.ndarray,
                title: str = "") -> bytes:
    """PNG bytes: the image (left) and its per-pixel NLL heat map (right, 'inferno')."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pixels = to_8bit(image, levels)  # (C, H, W) uint8
    c, h, w = pixels.shape
    bits = pixel_bits(nll)
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
    right.set_title("-log2 p per pixel (bits)", fontsize=9)
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
                  nll: torch.Tensor | np.ndarray, title: str = "") -> Path:
    """Write one heat map PNG atomically."""
    write_bytes(path, heatmap_png(image, levels, nll, title))
    return Path(path)
