"""Triton kernels with the numerics of `slimfit.ops.quant` (see its docstring).

- ``quantize`` / ``dequantize``: fixed-point or per-block int8 / int4 (two per byte), one
  memory-bound pass each; codes and scales are bit-identical to the PyTorch path (fp
  contraction is disabled so ``x * inv + 0.5`` rounds twice, as the eager ops do).
- ``act_backward``: unpack + dequantize + activation derivative + multiply by the incoming
  gradient in one pass (GELU / GELU-tanh / QuickGELU / SiLU backward); the derivative uses
  Triton's erf/exp, equal to the PyTorch path to ~1e-6 (fp32).
- ``dropout_add_norm`` (+ ``_backward``): a post-norm block's ``layer_norm(dropout(h) + r)``
  with its int8 code of the normalized rows, one row per program each way (see
  ``residual_norm``).
- ``dropout``: keep-mask ``rand4x(seed, i // 4)[i % 4] >= p`` from Triton's Philox,
  regenerated from the same seed in backward (the mask differs from the PyTorch path's generator, by design
  each path is consistent with itself).

All kernels take flat contiguous tensors; callers pass tensors in memory order. Launches go
through ``triton_launch.launch`` (less host work per launch).
"""

from __future__ import annotations

import math

import torch

from .quant import _f32
from .triton_launch import launch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # pragma: no cover - CI has no triton
    AVAILABLE = False

# Tile sizes from benchmarks/kernel_tune_gpu.py (H200, bert-base QA tensors): 64 blocks of
# 64 per program quantize 10-15% faster than 16; the GELU backward is best at 4096 elements.
_ELEMS = 1024  # elements (fixed mode) per program
_ROWS = 64  # blocks (block mode) per program, at most 4096 elements
_ACT_ELEMS = 4096  # elements per program of the GELU / SiLU backward

if AVAILABLE:
    # All kernels read and write their tensors in contiguous 1-D/2-D tiles (vectorizable);
    # 4-bit codes are packed by a sum over pairs ``q0 + (q1 << 4)`` and unpacked per element
    # from byte ``i // 2`` (shift ``4 * (i % 2)``), so no strided access is needed.

    @triton.jit
    def _pack_pairs(u, N: tl.constexpr):
        """[N] uint codes in 0..15 -> [N // 2] bytes, element 2k in the low nibble."""
        k = tl.arange(0, N)
        shifted = u.to(tl.int32) << ((k % 2) * 4)
        return tl.sum(tl.reshape(shifted, (N // 2, 2)), axis=1).to(tl.uint8)

    @triton.jit
    def _quant_fixed_kernel(x_ptr, out_ptr, n, inv_step, QMIN: tl.constexpr, QMAX: tl.constexpr,
                            FOUR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.floor(x * inv_step + 0.5), QMIN), QMAX)
        if FOUR:
            j = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            tl.store(out_ptr + j, _pack_pairs(q + 8.0, BLOCK), mask=2 * j < n)
        else:
            tl.store(out_ptr + i, q.to(tl.int8), mask=i < n)

    @triton.jit
    def _quant_block_kernel(x_ptr, out_ptr, scale_ptr, n, nb, clip, mean_ptr, rstd_ptr, H,
                            BS: tl.constexpr, BSP: tl.constexpr, QMAX: tl.constexpr,
                            FOUR: tl.constexpr, ROWS: tl.constexpr, NORM: tl.constexpr,
                            CENTER: tl.constexpr):  # fmt: skip
        """ROWS blocks of BS elements (tile [ROWS, BSP], BSP = next power of 2 >= BS)."""
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BSP)
        m = (rows < nb)[:, None] & (cols < BS)[None, :]
        e = rows[:, None] * BS + cols[None, :]
        inside = m & (e < n)
        x = tl.load(x_ptr + e, mask=inside, other=0.0).to(tl.float32)
        if NORM:  # quantize the normalized row (x - mean) * rstd without writing it
            r = e // H
            if CENTER:
                x = x - tl.load(mean_ptr + r, mask=inside, other=0.0)
            x = tl.where(inside, x * tl.load(rstd_ptr + r, mask=inside, other=0.0), 0.0)
        absmax = tl.minimum(tl.max(tl.abs(x), axis=1), clip)
        qmax = tl.full(absmax.shape, QMAX, tl.float32)
        one = tl.full(absmax.shape, 1.0, tl.float32)
        inv = tl.where(absmax > 0, tl.div_rn(qmax, tl.where(absmax > 0, absmax, one)), 0.0)
        tl.store(scale_ptr + rows, absmax * (1.0 / QMAX), mask=rows < nb)
        q = tl.minimum(tl.maximum(tl.floor(x * inv[:, None] + 0.5), -QMAX), QMAX)
        if FOUR:
            k = tl.arange(0, BSP // 2)
            shifted = (q + 8.0).to(tl.int32) << ((cols % 2) * 4)[None, :]
            b = tl.sum(tl.reshape(shifted, (ROWS, BSP // 2, 2)), axis=2).to(tl.uint8)
            mk = (rows < nb)[:, None] & (k < BS // 2)[None, :]
            tl.store(out_ptr + rows[:, None] * (BS // 2) + k[None, :], b, mask=mk)
        else:
            tl.store(out_ptr + e, q.to(tl.int8), mask=m)

    @triton.jit
    def _dequant_vals(c_ptr, s_ptr, i, n, step, FOUR: tl.constexpr, BLOCKWISE: tl.constexpr,
                      BS: tl.constexpr):  # fmt: skip
        """fp32 values of elements i."""
        if FOUR:
            b = tl.load(c_ptr + i // 2, mask=i < n, other=0).to(tl.int32)
            q = ((b >> ((i % 2) * 4).to(tl.int32)) & 15) - 8
        else:
            q = tl.load(c_ptr + i, mask=i < n, other=0)
        q = q.to(tl.float32)
        if BLOCKWISE:
            return q * tl.load(s_ptr + i // BS, mask=i < n, other=0.0)
        return q * step

    @triton.jit
    def _dequant_kernel(c_ptr, s_ptr, out_ptr, n, step, FOUR: tl.constexpr,
                        BLOCKWISE: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = _dequant_vals(c_ptr, s_ptr, i, n, step, FOUR, BLOCKWISE, BS)
        tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=i < n)

    @triton.jit
    def _deriv(x, KIND: tl.constexpr):
        if KIND == 0:  # gelu (erf)
            d = (
                0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
                + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
            )
        elif KIND == 1:  # gelu tanh, written with s = sigmoid(2u) (no cancellation)
            x2 = x * x
            u = 0.7978845608028654 * x * (1.0 + 0.044715 * x2)
            s = 1.0 / (1.0 + tl.exp(-2.0 * u))
            d = s + 2.0 * x * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * x2)
        elif KIND == 2:  # quick gelu
            s = 1.0 / (1.0 + tl.exp(-1.702 * x))
            d = s + 1.702 * x * s * (1.0 - s)
        else:  # silu
            s = 1.0 / (1.0 + tl.exp(-x))
            d = s * (1.0 + x * (1.0 - s))
        return d

    @triton.jit
    def _act_bwd_kernel(g_ptr, c_ptr, s_ptr, out_ptr, n, step, KIND: tl.constexpr,
                        FOUR: tl.constexpr, BLOCKWISE: tl.constexpr, BS: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = _dequant_vals(c_ptr, s_ptr, i, n, step, FOUR, BLOCKWISE, BS)
        g = tl.load(g_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, (g * _deriv(v, KIND)).to(out_ptr.dtype.element_ty), mask=i < n)

    @triton.jit
    def _dequant_affine_kernel(c_ptr, s_ptr, w_ptr, b_ptr, out_ptr, n, nb, H,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr, BS: tl.constexpr,
                               ROWS: tl.constexpr):  # fmt: skip
        """A norm's output again from its int8 per-block code of ``y``: ``y * w + b`` (fp32,
        two roundings as the eager ops do), stored in the output's dtype."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        e = rows[:, None] * BS + tl.arange(0, BS)[None, :]
        m = e < n
        q = tl.load(c_ptr + e, mask=m, other=0).to(tl.float32)
        v = q * tl.load(s_ptr + rows, mask=rows < nb, other=0.0)[:, None]
        col = e % H
        if HAS_W:
            v = v * tl.load(w_ptr + col, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            v = v + tl.load(b_ptr + col, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + e, v.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _norm_bwd_kernel(g_ptr, c_ptr, s_ptr, rstd_ptr, w_ptr, out_ptr, H, n, inv_h,
                         BS: tl.constexpr, BLOCK_H: tl.constexpr, HAS_W: tl.constexpr,
                         CENTER: tl.constexpr, FOUR: tl.constexpr):  # fmt: skip
        """One row: y = int8/int4 code * block scale; g' = g * w;
        dx = rstd * (g' - mean(g') - y * mean(g' * y))  (no mean(g') term for RMSNorm)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        m = cols < H
        e = row * H + cols
        y = tl.where(m, _dequant_vals(c_ptr, s_ptr, e, n, 1.0, FOUR, True, BS), 0.0)
        g = tl.load(g_ptr + e, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        dot = tl.sum(g * y, axis=0) * inv_h
        r = tl.load(rstd_ptr + row)
        if CENTER:
            dx = r * (g - tl.sum(g, axis=0) * inv_h - y * dot)
        else:
            dx = r * (g - y * dot)
        tl.store(out_ptr + e, dx.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, n, p, scale, seed, BLOCK: tl.constexpr):
        # One Philox call gives four uniforms: element i takes number i % 4 of counter
        # i // 4 (a call per element made the kernel compute-bound, ~3x its memory time).
        j = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        r0, r1, r2, r3 = tl.rand4x(seed, j.to(tl.int32))
        k = tl.arange(0, 4)[None, :]
        r = tl.where(k == 0, r0[:, None], tl.where(k == 1, r1[:, None],
                     tl.where(k == 2, r2[:, None], r3[:, None])))  # fmt: skip
        i = j[:, None] * 4 + k
        m = i < n
        x = tl.load(x_ptr + i, mask=m, other=0.0)
        y = tl.where(r >= p, x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + i, y.to(x.dtype), mask=m)

    @triton.jit
    def _keep_uniforms(seed, row, H, q, k):
        """[BLOCK_H // 4, 4] uniforms of row elements ``4 q + k``: element ``i = row * H + col``
        takes number ``i % 4`` of Philox counter ``i // 4``, as ``_dropout_kernel`` does."""
        r0, r1, r2, r3 = tl.rand4x(seed, (row * (H // 4) + q).to(tl.int32))
        return tl.where(k == 0, r0[:, None], tl.where(k == 1, r1[:, None],
                        tl.where(k == 2, r2[:, None], r3[:, None])))  # fmt: skip

    @triton.jit
    def _row_tile(H, BLOCK_H: tl.constexpr):
        """This program's row of H elements as (BLOCK_H // 4, 4) tiles: the row, the tile's
        quad and lane indices (what ``_keep_uniforms`` draws by), columns, their mask and
        flat offsets."""
        row = tl.program_id(0).to(tl.int64)
        q = tl.arange(0, BLOCK_H // 4)
        k = tl.arange(0, 4)[None, :]
        col = q[:, None] * 4 + k
        return row, q, k, col, col < H, row * H + col

    @triton.jit
    def _dan_fwd_kernel(h_ptr, r_ptr, w_ptr, b_ptr, out_ptr, code_ptr, scale_ptr, rstd_ptr, H,
                        p, drop_scale, seed, eps, inv_h, BLOCK_H: tl.constexpr, BS: tl.constexpr,
                        DROP: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):  # fmt: skip
        """One row of ``layer_norm(dropout(h) + r)``: the output, rstd and the int8 per-block
        code of ``y = (z - mean) * rstd`` (rows of H elements, H % 4 == 0, H % BS == 0)."""
        row, q, k, col, m, e = _row_tile(H, BLOCK_H)
        x = tl.load(h_ptr + e, mask=m, other=0.0)
        if DROP:  # the dropout's output in h's dtype, as the separate kernel writes it
            keep = _keep_uniforms(seed, row, H, q, k) >= p
            x = tl.where(keep, x.to(tl.float32) * drop_scale, 0.0).to(h_ptr.dtype.element_ty)
        z = x.to(tl.float32) + tl.load(r_ptr + e, mask=m, other=0.0).to(tl.float32)
        z = z.to(r_ptr.dtype.element_ty).to(tl.float32)  # the add's rounding (z has r's dtype)
        mean = tl.sum(tl.sum(z, axis=1), axis=0) * inv_h
        c = tl.where(m, z - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(tl.sum(c * c, axis=1), axis=0) * inv_h + eps)
        y = c * rstd
        o = y
        if HAS_W:
            o = o * tl.load(w_ptr + col, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            o = o + tl.load(b_ptr + col, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + e, o.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(rstd_ptr + row, rstd)
        # the code, as _quant_block_kernel makes it: blocks of BS along the row
        yb = tl.reshape(y, (BLOCK_H // BS, BS))
        absmax = tl.max(tl.abs(yb), axis=1)
        qmax = tl.full(absmax.shape, 127.0, tl.float32)
        one = tl.full(absmax.shape, 1.0, tl.float32)
        inv = tl.where(absmax > 0, tl.div_rn(qmax, tl.where(absmax > 0, absmax, one)), 0.0)
        code = tl.minimum(tl.maximum(tl.floor(yb * inv[:, None] + 0.5), -127.0), 127.0)
        blk = tl.arange(0, BLOCK_H // BS)
        cb = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        tl.store(code_ptr + row * H + cb, code.to(tl.int8), mask=cb < H)
        nb = H // BS
        tl.store(scale_ptr + row * nb + blk, absmax * (1.0 / 127.0), mask=blk < nb)

    @triton.jit
    def _dan_bwd_kernel(g_ptr, code_ptr, scale_ptr, rstd_ptr, w_ptr, gh_ptr, gz_ptr, H, p,
                        drop_scale, seed, inv_h, BLOCK_H: tl.constexpr, BS: tl.constexpr,
                        DROP: tl.constexpr, HAS_W: tl.constexpr, WANT_H: tl.constexpr,
                        WANT_R: tl.constexpr):  # fmt: skip
        """One row: the norm's input gradient ``gz`` from the code of y (in z's dtype, that of
        ``gz_ptr``: the residual's gradient) and the dropout branch's, ``mask(gz) * scale``."""
        row, q, k, col, m, e = _row_tile(H, BLOCK_H)
        y = tl.load(code_ptr + e, mask=m, other=0).to(tl.float32)
        y = y * tl.load(scale_ptr + row * (H // BS) + col // BS, mask=m, other=0.0)
        g = tl.load(g_ptr + e, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(w_ptr + col, mask=m, other=0.0).to(tl.float32)
        dot = tl.sum(tl.sum(g * y, axis=1), axis=0) * inv_h
        mg = tl.sum(tl.sum(g, axis=1), axis=0) * inv_h
        gz = (tl.load(rstd_ptr + row) * (g - mg - y * dot)).to(gz_ptr.dtype.element_ty)
        if WANT_R:
            tl.store(gz_ptr + e, gz, mask=m)
        if WANT_H:
            gd = gz.to(gh_ptr.dtype.element_ty).to(tl.float32)
            if DROP:
                keep = _keep_uniforms(seed, row, H, q, k) >= p
                gd = tl.where(keep, gd * drop_scale, 0.0)
            tl.store(gh_ptr + e, gd.to(gh_ptr.dtype.element_ty), mask=m)


_KIND = {"gelu": 0, "gelu_tanh": 1, "quick_gelu": 2, "silu": 3}


def _grid(n: int, per: int):
    # plain integer math: triton.cdiv is a @jit function, ~6 us per call from Python
    return (max(1, -(-n // per)),)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def quantize(flat: torch.Tensor, meta, mean=None, rstd=None, h: int = 1):
    """Flat contiguous tensor -> (codes, fp32 scales or None), as ``quant._quantize_torch``.

    With ``rstd`` (block mode): quantizes ``(x - mean[row]) * rstd[row]`` (rows of ``h``
    elements; no ``mean``: ``x * rstd[row]``), the normalized output of a norm, in one pass.
    """
    flat = flat.contiguous()
    norm = (
        flat if mean is None else mean.contiguous(),
        flat if rstd is None else rstd.contiguous(),
        int(h),
    )
    n = meta.numel
    four = meta.bits == 4
    if meta.mode == "fixed":
        out = torch.empty((n + 1) // 2 if four else n, dtype=torch.uint8 if four else torch.int8,
                          device=flat.device)  # fmt: skip
        inv = _f32(1.0 / meta.step)
        launch(
            _quant_fixed_kernel, _grid(n, _ELEMS),
            flat, out, n, inv, QMIN=meta.qmin, QMAX=meta.qmax, FOUR=four, BLOCK=_ELEMS,
            enable_fp_fusion=False,
        )  # fmt: skip
        return out, None
    bs = meta.block
    nb = max(1, -(-n // bs))
    out = torch.empty(nb * bs // 2 if four else nb * bs, dtype=torch.uint8 if four else torch.int8,
                      device=flat.device)  # fmt: skip
    scales = torch.empty(nb, dtype=torch.float32, device=flat.device)
    rows = 1 << max(0, (min(_ROWS, 4096 // bs)).bit_length() - 1)  # a power of 2
    launch(
        _quant_block_kernel, _grid(nb, rows),
        flat, out, scales, n, nb, float(meta.clip), norm[0], norm[1], norm[2], BS=bs,
        BSP=_pow2(bs), QMAX=meta.qmax, FOUR=four, ROWS=rows, NORM=norm[1] is not flat,
        CENTER=norm[0] is not flat, enable_fp_fusion=False,
    )  # fmt: skip
    return out, scales


def dequantize(codes: torch.Tensor, scales, meta, dtype: torch.dtype) -> torch.Tensor:
    n = meta.numel
    out = torch.empty(n, dtype=dtype, device=codes.device)
    launch(
        _dequant_kernel, _grid(n, _ELEMS),
        codes, scales if scales is not None else codes, out, n, float(meta.step),
        FOUR=meta.bits == 4, BLOCKWISE=meta.mode == "block", BS=meta.block, BLOCK=_ELEMS,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _in_memory_order(t: torch.Tensor, meta) -> torch.Tensor:
    if meta.perm is not None:
        return t.permute(meta.perm).contiguous()
    return t.contiguous()


def _back_to_order(flat: torch.Tensor, meta) -> torch.Tensor:
    from .quant import _restore_order

    return _restore_order(flat, meta)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def act_backward(grad: torch.Tensor, codes, scales, meta, kind: str) -> torch.Tensor:
    g = _in_memory_order(grad, meta).view(-1)
    out = torch.empty_like(g)
    n = meta.numel
    launch(
        _act_bwd_kernel, _grid(n, _ACT_ELEMS),
        g, codes, scales if scales is not None else codes, out, n, float(meta.step),
        KIND=_KIND[kind], FOUR=meta.bits == 4, BLOCKWISE=meta.mode == "block", BS=meta.block,
        BLOCK=_ACT_ELEMS,
    )  # fmt: skip
    return _back_to_order(out, meta)


def dequantize_affine(codes, scales, meta, weight, bias, dtype: torch.dtype) -> torch.Tensor | None:
    """``dequantize(codes) * weight + bias`` (per column of the last dim, fp32 arithmetic)
    in ``dtype``, in one pass; None where this kernel does not apply (not an int8 per-block
    code of contiguous rows, or a block size that is not a power of 2)."""
    if meta.bits != 8 or meta.mode != "block" or meta.perm is not None or not _is_pow2(meta.block):
        return None
    n, bs, h = meta.numel, meta.block, meta.shape[-1]
    out = torch.empty(n, dtype=dtype, device=codes.device)
    rows = max(1, _ELEMS // bs)
    nb = -(-n // bs)
    launch(
        _dequant_affine_kernel, _grid(nb, rows),
        codes, scales, weight if weight is not None else codes,
        bias if bias is not None else codes, out, n, nb, h, HAS_W=weight is not None,
        HAS_B=bias is not None, BS=bs, ROWS=rows, enable_fp_fusion=False,
    )  # fmt: skip
    return out.view(meta.shape)


def norm_backward(grad2d, codes, scales, meta, rstd, weight, out_dtype, center: bool, shape=None):
    """Input gradient of a frozen-gain norm from its int8/int4 per-block normalized output,
    in ``shape`` (default: ``grad2d``'s rows x H)."""
    rows, h = grad2d.shape
    g = grad2d.contiguous()
    out = torch.empty(shape or (rows, h), dtype=out_dtype, device=g.device)
    launch(
        _norm_bwd_kernel, (rows,),
        g, codes, scales, rstd.contiguous(), weight if weight is not None else g, out, h,
        rows * h, 1.0 / h, BS=meta.block, BLOCK_H=_pow2(h), HAS_W=weight is not None,
        CENTER=center, FOUR=meta.bits == 4,
    )  # fmt: skip
    return out


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x * keep / (1 - p)``, ``keep = rand4x(seed, i // 4)[i % 4] >= p`` over x's logical
    order."""
    xc = x.contiguous()
    out = torch.empty_like(xc)
    n = xc.numel()
    launch(
        _dropout_kernel, _grid(n, _ELEMS),
        xc, out, n, float(p), float(1.0 / (1.0 - p)), _seed31(seed), BLOCK=_ELEMS,
    )  # fmt: skip
    return out


def _seed31(seed: int) -> int:
    return int(seed) % (2**31 - 1)


def _row_warps(block_h: int) -> int:
    return min(16, max(4, block_h // 256))  # ~8 elements of a row per thread


def dropout_add_norm(h, r, weight, bias, p: float, seed: int, eps: float, out_dtype, block: int):
    """``layer_norm(dropout(h) + r)`` over rows of ``h.shape[-1]``, ``r`` of the sum's
    dtype -> (output in ``out_dtype``, int8 codes of y, fp32 block scales, fp32 rstd)."""
    width = h.shape[-1]
    rows = h.numel() // width
    dev = h.device
    out = torch.empty(h.shape, dtype=out_dtype, device=dev)
    codes = torch.empty(rows * width, dtype=torch.int8, device=dev)
    scales = torch.empty(rows * (width // block), dtype=torch.float32, device=dev)
    rstd = torch.empty(rows, dtype=torch.float32, device=dev)
    bh = _pow2(width)
    launch(
        _dan_fwd_kernel, (rows,),
        h, r, weight if weight is not None else h, bias if bias is not None else h, out, codes,
        scales, rstd, width, float(p), 1.0 / (1.0 - p) if p > 0 else 1.0, _seed31(seed),
        float(eps), 1.0 / width, BLOCK_H=bh, BS=block, DROP=p > 0, HAS_W=weight is not None,
        HAS_B=bias is not None, num_warps=_row_warps(bh), enable_fp_fusion=False,
    )  # fmt: skip
    return out, codes, scales, rstd


def dropout_add_norm_backward(grad2d, codes, scales, meta, rstd, weight, p: float, seed: int,
                              h_dtype, r_dtype, want_h: bool, want_r: bool, shape):  # fmt: skip
    """-> (gradient of h or None, gradient of r or None), in ``shape``."""
    rows, width = grad2d.shape
    g = grad2d.contiguous()
    dev = g.device
    gh = torch.empty(shape, dtype=h_dtype, device=dev) if want_h else g.new_empty(0, dtype=h_dtype)
    gz = torch.empty(shape, dtype=r_dtype, device=dev) if want_r else g.new_empty(0, dtype=r_dtype)
    bh = _pow2(width)
    launch(
        _dan_bwd_kernel, (rows,),
        g, codes, scales, rstd, weight if weight is not None else g, gh, gz, width, float(p),
        1.0 / (1.0 - p) if p > 0 else 1.0, _seed31(seed), 1.0 / width, BLOCK_H=bh,
        BS=meta.block, DROP=p > 0, HAS_W=weight is not None, WANT_H=want_h, WANT_R=want_r,
        num_warps=_row_warps(bh),
    )  # fmt: skip
    return (gh if want_h else None), (gz if want_r else None)
