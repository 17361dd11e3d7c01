"""Where the GPU waits for the host: idle gaps on the compute stream of a profiled step.

Reads the gzipped Chrome traces that ``step_profile_gpu.py --trace`` writes (runs on any
machine, no GPU needed) and prints, per trace:

- the span of the profiled steps and how much of it each stream was busy;
- the compute stream's idle time, and each gap's cause: the host operator (innermost
  ``cpu_op``) that was issuing the kernel which ended the gap; a step bound by the host
  shows its gaps where the host falls behind;
- the host time of CUDA runtime calls (copies, allocations, events, stream waits) and
  the copies by kind.

    python benchmarks/trace_gaps.py runs/step-profile/trace-*.json.gz
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict


def _load(path: str) -> list[dict]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return [e for e in data["traceEvents"] if e.get("ph") == "X"]


def _enclosing_ops(cpu_ops: list[dict]):
    """A lookup from a host timestamp to the innermost ``cpu_op`` running at that time."""
    ops = sorted(cpu_ops, key=lambda e: (e["ts"], -e["dur"]))
    starts = [e["ts"] for e in ops]

    def at(ts: float) -> str:
        i = bisect.bisect_right(starts, ts) - 1
        best = None
        # walk back over the ops that start before ts; nested ops start later, so the
        # first one found that still covers ts is the innermost
        for j in range(i, max(i - 400, -1), -1):
            e = ops[j]
            if e["ts"] + e["dur"] >= ts:
                best = e
                break
        return best["name"] if best else "(no op)"

    return at


def analyse(path: str, top: int, min_gap_us: float) -> dict:
    events = _load(path)
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for e in gpu:
        by_stream[e["args"].get("stream", -1)].append(e)
    compute = max(by_stream, key=lambda s: sum(e["dur"] for e in by_stream[s]))
    t0 = min(e["ts"] for e in cpu_ops + gpu)
    t1 = max(e["ts"] + e["dur"] for e in cpu_ops + gpu)
    launch_of = {e["args"].get("correlation"): e for e in runtime}
    op_at = _enclosing_ops(cpu_ops)

    ks = sorted(by_stream[compute], key=lambda e: e["ts"])
    gaps: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    idle = 0.0
    for prev, nxt in zip(ks, ks[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap < min_gap_us:
            continue
        idle += gap
        launch = launch_of.get(nxt["args"].get("correlation"))
        cause = op_at(launch["ts"]) if launch else "(no launch found)"
        gaps[cause][0] += 1
        gaps[cause][1] += gap
    calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        calls[e["name"]][0] += 1
        calls[e["name"]][1] += e["dur"]
    copies: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in gpu:
        if e["cat"] == "gpu_memcpy":
            key = f"{e['name']} (stream {e['args'].get('stream')})"
            copies[key][0] += 1
            copies[key][1] += e["dur"]
    return {
        "span_ms": (t1 - t0) / 1e3,
        "busy_ms": {s: sum(e["dur"] for e in v) / 1e3 for s, v in by_stream.items()},
        "compute_stream": compute,
        "compute_idle_ms": idle / 1e3,
        "gaps": sorted(gaps.items(), key=lambda kv: -kv[1][1])[:top],
        "runtime": sorted(calls.items(), key=lambda kv: -kv[1][1])[:top],
        "copies": sorted(copies.items(), key=lambda kv: -kv[1][1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--min-gap-us", type=float, default=2.0, help="shorter gaps are launch latency")
    args = ap.parse_args()
    for path in args.traces:
        r = analyse(path, args.top, args.min_gap_us)
        print(f"\n== {path}")
        print(
            f"span {r['span_ms']:.1f} ms; compute stream {r['compute_stream']} idle "
            f"{r['compute_idle_ms']:.1f} ms (gaps >= {args.min_gap_us} us)"
        )
        for s, ms in sorted(r["busy_ms"].items(), key=lambda kv: -kv[1]):
            print(f"   stream {s}: busy {ms:.1f} ms")
        print(" compute-stream gaps by the host op issuing the kernel after them:")
        for name, (n, us) in r["gaps"]:
            print(f"   {us / 1e3:7.2f} ms {n:5d}x {name[:100]}")
        print(" CUDA runtime calls (host time):")
        for name, (n, us) in r["runtime"]:
            print(f"   {us / 1e3:7.2f} ms {n:5d}x {name}")
        print(" copies:")
        for name, (n, us) in r["copies"]:
            print(f"   {us / 1e3:7.2f} ms {n:5d}x {name}")


if __name__ == "__main__":
    main()
