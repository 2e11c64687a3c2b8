"""The pixel-level contract: images are integer levels in [0, levels - 1], `levels` explicit.

Every module that turns images into floats, floats back into images, checks that a
tensor holds pixel levels, or moves images inside an eps ball does it with these
functions, so the convention (x / (levels - 1), round to the nearest level, the ball
counted in whole levels) is written once. `levels` is always passed in: guessing it
from `x.max() + 1` silently picks the wrong model for an image with no bright pixel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .errors import DataError, UsageError


def check_levels(levels: int) -> int:
    """`levels` as an int in [2, 256] (uint8 holds at most 256), else a UsageError."""
    if int(levels) != levels or not 2 <= levels <= 256:
        raise UsageError(f"levels must be an integer between 2 and 256, got {levels}")
    return int(levels)


def check_images(images: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) with every value below `levels`, else a DataError."""
    if images.dtype != torch.uint8:
        raise DataError(f"images must be uint8 pixel levels, not {images.dtype}")
    if images.dim() != 4:
        raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    check_range(images, levels)
    return images


def check_range(images: torch.Tensor, levels: int) -> None:
    """Integer pixel values in [0, levels - 1], else a DataError."""
    if images.is_floating_point():
        raise DataError("images must hold integer pixel levels (uint8), not floats")
    if images.numel() and (int(images.min()) < 0 or int(images.max()) >= levels):
        raise DataError(f"pixel values must lie in [0, {levels - 1}] for {levels} levels, "
                        f"found {int(images.min())}..{int(images.max())}")


def to_float(images: torch.Tensor, levels: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer levels -> floats in [0, 1]: x / (levels - 1)."""
    return images.to(dtype) / float(levels - 1)


def to_levels(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Floats in [0, 1] -> uint8 levels: round(clamp(x, 0, 1) * (levels - 1)), no gradient."""
    return torch.round(x.detach().clamp(0.0, 1.0) * (levels - 1)).to(torch.uint8)


def straight_through_round(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Round [0, 1] floats to the pixel levels on the forward pass, identity backward."""
    q = to_float(to_levels(x, levels), levels, x.dtype).to(x.device)
    return x + (q - x).detach()


def ball_levels(eps: float, levels: int) -> int:
    """Whole levels an eps budget (a fraction of [0, 1]) lets a quantised pixel move."""
    return int(math.floor(eps * (levels - 1) + 1e-6))


def level_fraction(k: float, levels: int) -> float:
    """`k` pixel levels as a fraction of [0, 1]: k / (levels - 1) (a ball, a step size)."""
    return k / (levels - 1)


def clip_to_ball(x: torch.Tensor, centre: torch.Tensor, eps: float) -> torch.Tensor:
    """Float images clipped to the L-inf ball of radius eps around `centre`, and to [0, 1]."""
    return torch.minimum(torch.maximum(x, centre - eps), centre + eps).clamp(0.0, 1.0)


def quantise(adv: torch.Tensor, clean: torch.Tensor, levels: int, ball: int) -> torch.Tensor:
    """Float [0, 1] adversarial images -> uint8 levels on the CPU: round, clip to the eps
    ball (`ball` whole levels) around the clean uint8 images, clip to [0, levels - 1]."""
    q = torch.round(adv.detach().float().cpu() * (levels - 1)).long()
    base = clean.long().cpu()
    q = torch.minimum(torch.maximum(q, base - ball), base + ball)
    return q.clamp(0, levels - 1).to(torch.uint8)


def from_8bit(values: np.ndarray, levels: int) -> np.ndarray:
    """Map 8-bit values to `levels` levels: v -> round(v * (levels-1) / 255)."""
    if levels == 256:
        return values.astype(np.uint8)
    return np.rint(values.astype(np.float64) * (levels - 1) / 255.0).astype(np.uint8)


def to_8bit(values: np.ndarray | torch.Tensor, levels: int) -> np.ndarray:
    """Inverse of `from_8bit`, exact on round trips: v -> round(v * 255 / (levels-1))."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if levels == 256:
        return values.astype(np.uint8)
    return np.rint(values.astype(np.float64) * 255.0 / (levels - 1)).astype(np.uint8)


def model_device(model: nn.Module) -> torch.device:
    """Where a model's parameters (or, for a parameter-free module, buffers) live."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
