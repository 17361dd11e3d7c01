"""`slimfit finetune-qa`: fine-tune a question-answering model on SQuAD 2.0 with SlimFit.

``AutoModelForQuestionAnswering`` on windows of ``--max-length`` tokens overlapping by
``--doc-stride`` (:mod:`slimfit.data.squad`), the same optimizer, LR schedule, precision
and SlimFit attachment as ``slimfit finetune`` (imported from :mod:`slimfit.train`) and
the same SlimFit flags (``--policy``, ``--freeze-ratio``, ``--score``,
``--freeze-warmup-steps``, ``--max-stale-steps``, ``--compression``, ``--seed``:
:func:`slimfit.cli.finetune.add_slimfit_arguments`), then the official SQuAD 2.0 EM/F1 on
the validation split. Writes ``metrics.json`` and
``predictions.json`` (``{id: answer}``, the official script's input) into ``--out``.

The defaults are the paper's SQuAD 2.0 settings (3 epochs, batch 128, LR 1.8e-4, seq 384,
stride 128, 80% of the units frozen); offline, pass ``--data-dir`` with the hub's files::

    slimfit finetune-qa --model bert-base-uncased --data-dir squad_v2/ --out runs/squad

The paper's precision, ILS score and compression as well: add
``--precision fp32 --score relative --compression paper``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..train import PRECISIONS, without_full_mask
from .finetune import add_slimfit_arguments, slimfit_options

# The paper's SQuAD 2.0 recipe (bert-base-uncased, REFERENCE.md).
DEFAULTS = {
    "model": "minilm-l6",
    "freeze_ratio": 0.8,
    "lr": 1.8e-4,
    "epochs": 3.0,
    "batch_size": 128,
    "max_length": 384,
    "doc_stride": 128,
}
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
LABELS = ("start_positions", "end_positions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument(
        "--model",
        default=d["model"],
        help="model alias, local folder or hub id; its QA head is new unless the checkpoint "
        "has one (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the rajpurkar/squad_v2 files (train.jsonl and validation.jsonl, or "
        "the parquet files) for machines without hub access (default: $SLIMFIT_DATA_DIR, "
        "else the hub)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where metrics.json and predictions.json go "
        "(default: runs/finetune-qa-<model>-<policy>-<time>)",
    )
    add_slimfit_arguments(parser, freeze_ratio=d["freeze_ratio"])
    parser.add_argument(
        "--lr",
        type=float,
        default=d["lr"],
        help="peak learning rate, decayed linearly to 0 (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=float, default=d["epochs"], help="(default: %(default)s)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="train exactly this many optimizer steps, overriding --epochs",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help="windows per optimizer step (default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=d["max_length"],
        help="tokens per window, question included (default: %(default)s)",
    )
    parser.add_argument(
        "--doc-stride",
        type=int,
        default=d["doc_stride"],
        help="context tokens shared by consecutive windows (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="bf16 = torch.autocast to bfloat16; auto = bf16 where the device computes it "
        "natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32 (default: %(default)s)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines and no summary")


def config_from_args(args: argparse.Namespace):
    """The validated ``TrainConfig`` of ``slimfit finetune`` (one-sentence ValueErrors); the
    SlimFit flags reach it exactly as in ``slimfit finetune`` (:func:`slimfit_options`)."""
    from ..train import TrainConfig

    return TrainConfig(
        model=args.model,
        **slimfit_options(args),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        precision=args.precision,
        max_length=args.max_length,
        output_dir=args.out,
        data_dir=args.data_dir,
        eval_batch_size=args.eval_batch_size,
        report=False,
    )


def run(args: argparse.Namespace) -> int:
    from ..data.squad import check_window
    from ..train import resolve_device

    cfg = config_from_args(args)
    check_window(cfg.max_length, args.doc_stride)
    resolve_device(cfg.device)  # fail on a bad device before loading anything
    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
    metrics = finetune_qa(cfg, args.doc_stride, progress=not args.quiet)
    if not args.quiet:
        e = metrics["eval"]
        print(
            f"slimfit finetune-qa: {metrics['steps']} steps; validation EM {e['exact']:.2f}, "
            f"F1 {e['f1']:.2f} over {e['total']} questions; {metrics['files']['metrics']}"
        )
    return 0


def load_qa_model(name: str):
    """``(model, tokenizer, resolved path)``: ``AutoModelForQuestionAnswering`` in fp32."""
    import transformers
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from ..models import resolve_model
    from ..train import check_model_type

    check_model_type(name)
    resolved = resolve_model(name)
    transformers.logging.set_verbosity_error()  # "newly initialized qa_outputs" is expected
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForQuestionAnswering.from_pretrained(resolved, dtype=torch.float32)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"could not load a question-answering model {name!r} from {resolved} "
            f"({first.rstrip('.')})."
        ) from None
    return model, tokenizer, resolved


def collate(tokenizer, rows: dict, device: torch.device) -> dict:
    """Model inputs (and labels, when ``rows`` has them) of a batch of windows, padded on
    the right to the batch's longest window, so the token positions stay those of the
    features whatever the tokenizer's own padding side."""
    inputs = {k: rows[k] for k in MODEL_INPUTS if k in rows}
    batch = tokenizer.pad(inputs, padding="longest", padding_side="right", return_tensors="pt")
    out = {k: v.to(device) for k, v in without_full_mask(batch).items()}
    for k in LABELS:
        if k in rows:
            out[k] = torch.tensor(rows[k], dtype=torch.long, device=device)
    return out


@torch.no_grad()
def predict_logits(model, tokenizer, features, device, precision: str, batch_size: int):
    """Start and end logits of every window, each cut to the window's own length."""
    from ..train import autocast_for

    was_training = model.training
    model.eval()
    lengths = features["length"]
    inputs = features.select_columns([k for k in MODEL_INPUTS if k in features.column_names])
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # little padding per batch
    starts, ends = [None] * len(lengths), [None] * len(lengths)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        with autocast_for(device, precision):
            out = model(**collate(tokenizer, inputs[idx], device))
        s, e = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        for j, i in enumerate(idx):
            starts[i], ends[i] = s[j, : lengths[i]], e[j, : lengths[i]]
    model.train(was_training)
    return starts, ends


def finetune_qa(cfg, doc_stride: int, progress: bool = True) -> dict:
    """Fine-tune on the SQuAD 2.0 train split, score the validation split, write
    ``metrics.json`` and ``predictions.json`` into ``cfg.output_dir``; returns the metrics."""
    from ..data.squad import (
        eval_features,
        gold_answers,
        load_squad,
        postprocess_predictions,
        squad_v2_metrics,
        train_features,
    )
    from ..train import (
        RunContext,
        build_lr_scheduler,
        build_optimizer,
        build_slimfit,
        device_name,
        epoch_batches,
        oom_message,
        plan_steps,
        prepare_output_dir,
        resolve_device,
        resolve_precision,
        set_seed,
        train_step,
        versions,
    )

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))
    out_dir = Path(cfg.output_dir or _default_out(cfg))
    prepare_output_dir(out_dir)
    data = load_squad(cfg.data_dir)
    set_seed(cfg.seed)  # the QA head's init
    model, tokenizer, resolved = load_qa_model(cfg.model)
    model.to(device).train()
    train = train_features(data["train"], tokenizer, cfg.max_length, doc_stride)
    valid = eval_features(data["validation"], tokenizer, cfg.max_length, doc_stride)
    if len(train) == 0:
        raise ValueError("the SQuAD 2.0 train split is empty; check the --data-dir files.")
    steps_per_epoch, total = plan_steps(cfg, len(train))
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    lr_scheduler = build_lr_scheduler(optimizer, total)
    sf = build_slimfit(model, optimizer, cfg)
    ctx = RunContext(
        cfg,
        device,
        None,
        model,
        tokenizer,
        resolved,
        optimizer,
        lr_scheduler,
        sf,
        total,
        steps_per_epoch,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lengths = train["length"]
    columns = [k for k in (*MODEL_INPUTS, *LABELS) if k in train.column_names]
    rows = train.select_columns(columns)
    losses: list[float] = []
    log_every = max(1, total // 20)
    t_train0 = time.perf_counter()
    while ctx.step < total:
        epoch = ctx.step // steps_per_epoch
        for idx in epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length):
            if ctx.step >= total:
                break
            try:
                losses.append(train_step(ctx, collate(tokenizer, rows[idx], device)))
            except torch.cuda.OutOfMemoryError:
                raise ValueError(oom_message(cfg)) from None
            if progress and (ctx.step % log_every == 0 or ctx.step == total):
                recent = losses[-50:]
                print(
                    f"step {ctx.step}/{total}  loss {sum(recent) / len(recent):.4f}  "
                    f"{time.perf_counter() - t_train0:.0f} s",
                    flush=True,
                )
    train_time = time.perf_counter() - t_train0

    t_eval0 = time.perf_counter()
    starts, ends = predict_logits(
        model, tokenizer, valid, device, cfg.precision, cfg.eval_batch_size
    )
    predictions = postprocess_predictions(data["validation"], valid, starts, ends)
    scores = squad_v2_metrics(predictions, gold_answers(data["validation"]))
    eval_time = time.perf_counter() - t_eval0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    config = {k: v for k, v in asdict(cfg).items() if k not in ("task", "extra", "report")}
    metrics = {
        "task": "squad_v2",
        "model": cfg.model,
        "model_path": resolved,
        "policy": cfg.policy,
        "exact": scores["exact"],
        "f1": scores["f1"],
        "eval": scores,
        "steps": ctx.step,
        "epochs": ctx.step / steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "learning_rate": cfg.learning_rate,
        "train_loss_last50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "units": len(sf.units),
        "frozen_per_step": sf.scheduler.n_frozen,
        "trained_steps_per_unit": sf.trained_steps_per_unit(),
        "data": {
            "train_examples": len(data["train"]),
            "train_features": len(train),
            "validation_examples": len(data["validation"]),
            "validation_features": len(valid),
        },
        "wall_time_s": time.perf_counter() - t0,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "peak_memory_bytes": peak,
        "device": device_name(device),
        "config": config | {"doc_stride": doc_stride},
        "slimfit": sf.config.to_dict(),
        "versions": versions(),
        "files": {
            "metrics": str(out_dir / "metrics.json"),
            "predictions": str(out_dir / "predictions.json"),
        },
    }
    sf.detach()
    (out_dir / "predictions.json").write_text(json.dumps(predictions, indent=1) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _default_out(cfg) -> str:
    model = Path(cfg.model).name or "model"
    return str(Path("runs") / f"finetune-qa-{model}-{cfg.policy}-{time.strftime('%Y%m%d-%H%M%S')}")
