"""`slimfit bench`: memory and speed of training modes side by side on one workload.

    from slimfit.bench import run_bench
    results = run_bench(["bert-base-seqcls"], ["full", "ckpt", "slimfit"], output="runs/bench")

Modes live in :mod:`slimfit.bench.modes` (one line each), workloads in
:mod:`slimfit.bench.workloads`, measurements in :mod:`slimfit.bench.measure`, output in
:mod:`slimfit.bench.report`.
"""

from __future__ import annotations

import datetime as _dt
import re
import sys
import time
from collections.abc import Callable

import torch

from . import report
from .env import collect as collect_env
from .modes import BASELINE, MODES, Mode, get_modes
from .runner import BenchSettings, run_workload, search_max_batch
from .workloads import (
    ATTENTION_MASKS,
    WORKLOADS,
    Workload,
    default_seq_len,
    get_workload,
    load_config,
)

__all__ = [
    "BASELINE",
    "MODES",
    "Mode",
    "WORKLOADS",
    "Workload",
    "BenchSettings",
    "run_bench",
    "parse_bytes",
    "search_max_batch",
    "resolve_device",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
}


def parse_bytes(text: str | int) -> int:
    """``"32GiB"`` -> 34359738368; accepts B, KB/MB/GB (10^3), KiB/MiB/GiB (2^10), K/M/G = KiB/MiB/GiB."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(
                f"cannot read the memory size {text!r}; write it like 32GiB, 24GB or 8000MiB."
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"the memory size must be positive, got {text!r}.")
    return value


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but no CUDA device is available; use --device cpu."
        )
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {name!r}; use cuda or cpu.")
    return dev


def run_bench(
    workloads: list[str],
    modes: list[str] | None = None,
    *,
    model: str | None = None,
    size: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
    seq_len: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    seed: int = 0,
    freeze_ratio: float | None = None,
    max_batch: bool = False,
    memory_cap: str | int | None = None,
    max_batch_limit: int = 4096,
    max_probes: int = 8,
    time_budget: float | None = None,
    profile: bool = False,
    diag_steps: int | None = None,
    b2b: bool = True,
    paired_rounds: int = 0,
    attention_mask: str = "none",
    output: str | None = None,
    png: bool = True,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs every mode on every workload in this process; writes bench.json/.md/.png to ``output``.

    Defaults depend on the device: on CUDA the paper's sizes (batch 128, 20 timed steps,
    3 warm-up steps); on CPU tiny configs (batch 4, 3 steps, 1 warm-up step).
    ``attention_mask``: the text batches' padding and mask, ``"none"``, ``"ones"`` or
    ``"padded"`` (see ``workloads.make_batch``).
    """
    dev = resolve_device(device)
    if size == "auto":
        size = "base" if dev.type == "cuda" else "tiny"
    if size not in ("base", "tiny"):
        raise ValueError(f"unknown size {size!r}; use base, tiny or auto.")
    ws = [get_workload(w) for w in workloads]
    if not ws:
        raise ValueError(
            "no workload given; pass --workload with one of " + ", ".join(WORKLOADS) + "."
        )
    ms = get_modes(modes)
    gpu = dev.type == "cuda"
    batch_size = batch_size if batch_size is not None else (128 if gpu else 4)
    steps = steps if steps is not None else (20 if gpu else 3)
    warmup = warmup if warmup is not None else (3 if gpu else 1)
    for name, v, low in (
        ("--batch-size", batch_size, 1),
        ("--steps", steps, 1),
        ("--warmup", warmup, 0),
        ("--max-batch-limit", max_batch_limit, 1),
        ("--max-probes", max_probes, 1),
        ("--paired-rounds", paired_rounds, 0),
    ):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}.")
    if attention_mask not in ATTENTION_MASKS:
        raise ValueError(
            f"--attention-mask must be {' or '.join(ATTENTION_MASKS)}, got {attention_mask!r}."
        )
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"--seq-len must be an integer >= 1, got {seq_len!r}.")
    if seq_len is not None and all(w.task == "image" for w in ws):
        raise ValueError("--seq-len does not apply to image workloads; leave it out for vit-base.")
    if freeze_ratio is not None and not 0.0 <= freeze_ratio < 1.0:
        raise ValueError(f"--freeze-ratio must be in [0, 1), got {freeze_ratio!r}.")
    cap = parse_bytes(memory_cap) if memory_cap is not None else None
    if max_batch and cap is None:
        raise ValueError("--max-batch needs --memory-cap (e.g. --memory-cap 32GiB).")
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"--time-budget must be positive seconds, got {time_budget!r}.")
    configs = [load_config(w, size, model) for w in ws]  # fail early on a bad --model

    t_start = time.monotonic()
    results = {
        "schema": "slimfit-bench/1",
        "command": command or " ".join(["slimfit bench"] + sys.argv[1:]),
        "argv": list(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": collect_env(dev),
        "settings": {
            "size": size,
            "model": model,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "steps": steps,
            "warmup": warmup,
            "seed": seed,
            "freeze_ratio": freeze_ratio,
            "max_batch": max_batch,
            "memory_cap": memory_cap,
            "memory_cap_bytes": cap,
            "max_batch_limit": max_batch_limit,
            "time_budget_s": time_budget,
            "profile": profile,
            "back_to_back": b2b,
            "paired_rounds": paired_rounds,
            "attention_mask": attention_mask,
            "optimizer": "AdamW(lr=2e-5, weight_decay=0.01)",
            "modes": [m.name for m in ms],
            "baseline": BASELINE,
        },
        "workloads": [],
    }
    if gpu and steps < 20:
        results["settings"]["note"] = "fewer than 20 timed steps: step-time spread is rough"

    def save(partial: dict | None = None) -> None:
        if output is None:
            return
        snapshot = dict(results, workloads=results["workloads"] + ([partial] if partial else []))
        report.write_all(snapshot, output, png=False)

    for w, config in zip(ws, configs):
        s_len = None if w.task == "image" else (seq_len or default_seq_len(w, size) or 128)
        settings = BenchSettings(
            batch_size=batch_size,
            seq_len=s_len,
            steps=steps,
            warmup=warmup,
            device=dev,
            seed=seed,
            freeze_ratio=freeze_ratio,
            max_batch=max_batch,
            memory_cap=cap,
            max_batch_limit=max_batch_limit,
            max_probes=max_probes,
            deadline=(t_start + time_budget) if time_budget else None,
            profile=profile,
            diag_steps=diag_steps if diag_steps is not None else (5 if gpu else 2),
            b2b_steps=steps if b2b else 0,
            paired_rounds=paired_rounds,
            attention_mask=attention_mask,
        )
        log(f"{w.name}: batch {batch_size}" + (f", seq {s_len}" if s_len else "") + f", {dev}")
        done = run_workload(w, config, ms, settings, log=log, on_mode=save)
        done["model_source"] = model or f"{size} {type(config).__name__} (random init)"
        results["workloads"].append(report.add_ratios(done))
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    report.finalize(results)
    if output is not None:
        results["files"] = {
            k: str(v) for k, v in report.write_all(results, output, png=png).items()
        }
    return results
