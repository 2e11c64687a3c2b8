"""The PixelCNN is an exact discrete likelihood model: normalised and causal."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig


def random_model(c: int, h: int, w: int, levels: int, seed: int = 0, **kw) -> PixelCNN:
    torch.manual_seed(seed)
    settings = {"filters": 8, "layers": 2, "kernel": 3, "first_kernel": 3, "head": 16, **kw}
    cfg = PixelCNNConfig(c, h, w, levels, **settings)
    model = PixelCNN(cfg).double().eval()
    with torch.no_grad():  # larger random weights so every connection matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("shape", [(1, 2, 2, 3), (3, 2, 1, 2), (3, 1, 2, 3), (2, 2, 2, 2)])
def test_probabilities_of_all_images_sum_to_one(shape):
    c, h, w, levels = shape
    model = random_model(c, h, w, levels)
    every = torch.tensor(list(itertools.product(range(levels), repeat=c * h * w)))
    every = every.view(-1, c, h, w)
    with torch.no_grad():
        logits = model.logits_from_scaled(model.scale(every).double())
        log_p = -F.cross_entropy(logits, every.long(), reduction="none").flatten(1).sum(1)
    total = torch.logsumexp(log_p, 0).exp().item()
    assert abs(total - 1.0) < 1e-5, total
    # and the model is not trivially uniform: probabilities differ between images
    assert log_p.max() - log_p.min() > 0.1


def order(c: int, h: int, w: int) -> list[tuple[int, int, int]]:
    """Autoregressive order: raster over pixels, channels inside a pixel."""
    return [(ch, i, j) for i in range(h) for j in range(w) for ch in range(c)]


@pytest.mark.parametrize("shape", [(1, 4, 5, 5), (3, 3, 3, 4), (2, 5, 2, 3)])
def test_logits_never_depend_on_their_own_or_later_subpixels(shape):
    c, h, w, levels = shape
    model = random_model(c, h, w, levels, first_kernel=5)
    seq = order(c, h, w)
    x = torch.rand(2, c, h, w, dtype=torch.float64) * 2 - 1
    for pos, (ch, i, j) in enumerate(seq):
        xs = x.clone().requires_grad_(True)
        logits = model.logits_from_scaled(xs)[:, :, ch, i, j]
        (grad,) = torch.autograd.grad(logits.sum() + (logits**2).sum(), xs)
        allowed = set(seq[:pos])
        for c2, i2, j2 in seq:
            g = grad[:, c2, i2, j2].abs().max().item()
            if (c2, i2, j2) in allowed:
                continue
            assert g == 0.0, f"logits of {(ch, i, j)} depend on later sub-pixel {(c2, i2, j2)}"
    # sanity: the test can fail - the last sub-pixel does depend on the previous ones
    xs = x.clone().requires_grad_(True)
    last = model.logits_from_scaled(xs)[:, :, seq[-1][0], seq[-1][1], seq[-1][2]]
    (grad,) = torch.autograd.grad(last.sum() + (last**2).sum(), xs)
    c2, i2, j2 = seq[-2]
    assert grad[:, c2, i2, j2].abs().max() > 0


def test_receptive_field_has_no_blind_spot():
    """The last pixel sees every earlier pixel once the stacks are deep enough."""
    c, h, w = 1, 5, 5
    cfg = PixelCNNConfig(c, h, w, 4, filters=8, layers=4, kernel=3, first_kernel=3, head=16)
    torch.manual_seed(1)
    model = PixelCNN(cfg).double()
    xs = (torch.rand(1, c, h, w, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    i, j = 3, 2
    logits = model.logits_from_scaled(xs)[:, :, 0, i, j]
    (grad,) = torch.autograd.grad((logits**2).sum(), xs)
    seen = grad[0, 0].abs() > 0
    # pixels up-right of (i, j) are the classic blind spot of the original PixelCNN
    assert seen[i - 1, j + 2] and seen[i - 2, j + 2] and seen[i, j - 1] and seen[i - 1, j]
    assert not seen[i, j] and not seen[i, j + 1] and not seen[i + 1].any()


def test_integer_forward_matches_nll_and_log_prob():
    model = random_model(1, 3, 3, 4).float()
    x = torch.randint(0, 4, (5, 1, 3, 3), dtype=torch.uint8)
    nll = model.nll(x)
    assert nll.shape == (5, 1, 3, 3)
    assert torch.allclose(model.log_prob(x), -nll.flatten(1).sum(1))


def test_config_rejects_even_kernels():
    with pytest.raises(ValueError):
        PixelCNNConfig(1, 4, 4, 2, kernel=4)
