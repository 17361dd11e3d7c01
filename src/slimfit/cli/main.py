"""`slimfit` command line: one sub-command per module in this package.

Each sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Errors the user can fix (bad arguments, missing files, bad configs) surface as one
sentence and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "finetune": (
        "slimfit.cli.finetune",
        "fine-tune a model with SlimFit (default: offline MiniLM on movie reviews)",
    ),
    "finetune-qa": (
        "slimfit.cli.finetune_qa",
        "fine-tune a QA model on SQuAD 2.0 with SlimFit (EM/F1)",
    ),
    "bench": ("slimfit.cli.bench", "measure memory and speed of every mode side by side"),
    "plan": ("slimfit.cli.plan", "predict peak GPU memory per mode before a run"),
    "report": ("slimfit.cli.report", "turn a run directory into figures and a summary"),
}


class CLIError(Exception):
    """A problem the user can fix; printed as one sentence, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one sentence, exit 2
        self.print_usage(sys.stderr)
        print(f"slimfit: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="slimfit", description="Memory-efficient fine-tuning of transformers (SlimFit)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show full tracebacks on errors",
        )
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        if args.debug:
            raise
        print(f"slimfit {args.command}: error: {_sentence(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slimfit {args.command}: interrupted.", file=sys.stderr)
        return 130


def _sentence(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__  # one line, whatever was raised
    if isinstance(err, (FileNotFoundError, PermissionError, NotADirectoryError)) and getattr(
        err, "filename", None
    ):
        text = (
            f"{err.strerror or type(err).__name__}: {err.filename}; check the path and try again."
        )
    return text
