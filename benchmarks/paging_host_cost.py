"""Host (Python-side) cost of optimizer-state paging per optimizer step, on the CPU.

``OptimizerStatePager.sync_to`` runs after every optimizer step. On a bert-base run about
10% of the units change state per step (ILS), and each carries two AdamW moments. The
tensors here are tiny (64x64) so the copies themselves cost nothing and what is timed is
the bookkeeping: mask handling, state lookups, buffer handling and issuing the copies.
On the CPU the CUDA-only work (stream switches, pinned buffers, ``record_stream``) does
not run, so this is a lower bound on what the GPU host pays. ``--device cuda --shapes
bert-base`` times the real thing: bert-base's unit shapes, pinned buffers, the side
stream, and the CUDA runtime calls per step (torch.profiler).

    PYTHONPATH=src python benchmarks/paging_host_cost.py [--units 200] [--change 0.1]
    PYTHONPATH=src python benchmarks/paging_host_cost.py --device cuda --shapes bert-base \
        --change 0.22 --hold 2 --calls 200
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


def _params(args, device: torch.device) -> list[torch.nn.Parameter]:
    if args.shapes == "square":
        shapes = [(args.size, args.size)] * args.units
    else:  # the freezable units of bert-base seq-cls (slimfit.units), built on the meta device
        from transformers import BertConfig, BertForSequenceClassification

        from slimfit import SlimFitConfig
        from slimfit.units import find_units

        with torch.device("meta"):
            model = BertForSequenceClassification(BertConfig())
        shapes = [tuple(u.param.shape) for u in find_units(model, SlimFitConfig())]
    return [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=200, help="freezable parameters (bert-base ~200)")
    ap.add_argument("--size", type=int, default=16, help="each parameter is size x size fp32")
    ap.add_argument("--shapes", choices=("square", "bert-base"), default="square",
                    help="bert-base: the shapes of bert-base seq-cls's units (--units, --size unused)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frozen", type=float, default=0.9, help="fraction of units frozen")
    ap.add_argument("--change", type=float, default=0.1, help="fraction changing per step")
    ap.add_argument("--hold", type=int, default=1,
                    help="steps each mask is held (2: units swap every other step, as ILS with one-step-late scores)")  # fmt: skip
    ap.add_argument("--calls", type=int, default=2000, help="steps per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    torch.manual_seed(0)
    dev = torch.device(args.device)
    params = _params(args, dev)
    units = len(params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:  # every unit has trained once: all carry AdamW state
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    changing = max(int(round(units * args.change)), 2)
    masks = [
        m for m in _masks(units, args.frozen, changing, walk=32, seed=1) for _ in range(args.hold)
    ]
    pager = OptimizerStatePager(opt, params, lambda: masks[0])

    def step(mask):
        # what attach's hooks call: after a step, after the next forward, before the next step
        pager.sync_to(mask)
        pager.prefetch()
        pager.ready()

    for m in masks + masks:  # warm: every host buffer exists, every unit paged in once
        step(m)
    step(masks[0])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def us_per_call(seq) -> float:
        # whole cycles, so every transition flips exactly `changing` units
        calls = max(args.calls - args.calls % len(seq), len(seq))
        step(seq[0])
        elapsed = 0.0
        for k in range(calls):
            sync()  # host time only: the copies run on after it, and never queue up
            t0 = time.perf_counter()
            step(seq[(k + 1) % len(seq)])
            elapsed += time.perf_counter() - t0
        sync()
        return elapsed * 1e6 / calls

    step_us, still_us = [], []
    for _ in range(args.repeats):
        step_us.append(us_per_call(masks))
        still_us.append(us_per_call([masks[0]]))  # nothing changes: the floor per step

    per_step = changing / args.hold
    print(
        f"units={units} shapes={args.shapes} device={dev.type} frozen={args.frozen:.0%} "
        f"changing={changing} every {args.hold} step(s) torch={torch.__version__}"
    )
    print(
        f"host us per step, {per_step:.1f} units change on average: median "
        f"{statistics.median(step_us):8.1f} (min {min(step_us):.1f})"
    )
    print(
        f"host us per step, nothing changes:          median "
        f"{statistics.median(still_us):8.1f} (min {min(still_us):.1f})"
    )
    if dev.type == "cuda":  # where the host time goes: CUDA runtime calls per step
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for m in masks:
                step(m)
            sync()
        calls = {}
        for e in prof.events():
            if e.name.startswith("cuda") or e.name.startswith("aten::"):
                n, t = calls.get(e.name, (0, 0.0))
                calls[e.name] = (n + 1, t + e.cpu_time_total)
        for name, (n, t) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"  {t / len(masks):8.1f} us {n / len(masks):6.1f}x per step  {name}")


if __name__ == "__main__":
    main()
