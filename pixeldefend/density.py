"""Exact discrete log-likelihoods: per-sub-pixel NLL maps, log p(x), bits/dim.

`precision` (precision.py) runs the network's forward pass in bf16/fp16 under autocast;
the log-softmax and the NLL are computed from the logits in float32 whatever it is."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .models.pixelcnn import PixelCNN
from .precision import autocast

LN2 = math.log(2.0)


@torch.no_grad()
def nll_map(model: PixelCNN, images: torch.Tensor, batch_size: int = 256,
            progress: Callable[[int], None] | None = None,
            precision: str = "fp32") -> torch.Tensor:
    """Negative log-likelihood in nats of every sub-pixel, (N, C, H, W), on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(device)
        if precision == "fp32":
            out.append(model.nll(chunk).float().cpu())
        else:
            with autocast(device, precision):
                logits = model(chunk)
            out.append(F.cross_entropy(logits.float(), chunk.long(), reduction="none").cpu())
        if progress is not None:
            progress(chunk.shape[0])
    model.train(was_training)
    if not out:
        c, h, w = model.config.channels, model.config.height, model.config.width
        return torch.zeros((0, c, h, w))
    return torch.cat(out)


def nll_nats(model: PixelCNN, images: torch.Tensor, batch_size: int = 256,
             progress: Callable[[int], None] | None = None,
             precision: str = "fp32") -> torch.Tensor:
    """-log p(x) in nats per image, (N,), float64."""
    return nll_map(model, images, batch_size, progress, precision).double().flatten(1).sum(1)


def nats_to_bits_per_dim(nll: torch.Tensor, dims: int) -> torch.Tensor:
    return nll / (dims * LN2)


def bits_per_dim(model: PixelCNN, images: torch.Tensor, batch_size: int = 256,
                 progress: Callable[[int], None] | None = None,
                 precision: str = "fp32") -> torch.Tensor:
    """-log2 p(x) / (C*H*W) per image, (N,), float64."""
    c, h, w = images.shape[1:]
    return nats_to_bits_per_dim(nll_nats(model, images, batch_size, progress, precision),
                                c * h * w)
