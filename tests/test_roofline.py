"""bench's roofline columns: FLOPs counted on the plain network (known answer), rates and
shares consistent (no timing asserts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig
from pixeldefend.roofline import forward_flops, matmul_gflops, roofline, train_step_flops


def test_forward_flops_are_every_conv_at_every_pixel():
    """Every conv of the plain network keeps the image size, so one forward pass costs
    2 x (weights of all convs) x pixels x images."""
    model = PixelCNN(PixelCNNConfig.from_preset("tiny", 3, 5, 6, 9))
    images = torch.randint(0, 9, (4, 3, 5, 6), dtype=torch.uint8)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert forward_flops(model, images) == 2 * weights * 5 * 6 * 4
    # backward: input and weight gradients, about twice the forward again
    ratio = train_step_flops(model, images) / forward_flops(model, images)
    assert 2.5 < ratio <= 3.0


def test_roofline_rates_and_shares_agree():
    model = PixelCNN(PixelCNNConfig.from_preset("tiny", 1, 4, 4, 5))
    images = torch.randint(0, 5, (2, 1, 4, 4), dtype=torch.uint8)
    row = roofline(model, images, matmul=100.0, score_s=0.5, train_s=2.0, purify_s=4.0)
    forward = forward_flops(model, images)
    assert row["score_gflops"] == pytest.approx(forward / 0.5 / 1e9)
    assert row["purify_gflops"] == pytest.approx(forward / 4.0 / 1e9)
    assert row["score_vs_matmul"] == pytest.approx(row["score_gflops"] / 100.0)
    assert row["train_vs_matmul"] == pytest.approx(row["train_gflops"] / 100.0)
    assert row["forward_gflop_per_image"] == pytest.approx(forward / 2 / 1e9)
    assert roofline(model, images, 100.0, 0.5, None, 4.0)["train_gflops"] is None


def test_matmul_rate_is_positive():
    assert matmul_gflops(repeat=1, size=64) > 0
