"""A small ResNet-style image classifier: its configuration, network and bundle writer.

Input contract (every classifier in pixeldefend, ours or the user's): float images in
[0, 1], shape (N, C, H, W), logits (N, K) out (`pixels.to_float` maps levels to floats).
Training lives in `models.classifier_training`; loading any classifier, ours or a
user's (the trust boundary), in `models.loading`. The names other modules imported from
here before the split still work (see `__getattr__` at the end).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import CLASSIFIER_PRESETS as PRESETS
from ..errors import UsageError

KIND = "classifier"

@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild the network; stored in the bundle's config.json."""

    channels: int
    height: int
    width: int
    num_classes: int
    levels: int
    filters: int = 16
    stages: int = 3
    blocks: int = 1
    norm: str = "batch"  # "batch" or "group"
    stem_stride: int = 1  # 2 halves the resolution at once: 4x cheaper on 28x28 images

    def __post_init__(self) -> None:
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', not {self.norm!r}")
        if self.num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        if min(self.filters, self.stages, self.blocks, self.channels) < 1:
            raise ValueError("filters, stages, blocks and channels must be positive")
        if self.stem_stride not in (1, 2):
            raise ValueError("stem_stride must be 1 or 2")

    @classmethod
    def from_preset(cls, preset: str, channels: int, height: int, width: int,
                    num_classes: int, levels: int) -> ClassifierConfig:
        if preset not in PRESETS:
            raise UsageError(f"unknown classifier preset {preset!r}: choose from "
                             f"{', '.join(PRESETS)}")
        stem_stride = 2 if min(height, width) >= 24 else 1  # 28x28 -> 14x14 features
        return cls(channels, height, width, num_classes, levels, stem_stride=stem_stride,
                   **PRESETS[preset])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetClassifier(nn.Module):
    """Stem conv, `stages` stages of residual blocks (width doubles, resolution halves
    after the first), global average pooling, linear head. Takes [0, 1] images."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        f = config.filters
        self.stem = nn.Sequential(nn.Conv2d(config.channels, f, 3, config.stem_stride, 1,
                                            bias=False),
                                  _norm(config.norm, f), nn.ReLU())
        layers: list[nn.Module] = []
        cin = f
        for s in range(config.stages):
            cout = f * 2**s
            for b in range(config.blocks):
                stride = 2 if s > 0 and b == 0 else 1
                layers.append(BasicBlock(cin, cout, stride, config.norm))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5  # centre [0, 1] inputs; part of the model, not the caller's job
        x = self.body(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_classifier(path: str | Path, model: ResNetClassifier,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write a classifier bundle (safetensors + config.json), atomically."""
    from ..bundle import save_bundle

    return save_bundle(path, KIND, model.config.to_dict(), model.state_dict(), meta=meta)


# Old import paths (`from pixeldefend.models.classifier import load_classifier`, ...):
# resolved on first use, so importing the architecture does not import the loaders.
_MOVED = {
    "models.loading": ("LoadedClassifier", "Normalize", "WrappedClassifier", "as_loaded",
                       "check_inputs", "classify", "load_classifier", "predict_logits",
                       "probe_classifier", "TORCHSCRIPT_SUFFIXES"),
    "models.classifier_training": ("train_classifier", "error_rate", "random_shift",
                                   "default_shift"),
    "pixels": ("to_float",),
    "data": ("split_holdout",),
}


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in _MOVED.items():
        if name in names:
            return getattr(importlib.import_module(f"pixeldefend.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
