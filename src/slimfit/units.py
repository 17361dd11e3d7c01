"""Which parameters are freezable units, and which transformer block each belongs to.

A unit is one parameter tensor, as in the paper: every weight with 2+ dims (Q, K, V,
attention output, FFN in/out, pooler, embeddings, patch projection, cls token, position
embeddings) plus every norm gain. Biases are never units: they are tiny and always train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import DEFAULT_HEAD_PATTERN, SlimFitConfig

# timm-style group matcher: the block index of a parameter in the common transformer
# layouts (HF `encoder.layer.N`, `layers.N`, timm `blocks.N`, GPT-2 `h.N`).
BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|blocks|h|block)\.(\d+)\.")


@dataclass(frozen=True)
class Unit:
    name: str
    param: nn.Parameter

    @property
    def numel(self) -> int:
        return self.param.numel()


def block_of(name: str) -> int | None:
    """Transformer block index of a parameter name, or None for embeddings/head/other."""
    m = BLOCK_PATTERN.search(name)
    return int(m.group(1)) if m else None


def _norm_gain_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower() and isinstance(
            getattr(mod, "weight", None), nn.Parameter
        ):
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


def find_units(
    model: nn.Module, config: SlimFitConfig, optimizer_params: set[int] | None = None
) -> list[Unit]:
    """The model's freezable units in parameter order.

    Only parameters that require grad (and, when given, that the optimizer holds) are
    units: what the user froze or left out of the optimizer stays as it is.
    """
    norm_gains = _norm_gain_names(model)
    units: list[Unit] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if optimizer_params is not None and id(param) not in optimizer_params:
            continue
        if config.units is not None:
            if not re.search(config.units, name) or name.endswith("bias"):
                continue
        elif not (param.dim() >= 2 or name in norm_gains):
            continue
        if config.train_head and re.search(DEFAULT_HEAD_PATTERN, name):
            continue
        if config.exclude is not None and re.search(config.exclude, name):
            continue
        units.append(Unit(name, param))
    return units


def params_in(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}
