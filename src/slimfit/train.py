"""The plain training loop behind ``slimfit finetune``.

Readable on purpose: AdamW (weight decay 0.01, none on biases and norm gains), linear
decay without warm-up, fp32 or bf16 autocast, dynamic padding, a seeded data order, and
SlimFit attached to the optimizer. Each piece is built by a small function
(:func:`build_model`, :func:`build_optimizer`, :func:`build_lr_scheduler`,
:func:`build_slimfit`, :func:`epoch_batches`) so that checkpoint/resume or a Trainer-based
path can reuse them. :func:`finetune` runs everything and writes ``metrics.json`` and
``schedule.jsonl`` into the output directory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import __version__
from .attach import SlimFit, attach
from .checkpoint import (
    NONFINITE_POLICIES,
    NonFiniteGuard,
    ensure_writable_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import DEFAULT_HEAD_PATTERN, LORA, POLICIES, SlimFitConfig
from .data import METRICS, TaskData, get_task
from .units import find_units

PRECISIONS = ("auto", "bf16", "fp32")
# Defaults measured on the offline default (minilm-l6 on sentiment, batch 32, max length
# 64, bf16 autocast, 3 seeds each, H100): ILS at freeze 0.9 reaches 84.1% test accuracy
# at lr 1e-4, 84.5% at 2e-4 and 84.5% at 4e-4 (full fine-tuning at 5e-5: 84.8%); units
# frozen most of the time see only a fraction of the updates, so the freezing policies
# take a larger step. Freeze 0.95 (the paper's SST-2 rate) at 4e-4: 84.4%.
DEFAULT_LR = {"none": 5e-5, "ils": 2e-4, "random": 2e-4}
DEFAULT_FREEZE_RATIO = 0.9


@dataclass
class TrainConfig:
    model: str = "minilm-l6"
    task: str = "sentiment"
    policy: str = "ils"
    freeze_ratio: float = DEFAULT_FREEZE_RATIO
    epochs: float = 3
    max_steps: int | None = None
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR[policy]
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast where the device computes bf16 natively, else fp32
    max_length: int = 64
    output_dir: str | None = None
    data_dir: str | None = None
    compression: str = "auto"  # "default" on CUDA, "none" on CPU
    freeze_warmup_steps: int = 0
    score: str | None = None  # None: SlimFitConfig's default ILS score
    max_stale_steps: int | None = None  # None: no bound (SlimFitConfig.max_stale_steps)
    eval_batch_size: int = 128
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    group_by_length: bool = True
    checkpoint_every: int | None = None  # None: once per epoch (and always at the end)
    keep_last: int = 2
    resume: bool = False
    on_nonfinite: str = "raise"
    report: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.policy]


def validate(cfg: TrainConfig) -> None:
    """One-sentence ValueErrors for every setting a user can get wrong."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    check(
        cfg.policy in POLICIES,
        f"unknown policy {cfg.policy!r}; choose one of {', '.join(POLICIES)}.",
    )
    check(
        cfg.precision in PRECISIONS,
        f"unknown precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}.",
    )
    check(
        0.0 <= cfg.freeze_ratio < 1.0, f"--freeze-ratio must be in [0, 1), got {cfg.freeze_ratio}."
    )
    check(cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}.")
    check(
        cfg.eval_batch_size >= 1,
        f"the eval batch size must be at least 1, got {cfg.eval_batch_size}.",
    )
    check(
        math.isfinite(cfg.epochs) and cfg.epochs > 0,
        f"--epochs must be a positive number, got {cfg.epochs}.",
    )
    check(
        cfg.max_steps is None or cfg.max_steps >= 1,
        f"--max-steps must be at least 1, got {cfg.max_steps}.",
    )
    check(
        cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0),
        f"--lr must be a positive number, got {cfg.lr}.",
    )
    check(cfg.max_length >= 2, f"--max-length must be at least 2 tokens, got {cfg.max_length}.")
    check(
        "lora" not in cfg.extra or cfg.policy == "none",
        f"the LoRA baseline freezes the backbone itself; run it with policy 'none', not {cfg.policy!r}.",
    )
    check(
        cfg.freeze_warmup_steps >= 0,
        f"--freeze-warmup-steps must be non-negative, got {cfg.freeze_warmup_steps}.",
    )
    check(
        cfg.max_stale_steps is None or cfg.max_stale_steps >= 1,
        f"--max-stale-steps must be at least 1 (or left out for no bound), got {cfg.max_stale_steps}.",
    )
    check(cfg.weight_decay >= 0, f"the weight decay must be non-negative, got {cfg.weight_decay}.")
    check(
        isinstance(cfg.compression, str) and cfg.compression.strip() != "",
        f"--compression must be a preset name such as 'none', got {cfg.compression!r}.",
    )
    check(
        cfg.checkpoint_every is None or cfg.checkpoint_every >= 1,
        f"--checkpoint-every must be at least 1, got {cfg.checkpoint_every}.",
    )
    check(
        cfg.on_nonfinite in NONFINITE_POLICIES,
        f"--on-nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {cfg.on_nonfinite!r}.",
    )
    get_task(cfg.task)  # unknown task: ValueError listing the known ones


# -- construction ------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name} asks for CUDA but this torch sees no GPU; use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible."
            )
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N.")
    return device


def check_model_type(name: str) -> None:
    """A local model folder whose ``config.json`` names an architecture this transformers
    does not know fails here, in one sentence (instead of deep inside the tokenizer)."""
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        return
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ValueError(
            f"{config} is not a readable JSON model config; pass a folder saved by save_pretrained."
        ) from None
    from transformers import CONFIG_MAPPING
    from transformers import __version__ as tf_version

    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"--model {name} has model_type {model_type!r}, which transformers {tf_version} "
            "does not support; pass a model of a supported architecture (e.g. bert)."
        )


def apply_lora(model: torch.nn.Module, options: dict) -> torch.nn.Module:
    """``model`` wrapped in peft LoRA adapters (``options``: LoraConfig keyword arguments
    over ``slimfit.config.LORA``); the backbone is frozen, the adapters and the head train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError(
            "the LoRA baseline needs peft; install it with pip install peft."
        ) from None
    head = [n for n, _ in model.named_children() if re.search(DEFAULT_HEAD_PATTERN, n)]
    return get_peft_model(model, LoraConfig(**{**LORA, "modules_to_save": head, **options}))


def build_model(cfg: TrainConfig, num_labels: int, device: torch.device, modality: str = "text"):
    """``(model, tokenizer, resolved_path)``; the head's init follows the seed set before.
    Image tasks have no tokenizer (None): their examples are the pixels."""
    from .models import load_image_model, load_model_and_tokenizer

    check_model_type(cfg.model)
    if modality == "image":
        model, resolved = load_image_model(cfg.model, num_labels)
        return model.to(device), None, resolved
    model, tokenizer, resolved = load_model_and_tokenizer(cfg.model, num_labels)
    # set, not inferred: a checkpoint fine-tuned on another task keeps its problem type in
    # its config, and a classifier's would give a regression head the cross-entropy loss
    model.config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    return model.to(device), tokenizer, resolved


def _no_decay(name: str, param: torch.nn.Parameter, norm_gains: set[str]) -> bool:
    return param.dim() < 2 or name in norm_gains


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    unit_options: dict | None = None,
    units: set[str] | frozenset = frozenset(),
) -> torch.optim.AdamW:
    """AdamW; biases and norm gains get no weight decay (the usual BERT recipe).

    ``unit_options``: AdamW options (lr, betas) of the parameters named in ``units`` (the
    freezable units); the others (task head, biases) keep the defaults."""
    norm_gains = {
        f"{m}.weight" for m, mod in model.named_modules() if "norm" in type(mod).__name__.lower()
    }
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (bool(unit_options) and name in units, _no_decay(name, param, norm_gains))
            groups.setdefault(key, []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else weight_decay,
                **(unit_options if is_unit else {}),
            }
            for (is_unit, no_decay), params in sorted(groups.items())
        ],
        lr=lr,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear decay from the base LR to 0 over ``total_steps``, no warm-up."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(1, total_steps))
    )


def resolve_compression(name: str, model: torch.nn.Module) -> str:
    """``auto``: the memory-lean ``default`` preset on CUDA, ``none`` on CPU (where memory is
    not the constraint and the conversions only cost time)."""
    if name != "auto":
        return name
    on_cuda = any(p.is_cuda for p in model.parameters())
    return "default" if on_cuda else "none"


def build_slimfit(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> SlimFit:
    return attach(model, optimizer, slimfit_config(cfg, model))


def slimfit_config(cfg: TrainConfig, model: torch.nn.Module) -> SlimFitConfig:
    # Further SlimFitConfig fields (score, max_stale_steps, exclude, a compression dict
    # such as {"attention_recompute": False}, ...) for sweeps.
    fields = dict(cfg.extra.get("slimfit", {}))
    if cfg.score is not None:
        fields.setdefault("score", cfg.score)
    if cfg.max_stale_steps is not None:
        fields.setdefault("max_stale_steps", cfg.max_stale_steps)
    compression = fields.pop("compression", None)
    if "lora" in cfg.extra:  # the LoRA baseline is plain peft, as the bench's lora mode
        compression = "none"
    elif compression is None:
        compression = resolve_compression(cfg.compression, model)
    return SlimFitConfig(
        freeze_ratio=cfg.freeze_ratio,
        policy=cfg.policy,
        seed=cfg.seed,
        warmup_steps=cfg.freeze_warmup_steps,
        compression=compression,
        **fields,
    )


def tokenize(tokenizer, texts: list[str] | list[tuple[str, str]], max_length: int) -> list[dict]:
    """One feature dict per text or ``(text_a, text_b)`` pair (tokenized as a pair, its
    longer side truncated first), truncated, unpadded (padding happens per batch)."""
    texts = list(texts)
    if texts and isinstance(texts[0], tuple):
        firsts, seconds = [a for a, _ in texts], [b for _, b in texts]
        enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length, padding=False)
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    keys = list(enc.keys())
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def without_full_mask(batch: dict) -> dict:
    """``batch`` without its attention mask where no position is padded: a mask of all ones
    gives the same attention as none. Checked while the batch is on the host, where it is
    free; on the device, transformers' own check (which then drops such a mask) reads it
    back in every forward, a synchronization that stalls a step whose forward is bound by
    the host issuing it (``benchmarks/results/2026-12-06-mask-sync-h100``)."""
    if not isinstance(batch, Mapping):  # e.g. a custom collator's tuple: left as it is
        return batch
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and bool(mask.all()):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def collate(
    tokenizer, features: list[dict], labels: list[int] | None, device: torch.device
) -> dict:
    """Pad a batch to its own longest sequence (dynamic padding). Float labels (a
    regression task) stay float: the model's one-output head then takes the MSE loss."""
    batch = without_full_mask(tokenizer.pad(features, padding="longest", return_tensors="pt"))
    out = {k: v.to(device) for k, v in batch.items()}
    if labels is not None:
        regression = any(isinstance(y, float) for y in labels)
        dtype = torch.float32 if regression else torch.long
        out["labels"] = torch.tensor(labels, dtype=dtype, device=device)
    return out


def featurize(tokenizer, inputs, max_length: int):
    """A split's per-example features: token ids of each text, or (image tasks, no
    tokenizer) the uint8 image array itself."""
    return inputs if tokenizer is None else tokenize(tokenizer, inputs, max_length)


def make_batch(tokenizer, features, idx: list[int], labels: list[int], device) -> dict:
    """The model inputs and labels of examples ``idx``."""
    ys = [labels[i] for i in idx]
    if tokenizer is None:
        from .data.vision import collate as collate_images

        return collate_images(features[idx], ys, device)
    return collate(tokenizer, [features[i] for i in idx], ys, device)


def lengths_of(tokenizer, features) -> list[int]:
    """Tokens per example (for length grouping); images are all the same size."""
    if tokenizer is None:
        return [0] * len(features)
    return [len(f["input_ids"]) for f in features]


# Batches are formed inside windows of this many batches when grouping by length.
LENGTH_GROUP_WINDOW = 50


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """The batches of one epoch, a function of (lengths, batch size, seed, epoch) only, so
    a resumed run can skip to any batch.

    A seeded permutation; with ``group_by_length`` it is cut into windows of
    ``LENGTH_GROUP_WINDOW`` batches, each window sorted by length and cut into batches,
    and the batch order shuffled again: batches hold similar lengths, so dynamic padding
    pads little (about 2x faster on the sentiment task), while every epoch still sees a
    fresh random mix.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * LENGTH_GROUP_WINDOW
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where the device computes bf16 natively (CUDA GPUs that
    support it; CPUs with AVX512-BF16 or AMX, where bf16 autocast ran 2.5x faster than fp32),
    else ``"fp32"``: on a CPU without them bf16 matmuls are emulated, ~46x slower than fp32
    on this project's AVX2 development machine (the offline default fine-tune would take
    hours). An explicit ``"bf16"`` or ``"fp32"`` is kept."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        cpu = torch.cpu
        native = [
            getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        ]
        return "bf16" if any(f is not None and f() for f in native) else "fp32"
    return "fp32"


def autocast_for(device: torch.device, precision: str):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    features: list[dict],
    labels: list[int],
    device: torch.device,
    precision: str,
    batch_size: int,
    metric: str = "accuracy",
    extra_metrics: tuple[str, ...] = (),
) -> dict:
    """Metrics and mean loss over one split; batches sorted by length (order-free). A
    model with one output (regression) predicts its raw output, others their argmax."""
    was_training = model.training
    model.eval()
    lengths = lengths_of(tokenizer, features)
    order = sorted(range(len(features)), key=lambda i: lengths[i])
    preds = [0] * len(features)
    total_loss = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = make_batch(tokenizer, features, idx, labels, device)
        with autocast_for(device, precision):
            out = model(**batch)
        total_loss += float(out.loss.float()) * len(idx)
        logits = out.logits.float()
        predicted = logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1)
        for i, p in zip(idx, predicted.tolist()):
            preds[i] = p
    model.train(was_training)
    return {
        **{m: METRICS[m](preds, labels) for m in (metric, *extra_metrics)},
        "loss": total_loss / max(1, len(labels)),
        "examples": len(labels),
    }


# -- the run -----------------------------------------------------------------------------


@dataclass
class RunContext:
    """Everything :func:`finetune` builds; kept together so resume/Trainer paths can reuse it."""

    cfg: TrainConfig
    device: torch.device
    data: TaskData
    model: torch.nn.Module
    tokenizer: object
    model_path: str
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    slimfit: SlimFit
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    rank: int = 0  # data-parallel rank (torchrun); 0 in one process
    world: int = 1


def plan_steps(cfg: TrainConfig, n_train: int, world: int = 1) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; ``max_steps``, when given, sets the total and
    overrides ``epochs`` (as in Hugging Face's Trainer). With ``world`` data-parallel ranks
    a final batch smaller than ``world`` is dropped (some rank would get no example)."""
    full, rest = divmod(n_train, cfg.batch_size)
    steps_per_epoch = full + (1 if rest >= world else 0)
    if cfg.max_steps is not None:
        return steps_per_epoch, cfg.max_steps
    return steps_per_epoch, max(1, math.ceil(cfg.epochs * steps_per_epoch))


def setup(cfg: TrainConfig) -> RunContext:
    rank, world = _rank_world()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))  # recorded as run
    if cfg.batch_size < world:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is the global batch and must be at least the "
            f"number of processes ({world})."
        )
    spec = get_task(cfg.task)
    if spec.modality not in ("text", "image"):
        raise ValueError(
            f"task {cfg.task!r} is a {spec.modality} task; slimfit finetune trains text and image tasks."
        )
    data = spec.load(cfg.data_dir)
    if len(data.train) == 0:
        raise ValueError(f"task {cfg.task!r} has no training examples; check the data files.")
    set_seed(cfg.seed)
    # num_labels 0: as many as the data's classes (an image folder's subfolders)
    num_labels = spec.num_labels or len(data.label_names)
    model, tokenizer, resolved = build_model(cfg, num_labels, device, spec.modality)
    if spec.modality == "image":  # image folders decode at the model's own image size
        from .data.images import decode_at

        data = decode_at(data, getattr(model.config, "image_size", None))
    if "lora" in cfg.extra:
        model = apply_lora(model, cfg.extra["lora"])
    model.train()
    steps_per_epoch, total = plan_steps(cfg, len(data.train), world)
    # Sweeps: AdamW options of the freezable units (those whose name matches "match", if
    # given), e.g. {"lr": 4e-4} or {"betas": (0.5, 0.999)}; the head and biases keep --lr.
    unit_options = dict(cfg.extra.get("unit_options") or {})
    match = unit_options.pop("match", None)
    units = set()
    if unit_options:
        units = {u.name for u in find_units(model, slimfit_config(cfg, model))}
        units = {n for n in units if match is None or re.search(match, n)}
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, unit_options, units)
    lr_scheduler = build_lr_scheduler(optimizer, total)
    sf = build_slimfit(model, optimizer, cfg)
    return RunContext(
        cfg,
        device,
        data,
        model,
        tokenizer,
        resolved,
        optimizer,
        lr_scheduler,
        sf,
        total,
        steps_per_epoch,
        rank=rank,
        world=world,
    )


def train_batches(ctx: RunContext, features: list[dict]) -> Iterator[tuple[int, list[int]]]:
    """``(epoch, indices)`` of the remaining batches, starting at ``ctx.step``."""
    lengths = lengths_of(ctx.tokenizer, features)
    step = ctx.step
    while step < ctx.total_steps:
        epoch, k = divmod(step, ctx.steps_per_epoch)
        batches = epoch_batches(
            lengths, ctx.cfg.batch_size, ctx.cfg.seed, epoch, ctx.cfg.group_by_length
        )
        batches = [b for b in batches if len(b) >= ctx.world]  # see plan_steps
        for batch in batches[k:]:
            if step >= ctx.total_steps:
                return
            yield epoch, batch
            step += 1


def train_step(ctx: RunContext, batch: dict, guard: NonFiniteGuard | None = None) -> float | None:
    """One optimizer step; the loss, or None when ``guard`` skipped a non-finite loss (the
    step still counts: its batch is consumed and the LR decays, the weights stay)."""
    with autocast_for(ctx.device, ctx.cfg.precision):
        loss = ctx.model(**batch).loss
    reported = _global_loss(ctx, loss)  # the global batch's loss (this loss in one process)
    if guard is not None and not guard.check(reported, ctx.step + 1):
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.lr_scheduler.step()
        ctx.step += 1
        return None
    loss.backward()
    if ctx.cfg.max_grad_norm:
        params = [p for p in ctx.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, ctx.cfg.max_grad_norm)
    ctx.optimizer.step()  # SlimFit's hooks run here: drop frozen grads, score, choose next set
    ctx.lr_scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.step += 1
    return float(reported.detach().float())


def _global_loss(ctx: RunContext, loss: torch.Tensor) -> torch.Tensor:
    """The loss averaged over data-parallel ranks (NaN anywhere is NaN everywhere), so
    that every rank takes the same non-finite decision."""
    if ctx.world == 1:
        return loss
    value = loss.detach().float().reshape(1).clone()
    torch.distributed.all_reduce(value)
    return value / ctx.world


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(cfg: TrainConfig) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1): pick this rank's GPU and start the process group
    (NCCL on CUDA, gloo on CPU). True when this call started it (and must end it)."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    cuda = resolve_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _barrier(ctx_or_world) -> None:
    world = ctx_or_world if isinstance(ctx_or_world, int) else ctx_or_world.world
    if world > 1:
        torch.distributed.barrier()


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def versions() -> dict:
    import transformers

    return {
        "slimfit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir``; a one-sentence ValueError when it cannot be written."""
    ensure_writable_dir(out_dir, "output directory", "another --output-dir")


def find_resume_checkpoint(cfg: TrainConfig, out_dir: Path) -> Path | None:
    """The checkpoint to resume from (``--resume``), or None for a fresh run; refuses to
    start a fresh run over another run's checkpoints."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = latest_checkpoint(out_dir)  # skips (and warns about) corrupted checkpoints
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipping ")]
    if cfg.resume and ckpt is None:
        if skipped:  # the reason, e.g. "... model.safetensors ... has the wrong size; ..."
            raise ValueError(f"--resume: {skipped[-1].split(': ', 1)[-1]}")
        raise ValueError(
            f"--resume: {out_dir} holds no complete slimfit checkpoint; start a fresh run "
            "without --resume (or point --output-dir at the run to continue)."
        )
    if cfg.resume and skipped:
        print(f"slimfit finetune: warning: {skipped[-1]}", file=sys.stderr)
    if not cfg.resume and ckpt is not None:
        raise ValueError(
            f"{out_dir} already holds {ckpt.name} of an earlier run; pass --resume to continue "
            "it, or choose another --output-dir."
        )
    return ckpt


def oom_message(cfg: TrainConfig) -> str:
    return (
        f"the GPU ran out of memory at batch size {cfg.batch_size}; run `slimfit plan` to see "
        "what fits, or lower --batch-size or raise --freeze-ratio."
    )


def _truncated_log(path: Path, last_step: int) -> list[str]:
    """The lines of a JSONL log up to ``last_step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return keep


def finetune(
    cfg: TrainConfig,
    progress: bool = True,
    console=None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Run one fine-tuning job end to end; returns (and writes) the metrics dict.

    Checkpoints go to ``<output_dir>/checkpoint-<step>`` every ``cfg.checkpoint_every``
    steps (default once per epoch) and at the end; ``cfg.resume`` continues from the newest
    one, bit-identically to an uninterrupted run.

    Under torchrun (``WORLD_SIZE`` > 1) it starts the process group itself; ``batch_size``
    is the global batch, each rank trains on ``batch[rank::world]`` and only rank 0 writes
    files, prints and evaluates (the other ranks return an empty dict).
    """
    started = init_distributed(cfg)
    try:
        return _finetune(cfg, progress, console, on_step)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _finetune(cfg: TrainConfig, progress: bool, console, on_step) -> dict:
    t0 = time.perf_counter()
    rank, world = _rank_world()
    main = rank == 0
    progress, console = progress and main, console if main else None
    out_dir = [cfg.output_dir or default_output_dir(cfg)]
    if world > 1:  # the default name holds a time stamp: rank 0's for all
        torch.distributed.broadcast_object_list(out_dir, src=0)
    out_dir = Path(out_dir[0])
    if main:
        prepare_output_dir(out_dir)
    _barrier(world)
    ckpt = find_resume_checkpoint(cfg, out_dir)
    ctx = setup(cfg)
    cfg = ctx.cfg  # "auto" settings resolved for this device
    verbose = progress or console is not None
    losses: list[float] = []
    if ckpt is not None:
        extra = load_checkpoint(ckpt, ctx.model, ctx.optimizer, ctx.lr_scheduler, ctx.slimfit)
        if int(extra.get("total_steps", -1)) != ctx.total_steps:
            raise ValueError(
                f"{ckpt} belongs to a run of {extra.get('total_steps')} steps but these options "
                f"give {ctx.total_steps}; resume with the --max-steps, --epochs and --batch-size "
                "it was started with."
            )
        ctx.step = int(extra["step"])
        losses = [float(x) for x in extra.get("recent_losses", [])]
        if verbose:
            print(f"resume {ctx.step} from {ckpt}", flush=True)
    if verbose and ctx.slimfit.conversion is not None:
        print(str(ctx.slimfit.conversion), flush=True)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    spec = get_task(cfg.task)
    tok = ctx.tokenizer
    feats = {
        name: featurize(tok, split.inputs, cfg.max_length)
        for name, split in (
            ("train", ctx.data.train),
            ("dev", ctx.data.dev),
            ("test", ctx.data.test),
        )
    }
    t_setup = time.perf_counter() - t0

    guard = NonFiniteGuard(out_dir, policy=cfg.on_nonfinite)
    every = cfg.checkpoint_every or ctx.steps_per_epoch
    schedule_path = out_dir / "schedule.jsonl"
    log_path = out_dir / "train_log.jsonl"
    old_log = _truncated_log(log_path, ctx.step)
    t_train0 = time.perf_counter()
    with (
        open(schedule_path if main else os.devnull, "w") as sched,
        open(log_path if main else os.devnull, "w") as train_log,
        _progress(progress) as bar,
    ):

        def write_record(rec: dict) -> None:
            sched.write(json.dumps(rec) + "\n")
            sched.flush()  # a crashed or running job's schedule is readable as it goes

        for rec in ctx.slimfit.schedule():  # a resumed run: the steps done before
            write_record(rec)
        train_log.writelines(old_log)
        train_log.flush()
        ctx.slimfit.add_step_callback(write_record)
        task_id = bar.add_task(
            f"{cfg.task} / {cfg.policy}", total=ctx.total_steps, completed=ctx.step, loss="-"
        )
        log_lines = progress and not bar.console.is_terminal
        log_every = max(1, ctx.total_steps // 20)
        for epoch, idx in train_batches(ctx, feats["train"]):
            idx = idx[ctx.rank :: ctx.world]  # this rank's share of the global batch
            batch = make_batch(tok, feats["train"], idx, ctx.data.train.labels, ctx.device)
            try:
                loss = train_step(ctx, batch, guard)
            except torch.cuda.OutOfMemoryError:
                raise ValueError(oom_message(cfg)) from None
            if loss is not None:
                losses.append(loss)
            log_now = ctx.step % log_every == 0 or ctx.step == ctx.total_steps
            if loss is not None and log_now:
                # before the checkpoint: a run killed in between resumes and rewrites it
                rec = {"step": ctx.step, "loss": loss, "lr": ctx.lr_scheduler.get_last_lr()[0]}
                train_log.write(json.dumps(rec) + "\n")
                train_log.flush()
            if (ctx.step % every == 0 or ctx.step == ctx.total_steps) and main:
                save_checkpoint(
                    out_dir,
                    ctx.step,
                    model=ctx.model,
                    optimizer=ctx.optimizer,
                    lr_scheduler=ctx.lr_scheduler,
                    slimfit=ctx.slimfit,
                    extra={
                        "step": ctx.step,
                        "epoch": epoch,
                        "total_steps": ctx.total_steps,
                        "recent_losses": losses[-50:],
                    },
                    keep_last=cfg.keep_last,
                )
            if ctx.step % every == 0 or ctx.step == ctx.total_steps:
                _barrier(ctx)  # the other ranks wait for rank 0's checkpoint
            recent = losses[-50:] or [float("nan")]
            bar.update(task_id, advance=1, loss=f"{sum(recent) / len(recent):.4f}")
            if log_lines and log_now:
                # not a terminal (a log file, CI): a plain line every 5% instead of a live bar
                elapsed = time.perf_counter() - t_train0
                print(
                    f"step {ctx.step}/{ctx.total_steps}  loss "
                    f"{sum(recent) / len(recent):.4f}  {elapsed:.0f} s",
                    flush=True,
                )
            if on_step is not None and loss is not None:
                on_step(ctx.step, loss)
    train_time = time.perf_counter() - t_train0
    if not main:  # rank 0 evaluates and writes; the others wait for it
        _barrier(ctx)
        ctx.slimfit.detach()
        return {}

    t_eval0 = time.perf_counter()
    results = {
        name: evaluate(
            ctx.model,
            tok,
            feats[name],
            split.labels,
            ctx.device,
            cfg.precision,
            cfg.eval_batch_size,
            spec.metric,
            spec.extra_metrics,
        )
        for name, split in (("dev", ctx.data.dev), ("test", ctx.data.test))
    }
    eval_time = time.perf_counter() - t_eval0
    with open(log_path, "a") as train_log:
        rec = {"step": ctx.step, f"dev_{spec.metric}": results["dev"][spec.metric]}
        train_log.write(json.dumps(rec) + "\n")

    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    sf = ctx.slimfit
    metrics = {
        "task": cfg.task,
        "modality": spec.modality,
        "model": cfg.model,
        "model_path": ctx.model_path,
        "policy": cfg.policy,
        "metric": spec.metric,
        f"dev_{spec.metric}": results["dev"][spec.metric],
        f"test_{spec.metric}": results["test"][spec.metric],
        "dev": results["dev"],
        "test": results["test"],
        "steps": ctx.step,
        "epochs": ctx.step / ctx.steps_per_epoch,
        "steps_per_epoch": ctx.steps_per_epoch,
        "world_size": ctx.world,
        "learning_rate": cfg.learning_rate,
        "train_loss_last50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "units": len(sf.units),
        "frozen_per_step": sf.scheduler.n_frozen,
        "trained_steps_per_unit": sf.trained_steps_per_unit(),
        "wall_time_s": time.perf_counter() - t0,
        "setup_time_s": t_setup,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "peak_memory_bytes": peak,
        "peak_memory_source": "torch.cuda.max_memory_allocated" if peak is not None else None,
        "peak_rss_bytes": rss_kib * 1024 if sys.platform.startswith("linux") else None,
        "device": device_name(ctx.device),
        "data": ctx.data.sizes(),
        "config": asdict(cfg) | {"lr": cfg.learning_rate},
        "slimfit": sf.config.to_dict(),
        "versions": versions(),
        "output_dir": str(out_dir),
        "files": {
            "metrics": str(out_dir / "metrics.json"),
            "schedule": str(schedule_path),
            "train_log": str(log_path),
            "checkpoint": str(latest_checkpoint(out_dir)),
        },
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    sf.detach()
    if cfg.report:
        write_report(out_dir)
    if verbose:
        print_summary(metrics, console)
    _barrier(ctx)
    return metrics


def write_report(out_dir: Path) -> None:
    """``slimfit report`` on the finished run; a failure is one warning, never an error."""
    try:
        from .report import make_report

        make_report(out_dir)
    except Exception as err:  # the run itself succeeded: never fail it over its figures
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"slimfit finetune: warning: the report was not written ({text}); run "
            f"`slimfit report {out_dir}` to retry.",
            file=sys.stderr,
        )


def default_output_dir(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = Path(cfg.model).name or "model"
    return str(Path("runs") / f"finetune-{cfg.task}-{model}-{cfg.policy}-{stamp}")


def _gib(n: int | None) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2**30:.2f} GiB"


def print_summary(m: dict, console=None) -> None:
    """The one-screen summary at the end of a run."""
    from rich.console import Console
    from rich.table import Table

    from .report import format_metrics

    console = console or Console()
    metric = m["metric"]
    extra = [k for k in m["dev"] if k in METRICS and k != metric]  # MRPC's accuracy, ...
    t = Table(
        title=f"slimfit finetune: {m['model']} on {m['task']}",
        show_header=False,
        title_justify="left",
    )
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    policy = (
        m["policy"]
        if m["policy"] == "none"
        else f"{m['policy']}, freeze ratio {m['config']['freeze_ratio']}"
    )
    rows = [
        ("policy", f"{policy} ({m['frozen_per_step']} of {m['units']} units frozen per step)"),
        (
            "training",
            f"{m['steps']} steps ({m['epochs']:.2f} epochs), batch {m['config']['batch_size']}, "
            f"lr {m['learning_rate']:g}, {m['config']['precision']}"
            + (f", max length {m['config']['max_length']}" if m.get("modality") != "image" else ""),
        ),
        ("data", f"train {m['data']['train']}, dev {m['data']['dev']}, test {m['data']['test']}"),
        (f"dev {metric}", format_metrics(m["dev"], metric, extra)),
        (f"test {metric}", format_metrics(m["test"], metric, extra)),
        (
            "wall time",
            f"{m['wall_time_s']:.1f} s (train {m['train_time_s']:.1f} s, eval {m['eval_time_s']:.1f} s)",
        ),
        ("peak GPU memory", _gib(m["peak_memory_bytes"])),
        ("device", m["device"]),
        ("metrics", m["files"]["metrics"]),
        ("schedule", m["files"]["schedule"]),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
