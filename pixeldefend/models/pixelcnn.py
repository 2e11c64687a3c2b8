"""Gated PixelCNN with an exact categorical likelihood over discrete pixel levels.

Autoregressive order: pixels in raster order (row by row, left to right), and inside a
pixel the channels in order (R, then G, then B). The model factorises

    p(x) = prod_{i,j} prod_c p(x[c,i,j] | pixels before (i,j), channels < c of (i,j))

and is built in two parts so that each factor's dependencies are explicit:

1. A *context* network computes, for every pixel, a feature vector that depends only on
   strictly earlier pixels. It has two stacks (van den Oord et al. 2016, "Conditional
   Image Generation with PixelCNN Decoders"): a vertical stack whose features at row i
   see only rows < i (down-shifted convolutions), and a horizontal stack whose features at
   (i, j) see only columns < j of row i plus the vertical stack: together no blind spot.
   Layers are gated (tanh * sigmoid) with residual and skip connections.
2. A per-pixel *channel head* turns the context into logits for channel c, conditioned on
   the values of channels < c of the same pixel (1x1 convolutions only), giving R->G->B.

All convolutions are unpadded `nn.Conv2d` with explicit `F.pad`, so the same weights can
run one image row or one pixel at a time: `PixelCNN.steps()` arranges them as matrices
(`PixelCNNSteps`, `GatedLayerSteps`, written beside the forward passes they mirror), and
`models.decoder.CachedDecoder` runs those steps in autoregressive order.

The same parameters run two ways. `reference_logits` (with `GatedLayer.forward`,
`context`, `channel_logits`) is the plain NCHW definition, one module call per conv.
`forward`, `logits_from_scaled` and `nll` take the fast path (`*_rows` methods): features
channels-last (N, H, W, C), where oneDNN's convolutions run several times faster and
every 1x1 conv is one matmul that also adds its residual; gates as one sigmoid with the
tanh half's scale folded into run-time copies of the weights; the last head conv fused
with the cross-entropy in cache-sized chunks. tests/test_fast_forward.py holds the two
to float tolerance (logits, NLL, gradients); a change to one must be made in the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import PIXELCNN_PRESETS as PRESETS
from ..errors import DataError
from ..pixels import check_range


@dataclass(frozen=True)
class PixelCNNConfig:
    """Everything needed to rebuild the network; stored in the bundle's config.json."""

    channels: int
    height: int
    width: int
    levels: int
    filters: int = 64
    layers: int = 5
    kernel: int = 3
    first_kernel: int = 5
    head: int = 128
    dropout: float = 0.0  # on the gated units while training; no effect at inference

    def __post_init__(self) -> None:
        for name in ("kernel", "first_kernel"):
            if getattr(self, name) % 2 != 1 or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive odd number")
        if self.levels < 2:
            raise ValueError("levels must be at least 2")

    @classmethod
    def from_preset(cls, preset: str, channels: int, height: int, width: int,
                    levels: int, **overrides: float) -> PixelCNNConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
        return cls(channels, height, width, levels, **{**PRESETS[preset], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move features one row down (row 0 becomes zeros): row i then sees rows < i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move features one column right: column j then sees columns < j."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def conv_rows(x: torch.Tensor, conv: nn.Conv2d, pad: tuple[int, int, int, int],
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """`conv` over channels-last features `x` (N, H, W, C) zero-padded by `pad` = (left,
    right, top, bottom), returned channels-last (N, H', W', out). oneDNN runs convolutions
    on channels-last tensors several times faster than on NCHW ones, and the permutes are
    views: no copy but the one padding."""
    left, right, top, bottom = pad
    if any(pad):
        x = F.pad(x, (0, 0, left, right, top, bottom))
    y = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias if bias is None else bias)
    return y.permute(0, 2, 3, 1)


def dense(x: torch.Tensor, conv: nn.Conv2d, residual: torch.Tensor | None = None,
          bias: bool = True) -> torch.Tensor:
    """A 1x1 conv over channels-last rows `x` (M, in) as one matmul, (M, out), with
    `residual` (M, out) added in the same call when given; `bias` False leaves the bias
    out (the caller adds it once elsewhere)."""
    w = conv.weight.view(conv.out_channels, conv.in_channels)
    b = conv.bias if bias else None
    if residual is None:
        return F.linear(x, w, b)
    y = torch.addmm(residual, x, w.t())
    return y if b is None else y.add_(b)  # addmm's backward does not read its output


class _SigmoidGate(torch.autograd.Function):
    """`gate` of pre-activations whose first half is multiplied by -2: tanh(a) sigmoid(b)
    as (1 - 2 sigmoid(-2a)) sigmoid(b), one sigmoid over the whole contiguous (M, 2f)
    tensor and one fused multiply-add. tanh over a strided half costs several times more
    on CPU, and the hand-written backward writes both halves' gradients at once."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(pre)
        sa, sb = s.chunk(2, dim=-1)
        ctx.save_for_backward(s)
        return torch.addcmul(sb, sa, sb, value=-2.0)  # sb (1 - 2 sa)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        sa, sb = s.chunk(2, dim=-1)
        d = torch.empty_like(s)
        da, db = d.chunk(2, dim=-1)
        torch.mul(grad, sb, out=da).mul_(-2.0)
        torch.addcmul(grad, grad, sa, value=-2.0, out=db)
        return torch.ops.aten.sigmoid_backward(d, s)


def _gate_scale(filters: int, like: torch.Tensor) -> torch.Tensor:
    """(2f,): -2 on the tanh half, 1 on the sigmoid half (exact in floating point)."""
    scale = torch.ones(2 * filters, dtype=like.dtype, device=like.device)
    scale[:filters] = -2.0
    return scale


PASS_ROWS = 16 * 28 * 28  # pixels per pass of `PixelCNN.nll` without autograd (see there)
HEAD_CHUNK = 1024  # rows of logits per step of `head_nll`: 1 MiB at 256 levels, in L2


class _HeadNLL(torch.autograd.Function):
    """The last 1x1 conv of a channel head and the cross-entropy of its logits, fused:
    -log softmax(z W^T + b)[target] per row, (M, K) -> (M,). The (M, levels) logits are
    never stored: they are made HEAD_CHUNK rows at a time, in cache, and made again in
    the backward pass (one extra small matmul instead of writing and re-reading 50 MB
    per 28x28 batch of 64; the pass is memory-bound otherwise)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        nll = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
        lse = torch.empty_like(nll)
        wt = weight.t()
        for s in range(0, z.shape[0], HEAD_CHUNK):
            logits = torch.addmm(bias, z[s:s + HEAD_CHUNK], wt)
            picked = logits.gather(1, target[s:s + HEAD_CHUNK, None]).squeeze(1)
            top = logits.amax(dim=1)
            total = logits.sub_(top[:, None]).exp_().sum(dim=1)
            torch.add(total.log_(), top, out=lse[s:s + HEAD_CHUNK])
            torch.sub(lse[s:s + HEAD_CHUNK], picked, out=nll[s:s + HEAD_CHUNK])
        ctx.save_for_backward(z, weight, bias, target, lse)
        return nll

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, weight, bias, target, lse = ctx.saved_tensors
        gz = torch.empty_like(z)
        gw = torch.zeros_like(weight)
        gb = torch.zeros_like(bias)
        wt = weight.t()
        for s in range(0, z.shape[0], HEAD_CHUNK):
            zc, g = z[s:s + HEAD_CHUNK], grad[s:s + HEAD_CHUNK, None]
            # d nll / d logits = softmax - onehot(target), times the incoming gradient
            d = torch.addmm(bias, zc, wt).sub_(lse[s:s + HEAD_CHUNK, None]).exp_().mul_(g)
            d.scatter_add_(1, target[s:s + HEAD_CHUNK, None], -g)
            torch.mm(d, weight, out=gz[s:s + HEAD_CHUNK])
            gw.addmm_(d.t(), zc)
            gb += d.sum(dim=0)
        return gz, gw, gb, None


def head_nll(z: torch.Tensor, conv: nn.Conv2d, target: torch.Tensor) -> torch.Tensor:
    """NLL in nats of integer `target` (M,) under the logits `conv` (1x1, levels outputs)
    makes of channels-last rows z (M, K): `_HeadNLL`."""
    # in float32 at least, also under autocast: the softmax decides the reported NLL
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        return _HeadNLL.apply(z.to(dtype), conv.weight.view(conv.out_channels, -1).to(dtype),
                              conv.bias.to(dtype), target.long())


def scaled(x: torch.Tensor, levels: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Integer levels -> network inputs in [-1, 1], in `dtype`."""
    return x.to(dtype) * (2.0 / (levels - 1)) - 1.0


def conv_matrix(conv: nn.Conv2d, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A conv's weight (out, in, kh, kw) as a (kh * kw * in, out) matrix, rows ordered
    (row, col, channel): the conv over one unfolded channels-last patch is one matmul."""
    w = conv.weight.detach().to(device=device, dtype=dtype)
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous()


def _vector(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype)


class GatedLayer(nn.Module):
    """One gated layer of both stacks.

    vertical:   v_pre = conv_v(rows i-k//2..i of v)         v <- v + v_out(gate(v_pre))
    horizontal: h_pre = conv_h(cols j-k//2..j of h) + v_to_h(v_pre)
                g = gate(h_pre); skip = h_skip(g);          h <- h + h_out(g)

    v at row i already depends only on rows < i, so v_pre may feed h without a shift.
    """

    def __init__(self, filters: int, kernel: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.k = kernel
        self.dropout = nn.Dropout(dropout)
        self.conv_v = nn.Conv2d(filters, 2 * filters, (kernel // 2 + 1, kernel))
        self.conv_h = nn.Conv2d(filters, 2 * filters, (1, kernel // 2 + 1))
        self.v_to_h = nn.Conv2d(2 * filters, 2 * filters, 1)
        self.v_out = nn.Conv2d(filters, filters, 1)
        self.h_out = nn.Conv2d(filters, filters, 1)
        self.h_skip = nn.Conv2d(filters, filters, 1)

    def forward(self, v: torch.Tensor, h: torch.Tensor):
        r = self.k // 2
        v_pre = self.conv_v(F.pad(v, (r, r, r, 0)))
        h_pre = self.conv_h(F.pad(h, (r, 0, 0, 0))) + self.v_to_h(v_pre)
        g = self.dropout(gate(h_pre))
        return v + self.v_out(gate(v_pre)), h + self.h_out(g), self.h_skip(g)

    def forward_rows(self, v: torch.Tensor, h: torch.Tensor, skip: torch.Tensor,
                     last: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` on channels-last features v, h (N, H, W, f), fast: the shifted convs
        pad once, every 1x1 conv is one matmul that also adds its residual, the gates are
        one sigmoid each (`_SigmoidGate`: the -2 on their tanh halves is folded into the
        weights, computed from the parameters at run time), and `skip` (N H W, f)
        accumulates this layer's skip without its bias (the caller adds all skip biases at
        once). The last layer returns only the skip (its v and h feed nothing)."""
        r, f = self.k // 2, v.shape[-1]
        scale = _gate_scale(f, v)
        w_v = self.conv_v.weight * scale[:, None, None, None]
        v_pre = F.conv2d(F.pad(v, (0, 0, r, r, r, 0)).permute(0, 3, 1, 2), w_v,
                         self.conv_v.bias * scale).permute(0, 2, 3, 1).reshape(-1, 2 * f)
        w_h = self.conv_h.weight * scale[:, None, None, None]
        h_pre = F.conv2d(F.pad(h, (0, 0, r, 0)).permute(0, 3, 1, 2), w_h,
                         (self.conv_h.bias + self.v_to_h.bias) * scale).permute(0, 2, 3, 1)
        w_vh = self.v_to_h.weight.view(2 * f, 2 * f) * (scale[:, None] / scale[None, :])
        h_pre = torch.addmm(h_pre.reshape(-1, 2 * f), v_pre, w_vh.t())
        g = self.dropout(_SigmoidGate.apply(h_pre))
        skip = dense(g, self.h_skip, skip, bias=False)
        if last:
            return v, h, skip
        v_next = dense(_SigmoidGate.apply(v_pre), self.v_out, v.reshape(-1, f)).view(v.shape)
        return v_next, dense(g, self.h_out, h.reshape(-1, f)).view(h.shape), skip

    def steps(self, h_bias: torch.Tensor, width: int, dtype: torch.dtype,
              device: torch.device) -> GatedLayerSteps:
        """This layer as row and pixel steps (see `GatedLayerSteps`); `h_bias` is the sum
        of the `h_out` biases of the layers before it."""
        return GatedLayerSteps(self, h_bias, width, dtype, device)


class GatedLayerSteps:
    """`GatedLayer.forward` one image row (vertical stack) or one pixel (horizontal stack)
    at a time, with the convolutions as matrices over channels-last patches. Any change to
    `GatedLayer.forward` must be made here too (tests/test_purify.py compares the two).

    The horizontal stack is carried minus its accumulated `h_out` biases (no per-pixel bias
    adds); the constant that removes comes back through the row's `base`, which knows per
    column how many `conv_h` taps fall on real pixels rather than on zero padding.
    """

    def __init__(self, layer: GatedLayer, h_bias: torch.Tensor, width: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.f, self.k, r = layer.conv_v.in_channels, layer.k, layer.k // 2
        f = self.f
        self.dtype, self.device = dtype, device
        self._buffers: dict[str, torch.Tensor] = {}
        self.w_v, self.b_v = conv_matrix(layer.conv_v, dtype, device), \
            _vector(layer.conv_v.bias, dtype, device)
        # conv_v per tap (row dr, column dc), in order t = dr * k + dc: (f, 2f) each
        self.w_v_taps = list(self.w_v.split(f))
        self.w_vout = conv_matrix(layer.v_out, dtype, device)
        self.b_vout = _vector(layer.v_out.bias, dtype, device)
        self.w_vh = conv_matrix(layer.v_to_h, dtype, device)
        self.b_base = _vector(layer.v_to_h.bias, dtype, device) + \
            _vector(layer.conv_h.bias, dtype, device)
        self.w_h = conv_matrix(layer.conv_h, dtype, device)  # ((r+1) f, 2f): taps j-r .. j
        # conv_h over (h~ + h_bias) with zero padding = conv_h over h~ + a per-column
        # constant: h_bias times the taps that fall on real columns (j - r + t >= 0)
        per_tap = torch.stack([h_bias @ self.w_h[t * f:(t + 1) * f] for t in range(r + 1)])
        corr = torch.stack([per_tap[max(0, r - j):].sum(0) for j in range(width)])
        self.corr_base = corr + self.b_base  # (W, 2f): all a row's base adds per column
        self.w_hout = conv_matrix(layer.h_out, dtype, device)
        self.b_hout = _vector(layer.h_out.bias, dtype, device)
        self.w_skip = conv_matrix(layer.h_skip, dtype, device)
        self.b_skip = _vector(layer.h_skip.bias, dtype, device)

    def row(self, rows: Sequence[torch.Tensor], v: torch.Tensor,
            v_next: torch.Tensor | None) -> torch.Tensor:
        """The vertical stack over one row, all images at once. `rows`: the r+1 input rows
        i-r..i, each (W+2r, n, f), padded and laid out (column, image, channel) so that
        every tap of `conv_v` reads one contiguous (W n, f) block: one matmul per tap, no
        unfolded copy. `v` (W, n, f): the input row i. Writes `v + v_out(gate(v_pre))`
        into `v_next` (W, n, f; the next layer's input row; None for the last layer, which
        needs none) and returns the row's per-pixel horizontal base (W, n, 2f):
        v_to_h(v_pre) plus the biases of conv_h."""
        width, n, f = v.shape
        m = width * n
        # results go to buffers reused row after row (a fresh large tensor per row costs
        # page faults), biases are added after the matmuls (addmm would first copy a
        # broadcast bias into its result, which costs more than the add); the returned
        # base is valid until the next call
        v_pre = torch.mm(rows[0][:width].reshape(m, f), self.w_v_taps[0],
                         out=self._buffer("v_pre", (m, 2 * f)))
        for t in range(1, len(self.w_v_taps)):
            dr, dc = divmod(t, self.k)
            v_pre.addmm_(rows[dr][dc:dc + width].reshape(m, f), self.w_v_taps[t])
        v_pre += self.b_v
        if v_next is not None:
            gv = torch.tanh(v_pre[:, :f], out=self._buffer("gv", (m, f)))
            gv.mul_(torch.sigmoid(v_pre[:, f:], out=self._buffer("sig", (m, f))))
            out = torch.addmm(v.reshape(m, f), gv, self.w_vout, out=v_next.view(m, f))
            out += self.b_vout
        base = torch.mm(v_pre, self.w_vh, out=self._buffer("base", (m, 2 * f)))
        return base.view(width, n, 2 * f).add_(self.corr_base.unsqueeze(1))

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._buffers[name] = torch.empty(shape, dtype=self.dtype,
                                                    device=self.device)
        return buf

    def pixel(self, window: torch.Tensor, base: torch.Tensor, g: torch.Tensor,
              h: torch.Tensor, h_next: torch.Tensor | None) -> None:
        """The horizontal stack at one pixel. `window` (n, (r+1) f): input columns j-r..j;
        `base` (n, 2f): the row's base at j, overwritten (each pixel's base is used once);
        `h` (n, f): the input at j. Writes the gated unit into `g` (n, f; the skip
        connections read it) and `h + h_out(g)` into `h_next` unless None."""
        f = self.f
        pre = base.addmm_(window, self.w_h)
        torch.mul(pre[:, :f].tanh_(), pre[:, f:].sigmoid_(), out=g)
        if h_next is not None:
            torch.addmm(h, g, self.w_hout, out=h_next)


class PixelCNN(nn.Module):
    """Gated PixelCNN over uint8 images with `levels` values per sub-pixel.

    `forward(x)` takes integer images (N, C, H, W) and returns logits (N, levels, C, H, W),
    so `F.cross_entropy(logits, x.long(), reduction="none")` is the per-sub-pixel NLL.
    """

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__()
        self.config = config
        c, f, k0 = config.channels, config.filters, config.first_kernel
        # input: C scaled values + a constant-one channel, so zero padding is distinguishable
        # from a pixel whose scaled value is 0
        self.in_v = nn.Conv2d(c + 1, f, (k0 // 2 + 1, k0))
        self.in_h = nn.Conv2d(c + 1, f, (1, k0 // 2 + 1))
        self.in_v_to_h = nn.Conv2d(f, f, 1)
        self.layers = nn.ModuleList(
            GatedLayer(f, config.kernel, config.dropout) for _ in range(config.layers))
        self.in_skip = nn.Conv2d(f, f, 1)
        self.trunk = nn.Conv2d(f, config.head, 1)
        # channel head: channel c sees the context and channels < c of the same pixel
        self.channel_in = nn.ModuleList(
            nn.Conv2d(i, config.head, 1, bias=False) if i > 0 else nn.Identity()
            for i in range(c)
        )
        self.channel_mid = nn.ModuleList(nn.Conv2d(config.head, config.head, 1) for _ in range(c))
        self.channel_out = nn.ModuleList(nn.Conv2d(config.head, config.levels, 1) for _ in range(c))

    # ---------------------------------------------------------------- building blocks

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels -> floats in [-1, 1]."""
        return scaled(x, self.config.levels, torch.float32)

    def context(self, x_in: torch.Tensor) -> torch.Tensor:
        """Per-pixel features (N, head, H, W) that depend only on strictly earlier pixels."""
        r = self.config.first_kernel // 2
        v = down_shift(self.in_v(F.pad(x_in, (r, r, r, 0))))
        h = right_shift(self.in_h(F.pad(x_in, (r, 0, 0, 0)))) + self.in_v_to_h(v)
        skip = self.in_skip(h)
        for layer in self.layers:
            v, h, s = layer(v, h)
            skip = skip + s
        return F.elu(self.trunk(F.elu(skip)))

    def channel_logits(self, ctx: torch.Tensor, xs_prev: torch.Tensor | None,
                       c: int) -> torch.Tensor:
        """Logits (N, levels, ...) of channel c from the context and the scaled values of
        channels < c at the same positions (`xs_prev`: (N, c, ...), None for c = 0).

        Works on any trailing spatial shape, e.g. (N, head, 1, 1) for a single pixel.
        """
        z = ctx
        if c > 0:
            z = z + self.channel_in[c](xs_prev)
        z = F.elu(self.channel_mid[c](F.elu(z)))
        return self.channel_out[c](z)

    def context_rows(self, xs: torch.Tensor) -> torch.Tensor:
        """`context` of scaled inputs (N, C, H, W) as channels-last rows (N H W, head),
        fast (see `GatedLayer.forward_rows`)."""
        r, f = self.config.first_kernel // 2, self.config.filters
        x_in = xs.permute(0, 2, 3, 1)
        x_in = torch.cat([x_in, torch.ones_like(x_in[..., :1])], dim=-1)
        # the shifts pad the conv outputs: row 0 of v and column 0 of h are zero features
        v = F.pad(conv_rows(x_in, self.in_v, (r, r, r, 0)), (0, 0, 0, 0, 1, -1))
        h = F.pad(conv_rows(x_in, self.in_h, (r, 0, 0, 0)), (0, 0, 1, -1))
        h = dense(v.reshape(-1, f), self.in_v_to_h, h.reshape(-1, f)).view(v.shape)
        skip = dense(h.view(-1, f), self.in_skip, bias=False)
        for i, layer in enumerate(self.layers):
            v, h, skip = layer.forward_rows(v, h, skip, last=i == len(self.layers) - 1)
        skip_bias = self.in_skip.bias + sum(layer.h_skip.bias for layer in self.layers)
        # in place on fresh tensors (autograd keeps ELU's output for its backward)
        return F.elu(dense(F.elu(skip.add_(skip_bias), inplace=True), self.trunk),
                     inplace=True)

    def channel_features_rows(self, ctx: torch.Tensor, xs_prev: torch.Tensor | None,
                              c: int) -> torch.Tensor:
        """`channel_logits` on channels-last rows up to its last conv: ctx (M, head),
        xs_prev (M, c) -> the input (M, head) of `channel_out[c]`."""
        z = ctx if c == 0 else dense(xs_prev, self.channel_in[c], ctx)
        return F.elu(dense(F.elu(z), self.channel_mid[c]), inplace=True)

    def channel_logits_rows(self, ctx: torch.Tensor, xs_prev: torch.Tensor | None,
                            c: int) -> torch.Tensor:
        """`channel_logits` on channels-last rows: logits (M, levels), levels contiguous."""
        return dense(self.channel_features_rows(ctx, xs_prev, c), self.channel_out[c])

    def channel_rows(self, xs: torch.Tensor) -> list[torch.Tensor]:
        """Per channel c, the input (N H W, head) of `channel_out[c]`, from scaled inputs
        (N, C, H, W)."""
        c = xs.shape[1]
        ctx = self.context_rows(xs)
        xs_rows = xs.permute(0, 2, 3, 1).reshape(-1, c)
        return [self.channel_features_rows(ctx, xs_rows[:, :ch] if ch else None, ch)
                for ch in range(c)]

    def logits_rows(self, xs: torch.Tensor) -> torch.Tensor:
        """Logits of scaled inputs (N, C, H, W), channels-last: (N, H, W, C, levels), the
        levels contiguous (what log-softmax wants)."""
        n, c, h, w = xs.shape
        ctx = self.context_rows(xs)
        xs_rows = xs.permute(0, 2, 3, 1).reshape(-1, c)
        logits = [self.channel_logits_rows(ctx, xs_rows[:, :ch] if ch else None, ch)
                  for ch in range(c)]
        out = logits[0].unsqueeze(1) if c == 1 else torch.stack(logits, dim=1)
        return out.view(n, h, w, c, self.config.levels)

    # ------------------------------------------------------------------------ full

    def forward(self, x: torch.Tensor, nll: bool = False) -> torch.Tensor:
        """Logits (N, levels, C, H, W) of integer images, or with `nll` their per-sub-pixel
        NLL (`nll()`: the fused fast path; training calls it this way, so that it also
        runs through DistributedDataParallel, which wraps only `forward`)."""
        return self.nll(x) if nll else self.logits_from_scaled(self.scale(x))

    def logits_from_scaled(self, xs: torch.Tensor) -> torch.Tensor:
        """Forward pass on scaled float inputs (N, C, H, W) -> logits (N, levels, C, H, W)
        (a view of `logits_rows`): differentiable in the input, which the causality test
        and gradient-based attacks use."""
        return self.logits_rows(xs).permute(0, 4, 3, 1, 2)

    def reference_logits(self, xs: torch.Tensor) -> torch.Tensor:
        """`logits_from_scaled` the plain way (NCHW, one module per conv): the readable
        definition that the fast path is tested against."""
        x_in = torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1)
        ctx = self.context(x_in)
        logits = [
            self.channel_logits(ctx, xs[:, :c] if c > 0 else None, c)
            for c in range(self.config.channels)
        ]
        return torch.stack(logits, dim=2)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sub-pixel negative log-likelihood in nats, (N, C, H, W). Without autograd,
        large batches run a few images at a time (`images_per_pass`): the activations
        then stay in the CPU's cache, which is faster than one big pass."""
        step = self.images_per_pass()
        if torch.is_grad_enabled() or x.shape[0] <= step:
            return self._nll(x)
        return torch.cat([self._nll(x[s:s + step]) for s in range(0, x.shape[0], step)])

    def images_per_pass(self) -> int:
        """Images per forward pass that keep one activation tensor near 1.6 MB (16 images
        of 28x28 at the small preset): faster on CPUs than larger passes."""
        cfg = self.config
        return max(1, PASS_ROWS // (cfg.height * cfg.width * cfg.channels))

    def _nll(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        target = x.permute(0, 2, 3, 1).reshape(-1, c)
        nll = [head_nll(z, self.channel_out[ch], target[:, ch])
               for ch, z in enumerate(self.channel_rows(self.scale(x)))]
        return torch.stack(nll, dim=1).view(n, h, w, c).permute(0, 3, 1, 2)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) in nats, one value per image."""
        return -self.nll(x).flatten(1).sum(1)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Integer images of this model's shape and levels; (N, H, W) gets a channel axis.
        Raises DataError otherwise."""
        cfg = self.config
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.channels, cfg.height,
                                                            cfg.width):
            raise DataError(
                f"images are {tuple(images.shape[1:])} (C,H,W), model expects "
                f"{(cfg.channels, cfg.height, cfg.width)}"
            )
        check_range(images, cfg.levels)
        return images

    # ----------------------------------------------------- one row / one pixel at a time

    def steps(self, dtype: torch.dtype = torch.float64,
              device: torch.device | None = None) -> PixelCNNSteps:
        """The network as row and pixel steps in `dtype` (see `PixelCNNSteps`)."""
        return PixelCNNSteps(self, dtype, device or next(self.parameters()).device)


class PixelCNNSteps:
    """`PixelCNN.context` and `channel_logits` one image row or one pixel at a time, with
    every convolution as a matrix over channels-last patches: what
    `models.decoder.CachedDecoder` runs. Any change to the forward pass must be made here
    too (tests/test_purify.py compares the two)."""

    def __init__(self, model: PixelCNN, dtype: torch.dtype, device: torch.device) -> None:
        cfg = model.config
        self.config, self.dtype, self.device = cfg, dtype, device
        m, v = (lambda conv: conv_matrix(conv, dtype, device)), \
            (lambda t: _vector(t, dtype, device))
        self.w_in_v, self.b_in_v = m(model.in_v), v(model.in_v.bias)
        self.w_in_h, self.b_in_h = m(model.in_h), v(model.in_h.bias)
        self.w_in_vh, self.b_in_vh = m(model.in_v_to_h), v(model.in_v_to_h.bias)
        self.layers: list[GatedLayerSteps] = []
        h_bias = torch.zeros(cfg.filters, device=device, dtype=dtype)
        for layer in model.layers:
            self.layers.append(layer.steps(h_bias, cfg.width, dtype, device))
            h_bias = h_bias + self.layers[-1].b_hout
        # all skip connections at once, from [h0, g_0, ..., g_last] side by side
        self.w_skip = torch.cat([m(model.in_skip)] + [s.w_skip for s in self.layers])
        self.b_skip = v(model.in_skip.bias) + sum(s.b_skip for s in self.layers)
        self.w_trunk, self.b_trunk = m(model.trunk), v(model.trunk.bias)
        self.w_cin = [None] + [m(model.channel_in[i]) for i in range(1, cfg.channels)]
        self.w_mid = [m(c) for c in model.channel_mid]
        self.b_mid = [v(c.bias) for c in model.channel_mid]
        self.w_out = [m(c) for c in model.channel_out]
        self.b_out = [v(c.bias) for c in model.channel_out]
        # network input of each level
        self.table = scaled(torch.arange(cfg.levels, device=device), cfg.levels, dtype)

    def input_row(self, patches: torch.Tensor | None, n: int) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        """The first vertical conv over one row, down-shifted: `patches` (W n, (r0+1) k0
        (C+1)), ordered column-major over (column, image), are the unfolded input rows
        i-1-r0..i-1 (None for row 0, which sees only padding). Returns v (W n, f) and the
        row's horizontal base (W, n, f): in_v_to_h(v) plus in_h's bias (not at column 0,
        which the right shift pads)."""
        cfg = self.config
        width, f = cfg.width, cfg.filters
        if patches is None:
            v = torch.zeros((width * n, f), device=self.device, dtype=self.dtype)
        else:
            v = torch.addmm(self.b_in_v, patches, self.w_in_v)
        base = torch.addmm(self.b_in_vh, v, self.w_in_vh).view(width, n, f)
        base[1:] += self.b_in_h
        return v, base

    def input_pixel(self, window: torch.Tensor | None, base: torch.Tensor,
                    out: torch.Tensor) -> None:
        """The first horizontal conv at one pixel, right-shifted: `window` (n, (r0+1)(C+1))
        holds input columns j-1-r0..j-1 (None at column 0). Writes h0 (n, f) into `out`."""
        if window is None:
            out.copy_(base)
        else:
            torch.addmm(base, window, self.w_in_h, out=out)

    def context(self, units: torch.Tensor) -> torch.Tensor:
        """The context (n, head) of one pixel from [h0, g_0, ..., g_last] (n, (L+1) f)."""
        skip = torch.addmm(self.b_skip, units, self.w_skip)
        return F.elu(torch.addmm(self.b_trunk, F.elu(skip), self.w_trunk))

    def channel_logits(self, ctx: torch.Tensor, xs_prev: torch.Tensor, c: int) -> torch.Tensor:
        """`PixelCNN.channel_logits` at one pixel: logits (n, levels) of channel c from the
        context and the network inputs of channels < c (`xs_prev`, (n, c))."""
        z = ctx if c == 0 else torch.addmm(ctx, xs_prev, self.w_cin[c])
        z = F.elu(torch.addmm(self.b_mid[c], F.elu(z), self.w_mid[c]))
        return torch.mm(z, self.w_out[c]).add_(self.b_out[c])  # cheaper than a broadcast copy
