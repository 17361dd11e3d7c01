"""Where a training step's time goes, host side and device side, per mode (issue 4).

For each workload and mode (built exactly as ``slimfit bench`` builds them):

- back-to-back step time over ``--steps`` steps (one synchronize at the end);
- run at a tiny ``--batch-size`` (e.g. 2), the back-to-back time is the host's cost of
  issuing one step (the device then has almost nothing to do);
- device time per step from torch.profiler (sum of kernel time in one step) and the number
  of kernel launches;
- implicit host-device synchronizations in one step (``torch.cuda.set_sync_debug_mode``);
- the Python functions with the most self time over a few steps (cProfile).

Run from the repository root on a GPU (about 1-2 minutes per workload):

    PYTHONPATH=src python benchmarks/step_profile_gpu.py --workload bert-base-seqcls \
        --mode full,freeze-only,slimfit-nopage,slimfit --out runs/step-profile

Writes ``step_profile.json`` into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import os
import pstats
import warnings

import torch

from slimfit.bench.env import collect
from slimfit.bench.measure import DeviceMemory
from slimfit.bench.modes import get_modes
from slimfit.bench.runner import BenchSettings, _back_to_back, _release, trainer_and_batch
from slimfit.bench.workloads import get_workload, load_config


def _kernel_stats(trainer, batch, steps: int = 2, trace: str | None = None) -> dict:
    """Per step, averaged over ``steps`` steps (ILS schedules alternate: units swap on
    every other step under async scores). ``trace``: also write the profile there as a
    gzipped Chrome trace (``benchmarks/trace_gaps.py`` reads it)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.step(batch)
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(trace)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict = {}
    for e in kernels:
        n, t = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, t + e.device_time_total / 1e3 / steps)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    # host time in CUDA runtime calls (copies issued, allocations, event records, waits)
    runtime: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
            n, t = runtime.get(e.name, (0, 0.0))
            runtime[e.name] = (n + 1, t + e.cpu_time_total / 1e3 / steps)
    return {
        "kernels": len(kernels) / steps,
        "device_ms": sum(e.device_time_total for e in kernels) / 1e3 / steps,
        "top_kernels": [
            {"name": k[:90], "count": n / steps, "ms": round(t, 3)} for k, (n, t) in top
        ],
        "runtime_calls": [
            {"name": k, "count": n / steps, "ms": round(t, 3)}
            for k, (n, t) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:12]
        ],
    }


def _syncs(trainer, batch) -> list[str]:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sorted({str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)})


def _python_top(trainer, batch, n: int, top: int) -> list[dict]:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        trainer.step(batch)
    pr.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(pr, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append(
            {
                "fn": f"{os.path.basename(file)}:{line}({fn})",
                "calls_per_step": nc / n,
                "self_ms_per_step": tt * 1e3 / n,
                "cum_ms_per_step": ct * 1e3 / n,
            }
        )
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    return rows[:top]


def command_line(script: str, args) -> str:
    """How the script was run (``--out`` left out: a device-local path)."""
    return f"python benchmarks/{script} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
    )


def each_mode(
    workloads: str, modes: str, batch_size: int, seq_len, steps: int, measure, freeze_ratio=None
):
    """Yield ``(workload, mode, measure(trainer, batch))`` for every comma-separated workload
    and mode, each built exactly as ``slimfit bench`` builds it and released afterwards; a
    mode that fails yields ``{"error": ...}`` and the others go on."""
    dev = torch.device("cuda")
    mem = DeviceMemory(dev)
    for wname in workloads.split(","):
        w = get_workload(wname)
        config = load_config(w, "base")
        seq = seq_len or w.seq_len
        s = BenchSettings(batch_size, seq, steps, 3, dev, freeze_ratio=freeze_ratio)
        for mode in get_modes(modes.split(",")):
            torch.manual_seed(0)
            mem.free()
            tr, batch = trainer_and_batch(w, config, mode, s, mem)
            try:
                r = measure(tr, batch, mem)
            except Exception as err:  # noqa: BLE001 - one mode's failure must not stop the others
                r = {"error": f"{type(err).__name__}: {err}"[:400]}
            finally:
                del batch
                _release(tr)
                del tr
                mem.free()
            yield wname, mode.name, r


def recorded(script: str, args, filename: str, seq_len, steps: int, measure):
    """``each_mode`` over ``args.workload`` x ``args.mode`` (batch ``args.batch_size``), every
    result written to ``args.out/filename`` with the command and environment as it comes."""
    os.makedirs(args.out, exist_ok=True)
    results = {
        "command": command_line(script, args),
        "env": collect(torch.device("cuda")),
        "workloads": {},
    }
    path = os.path.join(args.out, filename)
    for wname, mname, r in each_mode(
        args.workload,
        args.mode,
        args.batch_size,
        seq_len,
        steps,
        measure,
        getattr(args, "freeze_ratio", None),
    ):
        results["workloads"].setdefault(wname, {})[mname] = r
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        yield wname, mname, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="bert-base-seqcls")
    ap.add_argument("--mode", default="full,freeze-only,slimfit-nopage,slimfit")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--freeze-ratio", type=float, default=None, help="overrides the modes' 0.95")
    ap.add_argument("--trace", action="store_true", help="write each mode's profile trace")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/step-profile"))
    args = ap.parse_args()
    # each_mode's order: every mode of the first workload, then the next workload's
    names = iter(f"{w}-{m}" for w in args.workload.split(",") for m in args.mode.split(","))

    def measure(tr, batch, mem) -> dict:
        trace = os.path.join(args.out, f"trace-{next(names)}.json") if args.trace else None
        for _ in range(5):
            tr.step(batch)
        r = {"b2b_ms": _back_to_back(tr, batch, args.steps, mem)["wall_per_step_s"] * 1e3}
        r.update(_kernel_stats(tr, batch, trace=trace))
        r["syncs"] = _syncs(tr, batch)
        r["python_top"] = _python_top(tr, batch, 5, args.top)
        return r

    done: dict = {}
    runs = recorded(
        "step_profile_gpu.py", args, "step_profile.json", args.seq_len, args.steps, measure
    )
    for wname, mname, r in runs:
        done.setdefault(wname, {})[mname] = r
        print(
            f"{wname:18} {mname:16} b2b {r.get('b2b_ms', float('nan')):7.1f} ms  "
            f"device {r.get('device_ms', float('nan')):6.1f} ms  "
            f"kernels {r.get('kernels', 0):7.1f}  syncs {len(r.get('syncs', []))} {r.get('error', '')}",
            flush=True,
        )
    for wname, rows in done.items():
        for mname, r in rows.items():
            print(f"\n== {wname} {mname}: syncs {r.get('syncs')}")
            for k in r.get("top_kernels", [])[:8] + r.get("runtime_calls", []):
                print(f"   {k['ms']:7.2f} ms {k['count']:6.1f}x {k['name']}")
            for p in r.get("python_top", [])[:15]:
                print(
                    f"   {p['self_ms_per_step']:6.2f} self {p['cum_ms_per_step']:7.2f} cum "
                    f"{p['calls_per_step']:6.0f}x {p['fn']}"
                )


if __name__ == "__main__":
    main()
