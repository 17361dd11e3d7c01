"""Lean linear: a frozen weight saves no input; a trainable one saves its input
(optionally int8); under autocast the fp32 weight is saved instead of a low-precision copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import autocast_dtype, load_packed, quantize_with, save_packed
from .config import CompressionConfig


class LinearFn(torch.autograd.Function):
    """``y = x @ W^T + b`` with ``W`` cast to ``cdtype`` inside (autocast's cast, redone in
    backward from the saved parameter, so no low-precision weight copy is kept).

    ``packed``: (codes, scales, meta) of the input when the weight trains and the input is
    kept quantized, else None (the input itself is kept when the weight trains).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, cdtype, packed):
        # Runs under the caller's autocast: F.linear casts x and the bias as plain autocast
        # does (bitwise the same output); only the weight is cast here, and not kept.
        w = weight if cdtype is None or weight.dtype == cdtype else weight.to(cdtype)
        out = F.linear(x, w, bias)
        base = out._base
        if base is not None and out.is_contiguous() and base.numel() == out.numel():
            # F.linear returns a view of its 2-D result; as a custom Function's output that
            # view could never be written in place (e.g. by an in-place activation)
            out = torch.ops.aten._unsafe_view(base, out.shape)
        ctx.cdtype = w.dtype
        ctx.meta = None
        ctx.x_dtype = x.dtype
        if ctx.needs_input_grad[1]:
            if packed is not None:
                tensors, ctx.meta = save_packed(packed)
                ctx.save_for_backward(weight, *tensors)
            else:
                xs = x if cdtype is None or not x.is_floating_point() else x.to(cdtype)
                ctx.x_dtype = xs.dtype
                ctx.save_for_backward(weight, xs)
        else:
            ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, *rest = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w = weight if weight.dtype == ctx.cdtype else weight.to(ctx.cdtype)
            gx = grad.matmul(w)
        g2 = None
        if ctx.needs_input_grad[1]:
            x = load_packed(rest, ctx.meta, ctx.x_dtype) if ctx.meta is not None else rest[0]
            g2 = grad.reshape(-1, grad.shape[-1])
            gw = g2.t().mm(x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            g2 = grad.reshape(-1, grad.shape[-1]) if g2 is None else g2
            gb = g2.sum(0)
        return gx, gw, gb, None, None


def lean_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: CompressionConfig,
    compress_input: bool,
) -> torch.Tensor:
    """``F.linear`` with the same output (bitwise, autocast included) and a lean backward."""
    if not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    cdtype = autocast_dtype(x.device.type)
    trainable = weight.requires_grad
    quant = trainable and compress_input and cfg.linear_bits is not None
    if cdtype is None and not quant:
        # Plain autograd already keeps no input for a frozen weight and only the input for
        # a trainable one: nothing to gain from a custom function.
        return F.linear(x, weight, bias)
    packed = quantize_with(cfg, x, cfg.linear_bits, cfg.linear_step, cached=True) if quant else None
    return LinearFn.apply(x, weight, bias, cdtype, packed)
