"""Lean activations (GELU exact/tanh, QuickGELU, SiLU): the forward is the module's own
(bitwise), backward keeps a low-bit code of the input and applies the exact derivative
at the dequantized value."""

from __future__ import annotations

import math

import torch

from ._common import direct_apply
from .config import CompressionConfig
from .quant import dequantize, quantize, run_kernel

KINDS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
# The clip of per-block codes is given for GELU; SiLU's derivative flattens about twice as
# slowly (silu'(6) = 1.015, gelu'(3) = 1.012), so its clip is twice as wide.
CLIP_FACTOR = {"gelu": 1.0, "gelu_tanh": 1.0, "quick_gelu": 1.0, "silu": 2.0}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def derivative(x: torch.Tensor, kind: str) -> torch.Tensor:
    """d act / dx at ``x`` (fp32 in, fp32 out)."""
    if kind == "gelu":
        return (
            0.5 * (1.0 + torch.erf(x * _INV_SQRT_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
        )
    if kind == "gelu_tanh":
        # 0.5 (1 + tanh u) = sigmoid(2u) and 1 - tanh(u)^2 = 4 s (1 - s): no cancellation
        x2 = x * x
        s = torch.sigmoid(2.0 * _SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x2))
        return s + 2.0 * x * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x2)
    if kind == "quick_gelu":
        s = torch.sigmoid(1.702 * x)
        return s + 1.702 * x * s * (1.0 - s)
    if kind == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    raise ValueError(f"unknown activation kind {kind!r}; use one of {', '.join(KINDS)}.")


def grad_from_codes(grad, codes, scales, meta, kind: str) -> torch.Tensor:
    """``grad * act'(dequantize(codes))`` in grad's dtype (fused in one kernel on Triton)."""

    def kernel():
        from . import kernels

        return kernels.act_backward(grad, codes, scales, meta, kind)

    def fallback():
        x = dequantize(codes, scales, meta, torch.float32)
        return (grad.float() * derivative(x, kind)).to(grad.dtype)

    return run_kernel("act_backward", codes, kernel, fallback)


def _inplace_op(kind: str):
    """The in-place ATen op computing activation ``kind`` (None where there is none)."""
    if kind == "gelu":
        return lambda t: torch.ops.aten.gelu_(t)
    if kind == "gelu_tanh":
        return lambda t: torch.ops.aten.gelu_(t, approximate="tanh")
    if kind == "silu":
        return lambda t: torch.nn.functional.silu(t, inplace=True)
    return None


def same_as_inplace(module: torch.nn.Module, kind: str) -> bool:
    """Whether ``module``'s forward equals the in-place op of ``kind`` bit for bit (probed
    on a grid in fp32 and bf16): only then may its output overwrite its input."""
    op = _inplace_op(kind)
    if op is None:
        return False
    grid = torch.linspace(-12.0, 12.0, 4801)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = grid.to(dtype)
            if not torch.equal(module(x), op(x.clone())):
                return False
    return True


class ActivationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, kind, bits, mode, step, block, clip, inplace):
        ctx.kind = kind
        if ctx.needs_input_grad[0]:
            codes, scales, ctx.meta = quantize(x, bits, mode, step, block, clip)
            ctx.save_for_backward(*([codes] if scales is None else [codes, scales]))
        if inplace:  # the codes are taken: x's buffer takes the output (one buffer, not two)
            ctx.mark_dirty(x)
            return _inplace_op(kind)(x)
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        codes, *scales = ctx.saved_tensors
        g = grad_from_codes(
            grad.contiguous(), codes, scales[0] if scales else None, ctx.meta, ctx.kind
        )
        return g, None, None, None, None, None, None, None, None


_activation = direct_apply(ActivationFn)


def lean_activation(
    x: torch.Tensor, fn, kind: str, cfg: CompressionConfig, inplace: bool = False
) -> torch.Tensor:
    """``fn(x)`` (bitwise) whose backward keeps a ``cfg.activation_bits`` code of ``x``.

    ``inplace``: the output overwrites ``x`` (slimfit.convert sets it only where ``x`` is a
    fresh linear output nobody else reads, and ``fn`` equals the in-place op bit for bit).
    """
    if cfg.activation_bits is None or not torch.is_grad_enabled() or not x.requires_grad:
        return fn(x)
    inplace = inplace and x._base is None and not x.is_leaf
    return _activation(
        x, fn, kind, cfg.activation_bits, cfg.act_scale, cfg.activation_step, cfg.block_size,
        None if cfg.activation_clip is None else cfg.activation_clip * CLIP_FACTOR[kind], inplace,
    )  # fmt: skip


def value(x: torch.Tensor, kind: str) -> torch.Tensor:
    """act(x) in fp32 (used by the gated backward)."""
    if kind == "gelu":
        return torch.nn.functional.gelu(x)
    if kind == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return torch.nn.functional.silu(x)


class GatedFn(torch.autograd.Function):
    """``h = act(gate) * up`` (LLaMA-style gated MLP). Keeps a low-bit code of ``gate``
    (as an activation input) and an int8 per-block code of ``up``; backward:
    ``d_up = dh * act(gate')``, ``d_gate = dh * up' * act'(gate')`` at the dequantized values.
    """

    @staticmethod
    def forward(ctx, gate, up, fn, kind, gq, block):
        h = fn(gate) * up
        ctx.kind = kind
        ctx.metas = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            cg, sg, mg = quantize(gate, *gq)
            cu, su, mu = quantize(up, 8, "block", 1.0, block)
            ctx.metas = (mg, mu, sg is not None)
            ctx.save_for_backward(*([cg] if sg is None else [cg, sg]), cu, su)
        return h

    @staticmethod
    def backward(ctx, dh):
        mg, mu, has_sg = ctx.metas
        saved = list(ctx.saved_tensors)
        cg, sg = (saved[0], saved[1]) if has_sg else (saved[0], None)
        cu, su = saved[-2], saved[-1]
        g = dequantize(cg, sg, mg, torch.float32)
        dh32 = dh.float()
        d_gate = d_up = None
        if ctx.needs_input_grad[0]:
            u = dequantize(cu, su, mu, torch.float32)
            d_gate = (dh32 * u * derivative(g, ctx.kind)).to(mg.dtype)
        if ctx.needs_input_grad[1]:
            d_up = (dh32 * value(g, ctx.kind)).to(mu.dtype)
        return d_gate, d_up, None, None, None, None


_gated = direct_apply(GatedFn)


def lean_gated(gate, up, fn, kind: str, cfg: CompressionConfig) -> torch.Tensor:
    """``fn(gate) * up`` (bitwise) with compressed saved operands."""
    if (
        cfg.activation_bits is None
        or not torch.is_grad_enabled()
        or not (gate.requires_grad or up.requires_grad)
    ):
        return fn(gate) * up
    clip = None if cfg.activation_clip is None else cfg.activation_clip * CLIP_FACTOR[kind]
    gq = (cfg.activation_bits, cfg.act_scale, cfg.activation_step, cfg.block_size, clip)
    return _gated(gate, up, fn, kind, gq, cfg.block_size)
