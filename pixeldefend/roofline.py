"""How close the PixelCNN runs to this CPU's limit (`bench`'s roofline columns).

The work of a pass is counted by torch's FLOP counter on the plain definition of the
network (`PixelCNN.reference_logits` + cross-entropy), so it does not depend on how the
fast path computes it: a faster implementation shows up as more GFLOP/s, never as fewer
FLOPs. The ceiling is a float32 1024x1024 matrix multiply timed on the same thread in
the same run (the same load on the machine).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .models.pixelcnn import PixelCNN

MATMUL_SIZE = 1024


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix multiplies and convolutions `fn` runs (torch's counter)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _reference_loss(model: PixelCNN, images: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.reference_logits(model.scale(images)), images.long())


def forward_flops(model: PixelCNN, images: torch.Tensor) -> int:
    """FLOPs of one scoring pass over `images`."""
    with torch.no_grad():
        return count_flops(lambda: _reference_loss(model, images))


def train_step_flops(model: PixelCNN, images: torch.Tensor) -> int:
    """FLOPs of one training step (forward and backward) over `images`."""
    m = copy.deepcopy(model).train()
    return count_flops(lambda: _reference_loss(m, images).backward())


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest of `repeat` wall-clock timings of `fn` (the least disturbed run)."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _best_of(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    return best_time(fn, repeat)


def plain_path_times(model: PixelCNN, images: torch.Tensor, repeat: int,
                     train_step: bool = True) -> dict[str, float | None]:
    """Seconds of scoring and of one Adam step on the plain NCHW path (`reference_logits`
    + cross-entropy over the whole batch: how the forward pass ran before the fast one),
    timed in the same run as the fast path, so its speed-up is measured under the same
    load on the machine."""
    with torch.inference_mode():
        score = _best_of(lambda: F.cross_entropy(
            model.reference_logits(model.scale(images)), images.long(), reduction="none"),
            repeat)
    if not train_step:
        return {"score_plain_s": score, "train_step_plain_s": None}
    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _reference_loss(m, images).backward()
        opt.step()

    return {"score_plain_s": score, "train_step_plain_s": _best_of(step, 1)}


def matmul_gflops(repeat: int = 5, size: int = MATMUL_SIZE) -> float:
    """The float32 matrix-multiply rate of this thread, best of `repeat`."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def roofline(model: PixelCNN, images: torch.Tensor, matmul: float, score_s: float,
             train_s: float | None, purify_s: float) -> dict[str, Any]:
    """Achieved GFLOP/s of scoring, a training step and fast purification over `images`,
    and each as a share of the `matmul` rate. Purification is rated by the work of one
    scoring pass (the least any exact purifier must do), so its share says how close it
    comes to the cost of scoring."""
    forward = forward_flops(model, images)
    train = train_step_flops(model, images) if train_s is not None else None
    score_rate = forward / score_s / 1e9
    purify_rate = forward / purify_s / 1e9
    train_rate = None if train is None or train_s is None else train / train_s / 1e9
    return {
        "matmul_gflops": matmul,
        "forward_gflop_per_image": forward / images.shape[0] / 1e9,
        "train_gflop_per_image": None if train is None else train / images.shape[0] / 1e9,
        "score_gflops": score_rate, "score_vs_matmul": score_rate / matmul,
        "train_gflops": train_rate,
        "train_vs_matmul": None if train_rate is None else train_rate / matmul,
        "purify_gflops": purify_rate, "purify_vs_matmul": purify_rate / matmul,
    }
