"""Launching the Triton kernels with less host work per launch.

``kernel[grid](*args)`` goes through ``JITFunction.run`` on every call: it binds and
specializes every argument, builds the compile-cache key, looks the compiled kernel up,
and (Triton 3.6) builds launch metadata for its launch hooks whether or not any is set.
That is ~50-100 us of host time a launch on the device machine, and a converted bert-base
step issues ~150 launches: in a step bound by the host, a large share of it.

:func:`launch` keeps, per kernel and per argument *specialization* (each tensor's dtype
and 16-byte alignment; each int's ``== 1``, ``% 16 == 0`` and 32-bit range; every other
argument's value), the compiled kernel that ``JITFunction.run`` picked the first time, and
then calls its launcher directly with the same arguments. The key is at least as fine as
Triton's own (it specializes on exactly these properties), so the kernel is the one
``run`` would pick. The launcher's calling convention is internal to Triton: the direct
path is taken only on the versions it was checked on (:data:`CHECKED`), only while no
launch hook is installed (e.g. Triton's profiler) and never with
``SLIMFIT_TRITON_LAUNCH=standard``; otherwise every launch is ``kernel[grid](...)``.
"""

from __future__ import annotations

import os

import torch

CHECKED = ((3, 6),)  # Triton (major, minor) versions the direct launch was checked on

_DIRECT: bool | None = None
_RUNTIME = None  # triton.knobs.runtime, where the launch hooks live
_LAUNCHERS: dict = {}  # (kernel, device, specialization) -> (run, function, metadata, names)
_INT32 = 2**31


def _direct_ok() -> bool:
    global _DIRECT, _RUNTIME
    if _DIRECT is None:
        import triton
        from triton import knobs

        _RUNTIME = knobs.runtime

        try:
            version = tuple(int(p) for p in triton.__version__.split(".")[:2])
        except ValueError:  # pragma: no cover - a local build's version string
            version = None
        _DIRECT = (
            version in CHECKED
            and os.environ.get("SLIMFIT_TRITON_LAUNCH") != "standard"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")  # no launcher there
        )
    return _DIRECT


def _hooks_installed() -> bool:
    # a HookChain (3.6) is installed when it holds a call; a plain callable always is
    enter, exit_ = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    return bool(
        (enter is not None and getattr(enter, "calls", True))
        or (exit_ is not None and getattr(exit_, "calls", True))
    )


def _spec(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if type(a) is int:
        return int, a == 1, a % 16 == 0, -_INT32 <= a < _INT32
    if type(a) is float:
        return float
    return type(a), a


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def _device() -> int:
    return torch._C._cuda_getDevice()  # what Triton's driver keys its kernel cache on


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)  # what Triton's driver launches on


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; the first argument must be a tensor."""
    if not _direct_ok() or not _on_cuda(args[0]):
        kernel[grid](*args, **kwargs)
        return
    device = _device()
    # id(kernel): a JITFunction hashes its source's hash under a lock on every call;
    # kernels are module globals, so an id is never reused while its entry lives
    key = (id(kernel), device, tuple(map(_spec, args)), tuple(kwargs.items()))
    hit = _LAUNCHERS.get(key)
    if hit is None or _hooks_installed():
        compiled = kernel[grid](*args, **kwargs)
        if hit is None and compiled is not None:
            names = tuple(kernel.arg_names[len(args) :])  # the rest, passed by keyword
            _LAUNCHERS[key] = (compiled.run, compiled.function, compiled.packed_metadata, names)
        return
    run, function, metadata, names = hit
    stream = _stream(device)
    gy = grid[1] if len(grid) > 1 else 1
    gz = grid[2] if len(grid) > 2 else 1
    # the launcher takes every parameter in order (constexprs included, it skips them)
    run(grid[0], gy, gz, stream, function, metadata, None, None, None,
        *args, *[kwargs[n] for n in names])  # fmt: skip


def direct_launches() -> int:
    """How many (kernel, specialization) entries take the direct path (for checks)."""
    return len(_LAUNCHERS)
