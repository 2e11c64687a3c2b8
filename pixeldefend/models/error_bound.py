"""A rigorous (first-order) bound on how far float32 logits can be from exact arithmetic,
and why exact purification therefore stays in float64.

Exact purification must take the same decision as the float64 reference at every
sub-pixel. A float32 decoder could be trusted wherever its box margin (best logit minus
second best) exceeds the worst-case error of both computations, falling back to float64
elsewhere. This module computes that worst case for `PixelCNN.logits_from_scaled` run
in float32, by the standard componentwise forward error analysis (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., sections 3.1 and 3.5):

- An affine map y = W x + b over n inputs, evaluated in any summation order (blocked,
  with or without FMA), from an input x^ with |x^ - x| <= E componentwise:
      |y^ - y| <= |W| E + gamma_{n+1} (|W| |x^| + |b|),   gamma_m = m u / (1 - m u),
  u = 2^-24. The rounding term is itself a convolution with |W|, so the bound is one
  more forward pass with absolute weights.
- tanh, sigmoid, ELU (Lipschitz constants 1, 1/4, 1) computed to a relative accuracy
  rho (taken as 16 u: PyTorch's vectorised float32 elementary functions are accurate to a
  few ulp): |phi^(x^) - phi(x)| <= L E + rho |phi^(x^)|.
- A product g = t s: |g^ - g| <= |t^| E_s + (|s^| + E_s) E_t + u |g^|; a sum adds the
  bounds plus u |z^|.
- Inputs: the scaled levels v * 2/(levels-1) - 1 in [-1, 1] are within 4 u of exact.

Terms of second order in u (products of two error bounds, and rho's effect on |phi|) are
dropped, so the bound is rigorous to first order; the float64 reference obeys the same
bound with u = 2^-53, so a float32 decision provably equals the reference's when its
margin exceeds the two bounds added.

The result (docs/PURIFICATION.md; `tests/test_error_bound.py` checks it does bound the
measured error): the worst case grows by the absolute row sums of the weights at every
layer, with no cancellation, and ends 10^10 to 10^15 times above the error actually
observed (about 1e4 on a random `small` model, 1e11 on the Fashion-MNIST model, against
measured errors of 2e-7 and 3e-5 and box margins whose median is 3e-2). No float32
decision could be certified, so `purify_fast` decodes in float64 (whose own agreement
with the reference is guarded by the near-tie fallback in `pixeldefend.purify`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .pixelcnn import PixelCNN, down_shift, right_shift, scaled

UNIT_ROUNDOFF_32 = 2.0 ** -24
FUNCTION_ACCURACY = 16  # relative accuracy of float32 tanh / sigmoid / elu, in units of u


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


class _Bounded:
    """Runs the float32 forward pass with an elementwise error bound beside each tensor."""

    def __init__(self, u: float) -> None:
        self.u, self.rho = u, FUNCTION_ACCURACY * u

    def conv(self, conv: nn.Conv2d, x: torch.Tensor, e: torch.Tensor,
             pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> tuple[torch.Tensor,
                                                                  torch.Tensor]:
        w, b = conv.weight, conv.bias
        n = w[0].numel() + (1 if b is not None else 0)
        y = conv(F.pad(x, pad))
        wa = w.abs()
        rounding = F.conv2d(F.pad(x.abs(), pad), wa)
        if b is not None:
            rounding = rounding + b.abs().view(1, -1, 1, 1)
        return y, F.conv2d(F.pad(e, pad), wa) + _gamma(n, self.u) * rounding

    def add(self, a: torch.Tensor, ea: torch.Tensor, b: torch.Tensor,
            eb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = a + b
        return z, ea + eb + self.u * z.abs()

    def gate(self, pre: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = pre.shape[1] // 2
        t, s = torch.tanh(pre[:, :f]), torch.sigmoid(pre[:, f:])
        et = e[:, :f] + self.rho * t.abs()
        es = e[:, f:] / 4 + self.rho * s.abs()
        g = t * s
        return g, t.abs() * es + (s.abs() + es) * et + self.u * g.abs()

    def elu(self, x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.elu(x)
        return y, e + self.rho * y.abs()


@torch.no_grad()
def float32_logit_error_bound(model: PixelCNN, images: torch.Tensor,
                              u: float = UNIT_ROUNDOFF_32) -> tuple[torch.Tensor,
                                                                    torch.Tensor]:
    """The float32 logits (N, levels, C, H, W) of `images` and a bound of the same shape
    on their distance from the exact-arithmetic logits (see the module docstring).
    Mirrors `PixelCNN.logits_from_scaled` and `context` layer by layer."""
    model = copy.deepcopy(model).float().eval()  # the caller's model stays as it was
    cfg = model.config
    b = _Bounded(u)
    xs = scaled(model.check_images(images), cfg.levels, torch.float32)
    x_in = torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1)
    e_in = torch.full_like(x_in, 4 * u)
    r = cfg.first_kernel // 2
    v, ev = b.conv(model.in_v, x_in, e_in, (r, r, r, 0))
    v, ev = down_shift(v), down_shift(ev)
    h, eh = b.conv(model.in_h, x_in, e_in, (r, 0, 0, 0))
    h, eh = b.add(right_shift(h), right_shift(eh), *b.conv(model.in_v_to_h, v, ev))
    skip, es = b.conv(model.in_skip, h, eh)
    for layer in model.layers:
        k = layer.k // 2
        v_pre, ev_pre = b.conv(layer.conv_v, v, ev, (k, k, k, 0))
        h_pre, eh_pre = b.add(*b.conv(layer.conv_h, h, eh, (k, 0, 0, 0)),
                              *b.conv(layer.v_to_h, v_pre, ev_pre))
        gv, egv = b.gate(v_pre, ev_pre)
        v, ev = b.add(v, ev, *b.conv(layer.v_out, gv, egv))
        g, eg = b.gate(h_pre, eh_pre)
        h, eh = b.add(h, eh, *b.conv(layer.h_out, g, eg))
        skip, es = b.add(skip, es, *b.conv(layer.h_skip, g, eg))
    ctx, ectx = b.elu(*b.conv(model.trunk, *b.elu(skip, es)))
    logits, bounds = [], []
    for c in range(cfg.channels):
        z, ez = ctx, ectx
        if c > 0:
            z, ez = b.add(z, ez, *b.conv(model.channel_in[c], xs[:, :c], e_in[:, :c]))
        z, ez = b.elu(*b.conv(model.channel_mid[c], *b.elu(z, ez)))
        out, eout = b.conv(model.channel_out[c], z, ez)
        logits.append(out)
        bounds.append(eout)
    return torch.stack(logits, dim=2), torch.stack(bounds, dim=2)
