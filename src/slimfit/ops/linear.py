"""Lean linear: a frozen weight saves no input; a trainable one saves its input
(optionally int8); under autocast the fp32 weight is saved instead of a low-precision copy
(``frozen_weight_copy`` says which frozen linears run as the plain op and keep the copy).
A trainable linear whose input is a lean LayerNorm's output keeps no input at all: it
shares the int8 code of the normalized rows that the norm keeps for its own backward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ._common import (
    TensorKeyed,
    autocast_dtype,
    direct_apply,
    is_normalized,
    load_packed,
    normalized_source,
    quantize_with,
    register_projection,
    save_packed,
)
from .config import CompressionConfig

_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default  # the overload: one Python hop less


class LinearFn(torch.autograd.Function):
    """``y = x @ W^T + b`` with ``W`` cast to ``cdtype`` inside (autocast's cast, redone in
    backward from the saved parameter, so no low-precision weight copy is kept).

    ``packed``: (codes, scales, meta) of the input when the weight trains and the input is
    kept quantized, else None (the input itself is kept when the weight trains).
    ``normed``: (codes, scales, meta, gain, bias) when the input is a LayerNorm's output
    ``y * gain + bias`` with ``y`` kept as int8 by that norm: the weight gradient is
    ``(g^T y) * gain + sum_rows(g) (x) bias``, from the norm's code (nothing kept here).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, cdtype, packed, normed=None):
        # Runs under the caller's autocast: F.linear casts x and the bias as plain autocast
        # does (bitwise the same output); only the weight is cast here, and not kept.
        w = weight if cdtype is None or weight.dtype == cdtype else weight.to(cdtype)
        out = F.linear(x, w, bias)
        base = out._base
        if base is not None and out.is_contiguous() and base.numel() == out.numel():
            # F.linear returns a view of its 2-D result; as a custom Function's output that
            # view could never be written in place (e.g. by an in-place activation)
            out = _UNSAFE_VIEW(base, out.shape)
        ctx.cdtype = w.dtype
        ctx.meta = None
        ctx.normed = None
        ctx.x_dtype = x.dtype
        if ctx.needs_input_grad[1]:
            if normed is not None:
                codes, scales, ctx.meta, gain, shift = normed
                ctx.normed = (gain is not None, shift is not None)
                affine = [t for t in (gain, shift) if t is not None]
                ctx.save_for_backward(weight, codes, scales, *affine)
            elif packed is not None:
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
        g2 = None
        # the weight gradient first: the input it dequantizes (a token x in_features tensor,
        # e.g. 302 MB for an FFN-out at bert-base QA sizes) is freed before the input
        # gradient, of the same size, is made
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1])
            if ctx.normed is not None:
                gw = _grad_weight_from_norm(g2, rest, ctx.meta, ctx.normed).to(weight.dtype)
            else:
                x = load_packed(rest, ctx.meta, ctx.x_dtype) if ctx.meta is not None else rest[0]
                gw = g2.t().mm(x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype)
                del x
            del rest
        if ctx.needs_input_grad[0]:
            w = weight if weight.dtype == ctx.cdtype else weight.to(ctx.cdtype)
            gx = grad.matmul(w)
        if ctx.needs_input_grad[2]:
            g2 = grad.reshape(-1, grad.shape[-1]) if g2 is None else g2
            gb = g2.sum(0)
        return gx, gw, gb, None, None, None


_linear = direct_apply(LinearFn)


def _grad_weight_from_norm(g2, saved, meta, has) -> torch.Tensor:
    """``g2^T (y * gain + bias)`` from the norm's int8 code of ``y`` (fp32 result)."""
    codes, scales, *affine = saved
    gain = affine.pop(0) if has[0] else None
    shift = affine.pop(0) if has[1] else None
    y = load_packed([codes, scales], meta, g2.dtype)
    gw = g2.t().mm(y).float()
    if gain is not None:
        gw.mul_(gain.float().reshape(1, -1))
    if shift is not None:
        gw.add_(torch.outer(g2.float().sum(0), shift.float().reshape(-1)))
    return gw


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
    trains = weight.requires_grad
    quant = trains and compress_input and cfg.linear_bits is not None
    copy = cfg.frozen_weight_copy
    # only a quantizing linear and attention_recompute use the norm's code: other frozen
    # linears (most of them, every step) skip the lookup
    normed = normalized_source(x) if quant or cfg.recompute_qkv else None
    if normed is not None and (normed[2].numel != x.numel() or normed[2].shape[-1] != x.shape[-1]):
        normed = None
    # a frozen linear that keeps autocast's weight copy is the plain op: no Python node
    # (a second registry lookup only where the first was not made or found dead codes)
    plain = not trains and (
        copy == "all" or (copy == "projections" and (normed is not None or is_normalized(x)))
    )
    projection = normed is not None and cfg.recompute_qkv
    if plain:
        # autocast's own casts, made here: a unit's frozen weight keeps its cast across steps
        # (frozen_cast), the bias comes from its model's one cast of all biases (bias_cast),
        # and attention's backward, which runs a projection again, finds the low-precision
        # weight the linear's node keeps anyway (no second cast there)
        together = _casts_together(bias)
        if projection or together or _keeps_cast(weight):
            cdtype = autocast_dtype(x.device.type)
            weight = frozen_cast(weight, cdtype)
            if together:
                bias = _grouped_cast(bias, cdtype)
            if projection:
                bias = _cast_to(bias, cdtype)
        out = F.linear(x, weight, bias)
    else:
        out = _lean_linear(x, weight, bias, cfg, quant, normed)
    if projection:
        register_projection(out, normed, weight, bias, x.dtype)
    return out


# Set (True) on the weights whose frozen casts are kept (registered by slimfit.attach).
CAST_ATTR = "_slimfit_keep_cast"
# weight -> (its data pointer, its cast); kept here, not on the parameter, so that copies
# and pickles of a model (copy.deepcopy, torch.save(model)) do not carry the casts along
_FROZEN_CASTS = TensorKeyed()
_compiling = torch.compiler.is_compiling


def keep_frozen_casts(params) -> None:
    """Let these parameters keep their low-precision cast across steps while frozen.

    Under autocast every frozen linear casts its fp32 weight again at every step (a launch
    and an allocation each, ~70 a step on bert-base, in a step bound by the host issuing
    them), and with ``frozen_weight_copy="all"`` keeps that cast until its backward anyway.
    A registered weight keeps the cast while it stays frozen and unchanged instead: the
    same tensor is handed to the linear at the next step. The cast is made again whenever
    the weight's version counter or storage moved (``load_state_dict``, ``.to()``, in-place
    edits) or the weight trained: whoever registers weights calls ``forget_frozen_casts``
    for those an optimizer step updates, as ``slimfit.attach`` does before every step
    (fused optimizers change a weight without moving its version counter). Edits through
    ``.data`` hide from the version counter too: call ``forget_frozen_casts`` after them."""
    for p in params:
        p.__dict__[CAST_ATTR] = True


def forget_frozen_casts(params, unregister: bool = False) -> None:
    """Drop the kept casts of ``params`` (and, with ``unregister``, stop keeping them)."""
    for p in params:
        _FROZEN_CASTS.drop(p)
        if unregister:
            p.__dict__.pop(CAST_ATTR, None)


def _keeps_cast(weight: torch.Tensor) -> bool:
    # not while torch.compile traces: it folds the casts itself, and does not trace the table
    return not _compiling() and CAST_ATTR in weight.__dict__


def frozen_cast(weight: torch.Tensor, cdtype: torch.dtype | None) -> torch.Tensor:
    """``weight`` as autocast hands it to a matmul (the same cast), kept across steps for
    a registered frozen weight (:func:`keep_frozen_casts`)."""
    if cdtype is None or weight.requires_grad or not _keeps_cast(weight):
        return _cast_to(weight, cdtype)
    hit = _kept(_FROZEN_CASTS, weight, cdtype)
    if hit is not None:
        return hit
    cast = _cast_to(weight, cdtype)
    if cast is not weight:
        _FROZEN_CASTS.put(weight, (weight.data_ptr(), cast))
    return cast


def _kept(table: TensorKeyed, t: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor | None:
    """The ``cdtype`` cast of ``t`` kept in ``table`` (as ``(data pointer, cast)``), or
    None once ``t`` changed: its version counter or its storage moved."""
    hit = table.get(t)
    if hit is not None and hit[0] == t.data_ptr() and hit[1].dtype == cdtype:
        return hit[1]
    return None


class _BiasCasts(torch.autograd.Function):
    """Autocast's casts of many biases as one node: ``b.to(cdtype)`` for each, and in
    backward each gradient cast back to its bias's dtype (what autocast's cast nodes do
    one by one: the same values, bit for bit). A bias whose cast no op used gets None,
    as it would without the cast: an optimizer then skips it."""

    @staticmethod
    def forward(ctx, cdtype, *biases):
        ctx.set_materialize_grads(False)
        ctx.dtype = biases[0].dtype
        flat = torch.cat([b.reshape(-1) for b in biases]).to(cdtype)
        casts = [c.view(b.shape) for c, b in zip(flat.split([b.numel() for b in biases]), biases)]
        # a frozen bias's cast does not require grad, as autocast's cast would not
        ctx.mark_non_differentiable(*(c for c, b in zip(casts, biases) if not b.requires_grad))
        return tuple(casts)

    @staticmethod
    def backward(ctx, *grads):
        used = [g for g in grads if g is not None]
        if not used:
            return (None,) * (len(grads) + 1)
        flat = torch.cat([g.reshape(-1) for g in used]).to(ctx.dtype)
        back = iter(flat.split([g.numel() for g in used]))
        return (None, *(None if g is None else next(back).view(g.shape) for g in grads))


_cast_biases = direct_apply(_BiasCasts)

# bias -> the biases cast with it (weak references); registered by slimfit.attach
_BIAS_GROUPS = TensorKeyed(versioned=False)
# bias -> (its data pointer, its cast in the current forward)
_BIAS_CASTS = TensorKeyed()


def cast_biases_together(biases) -> None:
    """Cast these biases (a model's linear biases) for autocast all at once, in one node.

    Biases are not units: they train at every step, so under autocast every linear casts
    its bias at every forward and its backward casts the bias gradient back, two ops and
    an autograd node per linear (~70 of each a step on bert-base, in a step bound by the
    host issuing them). A registered bias is cast, at its first use in a forward, together
    with the others of its device and dtype: two kernels and one node for all of them.
    The casts serve until ``forget_bias_casts`` (call it at every forward's start and
    before every optimizer step, as ``slimfit.attach`` does) or until a bias changes in
    a way its version counter or data pointer shows."""
    groups: dict = {}
    for b in biases:
        groups.setdefault((b.device, b.dtype), []).append(b)
    for group in groups.values():
        refs = tuple(weakref.ref(b) for b in group)
        for b in group:
            _BIAS_GROUPS.put(b, refs)


def forget_bias_casts(biases=None) -> None:
    """Drop the current casts (of all biases), and with ``biases`` stop casting those
    together."""
    _BIAS_CASTS.clear()
    for b in biases or ():
        _BIAS_GROUPS.drop(b)


def _casts_together(bias: torch.Tensor | None) -> bool:
    # not while torch.compile traces: it casts by itself, and does not trace the tables
    return bias is not None and not _compiling() and bias in _BIAS_GROUPS


def bias_cast(bias: torch.Tensor | None, cdtype: torch.dtype | None) -> torch.Tensor | None:
    """``bias`` cast as its model's one cast of all its biases made it (at the first call
    in a forward), or ``bias`` itself where it is not registered (autocast casts it)."""
    return _grouped_cast(bias, cdtype) if _casts_together(bias) else bias


def _grouped_cast(bias: torch.Tensor, cdtype: torch.dtype | None) -> torch.Tensor:
    # bias_cast for a bias known to be registered (lean_linear has looked already)
    if cdtype is None or bias.dtype == cdtype:
        return bias
    hit = _kept(_BIAS_CASTS, bias, cdtype)
    if hit is not None and hit.requires_grad == bias.requires_grad:
        return hit
    if torch._C._are_functorch_transforms_active():
        return bias
    group = [b for b in (r() for r in _BIAS_GROUPS.get(bias)) if b is not None]
    mine = bias
    for b, cast in zip(group, _cast_biases(cdtype, *group)):
        _BIAS_CASTS.put(b, (b.data_ptr(), cast))
        if b is bias:
            mine = cast
    return mine


def _cast_to(t: torch.Tensor | None, cdtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` as autocast (dtype ``cdtype``, None: off) hands it to a matmul: the same cast."""
    if t is None or cdtype is None or t.dtype == cdtype or not t.is_floating_point():
        return t
    return t.to(cdtype)


def _lean_linear(x, weight, bias, cfg: CompressionConfig, quant: bool, normed):
    cdtype = autocast_dtype("cuda" if x.is_cuda else x.device.type)
    if cdtype is None and not quant:
        # Plain autograd already keeps no input for a frozen weight and only the input for
        # a trainable one: nothing to gain from a custom function.
        return F.linear(x, weight, bias)
    packed = None
    if quant and normed is None:
        packed = quantize_with(cfg, x, cfg.linear_bits, cfg.linear_step, cached=True)
    bias = bias_cast(bias, cdtype)
    return _linear(x, weight, bias, cdtype, packed, normed if quant else None)
