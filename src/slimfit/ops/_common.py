"""Helpers shared by the lean ops: autocast state, cached quantization of shared inputs."""

from __future__ import annotations

import contextlib
import weakref

import torch

from .config import CompressionConfig
from .quant import QMeta, dequantize, quantize


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False where autocast does not exist
    (e.g. the meta device, used by shape-only simulations)."""
    if device_type == "meta":
        return False
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):  # pragma: no cover - exotic device types
        return False


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off."""
    if not autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) to re-enter the same autocast state later (e.g. in backward)."""
    enabled = autocast_enabled(device_type)
    return enabled, (torch.get_autocast_dtype(device_type) if enabled else None)


def autocast_ctx(device_type: str, enabled: bool, dtype: torch.dtype | None = None):
    """``torch.autocast(device_type, dtype, enabled)`` for a state a forward already ran
    under (what backward re-enters); a null context where autocast does not exist and
    nothing is to be enabled (meta)."""
    if not enabled and device_type == "meta":
        return contextlib.nullcontext()
    if torch._C._is_torch_function_mode_enabled():  # export / tracing must see the region
        if dtype is None:
            return torch.autocast(device_type, enabled=enabled)
        return torch.autocast(device_type, dtype=dtype, enabled=enabled)
    return _Reenter(device_type, enabled, dtype)


class _Reenter:
    """``torch.autocast``'s enter and exit without its constructor, which re-validates the
    device and dtype (on CUDA it asks whether bf16 is supported) on every call: ~50 us of
    host time on the device machine, once a layer in a launch-bound backward. The state
    comes from a forward that ran under a valid autocast, so there is nothing to check.
    Enter and exit are torch.autocast's: the nesting count, and the cast cache dropped when
    the outermost region exits (a weight updated in place is cast again next time)."""

    __slots__ = ("device", "enabled", "dtype", "prev")

    def __init__(self, device: str, enabled: bool, dtype: torch.dtype | None):
        self.device, self.enabled, self.dtype = device, enabled, dtype

    def __enter__(self):
        d = self.device
        self.prev = (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
        torch.set_autocast_enabled(d, self.enabled)
        if self.dtype is not None:
            torch.set_autocast_dtype(d, self.dtype)
        torch.autocast_increment_nesting()
        return self

    def __exit__(self, *exc):
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(self.device, self.prev[0])
        torch.set_autocast_dtype(self.device, self.prev[1])
        return False


def direct_apply(fn_cls: type[torch.autograd.Function]):
    """``fn_cls.apply`` minus the per-call work of its Python wrapper.

    ``Function.apply`` is a Python classmethod that, before reaching the C++ ``apply``,
    looks for a ``setup_context`` and unwraps functorch's dead wrappers from every argument
    (a generator over the arguments). That costs ~15 us a call on the CPU proxy, ~150 calls a
    step: a launch-bound step pays it directly. Under functorch transforms (vmap, grad)
    and torch.compile the wrapper is needed and still runs."""
    fast = super(torch.autograd.Function, fn_cls).apply  # the C++ apply, bound to fn_cls
    slow = fn_cls.apply
    transforms_active = torch._C._are_functorch_transforms_active
    compiling = torch.compiler.is_compiling

    def apply(*args):
        if transforms_active() or compiling():
            return slow(*args)
        return fast(*args)

    return apply


class TensorKeyed:
    """Values keyed by a live tensor: an entry dies with its tensor, and (``versioned``)
    is not returned once the tensor has been modified in place (its version moved)."""

    def __init__(self, versioned: bool = True):
        self._entries: dict[int, tuple] = {}
        self._versioned = versioned

    def put(self, t: torch.Tensor, value) -> None:
        key, entries = id(t), self._entries
        try:
            ref = weakref.ref(t, lambda _ref: entries.pop(key, None))
        except TypeError:  # pragma: no cover - tensors always take weak references
            return
        entries[key] = (ref, t._version, value)

    def get(self, t: torch.Tensor):
        hit = self._entries.get(id(t))
        if hit is None or hit[0]() is not t or (self._versioned and hit[1] != t._version):
            return None
        return hit[2]

    def __contains__(self, t) -> bool:
        hit = self._entries.get(id(t))
        return hit is not None and hit[0]() is t

    def clear(self) -> None:
        self._entries.clear()

    def drop(self, t: torch.Tensor) -> None:
        if t in self:
            del self._entries[id(t)]


# Inputs shared by several ops (the LayerNorm output read by Q, K and V) are quantized
# once: entries live as long as the input tensor does and die with it.
_QCACHE = TensorKeyed()


def quantize_cached(
    x: torch.Tensor, bits: int, mode: str, step: float, block: int
) -> tuple[torch.Tensor, torch.Tensor | None, QMeta]:
    spec = (bits, mode, step, block)
    hit = _QCACHE.get(x)
    if hit is not None and hit[0] == spec:
        return hit[1]
    packed = quantize(x, bits, mode, step, block)
    _QCACHE.put(x, (spec, packed))
    return packed


# A LayerNorm's output ``out = y * gain + bias`` whose int8 code of ``y`` the norm keeps for
# its own backward: a trainable linear reading ``out`` takes its weight gradient from that
# code (``g^T out = (g^T y) * gain + sum(g) (x) bias``) instead of keeping a second copy.
_NORMED = TensorKeyed()


def register_normalized(out: torch.Tensor, codes, scales, meta: QMeta, gain, bias) -> None:
    """Record that ``out`` is ``dequantize(codes, scales) * gain + bias`` (rows of ``meta``)."""
    # weak: a caller that keeps ``out`` (e.g. output_hidden_states) must not keep the
    # codes alive after the norm's backward has released them
    _NORMED.put(out, (weakref.ref(codes), weakref.ref(scales), meta, gain, bias))


def normalized_source(x: torch.Tensor):
    """``(codes, scales, meta, gain, bias)`` when ``x`` is a registered norm output that has
    not changed since and whose codes are still alive, else None."""
    hit = _NORMED.get(x)
    if hit is None:
        return None
    codes, scales = hit[0](), hit[1]()
    if codes is None or scales is None:
        return None
    return (codes, scales, *hit[2:])


def is_normalized(x: torch.Tensor) -> bool:
    """Whether ``x`` is a registered, unchanged norm output, whether or not its codes are
    still alive (under non-reentrant activation checkpointing they are not, in the first
    forward; the same decision must be taken when the block is recomputed)."""
    return _NORMED.get(x) is not None


# A linear's output ``F.linear(norm_out, weight, bias)`` whose input is a registered norm
# output: attention (``attention_recompute``) can rebuild Q, K, V from the norm's code.
_PROJECTED = TensorKeyed()


def register_projection(out: torch.Tensor, normed: tuple, weight, bias, x_dtype) -> None:
    """Record ``out = F.linear(norm_out.to(x_dtype), weight, bias)`` under its storage's
    root tensor (views of it, e.g. the heads of Q, find it through ``._base``)."""
    root = out if out._base is None else out._base
    if root.is_contiguous() and root.numel() == out.numel():
        _PROJECTED.put(root, (normed, weight, bias, x_dtype, out.shape))


def projection_source(t: torch.Tensor):
    """``(normed, weight, bias, x_dtype, out_shape)`` when ``t`` is a view of a registered,
    unchanged projection, else None."""
    return _PROJECTED.get(t if t._base is None else t._base)


def quantize_with(cfg: CompressionConfig, x: torch.Tensor, bits: int, step: float, cached=False):
    fn = quantize_cached if cached else quantize
    return fn(x, bits, cfg.scale, step, cfg.block_size)


def save_packed(packed) -> tuple[list[torch.Tensor], QMeta]:
    codes, scales, meta = packed
    return ([codes] if scales is None else [codes, scales]), meta


def load_packed(tensors, meta: QMeta, dtype=None) -> torch.Tensor:
    codes = tensors[0]
    scales = tensors[1] if len(tensors) > 1 else None
    return dequantize(codes, scales, meta, dtype)
