"""Launch configurations of the lean ops' Triton kernels at bert-base QA sizes (issue 4).

Times each kernel (``triton.testing.do_bench``, median us) over a grid of tile sizes and
warp counts on the tensors a bert-base QA step at batch 128 hands it (49152 tokens), next to
the native op it replaces, and prints the best configuration per kernel:

    PYTHONPATH=src python benchmarks/kernel_tune_gpu.py --out runs/kernel-tune
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton.testing

from slimfit.bench.env import collect
from slimfit.ops import kernels
from slimfit.ops.quant import quantize


def bench(fn) -> float:
    return round(triton.testing.do_bench(fn, warmup=10, rep=60) * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128 * 384)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/kernel-tune"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    t = args.tokens
    rows: dict[str, dict] = {}

    # GELU backward from a 4-bit per-block code of the FFN's pre-activation (t x 3072 bf16)
    x = torch.randn(t, 3072, device=dev, dtype=torch.bfloat16) * 2
    g = torch.randn_like(x)
    codes, scales, meta = quantize(x, 4, "block", 1.0, 64, 6.0)
    n, bs = meta.numel, meta.block
    out = torch.empty_like(g).view(-1)
    gf = g.view(-1)
    act = {"native gelu_backward (bf16 input kept)": bench(
        lambda: torch.ops.aten.gelu_backward(g, x))}  # fmt: skip
    for block in (1024, 2048, 4096):
        for w in (4, 8):
            act[f"flat BLOCK={block} warps={w}"] = bench(lambda block=block, w=w: kernels._act_bwd_kernel[(-(-n // block),)](
                gf, codes, scales, out, n, 1.0, KIND=0, FOUR=True, BLOCKWISE=True, BS=bs, BLOCK=block, num_warps=w))  # fmt: skip
    nb = -(-n // bs)
    for r in (8, 16, 32, 64):
        for w in (2, 4, 8):
            act[f"rows ROWS={r} warps={w}"] = bench(lambda r=r, w=w: kernels._act_bwd_rows_kernel[(-(-nb // r),)](
                gf, codes, scales, out, n, nb, 1.0, KIND=0, FOUR=True, BLOCKWISE=True, BS=bs, ROWS=r, num_warps=w))  # fmt: skip
    rows["act_backward gelu 4-bit block64"] = act

    # 4-bit per-block quantize of the same tensor (the GELU input code), clip 6
    xf = x.view(-1)
    c = torch.empty(nb * bs // 2, dtype=torch.uint8, device=dev)
    s = torch.empty(nb, dtype=torch.float32, device=dev)
    qa = {"native copy of the bf16 tensor (what full keeps)": bench(lambda: x.clone())}
    for r in (4, 8, 16, 32, 64):
        for w in (2, 4, 8):
            qa[f"ROWS={r} warps={w}"] = bench(lambda r=r, w=w: kernels._quant_block_kernel[(-(-nb // r),)](
                xf, c, s, n, nb, 6.0, xf, xf, 1, BS=bs, BSP=bs, QMAX=7, FOUR=True, ROWS=r,
                NORM=False, CENTER=False, num_warps=w, enable_fp_fusion=False))  # fmt: skip
    rows["quantize 4-bit block64 (t x 3072 bf16)"] = qa

    # int8 code of a LayerNorm's normalized rows (t x 768 fp32 input, mean / rstd per row)
    h = torch.randn(t, 768, device=dev)
    mean = h.mean(1, keepdim=True)
    rstd = torch.rsqrt(h.var(1, unbiased=False, keepdim=True) + 1e-12)
    hf = h.view(-1)
    n2 = hf.numel()
    nb2 = n2 // 64
    c2 = torch.empty(n2, dtype=torch.int8, device=dev)
    s2 = torch.empty(nb2, dtype=torch.float32, device=dev)
    lq = {
        "native layer_norm forward": bench(
            lambda: torch.native_layer_norm(h, (768,), None, None, 1e-12)
        )
    }
    for r in (4, 8, 16, 32, 64):
        for w in (2, 4, 8):
            lq[f"ROWS={r} warps={w}"] = bench(lambda r=r, w=w: kernels._quant_block_kernel[(-(-nb2 // r),)](
                hf, c2, s2, n2, nb2, float("inf"), mean, rstd, 768, BS=64, BSP=64, QMAX=127,
                FOUR=False, ROWS=r, NORM=True, CENTER=True, num_warps=w, enable_fp_fusion=False))  # fmt: skip
    rows["norm quantize int8 (t x 768 fp32)"] = lq

    for name, r in rows.items():
        best = min((v, k) for k, v in r.items() if not k.startswith("native"))
        print(f"== {name}: best {best[1]} {best[0]} us")
        for k, v in r.items():
            print(f"   {v:8.1f} us  {k}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_tune.json"), "w") as f:
        json.dump({"env": collect(dev), "tokens": t, "us": rows}, f, indent=1)


if __name__ == "__main__":
    main()
