"""Triton launches: the direct launcher of `slimfit.ops.kernels` against Triton's own path.

For each kernel wrapper (quantize fixed / per-block, int8 / int4, the fused norm quantize,
dequantize, fused activation backward, norm backward, dropout):

- the outputs of both paths are bitwise equal, on several fresh inputs and shapes (the
  direct path is what every call after a specialization's first one takes);
- dropout's mask is the same in forward and in the replay (same seed, other dtype);
- host time per call, in microseconds, of each path (small tensors: the device is idle, so
  the loop measures the Python and launch cost).

Run from the repository root on a GPU (a few seconds):

    PYTHONPATH=src python benchmarks/triton_launch_gpu.py --out runs/triton-launch

Writes ``triton_launch.json`` into ``--out`` and prints a table; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from slimfit.bench.env import collect
from slimfit.ops import kernels, quant


def _cases(x: torch.Tensor, seed: int):
    """name -> a call of one wrapper on ``x`` (its outputs as a tuple of tensors)."""
    h = x.shape[-1]
    rows = x.numel() // h
    x2 = x.reshape(rows, h)
    mean = x2.float().mean(1)
    rstd = torch.rsqrt(x2.float().var(1, unbiased=False) + 1e-5)
    q8 = quant.quantize(x, 8, "block", block=64)
    q4 = quant.quantize(x, 4, "fixed", step=0.5)
    g = torch.randn_like(x)

    def norm_codes():
        return kernels.quantize(x2.reshape(-1), q8[2], mean, rstd, h)

    return {
        "quantize int8 block": lambda: quant.quantize(x, 8, "block", block=64)[:2],
        "quantize int4 fixed": lambda: quant.quantize(x, 4, "fixed", step=0.5)[:1],
        "quantize int4 block clip": lambda: quant.quantize(x, 4, "block", block=64, clip=3.0)[:2],
        "norm quantize int8": norm_codes,
        "dequantize int8 block": lambda: (quant.dequantize(*q8),),
        "dequantize int4 fixed": lambda: (quant.dequantize(*q4),),
        "gelu backward 4-bit": lambda: (kernels.act_backward(g, q4[0], None, q4[2], "gelu"),),
        "norm backward int8": lambda: (
            kernels.norm_backward(
                g.reshape(rows, h), *norm_codes(), q8[2], rstd, None, x.dtype, True
            ),
        ),
        "dropout": lambda: (kernels.dropout(x, 0.1, seed),),
    }


def _host_us(fn, n: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="timed calls per wrapper and path")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/triton-launch"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    failures: list[str] = []
    # correctness: fresh inputs, shapes, dtypes; each case run on both paths
    for trial, (shape, dtype) in enumerate(
        [((4, 16, 768), torch.bfloat16), ((3, 7, 1000), torch.float32), ((2, 128, 768), torch.bfloat16),
         ((8, 5, 4096), torch.float16)]
    ):  # fmt: skip
        torch.manual_seed(trial)
        x = torch.randn(*shape, device=dev, dtype=dtype) * 2
        for name, fn in _cases(x, seed=1000 + trial).items():
            outs = {}
            for direct in (False, True, True):  # the second direct call surely takes the cache
                kernels._DIRECT = direct
                outs.setdefault(direct, []).append(fn())
            ref = outs[False][0]
            for got in outs[True]:
                if not all(torch.equal(a, b) for a, b in zip(got, ref)):
                    failures.append(f"{name} {tuple(shape)} {dtype}: direct != triton path")
    kernels._DIRECT = True
    x = torch.randn(4, 64, 768, device=dev, dtype=torch.bfloat16)
    fwd = kernels.dropout(x, 0.1, 77)
    replay = kernels.dropout(torch.ones_like(x, dtype=torch.float32), 0.1, 77)
    if not torch.equal(fwd == 0, replay == 0):
        failures.append("dropout: replayed mask differs from the forward's")
    # host cost per call, small tensors (the device idles)
    x = torch.randn(2, 16, 768, device=dev, dtype=torch.bfloat16)
    rows = []
    for name, fn in _cases(x, seed=5).items():
        t = {}
        for direct in (False, True):
            kernels._DIRECT = direct
            t[direct] = _host_us(fn, args.calls)
        rows.append(
            {"wrapper": name, "triton_path_us": round(t[False], 1), "direct_us": round(t[True], 1)}
        )
    kernels._DIRECT = True
    result = {
        "command": "python benchmarks/triton_launch_gpu.py " + " ".join(sys.argv[1:]),
        "env": collect(dev),
        "compiled_specializations": len(kernels._COMPILED),
        "failures": failures,
        "host_us_per_call": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_launch.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'wrapper':28} {'triton path us':>15} {'direct us':>10}")
    for r in rows:
        print(f"{r['wrapper']:28} {r['triton_path_us']:15.1f} {r['direct_us']:10.1f}")
    print(f"specializations cached: {len(kernels._COMPILED)}; failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
