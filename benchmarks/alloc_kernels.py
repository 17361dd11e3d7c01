"""Stand-ins for ``slimfit.ops.kernels`` that only allocate their outputs (CPU proxies).

On the GPU a converted op issues Triton kernels; on a CPU without Triton it takes the
PyTorch path, a different and longer chain of ops. For measuring a step's *host* cost on
the CPU (``benchmarks/host_proxy_cpu.py --kernels alloc``), these stand-ins take the
Triton path's place: the converted ops run the same Python as on the GPU, and each kernel
costs an output allocation instead of a launch (so a launch's own host cost, ~20-50 us on
the device machine, is left out). The values are garbage: never train with them.

    import alloc_kernels; alloc_kernels.install()   # before the first converted step
"""

from __future__ import annotations

import os
import sys
import types

import torch


def _quantize(flat, meta, mean=None, rstd=None, h=1):
    n, four = meta.numel, meta.bits == 4
    dtype = torch.uint8 if four else torch.int8
    if meta.mode == "fixed":
        return torch.empty((n + 1) // 2 if four else n, dtype=dtype, device=flat.device), None
    nb = max(1, -(-n // meta.block))
    codes = torch.empty(nb * meta.block // (2 if four else 1), dtype=dtype, device=flat.device)
    return codes, torch.empty(nb, device=flat.device)


def _dequantize(codes, scales, meta, dtype):
    return torch.empty(meta.numel, dtype=dtype, device=codes.device)


def _act_backward(grad, codes, scales, meta, kind):
    return torch.empty_like(grad)


def _dequantize_affine(codes, scales, meta, weight, bias, dtype):
    return torch.empty(meta.shape, dtype=dtype, device=codes.device)


def _norm_backward(grad2d, codes, scales, meta, rstd, weight, out_dtype, center, shape=None):
    return torch.empty(shape or grad2d.shape, dtype=out_dtype, device=grad2d.device)


def _dropout(x, p, seed):
    return torch.empty_like(x)


def _dropout_add_norm(h, r, weight, bias, p, seed, eps, out_dtype, block):
    rows, width = h.numel() // h.shape[-1], h.shape[-1]
    dev = h.device
    return (
        torch.empty(h.shape, dtype=out_dtype, device=dev),
        torch.empty(rows * width, dtype=torch.int8, device=dev),
        torch.empty(rows * width // block, device=dev),
        torch.empty(rows, device=dev),
    )


def _dropout_add_norm_backward(grad2d, codes, scales, meta, rstd, weight, p, seed, h_dtype,
                               r_dtype, want_h, want_r, shape):  # fmt: skip
    dev = grad2d.device
    return (
        torch.empty(shape, dtype=h_dtype, device=dev) if want_h else None,
        torch.empty(shape, dtype=r_dtype, device=dev) if want_r else None,
    )


def install() -> None:
    """Replace ``slimfit.ops.kernels`` with the stand-ins and route the ops to them."""
    mod = types.ModuleType("slimfit.ops.kernels")
    mod.AVAILABLE = True
    mod.quantize, mod.dequantize, mod.act_backward = _quantize, _dequantize, _act_backward
    mod.dequantize_affine, mod.norm_backward, mod.dropout = (
        _dequantize_affine,
        _norm_backward,
        _dropout,
    )
    mod.dropout_add_norm = _dropout_add_norm
    mod.dropout_add_norm_backward = _dropout_add_norm_backward
    sys.modules["slimfit.ops.kernels"] = mod
    import slimfit.ops

    slimfit.ops.kernels = mod
    os.environ["SLIMFIT_BACKEND"] = "triton"
