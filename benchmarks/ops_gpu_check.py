"""GPU check of slimfit's memory-lean ops (issue 3): correctness, kernel speed, model memory/time.

One script, every check isolated (a failing check is recorded with its error and the script
goes on). On CUDA:

1. kernels: every Triton kernel (quantize/dequantize fixed and per-block, int8/int4, clipped;
   fused activation backward; fused norm quantize and backward; dropout) against the
   pure-PyTorch path (codes and scales bitwise; derivatives to fp32 rounding) and against a
   float64 reference, on fresh random inputs, with output memory poisoned (NaN bytes) first;
2. ops: every lean op under bf16 autocast on CUDA: forward bitwise equal to the original
   (F.linear, LayerNorm, RMSNorm, GELU/SiLU, transformers' SDPA attention with masks,
   causal, GQA; dropout's mask replay), gradients against float64 references; a converted
   tiny BERT (same logits, gradients close) and its saved bytes per layer vs the formula;
3. speed: quantize/dequantize/fused-backward kernels vs a device-to-device copy's bandwidth
   (and the PyTorch path);
4. models: bert-base (BertConfig(), random init) seq-cls, seq 128, bf16 autocast, AdamW:
   peak memory and median step time of full fine-tuning, activation checkpointing, 95% of
   units frozen with and without conversion ("default" and "paper"), converted full
   fine-tuning, and slimfit.attach (ILS 0.95, compression "default"), at each batch size.

Run from the repository root (about 3-6 minutes on one H100):

    PYTHONPATH=src python benchmarks/ops_gpu_check.py            # all, batches 32 and 128
    PYTHONPATH=src python benchmarks/ops_gpu_check.py --batches 128 --steps 10
    PYTHONPATH=src python benchmarks/ops_gpu_check.py --task qa --seq 384 --batches 128 \
        --skip kernels,ops,speed                                    # the QA workload
    PYTHONPATH=src python benchmarks/ops_gpu_check.py --smoke     # tiny, CPU works too

Prints a short table per section and writes ops_gpu_check.json (and .md) into $OUT (or
--out) after every section, so a timeout still leaves the sections done so far.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

GiB = 1024**3
RESULTS: dict = {"env": {}, "checks": [], "kernels": [], "models": [], "notes": []}
ARGS = None


# -- bookkeeping -----------------------------------------------------------------------------------
def out_dir() -> Path | None:
    d = ARGS.out or os.environ.get("OUT")
    return Path(d) if d else None


def save() -> None:
    d = out_dir()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / "ops_gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        (d / "ops_gpu_check.md").write_text(markdown())
    except Exception as err:  # never abort on a write error
        print(f"[warn] could not write results: {err}")


def record_check(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        detail = fn()
        entry = {"name": name, "ok": True, "detail": detail}
    except Exception as err:
        tb = traceback.format_exc(limit=6)
        entry = {
            "name": name,
            "ok": False,
            "error": f"{type(err).__name__}: {err}"[:600],
            "trace": tb[-2500:],
        }
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    RESULTS["checks"].append(entry)
    status = "ok  " if entry["ok"] else "FAIL"
    info = entry.get("detail") if entry["ok"] else entry["error"]
    print(f"  [{status}] {name}: {_short(info)}", flush=True)


def _short(info, n=150) -> str:
    s = (
        ""
        if info is None
        else (json.dumps(info, default=str) if not isinstance(info, str) else info)
    )
    return s if len(s) <= n else s[: n - 3] + "..."


@contextlib.contextmanager
def backend(name: str):
    old = os.environ.get("SLIMFIT_BACKEND")
    os.environ["SLIMFIT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SLIMFIT_BACKEND", None)
        else:
            os.environ["SLIMFIT_BACKEND"] = old


def poison(device) -> None:
    """Fill free cached memory with 0xFF bytes (NaN for fp16/bf16/fp32) so that an output
    element a kernel forgets to write shows up as NaN (or -1 for int8)."""
    if device.type != "cuda":
        return
    try:
        free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        n = max(64 * 1024**2, min(int(free), 2 * GiB))
        t = torch.empty(n, dtype=torch.uint8, device=device).fill_(0xFF)
        del t
    except RuntimeError:
        pass


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def triton_usable(device) -> bool:
    from slimfit.ops import quant

    if not quant.triton_available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 1. kernels vs PyTorch path vs float64 ------------------------------------------------------------
def kernel_checks(device) -> None:
    from slimfit.ops import quant
    from slimfit.ops.activation import derivative, grad_from_codes

    have_triton = triton_usable(device)
    RESULTS["env"]["triton_kernels"] = have_triton
    if not have_triton:
        RESULTS["notes"].append(
            "Triton kernels not usable here (no triton, or CPU without TRITON_INTERPRET=1): kernel checks skipped"
        )
        print("  Triton kernels not usable here: kernel checks skipped")
        return

    shapes = [(4097,), (7, 50), (128, 768), ("qkv", (2, 128, 12, 64))]
    act_shape, norm_hs, norm_rows = (64, 3072), (768, 1000, 4096), (4, 128)
    if ARGS.smoke:
        shapes = [(4097,), (7, 50), ("qkv", (2, 16, 4, 64))]
        act_shape, norm_hs, norm_rows = (8, 384), (96, 50), (2, 16)
    specs = [(4, "fixed", 0.5, 64, None), (8, "fixed", 1 / 16, 64, None), (8, "block", 1.0, 64, None),
             (4, "block", 1.0, 64, 3.0), (8, "block", 1.0, 32, None), (4, "block", 1.0, 128, None)]  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in shapes:
            for bits, mode, step, block, clip in specs:
                name = f"quant {bits}b {mode}{block if mode == 'block' else step} clip={clip} {dtype} {shape}"

                def run(
                    shape=shape,
                    bits=bits,
                    mode=mode,
                    step=step,
                    block=block,
                    clip=clip,
                    dtype=dtype,
                ):
                    # a stable seed per case (Python's hash() of a str changes per process)
                    torch.manual_seed(zlib.crc32(repr((shape, bits, mode, block)).encode()))
                    if shape[0] == "qkv":
                        x = (torch.randn(shape[1], device=device) * 3).to(dtype).transpose(1, 2)
                    else:
                        x = (torch.randn(shape, device=device) * 3).to(dtype)
                    with backend("torch"):
                        c, s, m = quant.quantize(x, bits, mode, step, block, clip)
                        d = quant.dequantize(c, s, m, torch.float32)
                    with backend("triton"):
                        poison(device)
                        c2, s2, m2 = quant.quantize(x, bits, mode, step, block, clip)
                        poison(device)
                        d2 = quant.dequantize(c2, s2, m2, torch.float32)
                        poison(device)
                        d2x = quant.dequantize(c2, s2, m2)  # original dtype
                    require(torch.equal(c, c2), f"codes differ at {int((c != c2).sum())} bytes")
                    require(s is None or torch.equal(s, s2), "scales differ")
                    require(torch.equal(d, d2), "dequantized values differ")
                    if device.type == "cuda":
                        require(
                            d2x.dtype == x.dtype and torch.equal(d2x, d.to(x.dtype)),
                            "dequant in dtype differs",
                        )
                    else:  # the CPU interpreter rounds fp32 -> bf16 toward zero: 1 ulp
                        require(
                            torch.allclose(d2x.float(), d, rtol=2**-7, atol=0),
                            "dequant in dtype differs",
                        )
                    require(not torch.isnan(d2).any(), "NaN in output (unwritten memory)")
                    # float64 reference of the formula
                    x64 = x.double()
                    if mode == "fixed":
                        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                        ref = torch.floor(x64 / step + 0.5).clamp(lo, hi) * step
                        err = (d2.double() - ref).abs().max().item()
                        require(err <= 1e-6 * step, f"fixed-point error {err}")
                    else:
                        flat = x64.permute(*m.perm).reshape(-1) if m.perm else x64.reshape(-1)
                        nb = math.ceil(flat.numel() / block)
                        blocks = F.pad(flat, (0, nb * block - flat.numel())).view(nb, block)
                        cap = blocks.abs().amax(1).clamp_max(clip if clip else math.inf)
                        exp_scale = cap / (2 ** (bits - 1) - 1)
                        require(torch.allclose(s2.double(), exp_scale, rtol=1e-6), "scale formula")
                        dd = d2.permute(*m.perm).reshape(-1) if m.perm else d2.reshape(-1)
                        clipped = flat.clamp(-cap.repeat_interleave(block)[: flat.numel()],
                                             cap.repeat_interleave(block)[: flat.numel()])  # fmt: skip
                        err = (dd.double() - clipped).abs()
                        # half a step, plus the fp32 rounding of x * (qmax / absmax) (|.| <=
                        # qmax = 127: two roundings move it by up to ~3e-5 of a step)
                        bound = (
                            exp_scale.repeat_interleave(block)[: flat.numel()] * (0.5 + 4e-5) + 1e-7
                        )
                        require(
                            bool((err <= bound).all()),
                            f"block error above scale/2: {err.max().item()}",
                        )
                    return {"bytes": quant.saved_bytes(m), "numel": x.numel()}

                record_check(name, run)

    # fused activation backward
    for kind in ("gelu", "gelu_tanh", "quick_gelu", "silu"):
        for dtype in (torch.float32, torch.bfloat16):
            for bits, mode, step, clip in (
                (4, "fixed", 0.5, None),
                (4, "block", 1.0, 3.0),
                (8, "block", 1.0, None),
            ):

                def run(kind=kind, dtype=dtype, bits=bits, mode=mode, step=step, clip=clip):
                    x = (torch.randn(act_shape, device=device) * 2 - 0.5).to(dtype)
                    g = torch.randn(act_shape, device=device).to(dtype)
                    with backend("torch"):
                        c, s, m = quant.quantize(x, bits, mode, step, 64, clip)
                        a = grad_from_codes(g, c, s, m, kind)
                        xq = quant.dequantize(c, s, m, torch.float64)
                    with backend("triton"):
                        poison(device)
                        b = grad_from_codes(g, c, s, m, kind)
                    ref = g.double() * derivative(xq, kind)
                    require(not torch.isnan(b).any(), "NaN in output")
                    tol = 1e-5 if dtype == torch.float32 else 8e-3
                    e_tt = ((a.double() - b.double()).abs() / (ref.abs() + 1e-3)).max().item()
                    require(e_tt < tol * 10, f"triton vs torch {e_tt}")
                    e_ref = rel(b, ref)
                    require(
                        e_ref < (1e-5 if dtype == torch.float32 else 1e-2), f"vs float64 {e_ref}"
                    )
                    return {"triton_vs_torch_maxrel": e_tt, "vs_float64_rel": e_ref}

                record_check(f"act_backward {kind} {bits}b {mode} {dtype}", run)

    # fused norm: quantize of normalized rows, backward from int8
    from slimfit.ops.config import CompressionConfig
    from slimfit.ops.norm import lean_layer_norm, lean_rms_norm

    for h, dtype, mode in [(h, d, m) for h in norm_hs for d in (torch.float32, torch.bfloat16)
                           for m in ("int8", "int4")]:  # fmt: skip
        if True:

            def run(h=h, dtype=dtype, mode=mode):
                from transformers.models.llama.modeling_llama import LlamaRMSNorm

                # the norm in the input's dtype, as in a model of that dtype (CUDA's layer_norm
                # rejects a bf16 input with fp32 weights outside autocast, plain or lean)
                ln = nn.LayerNorm(h).to(device, dtype)
                rms = LlamaRMSNorm(h).to(device, dtype)
                for mod in (ln, rms):
                    with torch.no_grad():
                        mod.weight.uniform_(0.5, 1.5)
                    mod.weight.requires_grad_(False)
                x = (torch.randn(*norm_rows, h, device=device) * 2 + 1).to(dtype)
                x[..., :3] *= 10
                x.requires_grad_(True)
                g = torch.randn(*norm_rows, h, device=device).to(dtype)
                out = {}
                for label, _mod, fn in (("layernorm", ln, lambda: lean_layer_norm(ln, x, CompressionConfig(norm=mode))),
                                       ("rmsnorm", rms, lambda: lean_rms_norm(rms, x, rms.forward, CompressionConfig(norm=mode)))):  # fmt: skip
                    res = {}
                    for be in ("torch", "triton"):
                        with backend(be):
                            poison(device)
                            y = fn()
                            res[be] = (y, torch.autograd.grad(y, x, g)[0])
                    require(
                        torch.equal(res["torch"][0], res["triton"][0]), f"{label} forward differs"
                    )
                    gt, gk = res["torch"][1], res["triton"][1]
                    require(not torch.isnan(gk).any(), "NaN in grad")
                    e = rel(gk, gt)
                    require(
                        e < (1e-5 if dtype == torch.float32 else 1e-2),
                        f"{label} triton vs torch {e}",
                    )
                    x64 = x.detach().double().requires_grad_(True)
                    y64 = (
                        F.layer_norm(x64, (h,), ln.weight.double(), ln.bias.double(), ln.eps)
                        if label == "layernorm"
                        else rms(x64)
                    )
                    (r64,) = torch.autograd.grad(y64, x64, g.double())
                    e64 = rel(gk, r64)
                    require(
                        e64
                        < ((5e-3 if dtype == torch.float32 else 3e-2) if mode == "int8" else 8e-2),
                        f"{label} vs float64 {e64}",
                    )
                    out[label] = {"triton_vs_torch": e, "vs_float64": e64}
                return out

            record_check(f"norm {mode} fused quantize+backward H={h} {dtype}", run)

    def run_dropout():
        from slimfit.ops.dropout import RegenDropoutFn

        with backend("triton"):
            n = 16 if ARGS.smoke else 128
            x = torch.randn(n, 128, 768, device=device, dtype=torch.bfloat16)
            # bf16 randn on CUDA has a few exact zeros per 10M; there `out != 0` below
            # cannot tell a kept element from a dropped one
            x = x.masked_fill(x == 0, 1.0).requires_grad_(True)
            poison(device)
            out = RegenDropoutFn.apply(x, 0.1)
            (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        keep = out != 0
        rate = keep.float().mean().item()
        require(abs(rate - 0.9) < 0.01, f"keep rate {rate}")
        require(
            torch.equal(
                gx, keep.to(gx.dtype) * torch.tensor(1 / 0.9, dtype=gx.dtype, device=device)
            ),
            "mask replay",
        )
        require(
            torch.allclose(out.float(), x.float() * keep / 0.9, rtol=1e-2, atol=1e-2),
            "forward scale",
        )
        return {"keep_rate": rate}

    record_check("dropout regenerate (triton)", run_dropout)

    def run_residual_norm(p, dtype):
        """LayerNorm(dropout(h) + r) in one kernel each way against (a) the PyTorch path
        without dropout, (b) with dropout, the separate dropout kernel's mask (same seed)
        then eager add + norm, (c) float64 of that; bert-base QA-sized rows (or smoke)."""
        import torch.nn.functional as F
        from torch import nn

        from slimfit.ops import kernels
        from slimfit.ops.config import CompressionConfig
        from slimfit.ops.dropout import _new_seed
        from slimfit.ops.residual_norm import lean_dropout_add_norm

        rows, width = (256, 768) if ARGS.smoke else (128 * 384, 768)
        ln, drop = nn.LayerNorm(width).to(device), nn.Dropout(p)
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_()
        h = torch.randn(rows, width, device=device).to(dtype)
        h = h.masked_fill(h == 0, 1.0).requires_grad_(True)  # see run_dropout
        r = (torch.randn(rows, width, device=device) * 2 + 1).requires_grad_(True)
        g = torch.randn(rows, width, device=device)
        leaves = [h, r, ln.weight, ln.bias]

        def fused(name):
            with backend(name):
                torch.manual_seed(7)
                poison(device)
                out = lean_dropout_add_norm(h, r, drop, ln, CompressionConfig())
                return out, torch.autograd.grad(out, leaves, g)

        out, grads = fused("triton")
        require(out.grad_fn.name() == "DropoutAddNormFnBackward", out.grad_fn.name())
        detail = {}
        if p == 0:
            ref, ref_grads = fused("torch")
        else:
            torch.manual_seed(7)
            keep = kernels.dropout(torch.ones_like(h), p, int(_new_seed())) != 0
            require(torch.equal(grads[0] != 0, keep), "backward drops what forward dropped")
            detail["keep_rate"] = keep.float().mean().item()
            ref = F.layer_norm(h * keep.to(dtype) / (1 - p) + r, (width,), ln.weight, ln.bias,
                               ln.eps)  # fmt: skip
            ref_grads = torch.autograd.grad(ref, leaves, g)
        detail["out_max_abs"] = (out - ref).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2**-6  # bf16 h: 1 ulp of the dropout output
        require(torch.allclose(out, ref, rtol=tol, atol=tol), f"output {detail}")
        for name, a, b, lim in zip(("h", "r", "gain", "bias"), grads, ref_grads,
                                   (2e-2, 2e-3, 2.5e-2, 1e-5)):  # fmt: skip
            detail[name] = rel(a, b)
            require(detail[name] < lim, f"{name} gradient {detail[name]} >= {lim}")
        require(not torch.isnan(out).any(), "NaN in the output")
        return detail

    for p, dtype in ((0.0, torch.float32), (0.1, torch.float32), (0.1, torch.bfloat16)):
        record_check(
            f"residual tail dropout {p} + add + LayerNorm, fused (triton) {dtype}",
            lambda p=p, dtype=dtype: run_residual_norm(p, dtype),
        )

    def run_direct_launch():
        from slimfit.ops import triton_launch

        ok = triton_launch._direct_ok()
        n = triton_launch.direct_launches()
        if ok:
            require(n > 0, "no kernel took the direct launch path")
        return {"direct": ok, "entries": n, "triton": __import__("triton").__version__}

    record_check("triton direct launch path in use (the checks above ran through it)",
                 run_direct_launch)  # fmt: skip


# -- 2. ops under autocast ----------------------------------------------------------------------------------
def op_checks(device) -> None:
    from slimfit.ops.activation import lean_activation
    from slimfit.ops.attention import ATTENTION_CONFIG, slimfit_sdpa_attention
    from slimfit.ops.config import CompressionConfig
    from slimfit.ops.linear import lean_linear
    from slimfit.ops.norm import lean_layer_norm

    dflt, paper, none = (CompressionConfig.preset(n) for n in ("default", "paper", "none"))
    dt = device.type

    for trainable in (False, True):
        for cfg_name, cfg in (("none", none), ("default", dflt)):

            def run(trainable=trainable, cfg=cfg):
                lin = nn.Linear(768, 3072).to(device)
                lin.weight.requires_grad_(trainable)
                x = torch.randn(8, 128, 768, device=device, requires_grad=True)
                with torch.autocast(dt, torch.bfloat16):
                    ref = F.linear(x, lin.weight, lin.bias)
                    out = lean_linear(x, lin.weight, lin.bias, cfg, True)
                require(
                    out.dtype == ref.dtype and torch.equal(out, ref),
                    "forward not bitwise equal to F.linear under autocast",
                )
                g = torch.randn_like(out)
                wrt = [x, lin.bias] + ([lin.weight] if trainable else [])
                got = torch.autograd.grad(out, wrt, g)
                refg = torch.autograd.grad(ref, wrt, g)
                errs = [rel(a, b) for a, b in zip(got, refg)]
                require(all(e < 2e-2 for e in errs), f"grads vs autocast F.linear {errs}")
                if trainable:
                    gw64 = g.double().reshape(-1, 3072).t() @ x.double().reshape(-1, 768)
                    e = rel(got[2], gw64)
                    require(e < 2e-2, f"weight grad vs float64 {e}")
                return {"grad_rel_vs_F.linear": errs}

            record_check(f"linear autocast trainable={trainable} cfg={cfg_name}", run)

    def frozen_linear_memory(copy):
        # a frozen linear under autocast with frozen_weight_copy="none" keeps nothing from
        # forward to backward: what its forward leaves allocated is its output; with "all"
        # (the default) it is the plain op and keeps autocast's 2-byte copy of the weight
        lin = nn.Linear(768, 3072).to(device)
        lin.weight.requires_grad_(False)
        x = torch.randn(8, 128, 768, device=device, requires_grad=True)
        before = torch.cuda.memory_allocated(device) if dt == "cuda" else 0
        with torch.autocast(dt, torch.bfloat16):
            out = lean_linear(x, lin.weight, lin.bias, dflt.replace(frozen_weight_copy=copy), True)
        kept = (torch.cuda.memory_allocated(device) - before) if dt == "cuda" else 0
        out_bytes = out.numel() * out.element_size()
        expect = out_bytes + (lin.weight.numel() * 2 if copy == "all" else 0)
        expect = expect if dt == "cuda" else 0  # no allocator counters on the CPU
        require(
            expect <= kept + 65536 and kept <= expect + 65536,
            f"forward left {kept} B allocated, expected {expect} B",
        )
        return {"kept_bytes": kept, "expected_bytes": expect}

    for copy in ("none", "all"):
        record_check(
            f"linear frozen autocast, frozen_weight_copy={copy}: kept bytes",
            lambda copy=copy: frozen_linear_memory(copy),
        )

    for mode in ("int8", "topk"):

        def run(mode=mode):
            ln = nn.LayerNorm(768).to(device)
            ln.weight.requires_grad_(False)
            x = torch.randn(8, 128, 768, device=device).to(torch.bfloat16).requires_grad_(True)
            with torch.autocast(dt, torch.bfloat16):
                ref = ln(x)
                out = lean_layer_norm(ln, x, CompressionConfig(norm=mode))
            require(
                out.dtype == ref.dtype and torch.equal(out, ref),
                f"forward differs ({out.dtype} vs {ref.dtype})",
            )
            g = torch.randn_like(out)
            gx, gb = torch.autograd.grad(out, [x, ln.bias], g)
            x64 = x.detach().double().requires_grad_(True)
            r = F.layer_norm(x64, (768,), ln.weight.double(), ln.bias.double(), ln.eps)
            rx, rb = torch.autograd.grad(r, [x64, ln.bias], g.double())
            ex, eb = rel(gx, rx), rel(gb, rb)
            require(ex < (2e-2 if mode == "int8" else 0.1) and eb < 1e-2, f"grads {ex} {eb}")
            return {"out_dtype": str(out.dtype), "gx_rel": ex, "gb_rel": eb}

        record_check(f"layernorm autocast norm={mode}", run)

    def run_trained_gain():
        ln = nn.LayerNorm(768).to(device)
        x = torch.randn(8, 128, 768, device=device).to(torch.bfloat16).requires_grad_(True)
        with torch.autocast(dt, torch.bfloat16):
            ref = ln(x)
            out = lean_layer_norm(ln, x, CompressionConfig())
        require(out.grad_fn.name() == "LayerNormFnBackward", f"not lean: {out.grad_fn.name()}")
        require(torch.equal(out, ref), "forward differs")
        g = torch.randn_like(out)
        gx, gw, gb = torch.autograd.grad(out, [x, ln.weight, ln.bias], g)
        x64 = x.detach().double().requires_grad_(True)
        w64 = ln.weight.detach().double().requires_grad_(True)
        r = F.layer_norm(x64, (768,), w64, ln.bias.double(), ln.eps)
        rx, rw, rb = torch.autograd.grad(r, [x64, w64, ln.bias], g.double())
        ex, ew, eb = rel(gx, rx), rel(gw, rw), rel(gb, rb)
        require(ex < 2e-2 and ew < 2.5e-2 and eb < 1e-2, f"grads {ex} {ew} {eb}")
        return {"gx_rel": ex, "gw_rel": ew, "gb_rel": eb}

    record_check("layernorm autocast trained gain (int8 code)", run_trained_gain)

    def run_linear_after_norm():
        """A trained linear reading a lean LayerNorm's output takes its weight gradient from
        the norm's int8 code (no copy of its own): same forward, grads vs float64."""
        ln = nn.LayerNorm(768).to(device)
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_()
        ln.weight.requires_grad_(False)
        lin = nn.Linear(768, 768).to(device)
        x = (torch.randn(8, 128, 768, device=device) * 2 + 1).requires_grad_(True)
        cfg = CompressionConfig()
        with torch.autocast(dt, torch.bfloat16):
            h = lean_layer_norm(ln, x, cfg)
            out = lean_linear(h, lin.weight, lin.bias, cfg, True)
            ref = lin(ln(x))
        require(torch.equal(out, ref), "forward differs")
        g = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, [x, lin.weight], g)
        x64 = x.detach().double().requires_grad_(True)
        w64 = lin.weight.detach().double().requires_grad_(True)
        h64 = F.layer_norm(x64, (768,), ln.weight.double(), ln.bias.double(), ln.eps)
        rx, rw = torch.autograd.grad(F.linear(h64, w64, lin.bias.double()), [x64, w64], g.double())
        ex, ew = rel(gx, rx), rel(gw, rw)
        require(ex < 2e-2 and ew < 2e-2, f"grads {ex} {ew}")
        return {"gx_rel": ex, "gw_rel": ew}

    record_check("trained linear after a layernorm (the norm's int8 code)", run_linear_after_norm)

    def tiny_model(kind):
        import transformers as T

        torch.manual_seed(0)
        if kind == "bert":
            cfg = T.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=1024, vocab_size=1000, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)  # fmt: skip
            model = T.BertForSequenceClassification(cfg)
            batch = {"input_ids": torch.randint(0, 1000, (8, 64), device=device)}
        else:
            cfg = T.ViTConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=1024, image_size=64, patch_size=8)  # fmt: skip
            model = T.ViTForImageClassification(cfg)
            batch = {"pixel_values": torch.randn(8, 3, 64, 64, device=device)}
        return model.to(device).train(), batch

    def both_steps(a, b, batch):
        """logits and parameter gradients of one bf16 step of each model"""
        outs, grads = [], []
        for m in (a, b):
            with torch.autocast(dt, torch.bfloat16):
                o = m(**batch).logits
            o.float().square().sum().backward()
            outs.append(o.detach())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        return outs, grads

    def run_inplace_ffn(kind):
        import copy

        from slimfit.convert import convert

        model, batch = tiny_model(kind)
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        convert(a, "default")
        convert(b, "default")
        for m in b.modules():
            m.__dict__.pop("_slimfit_inplace", None)
        marked = sum(bool(m.__dict__.get("_slimfit_inplace")) for m in a.modules())
        require(marked == 2, f"{marked} activations in place")
        outs, grads = both_steps(a, b, batch)
        require(torch.equal(outs[0], outs[1]), "logits differ in place vs out of place")
        require(all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0]), "grads differ")
        return {"in_place_activations": marked}

    for kind in ("bert", "vit"):
        record_check(f"in-place FFN activation {kind} (bitwise vs out of place)",
                     lambda kind=kind: run_inplace_ffn(kind))  # fmt: skip

    def run_attention_recompute(kind):
        """Q, K, V rebuilt from their LayerNorm's int8 code: the same logits, gradients
        aligned with the default (Q, K, V codes kept)."""
        import copy

        from slimfit.convert import convert

        model, batch = tiny_model(kind)
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        convert(a, "default")
        convert(b, CompressionConfig(attention_recompute=True))
        outs, grads = both_steps(a, b, batch)
        require(torch.equal(outs[0], outs[1]), "logits differ")
        cos = [
            torch.nn.functional.cosine_similarity(
                x.flatten().double(), grads[1][n].flatten().double(), 0
            ).item()
            for n, x in grads[0].items()
            if not n.endswith(("key.bias", "k_proj.bias"))  # softmax ignores it: only noise
        ]
        require(min(cos) > 0.99, f"gradient cosine {min(cos)}")
        return {"min_grad_cosine": min(cos), "params": len(cos)}

    for kind in ("bert", "vit"):
        record_check(f"attention_recompute {kind} (vs Q, K, V codes)",
                     lambda kind=kind: run_attention_recompute(kind))  # fmt: skip

    def run_act():
        from transformers.activations import ACT2FN

        out = {}
        for name in ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "silu"):
            mod = ACT2FN[name]
            kind = {"gelu": "gelu", "quick_gelu": "quick_gelu", "silu": "silu"}.get(
                name, "gelu_tanh"
            )
            x = (
                (torch.randn(8, 128, 3072, device=device) * 2 - 0.5)
                .to(torch.bfloat16)
                .requires_grad_(True)
            )
            with torch.autocast(dt, torch.bfloat16):
                y = lean_activation(x, mod, kind, dflt)
                require(torch.equal(y, mod(x)), f"{name} forward differs")
            g = torch.randn_like(y)
            (gx,) = torch.autograd.grad(y, x, g)
            x64 = x.detach().double().requires_grad_(True)
            (r,) = torch.autograd.grad(mod(x64), x64, g.double())
            out[name] = rel(gx, r)
            require(out[name] < 0.15, f"{name} grad rel {out[name]}")
        return out

    record_check("activations autocast (4-bit default)", run_act)

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attn(nn.Module):
        def __init__(self, groups, causal):
            super().__init__()
            self.num_key_value_groups = groups
            self.is_causal = causal

    def same_via_backward(make_out, leaves, g, got) -> bool:
        """``backward()`` (slimfit calls the recomputed forward's fused node directly) gives
        the gradients ``autograd.grad`` gave (there slimfit falls back to autograd.grad)."""
        for t in leaves:
            t.grad = None
        make_out().backward(g)
        same = all(torch.equal(t.grad, a) for t, a in zip(leaves, got))
        for t in leaves:
            t.grad = None
        return same

    for masked, groups, causal in (
        (False, 1, False),
        (True, 1, False),
        (False, 1, True),
        (False, 2, True),
        (True, 2, False),
    ):

        def run(masked=masked, groups=groups, causal=causal):
            mod = Attn(groups, causal)
            ATTENTION_CONFIG[mod] = dflt
            B, S, Hh, D = 4, 128, 12, 64
            q = (
                (torch.randn(B, S, Hh, D, device=device) * 1.5)
                .to(torch.bfloat16)
                .transpose(1, 2)
                .requires_grad_(True)
            )
            k = (
                (torch.randn(B, S, Hh // groups, D, device=device) * 1.5)
                .to(torch.bfloat16)
                .transpose(1, 2)
                .requires_grad_(True)
            )
            v = (
                torch.randn(B, S, Hh // groups, D, device=device)
                .to(torch.bfloat16)
                .transpose(1, 2)
                .requires_grad_(True)
            )
            mask = None
            if masked:
                mask = torch.ones(B, 1, S, S, dtype=torch.bool, device=device)
                mask[-1, ..., 100:] = False
            with torch.autocast(dt, torch.bfloat16):
                ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=D**-0.5)
                out, _ = slimfit_sdpa_attention(mod, q, k, v, mask, scaling=D**-0.5)
            require(torch.equal(out, ref), "forward differs from transformers' sdpa")
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, [q, k, v], g)
            refg = torch.autograd.grad(ref, [q, k, v], g)

            def again():
                with torch.autocast(dt, torch.bfloat16):
                    return slimfit_sdpa_attention(mod, q, k, v, mask, scaling=D**-0.5)[0]

            require(same_via_backward(again, [q, k, v], g, got), "backward() != autograd.grad")
            leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
            r64, _ = sdpa_attention_forward(mod, *leaves, mask, scaling=D**-0.5)
            g64 = torch.autograd.grad(r64, leaves, g.double())
            e_bf16 = [rel(a, b) for a, b in zip(refg, g64)]
            e_ours = [rel(a, b) for a, b in zip(got, g64)]
            require(
                all(e < 6e-2 for e in e_ours),
                f"grads vs float64 {e_ours} (bf16 sdpa itself: {e_bf16})",
            )
            return {"ours_vs_f64": e_ours, "bf16_sdpa_vs_f64": e_bf16}

        record_check(f"attention mask={masked} gqa={groups} causal={causal}", run)

    def run_attn_dropout():
        mod = Attn(1, False)
        ATTENTION_CONFIG[mod] = dflt
        q, k, v = (
            torch.randn(4, 12, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        torch.manual_seed(7)
        with torch.autocast(dt, torch.bfloat16):
            out, _ = slimfit_sdpa_attention(mod, q, k, v, None, dropout=0.2, scaling=0.125)
        torch.manual_seed(7)
        with torch.autocast(dt, torch.bfloat16):
            ref = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, scale=0.125).transpose(
                1, 2
            )
        require(torch.equal(out, ref), "dropout forward differs from SDPA under the same RNG state")
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [q, k, v], g)
        refg = torch.autograd.grad(ref, [q, k, v], g)

        def again():
            torch.manual_seed(7)
            with torch.autocast(dt, torch.bfloat16):
                return slimfit_sdpa_attention(mod, q, k, v, None, dropout=0.2, scaling=0.125)[0]

        require(same_via_backward(again, [q, k, v], g, got), "backward() != autograd.grad")
        errs = [rel(a, b) for a, b in zip(got, refg)]
        require(all(e < 6e-2 for e in errs), f"grads vs SDPA's own (same mask) {errs}")
        return {"grad_rel_vs_sdpa_same_mask": errs}

    record_check("attention dropout mask replay (CUDA RNG)", run_attn_dropout)

    def make_model(kind):
        import transformers as T

        common = dict(
            hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=2
        )
        if kind == "bert":
            cfg = T.BertConfig(
                vocab_size=1000, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common
            )
            return T.BertForSequenceClassification(cfg), "text"
        if kind == "vit":
            cfg = T.ViTConfig(image_size=64, patch_size=8, num_labels=3, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, **common)  # fmt: skip
            return T.ViTForImageClassification(cfg), "image"
        cfg = T.LlamaConfig(
            vocab_size=1000, num_key_value_heads=2, max_position_embeddings=256, **common
        )
        return T.LlamaForCausalLM(cfg), "text"

    for kind in ("bert", "vit", "llama"):

        def run_model(kind=kind):
            from slimfit.convert import convert, restore

            torch.manual_seed(0)
            model, inp = make_model(kind)
            model = model.to(device).train()
            if inp == "text":
                ids = torch.randint(3, 1000, (8, 128), device=device)
                am = torch.ones_like(ids)
                am[-1, 90:] = 0
                batch = {"input_ids": ids, "attention_mask": am}
            else:
                batch = {"pixel_values": torch.randn(8, 3, 64, 64, device=device)}

            def step():
                with torch.autocast(dt, torch.bfloat16):
                    lg = model(**batch).logits
                lg.float().square().mean().backward()
                gr = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                model.zero_grad(set_to_none=True)
                return lg.detach(), gr

            ref, rg = step()
            convert(model, "none")
            out0, g0 = step()
            restore(model)
            report = convert(model, "default")
            out, gd = step()
            restore(model)
            require(torch.equal(out0, ref), "logits differ with compression 'none'")
            require(torch.equal(out, ref), "logits differ with compression 'default'")
            # key biases get a structurally zero gradient (softmax is shift-invariant): skip
            big = [n for n in rg if rg[n].norm() > 1e-6 * rg[n].numel() ** 0.5
                   and not re.search(r"(key|k_proj|k_lin)\.bias$", n)]  # fmt: skip
            worst_none = max(rel(g0[n], rg[n]) for n in big)
            cos = min(F.cosine_similarity(gd[n].flatten().double(), rg[n].flatten().double(), 0).item()
                      for n in big)  # fmt: skip
            require(worst_none < 2e-2, f"'none' gradients differ: {worst_none}")
            require(cos > 0.9, f"'default' gradient cosine {cos}")
            return {"none_worst_grad_rel": worst_none, "default_min_grad_cos": cos,
                    "converted": dict(report.converted), "attention": report.attention}  # fmt: skip

        record_check(f"tiny {kind} converted under autocast: logits and gradients", run_model)

    def run_bytes():
        import transformers as T

        from slimfit.convert import convert

        H, I, B, S = 256, 1024, 4, 128  # noqa: E741
        sizes = []
        for layers in (1, 2):
            torch.manual_seed(0)
            cfg = T.BertConfig(vocab_size=1000, hidden_size=H, num_attention_heads=4, intermediate_size=I,
                               num_hidden_layers=layers, attention_probs_dropout_prob=0.0)  # fmt: skip
            model = T.BertForSequenceClassification(cfg).to(device).train()
            for n, p in model.named_parameters():
                p.requires_grad_(n.endswith("bias"))
            convert(model, "default")
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            seen = {}

            def pack(t, seen=seen, params=params):
                s = t.untyped_storage()
                if s.data_ptr() not in params:
                    seen[s.data_ptr()] = s.nbytes()
                return t

            ids = torch.randint(3, 1000, (B, S), device=device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast(dt, torch.bfloat16):
                    lg = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            lg.float().sum().backward()
            sizes.append(sum(seen.values()))
        T_ = B * S
        q8 = lambda n: math.ceil(n / 64) * 68  # noqa: E731
        # 2 LayerNorms (int8 y + fp32 rstd per row), GELU input 4-bit + scales; the 2
        # dropouts nothing (inside the residual tails' nodes, their seeds Python ints); Q, K,
        # V nothing (rebuilt in backward from the norm's code, the default); every frozen
        # linear (Q, K, V, attention output, FFN-in, FFN-out) keeps autocast's bf16 weight
        # copy (frozen_weight_copy="all", the default), and attention keeps the bf16 casts
        # of the Q, K, V biases that those projections made (its rebuild reuses them)
        expect = 2 * (q8(T_ * H) + 4 * T_) + T_ * I // 2 + 4 * T_ * I // 64
        expect += 2 * (4 * H * H + 2 * H * I) + 2 * 3 * H
        got = sizes[1] - sizes[0]
        require(got == expect, f"bytes per layer {got} != formula {expect}")
        return {
            "bytes_per_layer": got,
            "per_token": got / T_,
            "bf16_plain_estimate_per_token": 2 * (4 * H + 2 * H + I) + 2 * H,
        }

    record_check("saved bytes per BERT layer under autocast = formula", run_bytes)

    def run_kept_casts():
        import importlib

        import transformers as T
        from torch.nn.attention import SDPBackend, sdpa_kernel

        import slimfit

        attach_module = importlib.import_module("slimfit.attach")
        keep, together = attach_module.keep_frozen_casts, attach_module.cast_biases_together

        def train(keep_casts: bool):
            attach_module.keep_frozen_casts = keep if keep_casts else (lambda params: None)
            attach_module.cast_biases_together = together if keep_casts else (lambda b: None)
            try:
                torch.manual_seed(0)
                cfg = T.BertConfig(vocab_size=1000, hidden_size=256, num_attention_heads=4,
                                   intermediate_size=1024, num_hidden_layers=3)  # fmt: skip
                model = T.BertForSequenceClassification(cfg).to(device).train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
                sf = slimfit.attach(model, opt, slimfit.SlimFitConfig(freeze_ratio=0.5))
                g = torch.Generator().manual_seed(1)
                for _ in range(8):
                    ids = torch.randint(3, 1000, (8, 64), generator=g).to(device)
                    # the math backend: fused attention backwards may sum in any order
                    with torch.autocast(dt, torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
                        loss = model(input_ids=ids, labels=torch.zeros(8, dtype=torch.long,
                                                                       device=device)).loss  # fmt: skip
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                sf.detach()
                return [p.detach().clone() for p in model.parameters()]
            finally:
                attach_module.keep_frozen_casts = keep
                attach_module.cast_biases_together = together

        kept, fresh = train(True), train(False)
        same = sum(torch.equal(a, b) for a, b in zip(kept, fresh))
        require(same == len(fresh), f"{len(fresh) - same} of {len(fresh)} parameters differ")
        return {"parameters": len(fresh), "bit_identical": same}

    record_check("ILS under autocast, fused AdamW: kept frozen casts and biases cast together "
                 "train bit for bit as casting each at every use", run_kept_casts)  # fmt: skip


# -- 3. kernel speed ------------------------------------------------------------------------------------------
def timeit(fn, device, reps=20) -> float:
    """Median seconds of fn() (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync(device)
    if device.type != "cuda":
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def kernel_speed(device) -> None:
    from slimfit.ops import quant
    from slimfit.ops.activation import grad_from_codes

    tokens = 128 * 128 if not ARGS.smoke else 512
    cases = [("gelu input 4b clip-block", (tokens, 3072), 4, "block", 1.0, 3.0),
             ("gelu input 4b fixed", (tokens, 3072), 4, "fixed", 0.5, None),
             ("hidden int8 block", (tokens, 768), 8, "block", 1.0, None),
             ("ffn-out input int8 block", (tokens, 3072), 8, "block", 1.0, None)]  # fmt: skip
    for label, shape, bits, mode, step, clip in cases:

        def run(label=label, shape=shape, bits=bits, mode=mode, step=step, clip=clip):
            x = torch.randn(shape, device=device, dtype=torch.bfloat16)
            g = torch.randn_like(x)
            y = torch.empty_like(x)
            t_copy = timeit(lambda: y.copy_(x), device)
            copy_bw = 2 * x.numel() * 2 / t_copy
            row = {"case": label, "shape": list(shape), "copy_GBps": copy_bw / 1e9}
            for be in ("triton", "torch"):
                if be == "triton" and (device.type != "cuda" or not triton_usable(device)):
                    continue
                with backend(be):
                    c, s, m = quant.quantize(x, bits, mode, step, 64, clip)
                    code_bytes = quant.saved_bytes(m)
                    tq = timeit(lambda: quant.quantize(x, bits, mode, step, 64, clip), device)
                    td = timeit(lambda c=c, s=s, m=m: quant.dequantize(c, s, m), device)
                    ta = timeit(lambda c=c, s=s, m=m: grad_from_codes(g, c, s, m, "gelu"), device)
                moved_q = x.numel() * 2 + code_bytes
                moved_a = 2 * x.numel() * 2 + code_bytes
                row[be] = {
                    "quantize_us": tq * 1e6, "quantize_frac_of_copy_bw": moved_q / tq / copy_bw,
                    "dequantize_us": td * 1e6, "dequantize_frac_of_copy_bw": moved_q / td / copy_bw,
                    "gelu_bwd_us": ta * 1e6, "gelu_bwd_frac_of_copy_bw": moved_a / ta / copy_bw,
                }  # fmt: skip
            RESULTS["kernels"].append(row)
            return {
                k: (round(v["quantize_us"], 1), round(v["quantize_frac_of_copy_bw"], 2))
                for k, v in row.items()
                if isinstance(v, dict)
            }

        record_check(f"speed {label}", run)

    def run_norm():
        from slimfit.ops.config import CompressionConfig
        from slimfit.ops.norm import lean_layer_norm

        ln = nn.LayerNorm(768).to(device)
        ln.weight.requires_grad_(False)
        x = torch.randn(tokens, 768, device=device, requires_grad=True)
        g = torch.randn(tokens, 768, device=device)
        row = {"case": "layernorm fwd+bwd (fp32, int8 y)", "shape": [tokens, 768]}

        def plain():
            y = F.layer_norm(x, (768,), ln.weight, ln.bias)
            torch.autograd.grad(y, x, g)

        row["plain_us"] = timeit(plain, device) * 1e6
        for be in ("triton", "torch"):
            if be == "triton" and (device.type != "cuda" or not triton_usable(device)):
                continue
            with backend(be):

                def lean():
                    y = lean_layer_norm(ln, x, CompressionConfig())
                    torch.autograd.grad(y, x, g)

                row[f"{be}_us"] = timeit(lean, device) * 1e6
        RESULTS["kernels"].append(row)
        return {k: round(v, 1) for k, v in row.items() if k.endswith("_us")}

    record_check("speed layernorm fwd+bwd", run_norm)


# -- 4. bert-base step time and peak memory ---------------------------------------------------------------------
def model_bench(device) -> None:
    import transformers as T

    import slimfit
    from slimfit.convert import convert

    if ARGS.smoke:
        cfg = T.BertConfig(vocab_size=1000, hidden_size=128, num_attention_heads=2, intermediate_size=512,
                           num_hidden_layers=2)  # fmt: skip
    else:
        cfg = T.BertConfig()  # bert-base
    modes = [
        ("bf16 full FT", dict()),
        ("bf16 + activation checkpointing", dict(ckpt=True)),
        ("95% frozen, no compression", dict(freeze=0.95)),
        ("95% frozen + convert default", dict(freeze=0.95, compression="default")),
        ("95% frozen + convert paper", dict(freeze=0.95, compression="paper")),
        ("95% frozen + default, norm int4", dict(freeze=0.95, compression={"norm": "int4"})),
        ("full FT + convert default", dict(compression="default")),
        ("slimfit.attach ILS 0.95 + default", dict(attach=True)),
    ]
    for batch in ARGS.batches:
        for label, opts in modes:

            def run(batch=batch, label=label, opts=opts):
                torch.manual_seed(0)
                head = (
                    T.BertForQuestionAnswering
                    if ARGS.task == "qa"
                    else T.BertForSequenceClassification
                )
                model = head(cfg).to(device).train()
                if opts.get("ckpt"):
                    model.gradient_checkpointing_enable()
                if opts.get("freeze"):
                    units = [p for n, p in model.named_parameters()
                             if (p.dim() >= 2 or "LayerNorm.weight" in n)
                             and not re.search(r"(classifier|qa_outputs)", n)]  # fmt: skip
                    g = torch.Generator().manual_seed(0)
                    idx = torch.randperm(len(units), generator=g)[
                        : int(opts["freeze"] * len(units))
                    ]
                    for i in idx.tolist():
                        units[i].requires_grad_(False)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
                report = None
                if opts.get("compression"):
                    report = str(convert(model, opts["compression"]))
                if opts.get("attach"):
                    sf = slimfit.attach(
                        model, opt, slimfit.SlimFitConfig(freeze_ratio=0.95, compression="default")
                    )
                    report = str(sf.conversion)
                ids = torch.randint(3, cfg.vocab_size, (batch, ARGS.seq), device=device)
                am = torch.ones_like(ids)
                if ARGS.task == "qa":
                    labels = {
                        "start_positions": torch.randint(0, ARGS.seq, (batch,), device=device),
                        "end_positions": torch.randint(0, ARGS.seq, (batch,), device=device),
                    }
                else:
                    labels = {"labels": torch.randint(0, 2, (batch,), device=device)}

                def step():
                    with torch.autocast(device.type, torch.bfloat16):
                        loss = model(input_ids=ids, attention_mask=am, **labels).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss

                for _ in range(ARGS.warmup):
                    step()
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(ARGS.steps):
                    t0 = time.perf_counter()
                    loss = step()
                    sync(device)
                    times.append(time.perf_counter() - t0)
                peak = (
                    torch.cuda.max_memory_allocated(device) / GiB
                    if device.type == "cuda"
                    else float("nan")
                )
                row = {"batch": batch, "seq": ARGS.seq, "task": ARGS.task, "mode": label, "peak_GiB": peak,
                       "step_s": statistics.median(times), "loss": float(loss), "conversion": report}  # fmt: skip
                RESULTS["models"].append(row)
                return {"peak_GiB": round(peak, 3), "step_s": round(row["step_s"], 4)}

            record_check(f"bert-base b={batch} {label}", run)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()


# -- output -------------------------------------------------------------------------------------------------------------
def markdown() -> str:
    lines = ["# slimfit ops GPU check", "", f"env: `{json.dumps(RESULTS['env'], default=str)}`", ""]
    checks = RESULTS["checks"]
    n_ok = sum(c["ok"] for c in checks)
    lines += [f"checks: {n_ok}/{len(checks)} passed", ""]
    for c in checks:
        if not c["ok"]:
            lines.append(f"- FAIL {c['name']}: {c['error']}")
    if RESULTS["kernels"]:
        lines += [
            "",
            "| kernel case | backend | quantize us (x copy bw) | dequantize us (x) | gelu bwd us (x) |",
            "|---|---|---|---|---|",
        ]
        for r in RESULTS["kernels"]:
            for be in ("triton", "torch"):
                v = r.get(be)
                if isinstance(v, dict):
                    lines.append(f"| {r['case']} | {be} | {v['quantize_us']:.1f} ({v['quantize_frac_of_copy_bw']:.2f}) | "
                                 f"{v['dequantize_us']:.1f} ({v['dequantize_frac_of_copy_bw']:.2f}) | "
                                 f"{v['gelu_bwd_us']:.1f} ({v['gelu_bwd_frac_of_copy_bw']:.2f}) |")  # fmt: skip
            if "plain_us" in r:
                lines.append(f"| {r['case']} | plain / triton / torch | {r.get('plain_us', float('nan')):.1f} / "
                             f"{r.get('triton_us', float('nan')):.1f} / {r.get('torch_us', float('nan')):.1f} us | | |")  # fmt: skip
    if RESULTS["models"]:
        lines += ["", "| batch | mode | peak GiB | step s |", "|---|---|---|---|"]
        for r in RESULTS["models"]:
            lines.append(
                f"| {r['batch']} | {r['mode']} | {r['peak_GiB']:.2f} | {r['step_s']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--batches", default="32,128", help="comma-separated batch sizes for the model bench"
    )
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--task", choices=("seqcls", "qa"), default="seqcls",
                    help="bert-base head for the model bench (qa: e.g. --seq 384)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--skip", default="", help="comma list of sections to skip: kernels,ops,speed,models"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a smoke test, CPU works)")
    ap.add_argument("--out", default=None, help="folder for the results (default: $OUT)")
    ARGS = ap.parse_args()
    ARGS.batches = [int(b) for b in ARGS.batches.split(",") if b]
    if ARGS.smoke:
        ARGS.batches, ARGS.seq, ARGS.steps, ARGS.warmup = [2], 16, 2, 1
    skip = set(filter(None, ARGS.skip.split(",")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    env = RESULTS["env"]
    env.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        command=" ".join(sys.argv),
    )  # fmt: skip
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    print(f"slimfit ops GPU check on {env['device']} (torch {env['torch']}, transformers "
          f"{env['transformers']}, triton {env['triton']})")  # fmt: skip
    if device.type != "cuda":
        RESULTS["notes"].append(
            "no CUDA device: ran on CPU (smoke test only; Triton needs TRITON_INTERPRET=1)"
        )
    sections = [
        ("kernels", kernel_checks),
        ("ops", op_checks),
        ("speed", kernel_speed),
        ("models", model_bench),
    ]
    for name, fn in sections:
        if name in skip:
            continue
        print(f"\n== {name}", flush=True)
        try:
            fn(device)
        except Exception as err:  # a section's own setup failed: record, go on
            RESULTS["checks"].append({"name": f"section {name}", "ok": False, "error": repr(err)[:600],
                                      "trace": traceback.format_exc(limit=6)[-2500:]})  # fmt: skip
            print(f"  [FAIL] section {name}: {err!r}")
        save()
    try:
        from slimfit.ops import quant

        env["triton_kernels_disabled_after_failure"] = sorted(quant._FAILED)
    except Exception:
        pass
    print()
    print(markdown())
    n_fail = sum(not c["ok"] for c in RESULTS["checks"])
    print(f"{n_fail} check(s) failed" if n_fail else "all checks passed")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
