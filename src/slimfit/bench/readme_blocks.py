"""README blocks generated from results files (never typed in): the text between
``<!-- slimfit-NAME:start -->`` and ``<!-- slimfit-NAME:end -->`` is replaced (``--write``)
or compared (``--check``, for CI) by the scripts that build each block."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- slimfit-{name}:start -->", f"<!-- slimfit-{name}:end -->"


def replaced(text: str, name: str, block: str, path: Path | str) -> str:
    """``text`` with the ``name`` block's body replaced by ``block``."""
    start, end = markers(name)
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} markers; add them where the block goes.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}{end}{tail}"


def write_or_check(path: Path | str, name: str, block: str, check: bool, sources: str) -> int:
    """Write the block into ``path`` (0), or with ``check`` return 1 (and say so) when the
    file's block differs from ``block``, generated from ``sources``."""
    path = Path(path)
    text = path.read_text()
    new = replaced(text, name, block, path)
    if check:
        if new != text:
            print(
                f"{path}: the {name} block differs from what {sources} gives; run with --write {path}.",
                file=sys.stderr,
            )
            return 1
        return 0
    path.write_text(new)
    return 0


def main(name: str, doc: str, build: Callable[[list[str]], str], argv=None) -> int:
    """The command line of a block generator: ``RESULTS... [--write FILE | --check FILE]``
    prints, writes or checks the ``name`` block that ``build(results)`` returns."""
    prog = Path(sys.argv[0]).stem
    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    ap.add_argument("results", nargs="+", help="the results files the block is built from")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", help="replace the block in this file")
    group.add_argument("--check", help="exit 1 if the block in this file differs")
    args = ap.parse_args(argv)
    try:
        body = build(args.results)
        target = args.write or args.check
        if not target:
            print(body, end="")
            return 0
        return write_or_check(target, name, body, bool(args.check), ", ".join(args.results))
    except (OSError, ValueError, KeyError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
