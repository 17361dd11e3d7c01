"""Lean dropout: no byte mask is kept for backward.

``"regenerate"``: keeps an 8-byte seed and rebuilds the mask in backward (Triton: one fused
kernel each way on CUDA; torch: a seeded ``torch.Generator``).
``"bitmask"``: keeps the mask at 1 bit per element.
"""

from __future__ import annotations

import torch

from ._common import direct_apply
from .quant import pack_bits, run_kernel, unpack_bits

_GENERATORS: dict = {}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = _GENERATORS.get(device)
    if g is None:
        g = _GENERATORS[device] = torch.Generator(device=device)
    return g.manual_seed(seed)


def keep_mask(shape, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The bool keep-mask for ``seed`` (torch path): ``rand >= p``."""
    if device.type == "meta":  # shape-only simulation
        return torch.empty(shape, dtype=torch.bool, device=device)
    return torch.rand(shape, generator=_generator(device, seed), device=device) >= p


def apply_keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x`` with the torch path's keep-mask of ``seed`` applied, scaled by ``1 / (1 - p)``
    (forward and backward alike: the gradient is masked as the input was)."""
    return x * keep_mask(x.shape, p, seed, x.device).to(x.dtype) * (1.0 / (1.0 - p))


def _new_seed() -> torch.Tensor:
    # Drawn from torch's default CPU generator, so torch.manual_seed makes runs repeatable.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


class RegenDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        seed = _new_seed()
        ctx.p = p
        ctx.triton = False

        def kernel():
            from . import kernels

            out = kernels.dropout(x, p, int(seed))
            ctx.triton = True  # backward must regenerate the mask the same way
            return out

        def fallback():
            return apply_keep_mask(x, p, int(seed))

        out = run_kernel("dropout", x, kernel, fallback)
        ctx.save_for_backward(seed)
        return out

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        if ctx.triton:
            from . import kernels

            return kernels.dropout(grad, ctx.p, int(seed)), None
        return apply_keep_mask(grad, ctx.p, int(seed)), None


class BitmaskDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        mask = torch.rand_like(x, dtype=torch.float32) >= p
        ctx.p, ctx.numel, ctx.shape = p, x.numel(), x.shape
        ctx.save_for_backward(pack_bits(mask))
        return x * mask.to(x.dtype) * (1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        mask = unpack_bits(bits, ctx.numel).view(ctx.shape)
        return grad * mask.to(grad.dtype) * (1.0 / (1.0 - ctx.p)), None


_regen_dropout = direct_apply(RegenDropoutFn)
_bitmask_dropout = direct_apply(BitmaskDropoutFn)


def lean_dropout(x: torch.Tensor, p: float, training: bool, mode: str | None, fn) -> torch.Tensor:
    if (
        mode is None
        or not training
        or p == 0.0
        or not torch.is_grad_enabled()
        or not x.requires_grad
    ):
        return fn(x)
    if p >= 1.0:
        return x * 0.0
    x = x.contiguous()
    if mode == "bitmask":
        return _bitmask_dropout(x, p)
    return _regen_dropout(x, p)
