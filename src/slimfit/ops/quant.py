"""Quantize-and-pack / unpack-and-dequantize, top-k pruning and bit masks.

Pure-PyTorch reference path; `slimfit.ops.kernels` (Triton) has identical numerics and is
chosen automatically for CUDA tensors when triton imports (``SLIMFIT_BACKEND=torch``
forces this file, ``=triton`` forces the kernels, e.g. on CPU under ``TRITON_INTERPRET=1``).

Numerics (shared by both paths, all arithmetic in fp32):

- fixed point, ``b`` bits, step ``s``: ``q = clamp(floor(x * (1/s) + 0.5), -2^(b-1), 2^(b-1)-1)``,
  ``x' = q * s``;
- per block of ``B`` elements (memory order), ``m = min(max |x|, clip)``:
  ``q = clamp(floor(x * (Q / m) + 0.5), -Q, Q)`` with ``Q = 2^(b-1)-1`` (0 where m == 0),
  ``x' = q * (m * (1/Q))``; one fp32 scale ``m * (1/Q)`` is kept per block;
- 8-bit codes are int8; 4-bit codes are stored ``q + 8`` two per byte, low nibble first.

A tensor is quantized in its memory order (a permuted view of a contiguous tensor, e.g.
the ``(B, H, S, D)`` transpose of a linear's output, costs no copy) and comes back with
the same shape and strides.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from dataclasses import dataclass

import torch

_HAS_TRITON: bool | None = None


def triton_available() -> bool:
    global _HAS_TRITON
    if _HAS_TRITON is None:
        try:
            from . import kernels  # noqa: F401

            _HAS_TRITON = kernels.AVAILABLE
        except Exception:  # pragma: no cover - depends on the install
            _HAS_TRITON = False
    return _HAS_TRITON


# Kernels that failed (e.g. did not compile) in "auto" mode: the PyTorch path takes over.
_FAILED: set = set()


def run_kernel(name: str, x: torch.Tensor, kernel, fallback):
    """``kernel()`` when the Triton path handles ``x``, else ``fallback()``.

    In the default ``auto`` mode a kernel that raises is disabled with one warning and the
    PyTorch path (same numerics) is used from then on; ``SLIMFIT_BACKEND=triton`` raises.
    """
    if use_triton(x) and name not in _FAILED:
        try:
            return kernel()
        except Exception as err:
            if os.environ.get("SLIMFIT_BACKEND", "auto") == "triton":
                raise
            _FAILED.add(name)
            warnings.warn(
                f"slimfit: the Triton kernel {name!r} failed ({type(err).__name__}: {err}); "
                "using the PyTorch path for it from now on.",
                RuntimeWarning,
                stacklevel=2,
            )
    return fallback()


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels handle ``x`` (see the module docstring)."""
    backend = os.environ.get("SLIMFIT_BACKEND", "auto")
    if backend == "torch":
        return False
    if backend == "triton":
        return triton_available()
    return x.is_cuda and triton_available()


@dataclass(frozen=True)
class QMeta:
    """How to rebuild a quantized tensor (no tensors: what backward keeps is the codes)."""

    shape: tuple
    dtype: torch.dtype
    perm: tuple | None  # memory-order permutation of the original tensor, None if contiguous
    numel: int
    bits: int
    mode: str  # "fixed" | "block"
    step: float  # fixed-point step (fixed mode)
    block: int  # block size (block mode)
    clip: float = math.inf  # block mode: absmax clipped to this (values beyond saturate)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.mode == "fixed" else -self.qmax


_METAS: dict = {}


def qmeta(shape: tuple, dtype, perm, bits: int, mode: str, step: float, block: int,
          clip: float = math.inf) -> QMeta:  # fmt: skip
    """``QMeta`` of these values, one shared instance per distinct value (a training step
    builds ~50 of them, all alike from step to step; the dataclass's own init is slow)."""
    key = (shape, dtype, perm, bits, mode, step, block, clip)
    meta = _METAS.get(key)
    if meta is None:
        if len(_METAS) > 4096:  # e.g. a new sequence length every batch
            _METAS.clear()
        meta = _METAS[key] = QMeta(
            shape, dtype, perm, math.prod(shape), bits, mode, float(step), int(block), clip
        )
    return meta


def memory_order(x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """A contiguous view of ``x`` in memory order and the permutation that made it."""
    if x.is_contiguous():
        return x, None
    perm = tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.size(d))))
    xp = x.permute(perm)
    if xp.is_contiguous():
        return xp, perm
    return x.contiguous(), None  # overlapping or gappy strides: one copy


def _restore_order(flat: torch.Tensor, meta: QMeta) -> torch.Tensor:
    if meta.perm is None:
        return flat.view(meta.shape)
    pshape = tuple(meta.shape[d] for d in meta.perm)
    inv = [0] * len(meta.perm)
    for i, d in enumerate(meta.perm):
        inv[d] = i
    return flat.view(pshape).permute(inv)


def _f32(v: float) -> float:
    """``v`` rounded to fp32, as ``float(torch.tensor(v, dtype=torch.float32))`` (no tensor:
    this runs on every quantize call)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def n_blocks(numel: int, block: int) -> int:
    return max(1, math.ceil(numel / block))


def quantize(
    x: torch.Tensor,
    bits: int,
    mode: str = "block",
    step: float = 1.0,
    block: int = 64,
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, QMeta]:
    """``x`` -> (codes uint8/int8, fp32 per-block scales or None, meta).

    ``clip`` (block mode): the block's absmax is clipped to it first, so a block with
    values beyond ``clip`` saturates there (for GELU/SiLU, whose derivative is flat out there).
    """
    if bits not in (4, 8) or mode not in ("fixed", "block"):
        raise ValueError(
            f"unsupported quantization {bits} bits / {mode!r}; use 4 or 8 bits, fixed or block."
        )
    # inside an autograd Function (the usual caller) nothing is recorded anyway
    xp, perm = memory_order(x.detach() if x.requires_grad and torch.is_grad_enabled() else x)
    clip = math.inf if clip is None else _f32(clip)
    meta = qmeta(tuple(x.shape), x.dtype, perm, bits, mode, step, block, clip)

    def kernel():
        from . import kernels

        return kernels.quantize(xp, meta)  # any contiguous shape: read flat

    return (
        *run_kernel("quantize", x, kernel, lambda: _quantize_torch(xp.reshape(-1), meta)),
        meta,
    )


def _quantize_torch(flat: torch.Tensor, meta: QMeta) -> tuple[torch.Tensor, torch.Tensor | None]:
    f = flat.float()
    scales = None
    if meta.mode == "fixed":
        inv = torch.tensor(1.0 / meta.step, dtype=torch.float32, device=f.device)
        padded = f if meta.bits == 8 or f.numel() % 2 == 0 else torch.nn.functional.pad(f, (0, 1))
        q = torch.floor(padded * inv + 0.5).clamp_(meta.qmin, meta.qmax)
    else:
        nb = n_blocks(meta.numel, meta.block)
        pad = nb * meta.block - f.numel()
        if pad:
            f = torch.nn.functional.pad(f, (0, pad))
        f = f.view(nb, meta.block)
        absmax = f.abs().amax(1)
        if math.isfinite(meta.clip):
            absmax = absmax.clamp_max(meta.clip)
        qmax = torch.tensor(float(meta.qmax), dtype=torch.float32, device=f.device)
        inv = torch.where(absmax > 0, qmax / absmax, torch.zeros_like(absmax))
        scales = absmax * torch.tensor(1.0 / meta.qmax, dtype=torch.float32, device=f.device)
        q = torch.floor(f * inv[:, None] + 0.5).clamp_(-meta.qmax, meta.qmax).view(-1)
    if meta.bits == 8:
        return q.to(torch.int8), scales
    u = (q + 8).to(torch.uint8).view(-1, 2)
    return u[:, 0] | (u[:, 1] << 4), scales


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor | None, meta: QMeta, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Codes -> tensor of ``meta.shape`` (and the original strides) in ``dtype`` (default:
    the original dtype)."""
    dtype = dtype or meta.dtype

    def kernel():
        from . import kernels

        return kernels.dequantize(codes, scales, meta, dtype)

    flat = run_kernel(
        "dequantize", codes, kernel, lambda: _dequantize_torch(codes, scales, meta).to(dtype)
    )
    return _restore_order(flat, meta)


def _dequantize_torch(
    codes: torch.Tensor, scales: torch.Tensor | None, meta: QMeta
) -> torch.Tensor:
    if meta.bits == 8:
        q = codes.float()
    else:
        q = torch.stack(((codes & 15), (codes >> 4)), dim=1).view(-1).float() - 8.0
    if meta.mode == "fixed":
        v = q * torch.tensor(meta.step, dtype=torch.float32, device=q.device)
    else:
        v = (q.view(-1, meta.block) * scales[:, None]).view(-1)
    return v[: meta.numel]


def saved_bytes(meta: QMeta) -> int:
    """Bytes of codes + scales that ``quantize`` returns for ``meta`` (for accounting)."""
    if meta.mode == "fixed":
        n = meta.numel
        return n if meta.bits == 8 else (n + 1) // 2
    nb = n_blocks(meta.numel, meta.block)
    return nb * meta.block * meta.bits // 8 + 4 * nb


# -- top-k pruning (the paper's frozen-norm compression) ------------------------------------
def topk_compress(y: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep the ``ceil(keep * n)`` largest-magnitude values of each row (last dim).

    Returns fp16 values, int16 indices (int32 when the row is longer than 32767) and n.
    """
    n = y.shape[-1]
    k = max(1, min(n, math.ceil(keep * n - 1e-9)))
    idx = y.abs().topk(k, dim=-1, sorted=False).indices
    values = torch.gather(y, -1, idx).to(torch.float16)
    return values, idx.to(torch.int16 if n <= 32767 else torch.int32), n


def topk_decompress(
    values: torch.Tensor, idx: torch.Tensor, n: int, dtype: torch.dtype
) -> torch.Tensor:
    out = torch.zeros(*values.shape[:-1], n, dtype=dtype, device=values.device)
    return out.scatter_(-1, idx.long(), values.to(dtype))


# -- 1 bit per element ------------------------------------------------------------------------
_BIT_WEIGHTS: dict = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = (2 ** torch.arange(8, device=device)).to(torch.uint8)
    return w


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 with 8 elements per byte (flat, memory order of ``mask``)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed[:, None] & _bit_weights(packed.device)) != 0
    return bits.view(-1)[:numel]
