"""Drawing images from a PixelCNN with the fast cached decoder of `pixeldefend.purify`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .models.pixelcnn import PixelCNN
from .purify import sample


@torch.no_grad()
def draw_samples(model: PixelCNN, n: int, generator: torch.Generator | None = None,
                 temperature: float = 1.0, progress: Callable[[], None] | None = None
                 ) -> torch.Tensor:
    """n images (uint8, (n, C, H, W)) drawn from p(x); `progress` is called once per row."""
    model.eval()
    return sample(model, n, generator=generator, temperature=temperature,
                  batch_size=max(n, 1), progress=progress)
