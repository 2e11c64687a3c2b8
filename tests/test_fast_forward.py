"""The fast channels-last forward pass (fused head + cross-entropy, folded gates, 1x1 convs
as matmuls) computes the same function as the plain NCHW definition, from the same
parameters, with the same gradients; shipped bundles load unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pixeldefend.models import pixelcnn
from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig

REPO = Path(__file__).resolve().parents[1]


def model_with_big_weights(preset: str, c: int, h: int, w: int, levels: int,
                           dropout: float = 0.0) -> PixelCNN:
    torch.manual_seed(1)
    model = PixelCNN(PixelCNNConfig.from_preset(preset, c, h, w, levels, dropout=dropout))
    with torch.no_grad():  # larger random weights so every connection matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def reference_nll(model: PixelCNN, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.reference_logits(model.scale(x)), x.long(), reduction="none")


@pytest.mark.parametrize("preset,shape", [
    ("tiny", (1, 5, 7, 17)), ("tiny", (3, 4, 3, 9)), ("small", (3, 2, 1, 5)),
    ("small", (1, 1, 3, 256)), ("base", (2, 3, 4, 6)),
])
def test_fast_logits_equal_reference_in_float64(preset, shape):
    c, h, w, levels = shape
    model = model_with_big_weights(preset, *shape).double().eval()
    x = torch.randint(0, levels, (3, c, h, w), generator=torch.Generator().manual_seed(2))
    xs = pixelcnn.scaled(x, levels)
    with torch.no_grad():
        fast, ref = model.logits_from_scaled(xs), model.reference_logits(xs)
    assert fast.shape == ref.shape == (3, levels, c, h, w)
    assert (fast - ref).abs().max().item() < 1e-11


def test_fused_nll_equals_cross_entropy_of_reference_logits(monkeypatch):
    """Several head chunks, a ragged last one, and batches split into passes."""
    monkeypatch.setattr(pixelcnn, "HEAD_CHUNK", 7)
    monkeypatch.setattr(pixelcnn, "PASS_ROWS", 2 * 3 * 5 * 6)  # 2 images per pass
    model = model_with_big_weights("tiny", 3, 5, 6, 9).eval()
    x = torch.randint(0, 9, (5, 3, 5, 6), dtype=torch.uint8)
    with torch.no_grad():
        fast, ref = model.nll(x), reference_nll(model, x)
    assert fast.shape == (5, 3, 5, 6)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(model.log_prob(x), -fast.flatten(1).sum(1))


def test_fused_training_gradients_equal_reference(monkeypatch):
    monkeypatch.setattr(pixelcnn, "HEAD_CHUNK", 10)
    model = model_with_big_weights("tiny", 2, 4, 5, 7).double().train()
    x = torch.randint(0, 7, (3, 2, 4, 5), dtype=torch.uint8)
    params = list(model.parameters())
    # the fast path scales in float32 like every caller; compare in float64 throughout
    fast = F.cross_entropy(model.logits_from_scaled(pixelcnn.scaled(x, 7)), x.long())
    ref = F.cross_entropy(model.reference_logits(pixelcnn.scaled(x, 7)), x.long())
    g_fast = torch.autograd.grad(fast, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    head = pixelcnn._HeadNLL.apply
    z = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (23,))
    assert torch.autograd.gradcheck(lambda z, w, b: head(z, w, b, t), (z, w, b))
    pre = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pixelcnn._SigmoidGate.apply, (pre,))
    a, b_half = pre.detach().chunk(2, dim=-1)
    expected = torch.tanh(a / -2.0) * torch.sigmoid(b_half)
    assert (pixelcnn._SigmoidGate.apply(pre.detach()) - expected).abs().max() < 1e-15
    assert abs(fast.item() - ref.item()) < 1e-12
    for a, r in zip(g_fast, g_ref, strict=True):
        assert (a is None) == (r is None)  # the last layer's v_out, h_out feed nothing
        if a is not None:
            assert (a - r).abs().max().item() < 1e-10


def test_training_loss_backpropagates_through_fused_head():
    model = model_with_big_weights("tiny", 1, 4, 4, 16, dropout=0.0).train()
    x = torch.randint(0, 16, (4, 1, 4, 4), dtype=torch.uint8)
    fast = model.nll(x).mean()
    grads = torch.autograd.grad(fast, [model.channel_out[0].weight, model.in_v.weight])
    ref = reference_nll(model, x).mean()
    ref_grads = torch.autograd.grad(ref, [model.channel_out[0].weight, model.in_v.weight])
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bundle", ["digits", "fashion-mnist"])
def test_shipped_bundles_keep_their_parameters_and_bits_per_dim(bundle):
    """The fast path reads the same state_dict: keys and shapes unchanged, and the
    bundle's own figures reproduce from the fast nll."""
    from pixeldefend.detector import DensityDetector

    path = REPO / "models" / bundle
    if not (path / "config.json").exists():
        pytest.skip(f"{path} not shipped")
    detector = DensityDetector.load(path, device="cpu")
    model = detector.model
    fresh = PixelCNN(model.config)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in fresh.state_dict().items()}
    x = torch.randint(0, model.config.levels, (4, model.config.channels, model.config.height,
                                               model.config.width), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model.nll(x), reference_nll(model, x), rtol=1e-5,
                                   atol=1e-4)
