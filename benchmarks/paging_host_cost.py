"""Host (Python-side) cost of optimizer-state paging per optimizer step, on the CPU.

``OptimizerStatePager.sync_to`` runs after every optimizer step. On a bert-base run about
10% of the units change state per step (ILS), and each carries two AdamW moments. The
tensors here are tiny (64x64) so the copies themselves cost nothing and what is timed is
the bookkeeping: mask handling, state lookups, buffer handling and issuing the copies.
On the CPU the CUDA-only work (stream switches, pinned buffers, ``record_stream``) does
not run, so this is a lower bound on what the GPU host pays.

    PYTHONPATH=src python benchmarks/paging_host_cost.py [--units 200] [--change 0.1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slimfit.optim.paging import OptimizerStatePager


def _masks(units: int, frozen_ratio: float, changing: int, walk: int, seed: int):
    """A cycle of frozen masks in which each transition flips exactly ``changing`` units
    (half freeze, half unfreeze): a random walk out and the same walk back."""
    g = torch.Generator().manual_seed(seed)
    frozen = torch.zeros(units, dtype=torch.bool)
    frozen[torch.randperm(units, generator=g)[: int(units * frozen_ratio)]] = True
    out = [frozen.clone()]
    half = max(changing // 2, 1)
    for _ in range(walk):
        on = frozen.nonzero().flatten()
        off = (~frozen).nonzero().flatten()
        thaw = on[torch.randperm(len(on), generator=g)[:half]]
        freeze = off[torch.randperm(len(off), generator=g)[:half]]
        frozen = frozen.clone()
        frozen[thaw] = False
        frozen[freeze] = True
        out.append(frozen)
    return out + out[-2:0:-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=200, help="freezable parameters (bert-base ~200)")
    ap.add_argument("--size", type=int, default=16, help="each parameter is size x size fp32")
    ap.add_argument("--frozen", type=float, default=0.9, help="fraction of units frozen")
    ap.add_argument("--change", type=float, default=0.1, help="fraction changing per step")
    ap.add_argument("--calls", type=int, default=2000, help="sync_to calls per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.size, args.size)) for _ in range(args.units)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:  # every unit has trained once: all carry AdamW state
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    changing = max(int(round(args.units * args.change)), 2)
    masks = _masks(args.units, args.frozen, changing, walk=32, seed=1)
    pager = OptimizerStatePager(opt, params, lambda: masks[0])
    pager.sync_to(masks[0])  # first round trip allocates the host buffers
    for m in masks:  # warm: every host buffer exists
        pager.sync_to(m)
    pager.sync_to(masks[0])

    def us_per_call(seq) -> float:
        # whole cycles, so every transition flips exactly `changing` units
        calls = max(args.calls - args.calls % len(seq), len(seq))
        pager.sync_to(seq[0])
        t0 = time.perf_counter()
        for k in range(calls):
            pager.sync_to(seq[(k + 1) % len(seq)])
        return (time.perf_counter() - t0) * 1e6 / calls

    step_us, still_us = [], []
    for _ in range(args.repeats):
        step_us.append(us_per_call(masks))
        still_us.append(us_per_call([masks[0]]))  # nothing changes: the floor per step

    moved = 2 * changing  # two AdamW moments per changing unit
    print(
        f"units={args.units} size={args.size}x{args.size} frozen={args.frozen:.0%} "
        f"changing/step={changing} ({moved} state tensors) torch={torch.__version__}"
    )
    print(
        f"sync_to, {changing} units change: median {statistics.median(step_us):8.1f} us/call "
        f"(min {min(step_us):.1f})"
    )
    print(
        f"sync_to, nothing changes:   median {statistics.median(still_us):8.1f} us/call "
        f"(min {min(still_us):.1f})"
    )


if __name__ == "__main__":
    main()
