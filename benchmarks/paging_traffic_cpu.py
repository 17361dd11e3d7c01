"""How much optimizer state the pager moves per step under a bench workload's ILS schedule.

Replays ``--steps`` steps of the workload's ``--mode`` (built as ``slimfit bench`` builds
it, at bench size, on the CPU at a small batch: the schedule depends on the scores, not
on the batch size's arithmetic) and prints, per step, how many units changed frozen flag,
then, for paging out a unit once it has been frozen ``k`` steps in a row (k = 1 is what
the pager does), the mean and largest MiB of AdamW state (two fp32 moments) moved per step
and kept on the device for units frozen but not yet paged.

    PYTHONPATH=src python benchmarks/paging_traffic_cpu.py --workload bert-base-seqcls
"""

from __future__ import annotations

import argparse

import torch

from slimfit.bench.measure import DeviceMemory
from slimfit.bench.modes import get_modes
from slimfit.bench.runner import BenchSettings, trainer_and_batch
from slimfit.bench.workloads import get_workload, load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="bert-base-seqcls")
    ap.add_argument("--mode", default="slimfit-nopage")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the means")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = get_workload(args.workload)
    dev = torch.device("cpu")
    s = BenchSettings(args.batch_size, args.seq_len, 5, 1, dev, freeze_ratio=0.9)
    trainer, batch = trainer_and_batch(
        w, load_config(w, "base"), get_modes([args.mode])[0], s, DeviceMemory(dev)
    )
    sf = trainer.slimfit
    state_bytes = [u.param.numel() * 8 for u in sf.units]
    masks = []
    for _ in range(args.steps):
        masks.append(sf.scheduler.frozen.clone())
        trainer.step(batch)
    frozen = torch.stack(masks)
    flips = (frozen[1:] != frozen[:-1]).sum(1).tolist()
    print(f"{args.workload}, {args.mode}, {len(sf.units)} units, {args.steps} steps")
    print("units that changed frozen flag, per step:", flips)
    mib = 2**20
    for k in (1, 2, 3, 4):
        paged = torch.zeros(frozen.shape[1], dtype=torch.bool)
        run = torch.zeros(frozen.shape[1], dtype=torch.long)
        moved, kept = [], []
        for f in frozen:
            run = torch.where(f, run + 1, torch.zeros_like(run))
            page_in, page_out = paged & ~f, ~paged & f & (run >= k)
            moved.append(sum(state_bytes[i] for i in torch.nonzero(page_in | page_out).flatten()))
            paged = (paged & f) | page_out
            kept.append(sum(state_bytes[i] for i in torch.nonzero(f & ~paged).flatten()))
        moved, kept = moved[args.skip :], kept[args.skip :]
        print(
            f"page out after {k} frozen step(s): moved per step mean {sum(moved) / len(moved) / mib:.1f}"
            f" MiB, max {max(moved) / mib:.1f}; frozen but on the device mean"
            f" {sum(kept) / len(kept) / mib:.1f} MiB, max {max(kept) / mib:.1f}"
        )


if __name__ == "__main__":
    main()
