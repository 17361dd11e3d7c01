"""Launching the Triton kernels with less host work per launch.

``kernel[grid](*args)`` goes through ``JITFunction.run`` on every call: it binds and
specializes every argument, builds the compile-cache key, looks the compiled kernel up,
and (Triton 3.6) builds launch metadata for its launch hooks whether or not any is set.
That is ~50-100 us of host time a launch on the device machine, and a converted bert-base
step issues ~150 launches: in a step bound by the host, a large share of it.

:func:`launch` keeps, per kernel and per argument *specialization* (each tensor's dtype
and 16-byte alignment; each int's ``== 1``, ``% 16 == 0`` and 32-bit range; every other
argument's value), the compiled kernel that ``JITFunction.run`` picked the first time, and
then calls its launcher directly with the same arguments (the launcher's compiled C
function itself where the kernel needs no scratch memory). The key is at least as fine as
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
_LAUNCHERS: dict = {}  # (kernel, device, specialization) -> (launch, fixed args, names)
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


def _key(args) -> tuple:
    """What Triton specializes on, per argument: a tensor's dtype and 16-byte alignment; an
    int's ``== 1``, ``% 16 == 0`` and 32-bit range; every other argument's value. One loop
    (no call per argument: ~10 arguments a launch, ~150 launches a step)."""
    key = []
    for a in args:
        t = type(a)
        if t is int:
            key.append((a == 1, a % 16 == 0, -_INT32 <= a < _INT32))
        elif t is float:
            key.append(float)
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            key.append((t, a))
    return tuple(key)


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def _device() -> int:
    return torch._C._cuda_getDevice()  # what Triton's driver keys its kernel cache on


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)  # what Triton's driver launches on


def _entry(compiled, names: tuple) -> tuple:
    """(C launch function, its fixed leading arguments, names of the keyword parameters).

    Triton's ``CudaLauncher.__call__`` allocates the kernel's global and profile scratch
    (when it has any) and then calls the compiled C ``launch``; for a kernel without
    scratch the C function is called directly (one Python frame less a launch)."""
    run = compiled.run
    c_launch = getattr(run, "launch", None)
    if (
        type(run).__name__ == "CudaLauncher"
        and c_launch is not None
        and not getattr(run, "global_scratch_size", 1)
        and not getattr(run, "profile_scratch_size", 1)
    ):
        # grid and stream come first; then the function, cooperative grid, PDL, no
        # scratch, the metadata, no launch metadata and no hooks
        fixed = (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                 compiled.packed_metadata, None, None, None)  # fmt: skip
        return c_launch, fixed, names
    # the launcher's own entry: function, metadata, no launch metadata, no hooks
    return run, (compiled.function, compiled.packed_metadata, None, None, None), names


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; the first argument must be a tensor."""
    if not _direct_ok() or not _on_cuda(args[0]):
        kernel[grid](*args, **kwargs)
        return
    device = _device()
    # id(kernel): a JITFunction hashes its source's hash under a lock on every call;
    # kernels are module globals, so an id is never reused while its entry lives
    key = (id(kernel), device, _key(args), *kwargs.items())
    hit = _LAUNCHERS.get(key)
    if hit is None or _hooks_installed():
        compiled = kernel[grid](*args, **kwargs)
        if hit is None and compiled is not None:
            names = tuple(kernel.arg_names[len(args) :])  # the rest, passed by keyword
            _LAUNCHERS[key] = _entry(compiled, names)
        return
    run, fixed, names = hit
    gy = grid[1] if len(grid) > 1 else 1
    gz = grid[2] if len(grid) > 2 else 1
    # every parameter in order (constexprs included, the launcher skips them)
    run(grid[0], gy, gz, _stream(device), *fixed, *args, *[kwargs[n] for n in names])


def direct_launches() -> int:
    """How many (kernel, specialization) entries take the direct path (for checks)."""
    return len(_LAUNCHERS)
