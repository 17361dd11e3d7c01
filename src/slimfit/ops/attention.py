"""Lean attention behind transformers' ``AttentionInterface`` (name ``"slimfit_sdpa"``).

Forward: the same ``F.scaled_dot_product_attention`` call as transformers' ``"sdpa"``
(fused kernels, the S x S matrix is never materialised; bitwise the same output).
Saved for backward: Q, K, V as 8-bit codes (K, V before any GQA repeat), the attention
mask (shared by all layers) and, with dropout, the RNG state. With ``attention_recompute``,
Q, K, V that are plain projections of a lean LayerNorm's output keep nothing of their own:
backward rebuilds them from the int8 code that norm keeps.
Backward: dequantize Q, K, V, re-run the fused forward under the saved autocast and RNG
state and call its fused backward node directly. This needs neither the output nor
the log-sum-exp to be kept, and works on every torch/device where SDPA has a backward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ._common import (
    autocast_ctx,
    autocast_dtype,
    autocast_state,
    direct_apply,
    load_packed,
    projection_source,
    quantize_with,
    save_packed,
)
from .quant import _FAILED, _restore_order, memory_order, qmeta, quantize, run_kernel, use_triton

NAME = "slimfit_sdpa"

# slimfit.convert sets this attribute (a CompressionConfig) on every module of a converted
# model; ATTENTION_CONFIG maps other modules (e.g. in tests) to a config.
CONFIG_ATTR = "_slimfit_attn_cfg"
ATTENTION_CONFIG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _sdpa(q, k, v, mask, dropout, scale, is_causal, n_rep):
    kwargs = {}
    if n_rep > 1:
        if mask is None and k.shape[-1] == v.shape[-1] <= 256:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=is_causal, **kwargs
    )


def _generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device`` (what SDPA's dropout draws from)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


class _ReplayRNG:
    """Context manager: run with the RNG state saved in forward, then put the current back."""

    def __init__(self, gen: torch.Generator, state: torch.Tensor | None):
        self.gen, self.state = gen, state

    def __enter__(self):
        if self.state is None:
            return
        self.saved = self.gen.get_state()
        self.gen.set_state(self.state)

    def __exit__(self, *exc):
        if self.state is None:
            return
        self.gen.set_state(self.saved)


def _pack_projected(qkv):
    """Q, K, V that are views of projections of lean LayerNorm outputs (``attention_recompute``)
    -> (how to rebuild, tensors to save): the norms' int8 codes (kept by the norms anyway)
    and the projections' parameters; None when any of the three is not such a view."""
    sources = [projection_source(t) for t in qkv]
    if any(src is None for src in sources):
        return None
    norms, roots, saved, views = [], [], [], []
    for t, (normed, weight, bias, x_dtype, out_shape) in zip(qkv, sources):
        root = t if t._base is None else t._base
        r = next((i for i, (obj, _) in enumerate(roots) if obj is root), None)
        if r is None:  # one projection per root (a fused QKV linear is run once)
            n = next((i for i, c in enumerate(norms) if c[0] is normed[0]), None)
            if n is None:
                codes, scales, meta, gain, shift = normed
                n = len(norms)
                norms.append(normed)
                saved += [codes, scales] + [a for a in (gain, shift) if a is not None]
            saved += [weight] + ([bias] if bias is not None else [])
            r = len(roots)
            roots.append((root, (n, bias is not None, x_dtype, tuple(out_shape))))
        offset = t.storage_offset() - root.storage_offset()
        views.append((r, tuple(t.shape), t.stride(), offset))
    infos = [(c[2], c[3] is not None, c[4] is not None) for c in norms]
    return ("projected", (infos, [spec for _, spec in roots], views)), saved


def _rebuild_projected(info, saved, device_type: str) -> list[torch.Tensor]:
    """Q, K, V again: each norm output from its int8 code, the projections run again (under
    the forward's autocast state, set by the caller), each view taken as in the forward.

    Projections of one norm output (Q, K and V in BERT/ViT) run as one matmul over their
    concatenated weights, and the views are taken straight from its output (one launch
    instead of three, no copies: a host-bound backward's cost is its launches). The
    concatenation is made again every backward, never kept between steps: fused AdamW
    (the transformers Trainer's default) updates parameters without moving their version
    counters, so a cache checked against versions would hand back stale weights."""
    infos, roots, views = info
    saved = list(saved)
    normed = []
    for meta, has_gain, has_shift in infos:
        codes, scales = saved.pop(0), saved.pop(0)
        gain = saved.pop(0) if has_gain else None
        normed.append((codes, scales, meta, gain, saved.pop(0) if has_shift else None))
    cdtype = autocast_dtype(device_type)

    def matmul_dtype(t: torch.Tensor) -> torch.dtype:  # what autocast makes of it
        return cdtype if cdtype is not None and t.is_floating_point() else t.dtype

    def stacked(ts: list[torch.Tensor]) -> torch.Tensor:
        # one concatenation and autocast's cast (a no-op where lean_linear handed over its
        # frozen projections' casts); a trained piece among cast ones is cast alone first
        if len(ts) == 1:
            return ts[0]
        if len({t.dtype for t in ts}) > 1:
            ts = [t.to(matmul_dtype(t)) for t in ts]
        return torch.cat(ts).to(matmul_dtype(ts[0]))

    params, groups = [], {}
    for r, (n, has_bias, x_dtype, _shape) in enumerate(roots):
        weight = saved.pop(0)
        params.append((weight, saved.pop(0) if has_bias else None))
        groups.setdefault((n, has_bias, x_dtype, matmul_dtype(weight)), []).append(r)
    placed: list = [None] * len(roots)  # root -> (output, its first column, its width)
    for (n, has_bias, x_dtype, _), rs in groups.items():
        h = _norm_output(normed[n], x_dtype, cdtype)
        h = h.reshape(*roots[rs[0]][3][:-1], h.shape[-1])
        ws = [params[r][0] for r in rs]
        w = stacked(ws)
        b = stacked([params[r][1] for r in rs]) if has_bias else None
        out = F.linear(h, w, b)
        col = 0
        for r, wr in zip(rs, ws):
            placed[r] = (out, col, wr.shape[0])
            col += wr.shape[0]
    qkv = []
    for r, size, stride, offset in views:
        out, col, width = placed[r]
        mapped = _view_in(size, stride, offset, width, out.shape[-1], col)
        if mapped is None:  # a view that does not stay within its projection's columns
            part = out if out.shape[-1] == width else out[..., col : col + width]
            qkv.append(part.contiguous().as_strided(size, stride, offset))
        else:
            qkv.append(out.as_strided(*mapped))
    return qkv


def _norm_output(src, x_dtype: torch.dtype, cdtype: torch.dtype | None) -> torch.Tensor:
    """A norm's output ``y * gain + bias`` from its code, as the projections read it: cast
    to ``x_dtype`` and then, under autocast, to ``cdtype`` (autocast's own cast of the
    input, once for the group). On Triton one fused pass writes the final dtype (the same
    values: fp32 arithmetic, one rounding, where ``x_dtype`` is fp32 or the final dtype)."""
    codes, scales, meta, gain, shift = src
    target = cdtype if cdtype is not None and x_dtype.is_floating_point else x_dtype
    if x_dtype in (torch.float32, target) and use_triton(codes) and "dequant_affine" not in _FAILED:

        def kernel():
            from . import kernels

            return kernels.dequantize_affine(codes, scales, meta, gain, shift, target)

        h = run_kernel("dequant_affine", codes, kernel, lambda: None)
        if h is not None:
            return h
    h = load_packed([codes, scales], meta, torch.float32)
    if gain is not None:
        h = h * gain.float()
    if shift is not None:
        h = h + shift.float()
    h = h.to(x_dtype)
    return h.to(cdtype) if cdtype is not None and h.is_floating_point() else h


def _view_in(size, stride, offset, width: int, total: int, col: int):
    """``(size, stride, offset)`` of a view of a contiguous ``(..., width)`` tensor, mapped
    into a contiguous ``(..., total)`` tensor whose columns ``col : col + width`` hold it;
    None when the view does not decompose into whole rows plus columns inside one row."""
    row, first = divmod(offset, width)
    strides, last = [], first
    for sz, st in zip(size, stride):
        if sz == 1:
            strides.append(st)
        elif st % width == 0:
            strides.append(st // width * total)
        elif st < width:
            strides.append(st)
            last += st * (sz - 1)
        else:
            return None
    if last >= width:
        return None
    return tuple(size), tuple(strides), row * total + col + first


def _pack_qkv(cfg, qkv):
    """Q, K, V -> (how to unpack, tensors to save). One quantize launch for the three when
    their blocks do not straddle (the same codes and scales as three separate calls: each
    tensor is a whole number of blocks, quantized in its memory order)."""
    bits, step, block = cfg.attention_bits, cfg.attention_step, cfg.block_size
    joint = len({t.dtype for t in qkv}) == 1 and (
        cfg.scale == "fixed" or all(t.numel() % block == 0 for t in qkv)
    )
    if not joint:
        parts, saved = [], []
        for t in qkv:
            tensors, meta = save_packed(quantize_with(cfg, t, bits, step))
            parts.append((meta, len(tensors)))
            saved += tensors
        return ("each", parts), saved
    flats, metas = [], []
    for t in qkv:
        xp, perm = memory_order(t.detach())
        flats.append(xp.reshape(-1))
        metas.append(qmeta(tuple(t.shape), t.dtype, perm, bits, cfg.scale, step, block))
    tensors, meta = save_packed(quantize(torch.cat(flats), bits, cfg.scale, step, block))
    return ("joint", (meta, metas)), tensors


def _unpack_qkv(parts, saved) -> list[torch.Tensor]:
    kind, info = parts
    if kind == "each":
        out = []
        for meta, n in info:
            out.append(load_packed(saved[:n], meta))
            saved = saved[n:]
        return out
    meta, metas = info
    flat = load_packed(saved, meta)
    chunks = flat.split([m.numel for m in metas])
    return [_restore_order(c, m) for c, m in zip(chunks, metas)]


class SDPAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, dropout, scale, is_causal, n_rep, cfg):
        dev = q.device
        ctx.device = dev
        ctx.autocast = autocast_state(dev.type)
        ctx.gen = _generator(dev) if dropout > 0 else None
        rng = ctx.gen.get_state() if ctx.gen is not None else None
        out = _sdpa(q, k, v, mask, dropout, scale, is_causal, n_rep)
        ctx.args = (dropout, scale, is_causal, n_rep)
        packed = _pack_projected((q, k, v)) if cfg.recompute_qkv else None
        ctx.parts, saved = packed if packed is not None else _pack_qkv(cfg, (q, k, v))
        ctx.n_packed = len(saved)
        ctx.has_mask, ctx.has_rng = mask is not None, rng is not None
        extra = ([mask] if mask is not None else []) + ([rng] if rng is not None else [])
        ctx.save_for_backward(*saved, *extra)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        enabled, dtype = ctx.autocast
        kind, info = ctx.parts
        packed, saved = saved[: ctx.n_packed], saved[ctx.n_packed :]
        mask = saved.pop(0) if ctx.has_mask else None
        rng = saved.pop(0) if ctx.has_rng else None
        qkv = None if kind == "projected" else _unpack_qkv(ctx.parts, packed)
        # one autocast region for the projections' rerun and the attention's
        with autocast_ctx(ctx.device.type, enabled, dtype):
            if qkv is None:
                with torch.no_grad():
                    qkv = _rebuild_projected(info, packed, ctx.device.type)
            leaves = [t.detach().requires_grad_(True) for t in qkv]
            with torch.enable_grad(), _ReplayRNG(ctx.gen, rng):
                out = _sdpa(*leaves, mask, *ctx.args)
        grads = _fused_node_grads(out, leaves, grad)
        if grads is None:
            grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        return (*grads, None, None, None, None, None, None)


_sdpa_fn = direct_apply(SDPAFn)


def _fused_node_grads(out: torch.Tensor, leaves, grad):
    """The gradients of ``leaves`` from calling ``out``'s backward node directly, when the
    recomputed forward is one fused node over the leaves (the usual case: flash / efficient /
    cuDNN attention). That is the node ``autograd.grad`` would run, without starting a nested
    engine pass for it (a per-layer host cost of a launch-bound step). None otherwise
    (e.g. the math path or a GQA repeat in between): the caller then uses ``autograd.grad``.
    """
    node = out.grad_fn
    if node is None:
        return None
    inputs = [getattr(fn, "variable", None) for fn, _ in node.next_functions]
    where = []
    for leaf in leaves:
        hits = [i for i, v in enumerate(inputs) if v is leaf]
        if len(hits) != 1:
            return None
        where.append(hits[0])
    grads = node(grad)
    grads = grads if isinstance(grads, tuple) else (grads,)
    picked = [grads[i] for i in where]
    # Inside a backward restricted to some inputs (autograd.grad(..., inputs) / backward
    # (inputs=...)), a node called outside the engine computes no output for edges the
    # running graph task does not need: all None here. autograd.grad then does it right.
    if any(g is None for g in picked):
        return None
    return picked


def _fallback(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def slimfit_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers attention function: same contract as its ``sdpa_attention_forward``."""
    cfg = module.__dict__.get(CONFIG_ATTR) or ATTENTION_CONFIG.get(module)
    needs_grad = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    )
    unsupported = (
        kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("output_attentions", False)
        or (attention_mask is not None and attention_mask.requires_grad)
    )
    if cfg is None or cfg.attention_bits is None or not needs_grad or unsupported:
        return _fallback(
            module, query, key, value, attention_mask,
            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
        )  # fmt: skip
    n_rep = int(getattr(module, "num_key_value_groups", 1) or 1)
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = _sdpa_fn(
        query, key, value, attention_mask, float(dropout), scaling, is_causal, n_rep, cfg
    )
    out = out.reshape(out.shape[0], -1, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register() -> str:
    """Register ``slimfit_sdpa`` with transformers' AttentionInterface (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, slimfit_sdpa_attention)
        try:  # else transformers builds no mask for this attention
            from transformers.masking_utils import AttentionMaskInterface
        except ImportError:  # pragma: no cover - transformers without mask interface
            pass
        else:
            AttentionMaskInterface.register(NAME, sdpa_mask_unread)
        _REGISTERED = True
    return NAME


def sdpa_mask_unread(*args, **kwargs):
    """The mask transformers builds for ``"sdpa"``, except that a given padding mask is
    never read back to decide whether to drop it.

    For ``"sdpa"`` transformers checks a bidirectional (BERT, ViT) padding mask on the host
    in every forward (``padding_mask.all()``) and drops it when nothing is padded. That read
    is a device synchronization per forward: the host cannot issue the next forward while
    the device runs the last backward, and a step whose forward is bound by the host (the
    converted ops' Python) pays it in full (``benchmarks/results/2026-12-06-mask-sync-h100``).
    Here a given mask is always built and used: a padded batch attends exactly as under
    ``"sdpa"`` (the same mask, bitwise the same output), without the read. An all-ones
    mask runs masked attention instead of being dropped, so unpadded batches should come
    without one: ``slimfit.train.without_full_mask`` drops it on the host, where the check
    is free, and slimfit's collates and ``SlimFitTrainer`` apply it. Causal masks keep
    transformers' own handling.
    """
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is not None:
        kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)
