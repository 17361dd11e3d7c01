"""`slimfit report RUN_DIR`: figures and a markdown summary of a run, written into RUN_DIR.

slimfit report runs/finetune-sentiment-minilm-l6-ils-20261123-101500
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory with schedule.jsonl (and metrics.json)")
    parser.add_argument(
        "--no-predict",
        action="store_true",
        help="do not predict the memory breakdown with slimfit plan when metrics.json has none",
    )


def run(args: argparse.Namespace) -> int:
    import warnings

    from slimfit.report import make_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging

            logging.set_verbosity_error()
        except Exception:  # noqa: BLE001
            pass
        files = make_report(args.run_dir, predict=not args.no_predict)
    print(f"slimfit report: wrote {len(files)} files into {args.run_dir}:")
    for f in files:
        print(f"  {f}")
    return 0
