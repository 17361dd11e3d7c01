"""README blocks generated from results files (never typed in): the text between
``<!-- slimfit-NAME:start -->`` and ``<!-- slimfit-NAME:end -->`` is replaced (``--write``)
or compared (``--check``, for CI) by the scripts that build each block."""

from __future__ import annotations

import sys
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
