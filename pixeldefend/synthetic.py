"""Synthetic out-of-distribution images, generated deterministically and offline.

Each generator draws 8-bit pictures on a canvas four times the model's size (so strokes
and edges are antialiased when `ood.convert_8bit` shrinks them) and returns uint8 images
(N, C, H, W) in the model's levels. Every set has two *variants* that share the recipe but
not the material: ``dev`` (font set A, its own seeds) for choosing statistics and
settings, ``test`` (font set B, other seeds) for reported figures, so a reported number
never comes from data that shaped the score.

- ``characters``: letters and symbols rendered from the system's TrueType fonts;
- ``rendered-digits``: the digits 0-9 rendered from those fonts;
- ``strokes``: pen-stroke-like digits (thick random Bezier curves, MNIST-like framing);
- ``shapes``: ellipses, rectangles, triangles and polygons, filled or outlined;
- ``blobs``: smooth images (blurred noise, sums of Gaussian bumps);
- near-OOD transforms of in-distribution images (`transform`): ``rot90``, ``shift``
  (6 px at 28x28), ``contrast`` (x 0.5 around the image mean), ``patch`` (a white square
  6 px at 28x28 pasted at a random place; `patch_boxes` gives where).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .data import ImageSpec, from_8bit, to_8bit
from .errors import DataError

FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts", "/usr/local/share/fonts")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SYMBOLS = "!#$%&*+=?@<>{}[]()/\\|~^§¶©®±÷×∑∞≈≠√∫"
DIGITS = "0123456789"
VARIANTS = ("dev", "test")
GENERATED = ("characters", "rendered-digits", "strokes", "shapes", "blobs")
TRANSFORMS = ("rot90", "shift", "contrast", "patch")
SCALE = 4  # drawing canvas = SCALE x the model's size
# seed offsets: the two variants never share random draws
VARIANT_SEED = {"dev": 1_000_003, "test": 0}


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise DataError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    return variant


@lru_cache(maxsize=1)
def system_fonts() -> tuple[str, ...]:
    """Every TrueType font file under the usual system folders, sorted (deterministic)."""
    found: set[str] = set()
    for folder in FONT_DIRS:
        root = Path(folder)
        if root.is_dir():
            found.update(str(p) for p in root.rglob("*.ttf"))
    return tuple(sorted(found))


def fonts_for(variant: str) -> list[str]:
    """Font set A (even positions, ``dev``) or B (odd positions, ``test``)."""
    fonts = system_fonts()
    if len(fonts) < 2:
        raise DataError("rendered-character sets need at least two TrueType fonts "
                        "(e.g. Debian's fonts-dejavu-core)")
    return list(fonts[0::2] if _check_variant(variant) == "dev" else fonts[1::2])


def _rng(seed: int, variant: str, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed + VARIANT_SEED[_check_variant(variant)], salt])


def _canvas(spec: ImageSpec) -> tuple[int, int]:
    return spec.width * SCALE, spec.height * SCALE


def _finish(canvases: list[np.ndarray], spec: ImageSpec) -> torch.Tensor:
    from .ood import convert_8bit  # local: ood imports this module

    return convert_8bit(canvases, spec)


def rendered_text(spec: ImageSpec, n: int, seed: int = 0, variant: str = "test",
                  alphabet: str = LETTERS + SYMBOLS) -> torch.Tensor:
    """One glyph per image, white-ish on black, random font, size, offset and slant."""
    from PIL import Image, ImageDraw, ImageFont

    rng = _rng(seed, variant, 1 if alphabet != DIGITS else 2)
    fonts = fonts_for(variant)
    w, h = _canvas(spec)
    out = []
    for _ in range(n):
        char = alphabet[int(rng.integers(len(alphabet)))]
        size = int(h * rng.uniform(0.55, 0.95))
        font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size)
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        cx = (w - (right - left)) / 2 - left + rng.uniform(-0.1, 0.1) * w
        cy = (h - (bottom - top)) / 2 - top + rng.uniform(-0.1, 0.1) * h
        draw.text((cx, cy), char, fill=int(rng.integers(170, 256)), font=font)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
        out.append(np.asarray(img))
    return _finish(out, spec)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, steps: int = 24) -> list[tuple]:
    t = np.linspace(0.0, 1.0, steps)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    return [tuple(p) for p in pts]


def strokes(spec: ImageSpec, n: int, seed: int = 0, variant: str = "test") -> torch.Tensor:
    """Digit-like pen strokes: 1-3 connected quadratic Bezier curves of one thick pen,
    inside the central 20/28 of the frame (MNIST's framing), slightly blurred."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = _rng(seed, variant, 3)
    w, h = _canvas(spec)
    lo, hi = 4 / 28, 24 / 28
    out = []
    for _ in range(n):
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        width = max(1, int(w * rng.uniform(0.07, 0.13)))
        point = rng.uniform(lo, hi, 2) * (w, h)
        for _ in range(int(rng.integers(1, 4))):
            ctrl = rng.uniform(lo, hi, 2) * (w, h)
            end = rng.uniform(lo, hi, 2) * (w, h)
            draw.line(_bezier(point, ctrl, end), fill=255, width=width, joint="curve")
            point = end
        img = img.filter(ImageFilter.GaussianBlur(radius=w / 56))
        out.append(np.asarray(img))
    return _finish(out, spec)


def shapes(spec: ImageSpec, n: int, seed: int = 0, variant: str = "test") -> torch.Tensor:
    """1-3 geometric shapes (ellipse, rectangle, triangle, regular polygon), filled or
    outlined, random grey levels, on a black or random grey background."""
    from PIL import Image, ImageDraw

    rng = _rng(seed, variant, 4)
    w, h = _canvas(spec)
    out = []
    for _ in range(n):
        background = 0 if rng.random() < 0.7 else int(rng.integers(0, 256))
        img = Image.new("L", (w, h), background)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            fill = int(rng.integers(60, 256))
            kind = int(rng.integers(4))
            cx, cy = rng.uniform(0.2, 0.8, 2) * (w, h)
            r = rng.uniform(0.12, 0.4) * w
            outline = rng.random() < 0.4
            width = max(1, int(w * rng.uniform(0.04, 0.1)))
            if kind == 0:
                ry = r * rng.uniform(0.5, 1.0)
                box = (cx - r, cy - ry, cx + r, cy + ry)
                draw.ellipse(box, outline=fill if outline else None,
                             fill=None if outline else fill, width=width)
            elif kind == 1:
                ry = r * rng.uniform(0.4, 1.0)
                box = (cx - r, cy - ry, cx + r, cy + ry)
                draw.rectangle(box, outline=fill if outline else None,
                               fill=None if outline else fill, width=width)
            else:
                sides = 3 if kind == 2 else int(rng.integers(5, 9))
                phase = rng.uniform(0, 2 * math.pi)
                pts = [(cx + r * math.cos(phase + 2 * math.pi * k / sides),
                        cy + r * math.sin(phase + 2 * math.pi * k / sides)) for k in range(sides)]
                if outline:
                    draw.line([*pts, pts[0]], fill=fill, width=width, joint="curve")
                else:
                    draw.polygon(pts, fill=fill)
        out.append(np.asarray(img))
    return _finish(out, spec)


def blobs(spec: ImageSpec, n: int, seed: int = 0, variant: str = "test") -> torch.Tensor:
    """Smooth images: half Gaussian-blurred uniform noise, half sums of 1-5 Gaussian bumps,
    each stretched to a random grey range."""
    from scipy.ndimage import gaussian_filter

    rng = _rng(seed, variant, 5)
    w, h = _canvas(spec)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for i in range(n):
        if i % 2 == 0:
            field = gaussian_filter(rng.random((h, w)), sigma=w * rng.uniform(0.04, 0.15),
                                    mode="wrap")
        else:
            field = np.zeros((h, w))
            for _ in range(int(rng.integers(1, 6))):
                cy, cx = rng.uniform(0, 1, 2)
                s = rng.uniform(0.08, 0.35)
                field += rng.uniform(-1, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)
                                                     / (2 * s * s))
        field = (field - field.min()) / max(float(np.ptp(field)), 1e-12)
        low = rng.uniform(0, 0.5)
        high = rng.uniform(low + 0.3, 1.0)
        out.append(np.round(255 * (low + (high - low) * field)).astype(np.uint8))
    return _finish(out, spec)


def generate(name: str, spec: ImageSpec, n: int, seed: int = 0,
             variant: str = "test") -> torch.Tensor:
    """One of GENERATED by name."""
    if name == "characters":
        return rendered_text(spec, n, seed, variant, LETTERS + SYMBOLS)
    if name == "rendered-digits":
        return rendered_text(spec, n, seed, variant, DIGITS)
    if name == "strokes":
        return strokes(spec, n, seed, variant)
    if name == "shapes":
        return shapes(spec, n, seed, variant)
    if name == "blobs":
        return blobs(spec, n, seed, variant)
    raise DataError(f"unknown generated set {name!r}: choose from {', '.join(GENERATED)}")


# ----------------------------------------------------------------- near-OOD transforms


def patch_size(spec: ImageSpec) -> int:
    """6 px at 28x28, scaled with the image (at least 2)."""
    return max(2, round(6 * min(spec.height, spec.width) / 28))


def patch_boxes(spec: ImageSpec, n: int, seed: int = 0,
                variant: str = "test") -> np.ndarray:
    """(n, 4) boxes (top, left, bottom, right), exclusive ends, of the `patch` transform."""
    rng = _rng(seed, variant, 6)
    size = patch_size(spec)
    tops = rng.integers(0, spec.height - size + 1, n)
    lefts = rng.integers(0, spec.width - size + 1, n)
    return np.stack([tops, lefts, tops + size, lefts + size], axis=1)


def transform(name: str, images: torch.Tensor, spec: ImageSpec, seed: int = 0,
              variant: str = "test") -> torch.Tensor:
    """Near-OOD versions of in-distribution images (uint8 levels, N x C x H x W)."""
    n = len(images)
    levels = spec.levels
    if name == "rot90":
        if spec.height != spec.width:
            raise DataError("rot90 needs square images")
        return torch.rot90(images, 1, dims=(-2, -1)).contiguous()
    if name == "shift":
        rng = _rng(seed, variant, 7)
        d = max(1, round(6 * min(spec.height, spec.width) / 28))
        out = torch.zeros_like(images)
        for i in range(n):  # 6 px in one of the four directions, zero (black) fill
            k = int(rng.integers(4))
            src = images[i]
            if k == 0:
                out[i, :, :, d:] = src[:, :, :-d]
            elif k == 1:
                out[i, :, :, :-d] = src[:, :, d:]
            elif k == 2:
                out[i, :, d:, :] = src[:, :-d, :]
            else:
                out[i, :, :-d, :] = src[:, d:, :]
        return out
    if name == "contrast":
        pixels = to_8bit(images, levels).astype(np.float64)
        mean = pixels.mean(axis=(1, 2, 3), keepdims=True)
        low = np.clip(np.round(mean + 0.5 * (pixels - mean)), 0, 255).astype(np.uint8)
        return torch.from_numpy(from_8bit(low, levels))
    if name == "patch":
        out = images.clone()
        for i, (t, left, b, r) in enumerate(patch_boxes(spec, n, seed, variant)):
            out[i, :, t:b, left:r] = levels - 1
        return out
    raise DataError(f"unknown transform {name!r}: choose from {', '.join(TRANSFORMS)}")
