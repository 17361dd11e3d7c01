"""A step's host cost per mode, from interleaved rounds (issue 4).

At a tiny batch (default 2) the device finishes each kernel long before the next is
issued, so steps run back to back take the host's time to issue them: Python, autograd,
dispatch and launches, which bound a launch-bound step at batch 128 too. On the device
machine that time drifts by 20-40% between runs of the same code, so every mode is built
once (exactly as ``slimfit bench`` builds it) and timed in ``--rounds`` interleaved rounds
of ``--steps`` steps; the report gives each mode's minimum and median round (the minimum
is the least disturbed) and its median ratio to the first mode over the rounds.

    PYTHONPATH=src python benchmarks/host_rounds_gpu.py --workload bert-base-seqcls \
        --mode full,freeze-only,slimfit-nopage,slimfit --out runs/host-rounds

Writes ``host_rounds.json`` into ``--out`` and prints a table. ``--device cpu`` runs a tiny
configuration (a check of the script, not a measurement of the GPU host).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from slimfit.bench.env import collect
from slimfit.bench.measure import DeviceMemory
from slimfit.bench.modes import get_modes
from slimfit.bench.runner import BenchSettings, trainer_and_batch
from slimfit.bench.workloads import get_workload, load_config


def round_ms(trainer, batch, steps: int, mem: DeviceMemory) -> float:
    """Milliseconds per step of ``steps`` steps issued back to back (synchronized around)."""
    mem.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch)
    mem.sync()
    return (time.perf_counter() - t0) / steps * 1e3


def summarize(rounds: dict[str, list[float]], ratio_key: str) -> dict:
    """Each entry's min and median round, and its median round ratio to the first entry."""
    first = rounds[next(iter(rounds))]
    return {
        name: {
            "min_ms": min(v),
            "median_ms": statistics.median(v),
            ratio_key: statistics.median(a / b for a, b in zip(v, first)),
        }
        for name, v in rounds.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="bert-base-seqcls")
    ap.add_argument("--mode", default="full,freeze-only,slimfit-nopage,slimfit")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--freeze-ratio", type=float, default=0.9)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--label", default="", help="a name for this code version in the JSON")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/host-rounds"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    mem = DeviceMemory(dev)
    w = get_workload(args.workload)
    config = load_config(w, "base" if dev.type == "cuda" else "tiny")
    s = BenchSettings(args.batch_size, args.seq_len or (w.seq_len if dev.type == "cuda" else 16),
                      args.steps, 3, dev, freeze_ratio=args.freeze_ratio)  # fmt: skip
    modes = get_modes(args.mode.split(","))
    trainers = {m.name: trainer_and_batch(w, config, m, s, mem) for m in modes}
    for tr, batch in trainers.values():
        for _ in range(5):
            tr.step(batch)
    mem.sync()
    rounds: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, (tr, batch) in trainers.items():
            rounds[name].append(round_ms(tr, batch, args.steps, mem))
    first = modes[0].name
    summary = summarize(rounds, f"ratio_to_{first}")
    result = {
        "command": "python benchmarks/host_rounds_gpu.py " + " ".join(sys.argv[1:]),
        "label": args.label,
        "env": collect(dev),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "ms_per_step_rounds": rounds,
        "summary": summary,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_rounds.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.label or 'this code'}: {args.workload} batch {args.batch_size}, "
          f"{args.rounds} rounds of {args.steps} steps")  # fmt: skip
    for name, r in summary.items():
        print(f"  {name:18} min {r['min_ms']:7.2f} ms  median {r['median_ms']:7.2f} ms  "
              f"x{first} {r[f'ratio_to_{first}']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
