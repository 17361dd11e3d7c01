"""The ``slimfit finetune`` command line the CLI tests share: a tiny offline CPU run."""

from __future__ import annotations


def finetune_args(model, data_dir, out, *extra, max_steps: int = 2) -> list[str]:
    """``finetune`` on ``model`` and ``data_dir`` (fp32 on CPU, batch 4, ``max_steps``
    steps, no report) into ``out``; ``extra`` flags go last, so they override these."""
    return [
        "finetune",
        "--model",
        str(model),
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--batch-size",
        "4",
        "--max-steps",
        str(max_steps),
        "--quiet",
        "--no-report",
        "--output-dir",
        str(out),
        *extra,
    ]
