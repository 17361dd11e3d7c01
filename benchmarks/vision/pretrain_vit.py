"""Pretrain a small ViT on Fashion-MNIST classes 0-4 (no pretrained ViT can be had offline).

A DeiT-Tiny-sized ``transformers.ViTForImageClassification`` (28x28 grayscale as one
channel, patch 4 -> 49 patches + CLS, hidden 192, 6 layers, 3 heads, MLP 768; 2.7M
parameters) trained from a seeded random init with AdamW (lr 1e-3, weight decay 0.05),
linear warm-up then cosine decay, label smoothing 0.1, random shifts (+-2 px) and
horizontal flips, bf16 autocast. Saves a standard HF folder (``config.json`` +
``model.safetensors``) plus ``pretrain.json`` (accuracy, settings, time) into --out;
``finetune_vit.py`` loads it and fine-tunes on classes 5-9.

    python benchmarks/vision/pretrain_vit.py --data-dir .carry/fmnist --out runs/vit-fmnist
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

# DeiT-Tiny-like (the default) and a tiny one for CPU tests.
SIZES = {
    "deit-tiny": {
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "intermediate_size": 768,
    },
    "test": {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    },
}


@dataclass
class PretrainConfig:
    size: str = "deit-tiny"
    patch_size: int = 4
    epochs: float = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    augment: bool = True
    max_grad_norm: float | None = 1.0
    precision: str = "bf16"
    seed: int = 0
    max_steps: int | None = None  # cap (tests); None: epochs decide
    time_limit_s: float | None = None  # safety: stop early (recorded) past this much training
    eval_batch_size: int = 1024


def vit_config(size: str, num_labels: int, patch_size: int = 4, label_names=None):
    from transformers import ViTConfig

    from slimfit.data.vision import IMAGE_SIZE

    if size not in SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {', '.join(SIZES)}.")
    names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
    return ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
        num_channels=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        **SIZES[size],
    )


def build_model(cfg: PretrainConfig, num_labels: int, label_names=None):
    from transformers import ViTForImageClassification

    torch.manual_seed(cfg.seed)
    return ViTForImageClassification(vit_config(cfg.size, num_labels, cfg.patch_size, label_names))


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shift by up to ``pad`` pixels (zero fill) and random horizontal flip of a
    uint8 batch ``(B, H, W)``; the random numbers come from the (CPU) ``generator``."""
    b, h, w = images.shape
    dev = images.device
    shift = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(dev)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = shift[0, :, None] + torch.arange(h, device=dev)  # (B, H)
    cols = shift[1, :, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    return padded[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def evaluate(model, images: np.ndarray, labels, device, precision="bf16", batch_size=1024):
    """Accuracy and mean loss of ``model`` on uint8 images ``(N, 28, 28)``."""
    from slimfit.data.vision import collate

    was = model.training
    model.eval()
    labels = np.asarray(labels)
    correct, loss = 0, 0.0
    for s in range(0, len(labels), batch_size):
        batch = collate(images[s : s + batch_size], labels[s : s + batch_size], device)
        with autocast(device, precision):
            out = model(**batch)
        correct += int((out.logits.float().argmax(-1) == batch["labels"]).sum())
        loss += float(out.loss.float()) * len(batch["labels"])
    model.train(was)
    n = max(1, len(labels))
    return {"accuracy": correct / n, "loss": loss / n, "examples": len(labels)}


def warmup_cosine(optimizer, total_steps: int, warmup_fraction: float):
    warm = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretrain(cfg: PretrainConfig, data, device: torch.device, log=print) -> tuple:
    """Train on ``data`` (a TaskData of uint8 images); returns ``(model, metrics)``."""
    from slimfit.data.vision import pixel_values
    from slimfit.train import build_optimizer

    model = build_model(cfg, len(data.label_names), data.label_names).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    train_x = torch.as_tensor(np.asarray(data.train.inputs)).to(device)
    train_y = torch.as_tensor(np.asarray(data.train.labels), dtype=torch.long).to(device)
    n = len(train_y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = warmup_cosine(optimizer, total, cfg.warmup_fraction)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    losses, step, stopped_early = [], 0, False
    t0 = time.perf_counter()
    while step < total and not stopped_early:
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, cfg.batch_size):
            if step >= total:
                break
            idx = order[s : s + cfg.batch_size]
            x = train_x[idx]
            if cfg.augment:
                x = augment(x, gen)
            with autocast(device, cfg.precision):
                logits = model(pixel_values=pixel_values(x)).logits
            loss = loss_fn(logits.float(), train_y[idx])
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == total:
                losses.append(float(loss.detach()))
            if step % steps_per_epoch == 0 or step == total:
                elapsed = time.perf_counter() - t0
                log(
                    f"pretrain step {step}/{total} epoch {step / steps_per_epoch:.1f} "
                    f"loss {losses[-1] if losses else float('nan'):.4f} {elapsed:.0f} s"
                )
                if cfg.time_limit_s is not None and elapsed > cfg.time_limit_s and step < total:
                    log(f"pretrain: time limit {cfg.time_limit_s} s reached, stopping early")
                    stopped_early = True
                    break
    train_time = time.perf_counter() - t0
    results = {
        name: evaluate(
            model, split.inputs, split.labels, device, cfg.precision, cfg.eval_batch_size
        )
        for name, split in (("dev", data.dev), ("test", data.test))
    }
    metrics = {
        "task": data.name,
        "classes": data.label_names,
        "dev_accuracy": results["dev"]["accuracy"],
        "test_accuracy": results["test"]["accuracy"],
        "dev": results["dev"],
        "test": results["test"],
        "steps": step,
        "planned_steps": total,
        "epochs": step / steps_per_epoch,
        "stopped_early": stopped_early,
        "train_time_s": train_time,
        "train_loss_every50": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": data.sizes(),
        "config": asdict(cfg),
    }
    return model, metrics


def save(model, metrics: dict, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # config.json + model.safetensors (fp32)
    (out / "pretrain.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="IDX folder or folder/.npz (default: apt's)")
    ap.add_argument("--out", required=True, help="folder for the HF model + pretrain.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d = PretrainConfig()
    for field, value in asdict(d).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        elif field in ("max_steps", "time_limit_s"):
            ap.add_argument(flag, type=float if field.endswith("_s") else int, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    args = ap.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(d)})

    from transformers.utils import logging as hf_logging

    from slimfit.data.vision import load_pretrain
    from slimfit.train import device_name, versions

    hf_logging.disable_progress_bar()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    data = load_pretrain(args.data_dir)
    print(f"pretrain data {data.sizes()} classes {data.label_names}", flush=True)
    model, metrics = pretrain(cfg, data, device, log=lambda s: print(s, flush=True))
    metrics.update(
        {
            "wall_time_s": time.perf_counter() - t0,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else None,
            "device": device_name(device),
            "versions": versions(),
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    save(model, metrics, args.out)
    print(
        f"pretrained: dev {100 * metrics['dev_accuracy']:.2f}% test "
        f"{100 * metrics['test_accuracy']:.2f}% in {metrics['train_time_s']:.0f} s "
        f"({metrics['steps']} steps); saved {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
