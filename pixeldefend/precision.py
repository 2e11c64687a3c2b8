"""Numeric precision of the network's forward pass: fp32 (default), bf16 or fp16.

Mixed precision runs the convolutions under `torch.autocast` and keeps everything that
decides a number the tool reports or compares in float32: the log-softmax / NLL of every
loss and score is computed from the logits cast back to float32, the optimiser's weights
stay float32, and fp16 training scales the loss with `torch.amp.GradScaler` so small
gradients do not underflow. Purification never uses this: it runs in float64 (its
bit-identity with the reference depends on it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 autocast exists on the CPU but has no fast kernels there: one PixelCNN training
# step measured 44x slower than fp32 (19.4 s vs 0.44 s, small preset, 32 images 28x28)
FP16_DEVICES = ("cuda",)


def check_precision(precision: str, device: torch.device) -> str:
    """`precision` if it is known and worth running on `device`, else a UsageError."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not "
                         f"{precision!r}", param="precision")
    if precision == "fp16" and device.type not in FP16_DEVICES:
        raise UsageError(f"precision fp16 needs a CUDA device (on {device.type} it has no fast "
                         "kernels and runs many times slower than fp32): use bf16 or fp32",
                         param="precision")
    return precision


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Run the enclosed forward pass in `precision` (fp32: exactly as without it)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a pass-through for fp32 and bf16, whose range needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
