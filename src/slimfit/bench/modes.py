"""Benchmark modes: one row each in ``MODES``; a new mode is one more ``Mode(...)`` line.

A mode says how the model is trained: precision (fp32, or bf16 autocast with fp32 master
weights), attention kernel, activation checkpointing, LoRA (peft kwargs), SlimFit
(``SlimFitConfig`` kwargs) and an optional ``setup(model, optimizer)`` callable for
anything else (e.g. optimizer-state paging). Every mode trains with AdamW.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import LORA


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    precision: str = "bf16"  # "fp32" | "bf16" (autocast, fp32 master weights)
    attention: str = "sdpa"  # "eager" | "sdpa" (transformers attn_implementation)
    checkpointing: bool = False  # model.gradient_checkpointing_enable()
    lora: dict | None = None  # peft.LoraConfig kwargs; task head added to modules_to_save
    slimfit: dict | None = None  # slimfit.SlimFitConfig kwargs
    setup: Callable | None = field(default=None, compare=False)  # setup(model, optimizer)

    def spec(self) -> dict:
        return {
            "precision": self.precision,
            "attention": self.attention,
            "checkpointing": self.checkpointing,
            "lora": self.lora,
            "slimfit": self.slimfit,
            "setup": getattr(self.setup, "__name__", None),
        }


# fmt: off
MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("full-fp32-eager", "fp32, eager attention (the paper's baseline)", precision="fp32", attention="eager"),
    Mode("full", "bf16 autocast + SDPA, fp32 master weights, AdamW"),
    Mode("ckpt", "full + activation checkpointing", checkpointing=True),
    Mode("lora", "full with peft LoRA r=8 on query/value (head trained)", lora=LORA),
    Mode("freeze-only", "full + SlimFit ILS 95% frozen, nothing else", slimfit={"freeze_ratio": 0.95, "compression": "none", "offload_optimizer_state": False}),
    Mode("slimfit-paper", "full + SlimFit ILS 95% + the paper's activation compression", slimfit={"freeze_ratio": 0.95, "compression": "paper", "offload_optimizer_state": False}),
    Mode("slimfit", "full + SlimFit ILS 95% + slimfit's defaults (compression, state paging on CUDA)", slimfit={"freeze_ratio": 0.95, "compression": "default"}),
    Mode("slimfit-nopage", "slimfit without optimizer-state paging", slimfit={"freeze_ratio": 0.95, "compression": "default", "offload_optimizer_state": False}),
    Mode("slimfit-resident", "slimfit keeping the optimizer state of its smallest units (30% of the elements) on the GPU when they freeze (resident_state_fraction=0.3: fewer page copies, more memory)", slimfit={"freeze_ratio": 0.95, "compression": "default", "resident_state_fraction": 0.3}),
    Mode("slimfit-nocopy", "slimfit where no frozen linear keeps autocast's bf16 weight copy (frozen_weight_copy='none': less memory, more Python autograd nodes)", slimfit={"freeze_ratio": 0.95, "compression": {"frozen_weight_copy": "none"}}),
    Mode("slimfit-projcopy", "slimfit where only the frozen projections of a norm's output keep autocast's bf16 weight copy (frozen_weight_copy='projections', the default before 2026-12-06: less memory, more Python autograd nodes)", slimfit={"freeze_ratio": 0.95, "compression": {"frozen_weight_copy": "projections"}}),
    Mode("slimfit-sync-scores", "slimfit where the ILS scores reach the scheduler at once (async_scores=False: every step waits for the device at its end)", slimfit={"freeze_ratio": 0.95, "compression": "default", "async_scores": False}),
    Mode("slimfit-qkv-codes", "slimfit keeping int8 codes of Q, K, V instead of rebuilding them in backward", slimfit={"freeze_ratio": 0.95, "compression": {"attention_recompute": False}}),
)}
# fmt: on
MAIN = list(MODES)  # what "all" runs

# The one-compression-at-a-time breakdown: ILS 95% (no paging) plus a single op of the
# default preset, the others kept as they are ("ils+linear" is the lean linear alone: a
# frozen linear keeps no bf16 weight copy, a trainable one an int8 input).
_NONE = {
    "linear_bits": None,
    "activation_bits": None,
    "norm": None,
    "attention_bits": None,
    "dropout": None,
}
_ONE = {
    "linear": {"linear_bits": 8},
    "act": {"activation_bits": 4},
    "norm": {"norm": "int8"},
    "attn": {"attention_bits": 8},
    "dropout": {"dropout": "regenerate"},
}
for _op, _fields in _ONE.items():
    MODES[f"ils+{_op}"] = Mode(
        f"ils+{_op}",
        f"freeze-only + the default preset's {_op} compression alone",
        slimfit={
            "freeze_ratio": 0.95,
            "compression": {**_NONE, **_fields},
            "offload_optimizer_state": False,
        },
    )
BREAKDOWN = ["freeze-only", *(f"ils+{op}" for op in _ONE), "slimfit-nopage"]

BASELINE = "full"  # ratios are taken against this mode


def get_modes(names: list[str] | None) -> list[Mode]:
    """Modes by name, in order; ``all`` stands for the main modes, ``breakdown`` for the
    one-compression-at-a-time modes."""
    groups = {"all": MAIN, "breakdown": BREAKDOWN}
    names = names or ["all"]
    unknown = [n for n in names if n not in MODES and n not in groups]
    if unknown:
        raise ValueError(
            f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)} (or all, breakdown)."
        )
    if len(set(names)) != len(names):
        raise ValueError("a mode is listed twice in --mode; list each mode once.")
    out: list[str] = []
    for n in names:
        out += [m for m in groups.get(n, [n]) if m not in out]
    return [MODES[n] for n in out]


def unavailable_reason(mode: Mode) -> str | None:
    """Why the mode cannot run in this installation, or None when it can."""
    if mode.lora is not None and importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install peft)"
    if mode.slimfit is not None:
        import dataclasses

        from slimfit import SlimFitConfig

        known = {f.name for f in dataclasses.fields(SlimFitConfig)}
        missing = [k for k in mode.slimfit if k not in known]
        if missing:
            return f"SlimFitConfig has no field {missing[0]!r} in this version of slimfit"
        compression = mode.slimfit.get("compression", "none")
        if (
            compression not in (None, "none")
            and importlib.util.find_spec("slimfit.convert") is None
        ):
            return f"slimfit.convert (compression {compression!r}) is not implemented yet"
    return None
