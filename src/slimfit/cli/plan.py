"""`slimfit plan`: will it fit, and at which batch size? Peak GPU memory per mode, no GPU.

slimfit plan --model bert-base-qa --batch-size 32
slimfit plan --model bert-base-seqcls --batch-size 128 --memory-cap 24GiB
slimfit plan --model ./my-model --seq-len 256 --batch-size 16 --mode full,ckpt --json
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimfit.plan import MODES, WORKLOADS

    parser.add_argument(
        "--model",
        default="bert-base-seqcls",
        help=f"a bench workload ({', '.join(WORKLOADS)}) or a Hugging Face model id / local "
        "folder (its config only; no weights are loaded) (default: bert-base-seqcls)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="default: 32")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (image models: pixels per side); default: the workload's",
    )
    parser.add_argument(
        "--freeze-ratio", type=float, default=0.95, help="SlimFit modes' freeze ratio (0.95)"
    )
    parser.add_argument(
        "--mode",
        default="all",
        help=f"comma-separated modes: {', '.join(MODES)} (default: all)",
    )
    parser.add_argument(
        "--memory-cap",
        default=None,
        help="also answer the largest batch per mode under this memory, e.g. 24GiB",
    )
    parser.add_argument("--seed", type=int, default=0, help="ILS seed (which units freeze first)")
    parser.add_argument(
        "--task",
        default=None,
        choices=("seqcls", "qa", "image"),
        help="task head of a --model given by id/folder (default: image for vision models, "
        "else seqcls)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=("bf16", "fp32"),
        help="override the modes' precision (default: fp32 for full-fp32-eager, bf16 "
        "autocast with fp32 master weights otherwise)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="BENCH_JSON",
        help="instead: predict every mode a slimfit bench run measured and write "
        "plan_vs_measured.md/.json into --output-dir",
    )
    parser.add_argument(
        "--output-dir",
        default="benchmarks/results/plan",
        help="folder for --compare's files (default: benchmarks/results/plan)",
    )
    parser.add_argument("--output", default=None, help="also write the JSON to this file")


def _modes(text: str) -> list[str]:
    from slimfit.plan import MODES

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names or names == ["all"]:
        return list(MODES)
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)} (or all).")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    import warnings

    from slimfit import plan

    if args.compare:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _quiet_transformers()
            files = plan.write_comparison(args.compare, args.output_dir)
        print(files[0].read_text())
        print(f"slimfit plan: wrote {', '.join(str(f) for f in files)}")
        return 0
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len must be at least 1, got {args.seq_len}.")
    if not 0.0 <= args.freeze_ratio < 1.0:
        raise ValueError(f"--freeze-ratio must be in [0, 1), got {args.freeze_ratio}.")
    modes = _modes(args.mode)
    cap = plan.parse_size(args.memory_cap) if args.memory_cap is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _quiet_transformers()
        result = plan.predict(
            args.model,
            args.batch_size,
            args.seq_len,
            modes,
            args.freeze_ratio,
            cap,
            args.seed,
            task=args.task,
            precision=args.precision,
            log=None if args.json else _progress,
        )
    text = json.dumps(result, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        print_table(result)
    return 0


def _progress(mode: str) -> None:
    slow = (
        " (slimfit ops run on CPU tensors: this takes a while)"
        if mode.startswith("slimfit")
        else ""
    )
    print(f"slimfit plan: simulating {mode}{slow} ...", file=sys.stderr, flush=True)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


def print_table(result: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from slimfit.plan import MODE_HELP, GiB

    out = file or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 120)
    unit = "px" if result["task"] == "image" else "tokens"
    title = (
        f"Predicted peak GPU memory: {result['model']}, batch {result['batch_size']}, "
        f"{result['seq_len']} {unit}"
    )
    table = Table(title=title, title_justify="left")
    cap = result.get("memory_cap_bytes")
    cols = ["mode", "peak GiB", "weights", "grads", "optim", "activations", "transient", "peak in"]
    if cap:
        cols.append(f"max batch ≤ {cap / GiB:.1f} GiB")
    for c in cols:
        table.add_column(c, justify="left" if c in ("mode", "peak in") else "right")
    notes = []
    for mode, p in result["modes"].items():
        if "error" in p:
            table.add_row(mode, "[yellow]n/a[/yellow]", *[""] * (len(cols) - 2))
            notes.append(f"{mode}: not planned: {p['error']}")
            continue
        b = p["breakdown"]
        g = lambda v: f"{v / GiB:.2f}"  # noqa: E731
        peak = g(p["peak_bytes"])
        if cap:
            peak = f"[red]{peak}[/red]" if p["peak_bytes"] > cap else f"[green]{peak}[/green]"
        row = [
            mode,
            peak,
            g(b["weights"] + b["weight_casts"]),
            g(b["gradients"]),
            g(b["optimizer"]),
            g(b["activations"]),
            g(b["transient"]),
            p["phase"],
        ]
        if cap:
            row.append(str(p.get("max_batch")) if p.get("max_batch") else "none")
        table.add_row(*row)
        for n in p.get("notes", []):
            notes.append(f"{mode}: {n}")
    console.print(table)
    console.print(
        "weights = fp32 masters + bf16 casts; activations = saved for backward; transient = "
        "everything else alive at the peak (+40 MiB cuBLAS workspace)."
    )
    if result.get("precision") in ("bf16", "fp32"):
        console.print(f"  precision: {result['precision']} in every mode (--precision)")
    for mode in result["modes"]:
        console.print(f"  [bold]{mode}[/bold]: {MODE_HELP[mode]}", highlight=False)
    for n in notes:
        console.print(f"  note, {n}", highlight=False)
