"""What is live at a training step's memory peak, per mode (issue 4: where the bytes go).

For each workload and mode (built exactly as ``slimfit bench`` builds them): a few warm-up
steps, then one step under ``torch.cuda.memory._record_memory_history``. The allocation
trace of that step is replayed to find the moment of the peak; the report lists the phase
(forward / backward / optimizer) of the peak and the largest blocks live then, each with
the innermost frames of slimfit / transformers / torch.nn code that allocated it.

    PYTHONPATH=src python benchmarks/memory_peak_gpu.py --workload bert-base-qa,vit-base \
        --mode slimfit,ckpt --out runs/memory-peak

Writes ``memory_peak.json`` into ``--out`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from step_profile_gpu import recorded  # the same script folder

MiB = 2**20
_KEEP = ("slimfit", "transformers", "torch/nn", "torch/optim", "torch/autograd", "benchmarks")


def _where(frames: list[dict], n: int = 3) -> str:
    kept = [f for f in frames if any(k in f["filename"] for k in _KEEP)]
    return " <- ".join(
        f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}" for f in kept[:n]
    )


def _trace_len() -> int:
    return sum(len(t) for t in torch.cuda.memory._snapshot()["device_traces"])


def _phase_step(trainer, batch) -> list:
    """One training step; (phase, index of its first trace event) at each boundary."""
    marks = []

    def mark(name):
        torch.cuda.synchronize()
        marks.append((name, _trace_len()))

    mark("forward")
    loss = trainer.forward(batch)
    mark("backward")
    loss.backward()
    del loss
    mark("optimizer")
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    mark("end")
    return marks


def peak_report(trainer, batch, top: int) -> dict:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        marks = _phase_step(trainer, batch)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snap["device_traces"] for e in trace]
    live: dict = {}
    total = best = base
    best_live: dict = {}
    best_index = 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > best:
            best, best_index, best_live = total, i, dict(live)
    phase = next((n for n, start in reversed(marks) if start <= best_index), "?")
    blocks = sorted(best_live.values(), key=lambda e: -e["size"])
    by_site: dict = {}
    for e in blocks:
        site = _where(e.get("frames", []))
        n, b = by_site.get(site, (0, 0))
        by_site[site] = (n + 1, b + e["size"])
    sites = sorted(by_site.items(), key=lambda kv: -kv[1][1])
    peak_frames = events[best_index].get("frames", []) if events else []
    return {
        "baseline_mib": base / MiB,
        "peak_mib": best / MiB,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / MiB,
        "phase": phase,
        "peak_site": _where(peak_frames, 6),
        "live_in_step_mib": sum(e["size"] for e in blocks) / MiB,
        "top_blocks": [
            {"mib": e["size"] / MiB, "where": _where(e.get("frames", []))} for e in blocks[:top]
        ],
        "top_sites": [{"mib": b / MiB, "blocks": n, "where": site} for site, (n, b) in sites[:top]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="bert-base-qa,vit-base")
    ap.add_argument("--mode", default="slimfit")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/memory-peak"))
    args = ap.parse_args()

    def measure(tr, batch, mem) -> dict:
        for _ in range(4):
            tr.step(batch)
        return peak_report(tr, batch, args.top)

    for wname, mname, r in recorded(
        "memory_peak_gpu.py", args, "memory_peak.json", None, 5, measure
    ):
        brief = {k: v for k, v in r.items() if k not in ("top_blocks", "top_sites")}
        print(f"\n== {wname} {mname}: {json.dumps(brief)}")
        for b in r.get("top_sites", [])[:14]:
            print(f"   {b['mib']:8.1f} MiB {b['blocks']:4d}x {b['where']}")


if __name__ == "__main__":
    main()
