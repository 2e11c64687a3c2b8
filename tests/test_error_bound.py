"""The first-order float32 forward error bound (`models.error_bound`) does bound the
measured float32 error, and is far too loose to certify float32 purification decisions:
the evidence behind keeping exact purification in float64 (docs/PURIFICATION.md)."""

from __future__ import annotations

import pytest
import torch

from pixeldefend.models.error_bound import float32_logit_error_bound
from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig
from pixeldefend.purify import float64_copy, scaled


@pytest.mark.parametrize("preset,shape", [("tiny", (1, 5, 6, 17)), ("tiny", (3, 4, 4, 9)),
                                          ("small", (1, 8, 8, 256))])
def test_bound_holds_and_is_far_above_the_measured_error(preset, shape):
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig.from_preset(preset, *shape)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, shape[3], (4, *shape[:3]), generator=g, dtype=torch.uint8)
    logits32, bound = float32_logit_error_bound(model, x)
    with torch.no_grad():
        logits64 = float64_copy(model).logits_from_scaled(scaled(x, shape[3]))
    err = (logits32.double() - logits64).abs()
    with torch.no_grad():  # the bound is about the plain forward pass, operation for operation
        assert torch.equal(logits32, model.reference_logits(model.scale(x)))
    assert bool((err <= bound.double()).all())
    # worst case without cancellation: orders of magnitude above what actually happens
    assert float(bound.median()) > 100 * float(err.max())
    assert next(model.parameters()).dtype == torch.float32
