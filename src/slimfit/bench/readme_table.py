"""The README performance table, generated from committed bench results (never typed in).

    python -m slimfit.bench.readme_table benchmarks/results/<run>            # print markdown
    python -m slimfit.bench.readme_table benchmarks/results/<run> --write README.md
    python -m slimfit.bench.readme_table benchmarks/results/<run> --check README.md

``--write`` replaces the text between ``<!-- slimfit-bench:start -->`` and
``<!-- slimfit-bench:end -->`` in the file; ``--check`` exits 1 when that text differs
from what the results give (for CI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .modes import MODES
from .readme_blocks import write_or_check
from .report import GiB, load, metric


def cell(res: dict | None) -> str:
    if not res:
        return "-"
    if res.get("status") != "ok":
        return str(res.get("status", "-"))
    # back to back (one synchronize per run of steps) is what a training loop sees
    peak, step = metric(res, "peak"), metric(res, "step_b2b") or metric(res, "step")
    mem = (
        f"{peak / GiB:.2f} GiB"
        if peak is not None
        else f"{metric(res, 'saved') / 2**20:.1f} MiB saved"
    )
    return f"{mem}, {step:.3f} s"


def table(runs: list[tuple[str, dict]], modes: list[str] | None = None) -> str:
    """Markdown: one row per workload, one column per mode (peak memory, median step)."""
    present = {m for _, r in runs for w in r["workloads"] for m in w["modes"]}
    names = modes or [m for m in MODES if m in present] + sorted(present - set(MODES))
    lines = [
        "| workload | " + " | ".join(f"`{m}`" for m in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for _, r in runs:
        for w in r["workloads"]:
            label = (
                f"{w['workload']} (batch {w['batch_size']}"
                + (f", seq {w['seq_len']}" if w.get("seq_len") else "")
                + ")"
            )
            lines.append(
                f"| {label} | " + " | ".join(cell(w["modes"].get(m)) for m in names) + " |"
            )
    lines.append("")
    for src, r in runs:
        env = r.get("env", {})
        lines.append(
            f"SlimFit modes freeze {_freeze_label(r)} of units per step. "
            f"Peak = max_memory_allocated after warm-up; step = {_step_label(r)}; "
            f"{env.get('device', '?')}, torch {env.get('torch', '?')}, transformers "
            f"{env.get('transformers', '?')}, {r.get('date', '?')}; from `{src}`."
        )
    return "\n".join(lines) + "\n"


def _freeze_label(run: dict) -> str:
    ratio = run.get("settings", {}).get("freeze_ratio")
    return f"{ratio:g}" if ratio is not None else "0.95 (the bench modes' own ratio)"


def _step_label(run: dict) -> str:
    steps = [
        m["time_b2b"]["steps"]
        for w in run["workloads"]
        for m in w["modes"].values()
        if m.get("time_b2b")
    ]
    if steps:
        return f"median step of {max(steps)} steps run back to back (no synchronize between them)"
    return f"median of {run.get('settings', {}).get('steps', '?')} synchronized steps"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m slimfit.bench.readme_table", description=__doc__.split("\n")[0]
    )
    ap.add_argument("runs", nargs="+", help="result folders (with bench.json) or bench.json files")
    ap.add_argument(
        "--modes", default=None, help="comma-separated columns (default: every mode present)"
    )
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", default=None, help="replace the marked block in this file")
    group.add_argument(
        "--check", default=None, help="exit 1 if the marked block in this file differs"
    )
    args = ap.parse_args(argv)
    try:
        runs = []
        for r in args.runs:
            p = Path(r)
            runs.append((str(p / "bench.json" if p.is_dir() else p), load(p)))
        modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
        block = table(runs, modes)
        if args.write or args.check:
            sources = ", ".join(s for s, _ in runs)
            return write_or_check(
                args.write or args.check, "bench", block, bool(args.check), sources
            )
        else:
            sys.stdout.write(block)
    except (OSError, ValueError) as err:
        print(f"readme_table: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
