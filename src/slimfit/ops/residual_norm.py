"""The tail of a post-norm residual block, ``LayerNorm(dropout(h) + residual)``, as one node.

BERT-style blocks (``BertSelfOutput`` / ``BertOutput`` and their copies: RoBERTa, ELECTRA,
...) end in dense -> dropout -> + input -> LayerNorm. Run as separate lean ops that is a
dropout node (a seed and a kernel), an add, the norm's node (the norm and a pass that codes
its output) and in backward the norm's kernel, a cast and the dropout's kernel: three
Python autograd nodes and about seven launches per block, 24 blocks in bert-base, in a step
whose time is bound by the host issuing them. Here it is one node, and on Triton one
kernel each way:

- forward: dropout (the seed's mask), the add, the norm's row statistics and output, and
  the int8 per-block code of the normalized rows ``y = (z - mean) * rstd``;
- backward: the norm's input gradient from that code, rounded as the add's input (the
  residual's gradient) and, masked again from the seed, the dropout branch's gradient.

It keeps what the separate lean ops keep (the norm's code, per-row rstd, the seed), shares
the code with a trained linear that reads the output (``register_normalized``), and trains
the norm's gain and bias as the lean norm does (``norm_trained_gain="compressed"``).

Numerics: the PyTorch path runs the separate lean ops' own sequence (bitwise the same
output, the same seed drawn). The Triton kernel draws the same dropout mask as the lean
dropout kernel; it computes the row mean and variance in its own order, so its output
differs from ``native_layer_norm``'s by fp32 rounding (a few ulp).
"""

from __future__ import annotations

import torch

from ._common import autocast_enabled, direct_apply, register_normalized
from .config import CompressionConfig
from .dropout import _new_seed, apply_keep_mask
from .norm import _grad_input, _ln_fp32_policy, _pack, _unpack
from .quant import _FAILED, qmeta, run_kernel, use_triton


def _triton_fits(h: torch.Tensor, r: torch.Tensor, width: int, cfg: CompressionConfig) -> bool:
    bs = cfg.block_size
    return (
        "residual_norm" not in _FAILED
        and use_triton(h)
        and width % 4 == 0
        and width % bs == 0
        and bs & (bs - 1) == 0
        and width <= 16384
        and r.dtype == torch.promote_types(h.dtype, r.dtype)  # the sum is in r's dtype
    )


class DropoutAddNormFn(torch.autograd.Function):
    """``layer_norm(dropout(h, p) + r)`` over the last dim (autocast off inside: the caller
    decides ``fp32``, autocast's choice of running the norm in fp32)."""

    @staticmethod
    def forward(ctx, h, r, weight, bias, p, eps, fp32, cfg):
        width = h.shape[-1]
        seed = int(_new_seed()) if p > 0 else 0
        z_dtype = torch.promote_types(h.dtype, r.dtype)
        x_dtype = torch.float32 if fp32 else z_dtype
        w = weight.float() if fp32 and weight is not None else weight
        b = bias.float() if fp32 and bias is not None else bias
        ctx.p, ctx.seed, ctx.width = p, seed, width
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (weight, bias))
        ctx.meta_in = (h.shape, h.dtype, r.dtype, z_dtype, x_dtype)
        ctx.triton = False
        out = None
        if _triton_fits(h, r, width, cfg):

            def kernel():
                from . import kernels

                return kernels.dropout_add_norm(
                    h.contiguous(), r.contiguous(), w, b, p, seed, eps, x_dtype, cfg.block_size
                )

            fused = run_kernel("residual_norm", h, kernel, lambda: None)
            if fused is not None:
                out, codes, scales, rstd = fused
                meta = qmeta((out.numel() // width, width), torch.float32, None, 8, "block",
                             1.0, cfg.block_size)  # fmt: skip
                ctx.norm_meta = ("codes", meta)
                ctx.triton = True
                packed = [codes, scales]
        if out is None:
            d = apply_keep_mask(h, p, seed) if p > 0 else h  # as RegenDropoutFn's torch path
            x = (d + r).to(x_dtype)
            out, mean, rstd = torch.native_layer_norm(x, (width,), w, b, eps)
            packed = _pack(ctx, x.contiguous(), width, mean, rstd, cfg)
        register_normalized(out, packed[0], packed[1], ctx.norm_meta[1], w, b)
        ctx.save_for_backward(w, rstd, *packed)
        return out

    @staticmethod
    def backward(ctx, grad):
        w, rstd, *packed = ctx.saved_tensors
        shape, h_dtype, r_dtype, z_dtype, x_dtype = ctx.meta_in
        g2 = grad.reshape(-1, ctx.width)
        gh = gr = gw = gb = None
        if ctx.needs_input_grad[2]:  # first: its fp32 y is freed before the others are made
            y = _unpack(ctx, packed)
            gw = y.mul_(g2).sum(0)
            del y
        if ctx.needs_input_grad[3]:
            gb = g2.sum(0, dtype=torch.float32)
        want_h, want_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if want_h or want_r:
            if ctx.triton:
                from . import kernels

                gh, gr = kernels.dropout_add_norm_backward(
                    g2, packed[0], packed[1], ctx.norm_meta[1], rstd, w, ctx.p, ctx.seed,
                    h_dtype, r_dtype, want_h, want_r, shape,
                )  # fmt: skip
            else:
                # the separate ops' chain: the norm's gradient in its input's dtype, cast to
                # the sum's, then to each addend's; the dropout branch masked again
                gz = _grad_input(ctx, g2, w, packed, rstd, True, x_dtype, shape).to(z_dtype)
                gr = gz.to(r_dtype) if want_r else None
                if want_h:
                    gh = gz.to(h_dtype)
                    gh = apply_keep_mask(gh, ctx.p, ctx.seed) if ctx.p > 0 else gh
        # in the parameters' dtypes (the backward of the fp32 cast under autocast)
        gw = None if gw is None else gw.to(ctx.param_dtypes[0])
        gb = None if gb is None else gb.to(ctx.param_dtypes[1])
        return gh, gr, gw, gb, None, None, None, None


_dropout_add_norm = direct_apply(DropoutAddNormFn)


def lean_dropout_add_norm(
    h: torch.Tensor, residual: torch.Tensor, dropout, norm, cfg: CompressionConfig
) -> torch.Tensor:
    """``norm(dropout(h) + residual)`` (``dropout`` an ``nn.Dropout``, ``norm`` an
    ``nn.LayerNorm`` over the last dim); the separate modules where this node does not
    apply (other compression settings, no gradient needed, a broadcasting add)."""
    params = norm._parameters
    weight = params["weight"] if "weight" in params else norm.weight
    bias = params["bias"] if "bias" in params else norm.bias
    p = dropout.p if dropout.training else 0.0
    gain_trains = weight is not None and weight.requires_grad
    shape = norm.normalized_shape
    if (
        cfg.norm != "int8"
        or cfg.dropout != "regenerate"
        or (gain_trains and cfg.norm_trained_gain == "exact")
        or not torch.is_grad_enabled()
        or not (
            h.requires_grad
            or residual.requires_grad
            or gain_trains
            or (bias is not None and bias.requires_grad)
        )
        or p >= 1.0
        or h.shape != residual.shape
        or len(shape) != 1
        or shape[0] != h.shape[-1]
    ):
        return norm(dropout(h) + residual)
    dev = "cuda" if h.is_cuda else h.device.type
    if not autocast_enabled(dev):
        return _apply(h, residual, weight, bias, p, norm.eps, False, cfg)
    z_dtype = torch.promote_types(h.dtype, residual.dtype)
    fp32 = (
        z_dtype != torch.float32
        or (weight is not None and weight.dtype != torch.float32)
        or (bias is not None and bias.dtype != torch.float32)
    ) and _ln_fp32_policy(h.device, z_dtype, weight)
    torch.set_autocast_enabled(dev, False)  # as lean_layer_norm does
    try:
        return _apply(h, residual, weight, bias, p, norm.eps, fp32, cfg)
    finally:
        torch.set_autocast_enabled(dev, True)


def _apply(h, residual, weight, bias, p, eps, fp32, cfg):
    return _dropout_add_norm(h, residual, weight, bias, float(p), float(eps), fp32, cfg)
