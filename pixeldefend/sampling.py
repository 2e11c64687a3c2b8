"""Drawing images from a PixelCNN: the fast cached decoder when available, else naive."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .models.pixelcnn import PixelCNN


@torch.no_grad()
def draw_samples(model: PixelCNN, n: int, generator: torch.Generator | None = None,
                 temperature: float = 1.0, progress: Callable[[], None] | None = None
                 ) -> torch.Tensor:
    """n images (uint8, (n, C, H, W)) drawn from p(x); `progress` is called once per row."""
    model.eval()
    try:
        from .purify import sample as fast_sample
    except ImportError:
        fast_sample = None
    if fast_sample is not None:
        images = fast_sample(model, n, generator=generator, temperature=temperature)
        if progress is not None:
            for _ in range(model.config.height):
                progress()
        return images
    cfg = model.config
    device = next(model.parameters()).device
    x = torch.zeros((n, cfg.channels, cfg.height, cfg.width), dtype=torch.long, device=device)
    for i in range(cfg.height):
        for j in range(cfg.width):
            for c in range(cfg.channels):
                logits = model(x)[:, :, c, i, j].double() / temperature
                probs = torch.softmax(logits, dim=1).cpu()
                drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                x[:, c, i, j] = drawn.to(device)
        if progress is not None:
            progress()
    return x.to(torch.uint8)
