"""Exact discrete log-likelihoods: per-sub-pixel NLL maps, log p(x), bits/dim."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .models.pixelcnn import PixelCNN

LN2 = math.log(2.0)


@torch.no_grad()
def nll_map(model: PixelCNN, images: torch.Tensor, batch_size: int = 256,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Negative log-likelihood in nats of every sub-pixel, (N, C, H, W), on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(device)
        out.append(model.nll(chunk).float().cpu())
        if progress is not None:
            progress(chunk.shape[0])
    model.train(was_training)
    if not out:
        c, h, w = model.config.channels, model.config.height, model.config.width
        return torch.zeros((0, c, h, w))
    return torch.cat(out)


def nll_nats(model: PixelCNN, images: torch.Tensor, batch_size: int = 256,
             progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """-log p(x) in nats per image, (N,), float64."""
    return nll_map(model, images, batch_size, progress).double().flatten(1).sum(1)


def nats_to_bits_per_dim(nll: torch.Tensor, dims: int) -> torch.Tensor:
    return nll / (dims * LN2)


def bits_per_dim(model: PixelCNN, images: torch.Tensor, batch_size: int = 256,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """-log2 p(x) / (C*H*W) per image, (N,), float64."""
    c, h, w = images.shape[1:]
    return nats_to_bits_per_dim(nll_nats(model, images, batch_size, progress), c * h * w)
