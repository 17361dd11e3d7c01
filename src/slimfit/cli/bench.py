"""`slimfit bench`: measure memory and speed of every mode side by side on a workload.

slimfit bench --workload bert-base-qa --mode full,ckpt,slimfit --output runs/bench-qa
slimfit bench --workload vit-base --max-batch --memory-cap 32GiB
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimfit.bench.modes import MODES
    from slimfit.bench.workloads import WORKLOADS

    parser.add_argument(
        "--workload",
        default="bert-base-seqcls",
        help=f"comma-separated workloads: {', '.join(WORKLOADS)} (default: bert-base-seqcls)",
    )
    parser.add_argument(
        "--mode",
        default="all",
        help=f"comma-separated modes, run in this order: {', '.join(MODES)}; all = the main modes, breakdown = ILS plus one compression at a time (default: all)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="HF model id or local path whose config replaces the workload's (random init, no weights)",
    )
    parser.add_argument(
        "--size",
        default="auto",
        choices=("auto", "base", "tiny"),
        help="model size: base (paper's), tiny (CI); auto = base on CUDA, tiny on CPU",
    )
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 128 on CUDA, 4 on CPU"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="text workloads (default: 128 seq-cls, 384 QA)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 3 on CPU)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (default: 3 on CUDA, 1 on CPU)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--freeze-ratio", type=float, default=None, help="override the SlimFit modes' 0.95"
    )
    parser.add_argument(
        "--max-batch",
        action="store_true",
        help="also search the largest batch each mode fits under --memory-cap (CUDA only; "
        "peak over 2 steps per probed batch, 8 for modes with a SlimFit schedule)",
    )
    parser.add_argument("--memory-cap", default=None, help="memory cap for --max-batch, e.g. 32GiB")
    parser.add_argument(
        "--max-batch-limit", type=int, default=4096, help="largest batch the search tries"
    )
    parser.add_argument(
        "--max-probes", type=int, default=8, help="probe runs per mode in the search"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds from the start after which max-batch searches are skipped (they run "
        "after every mode is timed)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one step per mode (torch.profiler): top ops by self time",
    )
    parser.add_argument(
        "--no-b2b",
        action="store_true",
        help="skip the back-to-back timing (steps without a sync between them)",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=0,
        help="also time slimfit against full in N alternating rounds of --steps steps "
        "(robust to a host whose speed drifts; slimfit-nopage and slimfit-resident join them "
        "when in --mode; 0: off)",
    )
    parser.add_argument(
        "--attention-mask",
        default="none",
        help="text batches: unpadded without a mask (none, the default), unpadded with an "
        "all-ones mask (ones; transformers' sdpa reads it on the host in every forward, a "
        "device sync), or dynamically padded rows of random length with their mask (padded)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest for tiny CPU runs on a busy machine)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="folder for bench.json, bench.md, bench.png (default: runs/bench-<time>)",
    )
    parser.add_argument("--no-png", action="store_true", help="skip the chart")
    parser.add_argument("--list", action="store_true", help="list workloads and modes, then exit")


def run(args: argparse.Namespace) -> int:
    from slimfit.bench import MODES, WORKLOADS, report, run_bench

    if args.list:
        print("workloads:")
        for w in WORKLOADS.values():
            print(f"  {w.name:18} {w.description}")
        print("modes:")
        for m in MODES.values():
            print(f"  {m.name:18} {m.description}")
        return 0
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be an integer >= 1, got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)
    output = args.output or f"runs/bench-{dt.datetime.now():%Y%m%d-%H%M%S}"
    argv = sys.argv[1:]
    if (
        "bench" in argv
    ):  # `slimfit [--debug] bench ARGS`; standalone: `python -m slimfit.cli.bench ARGS`
        argv = argv[argv.index("bench") + 1 :]
    command = "slimfit bench " + " ".join(shlex.quote(a) for a in argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = run_bench(
        _csv(args.workload),
        _csv(args.mode),
        model=args.model,
        size=args.size,
        device=args.device,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        freeze_ratio=args.freeze_ratio,
        max_batch=args.max_batch,
        memory_cap=args.memory_cap,
        max_batch_limit=args.max_batch_limit,
        max_probes=args.max_probes,
        time_budget=args.time_budget,
        profile=args.profile,
        b2b=not args.no_b2b,
        paired_rounds=args.paired_rounds,
        attention_mask=args.attention_mask,
        output=output,
        png=not args.no_png,
        command=command,
        log=log,
    )
    print(report.to_text(results))
    print(f"wrote {', '.join(results.get('files', {}).values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m slimfit.cli.bench``): imports no other sub-command."""
    try:
        from slimfit.cli.main import _Parser, _sentence
    except ImportError:  # keep the standalone entry independent of main.py's internals
        _Parser, _sentence = argparse.ArgumentParser, str

    parser = _Parser(prog="slimfit bench", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        if args.debug:
            raise
        print(f"slimfit bench: error: {_sentence(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
