"""Lean norms for a frozen gain: the forward is the original op (bitwise); backward keeps a
compressed normalized output ``y = (x - mean) * rstd`` (LayerNorm) or ``y = x * rrms``
(RMSNorm) plus the per-row fp32 ``rstd``.

With ``g' = grad * gain`` (row-wise, fp32), the input gradient is
``dx = rstd * (g' - mean(g') - y * mean(g' * y))`` for LayerNorm and
``dx = rstd * (g' - y * mean(g' * y))`` for RMSNorm; the bias gradient needs only ``grad``.
A trainable LayerNorm gain takes its gradient ``sum_rows(grad * y)`` from the same int8
code (``norm_trained_gain="compressed"``) or runs the original op (``"exact"``, and always
with int4 / top-k codes, too coarse for it: 20-30% gain-gradient error at int4, 1-2% at int8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import autocast_enabled, direct_apply, register_normalized
from .config import CompressionConfig
from .quant import (
    _FAILED,
    dequantize,
    qmeta,
    quantize,
    run_kernel,
    topk_compress,
    topk_decompress,
    use_triton,
)


def _pack(ctx, x: torch.Tensor, h: int, mean, rstd, cfg: CompressionConfig):
    """Compress ``y = (x - mean) * rstd`` (rows of ``h``; no mean: RMS) -> tensors to save.

    ``x`` is contiguous in any shape, ``mean``/``rstd`` hold one value per row. On Triton
    the codes come from one pass over ``x`` (y is never written)."""
    bits = 4 if cfg.norm == "int4" else 8
    if cfg.norm != "topk" and use_triton(x) and "norm_quantize" not in _FAILED:
        meta = qmeta((x.numel() // h, h), torch.float32, None, bits, "block", 1.0, cfg.block_size)

        def kernel():
            from . import kernels

            return kernels.quantize(x, meta, mean, rstd, h)

        packed = run_kernel("norm_quantize", x, kernel, lambda: None)
        if packed is not None:
            ctx.norm_meta = ("codes", meta)
            return list(packed)
    y2d = x.reshape(-1, h).float()
    if mean is not None:
        y2d = y2d - mean.reshape(-1, 1)
    y2d = y2d * rstd.reshape(-1, 1)
    if cfg.norm == "topk":
        values, idx, n = topk_compress(y2d, cfg.norm_keep)
        ctx.norm_meta = ("topk", n)
        return [values, idx]
    codes, scales, meta = quantize(y2d, bits, "block", 1.0, cfg.block_size)
    ctx.norm_meta = ("codes", meta)
    return [codes, scales]


def _grad_input(ctx, grad2d, weight, packed, rstd, center: bool, dtype, shape) -> torch.Tensor:
    """The input gradient, in ``shape`` (``grad2d``: rows x H)."""
    kind, info = ctx.norm_meta

    def fallback():
        y = _unpack(ctx, packed)
        return _input_grad(grad2d, weight, y, rstd.reshape(-1, 1), center).to(dtype).reshape(shape)

    if kind != "codes":
        return fallback()

    def kernel():
        from . import kernels

        return kernels.norm_backward(
            grad2d, packed[0], packed[1], info, rstd, weight, dtype, center, shape
        )

    return run_kernel("norm_backward", grad2d, kernel, fallback)


def _unpack(ctx, tensors) -> torch.Tensor:
    kind, info = ctx.norm_meta
    if kind == "topk":
        return topk_decompress(tensors[0], tensors[1], info, torch.float32)
    return dequantize(tensors[0], tensors[1], info, torch.float32)


def _input_grad(grad2d, weight, y, rstd, center: bool) -> torch.Tensor:
    g = grad2d.float()
    if weight is not None:
        g = g * weight.reshape(1, -1).float()
    dot = (g * y).mean(1, keepdim=True)
    if center:
        return rstd * (g - g.mean(1, keepdim=True) - y * dot)
    return rstd * (g - y * dot)


class LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps, cfg):
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        h = ctx.h = shape[0] if len(shape) == 1 else math.prod(shape)
        ctx.x_meta = (x.shape, x.dtype)
        tensors = []
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            tensors = [rstd, *_pack(ctx, x.contiguous(), h, mean, rstd, cfg)]
            kind, meta = ctx.norm_meta
            if kind == "codes" and meta.bits == 8:  # a trained linear reading out shares it
                register_normalized(out, tensors[1], tensors[2], meta, weight, bias)
        ctx.save_for_backward(weight, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, *rest = ctx.saved_tensors
        shape, dtype = ctx.x_meta
        g2 = grad.reshape(-1, ctx.h)
        gx = gw = gb = None
        if rest:
            rstd, *packed = rest
            if ctx.needs_input_grad[1]:  # first: its fp32 y is freed before gx is made
                y = _unpack(ctx, packed)
                gw = y.mul_(g2).sum(0).to(weight.dtype).reshape(weight.shape)
                del y
            if ctx.needs_input_grad[0]:
                gx = _grad_input(ctx, g2, weight, packed, rstd, True, dtype, shape)
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0, dtype=torch.float32).to(grad.dtype)
        return gx, gw, gb, None, None, None


_layer_norm = direct_apply(LayerNormFn)
_LN_POLICY: dict = {}


def _ln_fp32_policy(device: torch.device, x_dtype: torch.dtype, weight) -> bool:
    """Whether autocast runs layer_norm of ``x_dtype`` in fp32 on ``device`` (CUDA does, CPU
    does not): probed once."""
    dtype = torch.get_autocast_dtype(device.type)
    key = (device.type, dtype, x_dtype, None if weight is None else weight.dtype)
    hit = _LN_POLICY.get(key)
    if hit is None:
        with torch.no_grad():
            t = torch.zeros(1, 2, dtype=x_dtype, device=device)
            w = None if weight is None else torch.ones(2, dtype=weight.dtype, device=device)
            hit = _LN_POLICY[key] = F.layer_norm(t, (2,), w, None, 1e-5).dtype == torch.float32
    return hit


def lean_layer_norm(module, x: torch.Tensor, cfg: CompressionConfig) -> torch.Tensor:
    # straight from the parameter dict: nn.Module's __getattr__ costs ~2 us a lookup
    params = module._parameters
    weight = params["weight"] if "weight" in params else module.weight
    bias = params["bias"] if "bias" in params else module.bias
    gain_trains = weight is not None and weight.requires_grad
    shape = module.normalized_shape
    if (
        cfg.norm is None
        or not torch.is_grad_enabled()
        or (gain_trains and (cfg.norm != "int8" or cfg.norm_trained_gain == "exact"))
        or not (x.requires_grad or gain_trains or (bias is not None and bias.requires_grad))
    ):
        return F.layer_norm(x, shape, weight, bias, module.eps)
    shape = shape if type(shape) is tuple else tuple(shape)
    dev = "cuda" if x.is_cuda else x.device.type
    if not autocast_enabled(dev):
        return _layer_norm(x, weight, bias, shape, module.eps, cfg)
    if x.dtype != torch.float32 and _ln_fp32_policy(x.device, x.dtype, weight):
        x = x.float()
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    # autocast off inside, as torch.autocast(dev, enabled=False) would (a third of the
    # cost: this runs for every norm of every step)
    torch.set_autocast_enabled(dev, False)
    try:
        return _layer_norm(x, weight, bias, shape, module.eps, cfg)
    finally:
        torch.set_autocast_enabled(dev, True)


class RMSNormFn(torch.autograd.Function):
    """``fn(x)`` is the module's own forward; ``y = x * rsqrt(mean(x^2) + eps)`` in fp32."""

    @staticmethod
    def forward(ctx, x, weight, fn, eps, cfg):
        out = fn(x)
        ctx.h = x.shape[-1]
        ctx.x_meta = (x.shape, x.dtype)
        tensors = []
        if ctx.needs_input_grad[0]:
            x2 = x.reshape(-1, ctx.h)
            r = torch.rsqrt(x2.float().pow(2).mean(-1, keepdim=True) + eps)
            tensors = [r, *_pack(ctx, x2.contiguous(), ctx.h, None, r, cfg)]
        ctx.save_for_backward(weight, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, *rest = ctx.saved_tensors
        shape, dtype = ctx.x_meta
        gx = None
        if rest and ctx.needs_input_grad[0]:
            rstd, *packed = rest
            gx = _grad_input(
                ctx, grad.reshape(-1, ctx.h), weight, packed, rstd, False, dtype, shape
            )
        return gx, None, None, None, None


_rms_norm = direct_apply(RMSNormFn)


def rms_eps(module, x: torch.Tensor) -> float:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    if eps is None:  # torch.nn.RMSNorm(eps=None)
        eps = torch.finfo(x.dtype).eps
    return float(eps)


def lean_rms_norm(module, x: torch.Tensor, fn, cfg: CompressionConfig) -> torch.Tensor:
    weight = module.weight
    if (
        cfg.norm is None
        or not torch.is_grad_enabled()
        or (weight is not None and weight.requires_grad)
        or not x.requires_grad
    ):
        return fn(x)
    return _rms_norm(x, weight, fn, rms_eps(module, x), cfg)
