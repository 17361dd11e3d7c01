"""Bench results: ratios against ``full``, the checks of issue 4, JSON / markdown / PNG.

Everything here reads the result dict (or its JSON), so a results folder can be
re-rendered or merged later::

    python -m slimfit.bench.results render RESULTS.json [--output DIR]
    python -m slimfit.bench.results merge OUTPUT_DIR A.json B.json ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .modes import BASELINE, MODES

GiB = 2**30
MiB = 2**20
JSON_NAME, MD_NAME, PNG_NAME = "bench.json", "bench.md", "bench.png"

# (description, mode, metric, other mode, factor): pass when metric(mode) <= factor * metric(other)
CHECKS = [
    ("slimfit peak memory <= ckpt", "slimfit", "peak", "ckpt", 1.0),
    ("slimfit step time <= full", "slimfit", "step", "full", 1.0),
    ("slimfit step time <= full, steps back to back", "slimfit", "step_b2b", "full", 1.0),
    ("slimfit peak memory >= 4x below full-fp32-eager", "slimfit", "peak", "full-fp32-eager", 0.25),
]


# -- numbers ---------------------------------------------------------------------------------


def metric(res: dict | None, name: str) -> float | None:
    """One number of a mode result: peak, reserved, saved, static, step, throughput, hooks."""
    if not res or res.get("status") != "ok":
        return None
    try:
        value = {
            "peak": lambda: res["memory"]["peak_allocated_bytes"],
            "reserved": lambda: res["memory"]["peak_reserved_bytes"],
            "saved": lambda: res["activations"]["saved_bytes"],
            "static": lambda: res["static"]["total_bytes"],
            "step": lambda: res["time"]["median_s"],
            "step_b2b": lambda: res["time_b2b"]["median_s"],
            "throughput": lambda: res["time"]["samples_per_s"],
            "hooks": lambda: res["slimfit"]["hooks"]["median_ms"],
        }[name]()
    except (KeyError, TypeError):
        return None
    return float(value) if value is not None else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or not isinstance(b, (int, float)) or b <= 0 or math.isnan(b):
        return None
    return a / b


def add_ratios(workload: dict, baseline: str = BASELINE) -> dict:
    """Adds ``ratios`` (against ``baseline``) to every mode and ``checks`` to the workload."""
    modes = workload["modes"]
    base = modes.get(baseline)
    for res in modes.values():
        res["ratios"] = {
            f"{m}_vs_{baseline}": ratio(metric(res, m), metric(base, m))
            for m in ("peak", "reserved", "saved", "step", "step_b2b", "throughput")
        }
        eager = modes.get("full-fp32-eager")
        res["ratios"]["peak_reduction_vs_full-fp32-eager"] = ratio(
            metric(eager, "peak"), metric(res, "peak")
        )
    workload["checks"] = run_checks(modes)
    paired = workload.get("paired") or {}
    if paired.get("status") == "ok":
        r, med = paired["ratio_median"], paired["step_s_median"]
        workload["checks"].append(
            {
                "check": "slimfit step time <= full, paired rounds",
                "status": "pass" if r <= 1.0 else "fail",
                "detail": f"median round ratio {r:.3f} over {paired['rounds']} rounds "
                f"(medians {_fmt_metric('step', med['slimfit'])} vs "
                f"{_fmt_metric('step', med['full'])})",
            }
        )
    return workload


def run_checks(modes: dict) -> list[dict]:
    out = []
    for text, mode, name, other, factor in CHECKS:
        a, b = metric(modes.get(mode), name), metric(modes.get(other), name)
        if a is None or b is None:
            missing = mode if a is None else other
            status = "n/a"
            detail = f"{missing} has no {name} measurement"
        else:
            status = "pass" if a <= factor * b else "fail"
            detail = f"{_fmt_metric(name, a)} vs {factor:g} x {_fmt_metric(name, b)}"
        out.append({"check": text, "status": status, "detail": detail})
    return out


def _fmt_metric(name: str, v: float) -> str:
    if name in ("peak", "reserved", "static"):
        return f"{v / GiB:.2f} GiB"
    if name == "saved":
        return f"{v / MiB:.1f} MiB"
    if name in ("step", "step_b2b"):
        return f"{v:.4f} s"
    return f"{v:.3g}"


# -- markdown / text -----------------------------------------------------------------------------


def _gib(v) -> str:
    """GiB with 2 decimals; values under 0.1 GiB (tiny CPU runs) in MiB."""
    if v is None:
        return "n/a"
    return f"{v / GiB:.2f} GiB" if v >= 0.1 * GiB else f"{v / MiB:.1f} MiB"


def _mib(v) -> str:
    return "n/a" if v is None else f"{v / MiB:.1f} MiB"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _ordered(modes: dict) -> list[str]:
    known = [m for m in MODES if m in modes]
    return known + [m for m in modes if m not in MODES]


def mode_rows(workload: dict) -> list[list[str]]:
    rows = []
    for name in _ordered(workload["modes"]):
        res = workload["modes"][name]
        if res.get("status") != "ok":
            rows.append([name, f"{res.get('status')}: {res.get('reason', '')}"] + [""] * 12)
            continue
        r, t, mem = res.get("ratios", {}), res["time"], res["memory"]
        hooks = metric(res, "hooks")
        mb = res.get("max_batch") or {}
        if mb.get("status") == "ok":
            bound = f" (<{mb['upper_bound']})" if mb.get("upper_bound") else " (limit)"
            max_batch = f"{mb['max_batch']}{bound}"
        else:
            max_batch = mb.get("status", "-") if mb else "-"
        rows.append(
            [
                name,
                "ok",
                _gib(mem["peak_allocated_bytes"]),
                _x(r.get(f"peak_vs_{BASELINE}")),
                _gib(mem["peak_reserved_bytes"]),
                _gib(res["static"]["total_bytes"]),
                _mib(res["activations"]["saved_bytes"]),
                f"{t['median_s'] * 1e3:.1f} ms ({t['p10_s'] * 1e3:.1f}-{t['p90_s'] * 1e3:.1f})",
                _x(r.get(f"step_vs_{BASELINE}")),
                _b2b(res.get("time_b2b"), r.get(f"step_b2b_vs_{BASELINE}")),
                f"{t['samples_per_s']:.0f}" if t.get("samples_per_s") else "n/a",
                _phases(res.get("phases")),
                ("-" if hooks is None else f"{hooks:.2f} ms") + _paged(res),
                max_batch,
            ]
        )
    return rows


HEADER = [
    "mode",
    "status",
    "peak alloc",
    f"x {BASELINE}",
    "peak reserved",
    "static",
    "saved act.",
    "step median (p10-p90)",
    f"x {BASELINE}",
    "back-to-back step (x full)",
    "samples/s",
    "fwd / bwd / opt",
    "hooks/step",
    "max batch",
]


def _paged(res: dict) -> str:
    moved = (res.get("slimfit") or {}).get("paged_bytes_per_step")
    if not moved:
        return ""
    return f" (paged {moved['to_host'] / 2**20:.0f} + {moved['to_device'] / 2**20:.0f} MiB)"


def _b2b(t: dict | None, ratio_full) -> str:
    if not t:
        return "-"
    return f"{t['median_s'] * 1e3:.1f} ms ({_x(ratio_full)})"


def _phases(p: dict | None) -> str:
    if not p:
        return "-"
    return f"{p['forward_ms']:.1f} / {p['backward_ms']:.1f} / {p['optimizer_ms']:.1f} ms"


def profile_rows(workload: dict, top: int = 12) -> tuple[list[str], list[list[str]]]:
    """Self time per op from the one profiled step of each mode (``--profile``)."""
    names = [
        m
        for m in _ordered(workload["modes"])
        if (workload["modes"][m].get("profile") or {}).get("top")
    ]
    if not names:
        return [], []
    per = {}
    for m in names:
        prof = workload["modes"][m]["profile"]
        per[m] = {r["op"]: r[prof["sort"]] for r in prof["top"]}
    best: dict = {}
    for m in names:
        for op, ms in per[m].items():
            best[op] = max(best.get(op, 0.0), ms)
    ops = sorted(best, key=lambda o: -best[o])[:top]
    rows = [
        [f"`{op[:60]}`"] + [f"{per[m][op]:.2f}" if op in per[m] else "-" for m in names]
        for op in ops
    ]
    rows.append(
        ["**total (all ops)**"]
        + [f"{workload['modes'][m]['profile']['total_ms']:.2f}" for m in names]
    )
    return ["op (self ms, one step)"] + names, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return lines


def breakdown_rows(workload: dict, key: str, top: int = 14) -> tuple[list[str], list[list[str]]]:
    """Saved bytes per group (``by_module`` or ``by_op``), one column per mode."""
    names = [
        m
        for m in _ordered(workload["modes"])
        if workload["modes"][m].get("status") == "ok"
        and key in workload["modes"][m].get("activations", {})
    ]
    if not names:
        return [], []
    totals: dict = {}
    for m in names:
        for g, b in workload["modes"][m]["activations"][key].items():
            totals[g] = max(totals.get(g, 0), b)
    groups = sorted(totals, key=lambda g: -totals[g])
    shown, rest = groups[:top], groups[top:]
    rows = []
    for g in shown:
        rows.append(
            [f"`{g}`"]
            + [
                _mib(workload["modes"][m]["activations"][key].get(g))
                if g in workload["modes"][m]["activations"][key]
                else "-"
                for m in names
            ]
        )
    if rest:
        rows.append(
            [f"other ({len(rest)})"]
            + [
                _mib(sum(workload["modes"][m]["activations"][key].get(g, 0) for g in rest))
                for m in names
            ]
        )
    rows.append(
        ["**total**"] + [_mib(workload["modes"][m]["activations"]["saved_bytes"]) for m in names]
    )
    if key == "by_module":
        rows.append(
            ["of which weight copies (autocast casts, by shape)"]
            + [_mib(workload["modes"][m]["activations"].get("weight_copy_bytes")) for m in names]
        )
        retained = [
            (workload["modes"][m].get("memory") or {}).get("graph_retained_bytes") for m in names
        ]
        if any(r is not None for r in retained):
            rows.append(
                ["cross-check: CUDA bytes held after the forward"] + [_mib(r) for r in retained]
            )
    return ["group"] + names, rows


def _host_speed_text(speed: dict | None) -> str:
    if not speed:
        return ""
    return (
        f" (probe when the run began: Python loop {speed['python_us']:.0f} us, "
        f"torch CPU op {speed['torch_op_us']:.1f} us; `host_speed` in the JSON has it around "
        "every mode's timing)"
    )


def to_markdown(results: dict) -> str:
    env = results.get("env", {})
    lines = [
        "# slimfit bench",
        "",
        f"- command: `{results.get('command', '')}`",
        f"- date: {results.get('date', '')}",
        f"- device: {env.get('device', '?')} (driver {env.get('driver') or 'n/a'}, CUDA {env.get('cuda') or 'n/a'})",
        "- versions: "
        + ", ".join(
            f"{k} {env.get(k) or 'n/a'}"
            for k in ("torch", "transformers", "triton", "peft", "slimfit", "python")
        ),
        f"- host: {env.get('host_cpu') or '?'}{_host_speed_text(env.get('host_speed'))}",
        f"- settings: {_settings_line(results.get('settings', {}))}",
        "",
        "Peak = max_memory_allocated over the timed steps after warm-up; step = median wall time of "
        "one forward+backward+AdamW step (p10-p90 in brackets); saved act. = unique storages "
        "autograd saves in one forward (parameters excluded); static = weights + buffers + "
        "gradients + optimizer state, measured from the tensors; hooks = SlimFit's optimizer "
        "hooks per step, synchronized: with them the device time of what they launch (e.g. "
        "the optimizer-state paging copies, which overlap compute in a real step), and in "
        "brackets the optimizer state those copies carry per step, to the host + back; fwd / bwd "
        "/ opt = medians of extra steps synchronized between phases (opt includes the hooks; "
        "fwd the page-in copies issued at its end); back-to-back = the same number of steps issued without "
        "synchronizing between them (CUDA events), as a training loop runs.",
    ]
    for w in results.get("workloads", []):
        lines += [
            "",
            f"## {w['workload']} (batch {w['batch_size']}"
            + (f", seq {w['seq_len']}" if w.get("seq_len") else "")
            + ")",
            "",
        ]
        lines += _md_table(HEADER, mode_rows(w))
        if w.get("checks"):
            lines += ["", "Checks:", ""]
            lines += _md_table(
                ["check", "status", "detail"],
                [[c["check"], c["status"].upper(), c["detail"]] for c in w["checks"]],
            )
        header, rows = profile_rows(w)
        if rows:
            lines += ["", "Step time by op (torch.profiler, one step, self time in ms):", ""]
            lines += _md_table(header, rows)
        for key, title in (
            ("by_module", "Saved activations by module"),
            ("by_op", "Saved activations by autograd node"),
        ):
            header, rows = breakdown_rows(w, key)
            if rows:
                lines += ["", f"{title} (one forward):", ""] + _md_table(header, rows)
    return "\n".join(lines) + "\n"


def _settings_line(s: dict) -> str:
    keys = ("size", "batch_size", "steps", "warmup", "seed", "memory_cap", "freeze_ratio")
    return ", ".join(f"{k}={s[k]}" for k in keys if k in s and s[k] is not None)


def to_text(results: dict) -> str:
    """Compact fixed-width table (what the CLI prints at the end)."""
    cols = [0, 2, 3, 6, 7, 8, 9, 12, 13]
    header = [HEADER[i] for i in cols]
    out = []
    for w in results.get("workloads", []):
        rows = mode_rows(w)
        ok = [[r[i] for i in cols] for r in rows if r[1] == "ok"]
        widths = [max([len(header[i])] + [len(r[i]) for r in ok]) for i in range(len(header))]
        widths[0] = max([widths[0]] + [len(r[0]) for r in rows])
        out.append(f"{w['workload']} (batch {w['batch_size']})")
        out.append("  ".join(h.ljust(widths[i]) for i, h in enumerate(header)).rstrip())
        for r in rows:
            if r[1] == "ok":
                out.append("  ".join(r[i].ljust(widths[j]) for j, i in enumerate(cols)).rstrip())
            else:
                out.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        for c in w.get("checks", []):
            out.append(f"  [{c['status'].upper():4}] {c['check']}: {c['detail']}")
        out.append("")
    return "\n".join(out)


# -- chart ----------------------------------------------------------------------------------------


def to_png(results: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results.get("workloads", [])
    fig, axes = plt.subplots(
        max(1, len(workloads)), 2, figsize=(13, 3.6 * max(1, len(workloads))), squeeze=False
    )
    for row, w in zip(axes, workloads):
        names = [m for m in _ordered(w["modes"]) if w["modes"][m].get("status") == "ok"]
        peaks = [metric(w["modes"][m], "peak") for m in names]
        if names and all(p is not None for p in peaks):
            values, label = [p / GiB for p in peaks], "peak allocated (GiB)"
            statics = [metric(w["modes"][m], "static") / GiB for m in names]
            bars = row[0].bar(names, values, color="#4c72b0", label="peak allocated")
            row[0].bar_label(bars, fmt="%.2f", fontsize=7)
            row[0].bar(
                names, statics, color="#dd8452", alpha=0.8, label="static (weights+grads+optim)"
            )
            row[0].legend(fontsize=7)
        else:
            values = [metric(w["modes"][m], "saved") / MiB for m in names]
            label = "saved activations (MiB); no CUDA memory counters"
            row[0].bar_label(row[0].bar(names, values, color="#4c72b0"), fmt="%.1f", fontsize=7)
        row[0].set_ylabel(label, fontsize=8)
        row[0].set_title(f"{w['workload']} (batch {w['batch_size']}): memory", fontsize=9)
        med = [w["modes"][m]["time"]["median_s"] * 1e3 for m in names]
        lo = [med[i] - w["modes"][m]["time"]["p10_s"] * 1e3 for i, m in enumerate(names)]
        hi = [w["modes"][m]["time"]["p90_s"] * 1e3 - med[i] for i, m in enumerate(names)]
        bars = row[1].bar(names, med, yerr=[lo, hi], color="#55a868", capsize=3)
        row[1].bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        row[1].set_ylabel("step time (ms), median, p10-p90", fontsize=8)
        row[1].set_title(f"{w['workload']}: step time", fontsize=9)
        for ax in row:
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
            ax.tick_params(axis="y", labelsize=7)
    env = results.get("env", {})
    fig.suptitle(
        f"slimfit bench - {env.get('device', '?')} - torch {env.get('torch', '?')} - "
        f"{results.get('date', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- files ----------------------------------------------------------------------------------------


def mark_missing(results: dict) -> dict:
    """Modes asked for but absent (the process was killed before them) become 'not run'."""
    asked = (results.get("settings") or {}).get("modes") or []
    for w in results.get("workloads", []):
        for m in asked:
            w["modes"].setdefault(
                m,
                {
                    "mode": m,
                    "status": "not run",
                    "reason": "the process ended before this mode (timeout or crash)",
                },
            )
    return results


def finalize(results: dict) -> dict:
    if not results.get("parts"):
        mark_missing(results)
    for w in results.get("workloads", []):
        add_ratios(w)
    return results


def write_json(results: dict, path: str | os.PathLike) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_all(results: dict, output: str | os.PathLike, png: bool = True) -> dict:
    """bench.json, bench.md and bench.png into ``output``; returns their paths."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    finalize(results)
    paths = {"json": out / JSON_NAME, "markdown": out / MD_NAME}
    write_json(_clean(results), paths["json"])
    paths["markdown"].write_text(to_markdown(results))
    if png:
        try:
            to_png(results, out / PNG_NAME)
            paths["png"] = out / PNG_NAME
        except Exception as err:  # noqa: BLE001 - a chart problem must not lose the numbers
            print(
                f"slimfit bench: warning: no chart ({type(err).__name__}: {err})", file=sys.stderr
            )
    return paths


def _clean(obj):
    """JSON-safe copy: NaN/inf become None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def load(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{p} is not valid JSON ({err.msg} at line {err.lineno}); re-run the bench."
        ) from None
    if "workloads" not in data:
        raise ValueError(f"{p} holds no 'workloads'; pass a bench.json written by slimfit bench.")
    return data


def merge(parts: list[dict]) -> dict:
    """One result from several runs (e.g. one process per workload): workloads side by side."""
    if not parts:
        raise ValueError("nothing to merge; pass at least one bench.json.")
    out = dict(parts[0])
    out["workloads"] = [w for p in parts for w in mark_missing(p).get("workloads", [])]
    out["command"] = " ; ".join(p.get("command", "") for p in parts)
    out["parts"] = [
        {"command": p.get("command"), "date": p.get("date"), "settings": p.get("settings")}
        for p in parts
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slimfit.bench.results")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="re-write markdown/PNG (and ratios) from a bench.json")
    r.add_argument("json")
    r.add_argument("--output", default=None)
    m = sub.add_parser("merge", help="merge several bench.json into one folder")
    m.add_argument("output")
    m.add_argument("jsons", nargs="+")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "render":
            data = load(args.json)
            out = args.output or (args.json if Path(args.json).is_dir() else Path(args.json).parent)
        else:
            parts = []
            for j in args.jsons:
                try:
                    parts.append(load(j))
                except (OSError, ValueError) as err:
                    print(f"merge: skipping {j}: {err}", file=sys.stderr)
            data, out = merge(parts), args.output
        write_all(data, out)
        print(to_text(data))
    except (OSError, ValueError) as err:
        print(f"slimfit bench report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
