"""Training a `ResNetClassifier`: augmentation and the cross-entropy objective on the
shared training loop (`pixeldefend.train`), validation by error rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..pixels import to_float
from .classifier import ResNetClassifier
from .loading import predict_logits


def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift each image by up to `pad` pixels (zero padding, then a random crop); draws
    from the global torch RNG so a resumed training run repeats it exactly."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2))
    out = torch.empty_like(x)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            sel = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().flatten()
            if sel.numel():
                out[sel] = padded[sel, :, dy : dy + h, dx : dx + w]
    return out


def default_shift(height: int, width: int) -> int:
    """1 pixel up to 28x28 (2 cost Fashion-MNIST a point in a 10-epoch run), 2 above."""
    return 1 if min(height, width) < 32 else 2



def error_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, levels: int,
               batch_size: int = 512) -> float:
    pred = predict_logits(model, images, levels, batch_size).argmax(1)
    return float((pred != labels.cpu()).float().mean())


def train_classifier(
    model: ResNetClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    settings: Any,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: Any = None,
    shift: int | None = None,
) -> Any:
    """Cross-entropy training through the shared loop; validation metric = error rate.

    Returns the loop's `TrainResult`; the model ends with its best-validation weights.
    """
    from ..train import run_training

    levels = model.config.levels
    pad = default_shift(model.config.height, model.config.width) if shift is None else shift

    def loss_fn(m: nn.Module, batch: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        x = random_shift(to_float(batch, levels), pad)
        assert y is not None
        return F.cross_entropy(m(x), y)

    def evaluate(m: nn.Module) -> float:
        return error_rate(m, val_images, val_labels, levels)

    return run_training(model, loss_fn, images, labels, evaluate, settings, device,
                        checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
