"""Training a `ResNetClassifier`: augmentation and the cross-entropy objective on the
shared training loop (`pixeldefend.train`), validation by error rate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet, require_labels
from ..pixels import to_float
from .classifier import ClassifierConfig, ResNetClassifier, count_parameters
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


def error_count(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, levels: int,
                batch_size: int = 512) -> int:
    """Misclassified images (the training loop adds the counts of every rank)."""
    pred = predict_logits(model, images, levels, batch_size).argmax(1)
    return int((pred != labels.cpu()).sum())


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
        return F.cross_entropy(m(x).float(), y)  # float32 softmax whatever the precision

    def evaluate(m: nn.Module, block: range) -> tuple[float, int]:
        part = slice(block.start, block.stop)
        return float(error_count(m, val_images[part], val_labels[part], levels)), len(block)

    return run_training(model, loss_fn, images, labels, evaluate, settings, device,
                        checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                        val_size=len(val_images))


# ------------------------------------------------------------------ the whole pipeline

SMALL_SET = 10_000  # fewer training images than this: more epochs by default


@dataclass
class ClassifierPlan:
    """What `fit_classifier` will train: the network, its settings and the data."""

    model: ResNetClassifier
    settings: Any  # train.TrainSettings
    shift: int
    train_set: ImageSet
    val_set: ImageSet
    test_set: ImageSet | None
    preset: str


def plan_classifier(train_set: ImageSet, val_set: ImageSet, test_set: ImageSet | None, *,
                    preset: str = "small", epochs: int | None = None, batch_size: int = 128,
                    lr: float = 3e-3, shift: int | None = None,
                    seed: int = 0, precision: str = "fp32") -> ClassifierPlan:
    """A seeded network sized for the data and the training settings: `epochs` defaults
    to 40 under 10,000 training images, else 10; the learning rate decays to 5% by the
    last epoch; `shift` defaults to `default_shift`."""
    from ..train import TrainSettings

    labels = require_labels(train_set, "training")
    require_labels(val_set, "validation")
    if test_set is not None:
        require_labels(test_set, "test")
    num_classes = max(len(train_set.classes or []), int(labels.max()) + 1, 2)
    spec = train_set.spec
    cfg = ClassifierConfig.from_preset(preset, spec.channels, spec.height, spec.width,
                                       num_classes, spec.levels)
    epochs = epochs or (40 if len(train_set) < SMALL_SET else 10)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr,
                             lr_decay=round(0.05 ** (1 / max(1, epochs - 1)), 6),
                             weight_decay=1e-4, grad_clip=5.0, seed=seed,
                             precision=precision)
    torch.manual_seed(seed)
    shift = default_shift(spec.height, spec.width) if shift is None else shift
    return ClassifierPlan(ResNetClassifier(cfg), settings, shift, train_set, val_set,
                          test_set, preset)


def fit_classifier(plan: ClassifierPlan, data: str, device: torch.device, *,
                   checkpoint_dir: Path | None = None, resume: bool = False,
                   progress: Any = None) -> dict[str, Any]:
    """Train the planned network (best validation weights kept) and return the bundle
    metadata: classes, data provenance, metrics (validation and test accuracy) and the
    training record. `save_classifier(out, plan.model, meta)` writes the bundle."""
    model, settings = plan.model, plan.settings
    train_set, val_set, test_set = plan.train_set, plan.val_set, plan.test_set
    start = time.perf_counter()
    result = train_classifier(model, train_set.images, require_labels(train_set, "training"),
                              val_set.images, require_labels(val_set, "validation"),
                              settings, device, checkpoint_dir=checkpoint_dir, resume=resume,
                              progress=progress, shift=plan.shift)
    seconds = time.perf_counter() - start
    model.eval()
    test_acc = None
    if test_set is not None:
        test_acc = 1.0 - error_rate(model, test_set.images, require_labels(test_set, "test"),
                                    model.config.levels)
    metrics = {"val_accuracy": round(1.0 - result.best_val, 5),
               "test_accuracy": None if test_acc is None else round(test_acc, 5),
               "train_seconds": round(seconds, 1), "epochs": settings.epochs,
               "best_epoch": result.best_epoch + 1}
    num_classes = model.config.num_classes
    return {
        "input": "float images in [0, 1], shape (N, C, H, W) -> logits (N, num_classes); "
                 "uint8 levels x map to x / (levels - 1)",
        "classes": train_set.classes or [str(i) for i in range(num_classes)],
        "data": {"spec": data, "train": train_set.source, "n_train": len(train_set),
                 "val": val_set.source, "n_val": len(val_set),
                 "test": None if test_set is None else test_set.source,
                 "n_test": 0 if test_set is None else len(test_set)},
        "metrics": metrics,
        "training": {"settings": settings.__dict__, "preset": plan.preset,
                     "shift": plan.shift, "history": result.history,
                     "parameters": count_parameters(model)},
    }
