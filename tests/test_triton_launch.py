"""The cached direct Triton launch (``slimfit.ops.triton_launch``), without a GPU: a stand-in
kernel records what ``JITFunction.run`` and the compiled launcher would receive."""

from __future__ import annotations

import pytest
import torch

from slimfit.ops import triton_launch as tl


class FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn-handle", "meta"

    def run(self, *args):
        self.log.append(("direct", args))


class FakeKernel:
    """``kernel[grid](*args, **kwargs)`` as Triton's: compiles once per call, returns the
    compiled kernel; parameters ``x, out, n, BLOCK`` (BLOCK a constexpr)."""

    arg_names = ["x", "out", "n", "BLOCK"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("standard", grid, args, kwargs))
            return FakeCompiled(self.log)

        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(tl, "_LAUNCHERS", {})
    monkeypatch.setattr(tl, "_direct_ok", lambda: True)
    monkeypatch.setattr(tl, "_on_cuda", lambda t: True)
    monkeypatch.setattr(tl, "_device", lambda: 0)
    monkeypatch.setattr(tl, "_stream", lambda device: 77)
    monkeypatch.setattr(tl, "_hooks_installed", lambda: False)


def test_first_launch_is_standard_then_direct_with_every_parameter_in_order(direct):
    k = FakeKernel()
    x, out = torch.zeros(64), torch.zeros(64)
    tl.launch(k, (4,), x, out, 64, BLOCK=16, num_warps=4)
    tl.launch(k, (5, 2), x, out, 64, BLOCK=16, num_warps=4)
    assert [e[0] for e in k.log] == ["standard", "direct"]
    assert k.log[0][1:] == ((4,), (x, out, 64), {"BLOCK": 16, "num_warps": 4})
    _, args = k.log[1]
    # grid, stream, function, metadata, no launch metadata or hooks, then x, out, n, BLOCK
    assert args[:9] == (5, 2, 1, 77, "fn-handle", "meta", None, None, None)
    assert args[9:] == (x, out, 64, 16)
    assert tl.direct_launches() == 1


class CudaLauncher:
    """Stands in for Triton 3.6's launcher: ``__call__`` allocates scratch, then calls the
    compiled C ``launch`` with the grid, stream, function, cooperative-grid and PDL flags,
    the two scratch buffers, the metadata, launch metadata, the hooks and the arguments."""

    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, log, scratch):
        self.log, self.global_scratch_size, self.profile_scratch_size = log, scratch, 0

    def launch(self, *args):
        self.log.append(("c", args))

    def __call__(self, gx, gy, gz, stream, function, *args):
        self.log.append(("launcher", (gx, gy, gz, stream, function, *args)))


@pytest.mark.parametrize("scratch", [0, 128])
def test_direct_launch_calls_the_c_launcher_unless_the_kernel_needs_scratch(direct, scratch):
    launcher = CudaLauncher([], scratch)
    compiled = type("Compiled", (), {"run": launcher, "function": "fn", "packed_metadata": "meta"})

    class Kernel(FakeKernel):  # compiles to the launcher above
        def __getitem__(self, grid):
            return lambda *a, **kw: (self.log.append(("standard", grid)), compiled)[1]

    k = Kernel()
    launcher.log = k.log
    x, out = torch.zeros(64), torch.zeros(64)
    tl.launch(k, (4,), x, out, 64, BLOCK=16)
    tl.launch(k, (3,), x, out, 64, BLOCK=16)
    kind, args = k.log[-1]
    if scratch:  # the launcher allocates the scratch: it is called as Triton calls it
        assert kind == "launcher"
        assert args == (3, 1, 1, 77, "fn", "meta", None, None, None, x, out, 64, 16)
    else:
        assert kind == "c"
        assert args == (3, 1, 1, 77, "fn", False, True, None, None, "meta", None, None, None,
                        x, out, 64, 16)  # fmt: skip


def test_a_new_specialization_goes_through_triton_again(direct):
    """Whatever Triton specializes on (a tensor's dtype or 16-byte alignment, an int's
    == 1 / % 16 / 32-bit range, a constexpr's or option's value) misses the cache."""
    k = FakeKernel()
    x, out = torch.zeros(64), torch.zeros(64)
    calls = [
        ((x, out, 64), {"BLOCK": 16}),
        ((x, out, 80), {"BLOCK": 16}),  # 80 % 16 == 0 as 64: same kernel
        ((x, out, 65), {"BLOCK": 16}),  # not a multiple of 16
        ((x, out, 1), {"BLOCK": 16}),  # == 1
        ((x, out, 2**31 + 16), {"BLOCK": 16}),  # 64-bit
        ((x.double(), out, 64), {"BLOCK": 16}),  # dtype
        ((x[1:], out, 64), {"BLOCK": 16}),  # alignment (4 bytes in)
        ((x, out, 64), {"BLOCK": 32}),  # constexpr value
    ]
    for args, kwargs in calls:
        tl.launch(k, (1,), *args, **kwargs)
    assert [e[0] for e in k.log] == ["standard", "direct"] + ["standard"] * 6


def test_standard_launch_where_direct_does_not_apply(monkeypatch, direct):
    k = FakeKernel()
    x = torch.zeros(64)
    monkeypatch.setattr(tl, "_hooks_installed", lambda: True)  # e.g. Triton's profiler
    for _ in range(2):
        tl.launch(k, (1,), x, x, 64, BLOCK=16)
    monkeypatch.setattr(tl, "_hooks_installed", lambda: False)
    monkeypatch.setattr(tl, "_on_cuda", lambda t: False)
    tl.launch(k, (1,), x, x, 64, BLOCK=16)
    assert [e[0] for e in k.log] == ["standard"] * 3


def test_direct_path_only_on_checked_triton_versions(monkeypatch):
    triton = pytest.importorskip("triton")
    for version, env, expect in (("3.6.0", None, True), ("3.6.1", "standard", False),
                                 ("3.7.0", None, False), ("3.5.1", None, False)):  # fmt: skip
        monkeypatch.setattr(tl, "_DIRECT", None)
        monkeypatch.setattr(triton, "__version__", version)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        if env is None:
            monkeypatch.delenv("SLIMFIT_TRITON_LAUNCH", raising=False)
        else:
            monkeypatch.setenv("SLIMFIT_TRITON_LAUNCH", env)
        assert tl._direct_ok() is expect, version
    monkeypatch.setattr(tl, "_DIRECT", None)
