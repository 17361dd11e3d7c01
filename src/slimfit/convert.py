"""In-place conversion of a model's modules to the memory-lean ops, and its reversal.

``convert(model, compression)`` swaps each supported module's ``__class__`` to a subclass
of its own class whose ``forward`` runs the lean op: parameter objects, names and
``state_dict`` keys stay exactly as they were (checkpoints load in plain transformers or
timm), and ``restore(model)`` swaps the original classes back. Attention goes through
transformers' ``AttentionInterface`` (``"slimfit_sdpa"``) via ``set_attn_implementation``.

Converted: ``nn.Linear``, ``nn.LayerNorm``, RMSNorm (``torch.nn.RMSNorm`` and transformers'
``*RMSNorm`` with ``weight * x * rsqrt(mean(x^2) + eps)``), GELU/SiLU activations (torch's
and transformers'), ``nn.Dropout``, and attention of models on ``"sdpa"``. Subclasses with
their own forward (LoRA layers, quantized linears) are left alone and listed.

In FFN blocks whose forward is recognised (BERT-style ``intermediate``, ViT-style ``mlp``)
the activation writes its output into its input, the linear's fresh output that nothing
else reads (bitwise the same values, one intermediate-sized buffer instead of two); a
forward hook that keeps that linear's output would see the activation's values instead.

Post-norm residual tails whose forward is recognised (BERT-style ``*SelfOutput`` /
``*Output``: dense -> dropout -> + input -> LayerNorm; with ``norm="int8"`` and
``dropout="regenerate"``) run dropout, add and norm as one lean node
(``ops.residual_norm``); hooks on that dropout or LayerNorm module do not fire while it does.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .ops import attention as _attention
from .ops.activation import lean_activation, lean_gated, same_as_inplace
from .ops.config import CompressionConfig
from .ops.dropout import lean_dropout
from .ops.linear import lean_linear
from .ops.norm import lean_layer_norm, lean_rms_norm
from .ops.residual_norm import lean_dropout_add_norm

_ATTR = "_slimfit_conversion"


# -- which activation class is which derivative ------------------------------------------------
def _activation_kind(module: nn.Module) -> str | None:
    cls = type(module)
    name = cls.__name__
    if cls is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if cls is nn.SiLU:
        return "silu"
    if not cls.__module__.startswith("transformers."):
        return None
    if name == "GELUActivation":
        return "gelu"
    if name in ("NewGELUActivation", "FastGELUActivation", "GELUTanh", "PytorchGELUTanh",
                "AccurateGELUActivation", "GELUPytorchTanh"):  # fmt: skip
        return "gelu_tanh"
    if name == "QuickGELUActivation":
        return "quick_gelu"
    if name == "SiLUActivation":
        return "silu"
    return None


def _is_rms_norm(module: nn.Module) -> bool:
    cls = type(module)
    if getattr(nn, "RMSNorm", None) is not None and cls is nn.RMSNorm:
        return True
    name = cls.__name__
    return (
        name.endswith("RMSNorm")
        and not name.startswith("Gemma")  # Gemma scales by (1 + weight)
        and cls.__module__.startswith("transformers.")
        and hasattr(module, "variance_epsilon")
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and not list(module.children())
    )


_GATED_BODY = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


def _gated_mlp_kind(module: nn.Module) -> str | None:
    """Activation kind of a LLaMA-style MLP whose forward is exactly
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, else None."""
    cls = type(module)
    if not cls.__module__.startswith("transformers.") or not cls.__name__.endswith("MLP"):
        return None
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(p) is nn.Linear for p in parts) or getattr(module, "act_fn", None) is None:
        return None
    try:
        src = "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return None
    if _GATED_BODY not in src:
        return None
    return _activation_kind(module.act_fn)


# FFN blocks whose activation input is a linear's fresh output that nothing else reads
# (the local is rebound at once): there the activation may overwrite its input.
_FFN_BODIES = {
    "hidden_states=self.dense(hidden_states)hidden_states=self.intermediate_act_fn(hidden_states)":
        "intermediate_act_fn",  # BERT, RoBERTa, ELECTRA, DeiT/ViT (older layout), ...
    "hidden_states=self.fc1(hidden_states)hidden_states=self.activation_fn(hidden_states)":
        "activation_fn",  # ViT / CLIP / Siglip MLPs
}  # fmt: skip


def _inplace_activations(model: nn.Module) -> set[int]:
    """ids of activation modules that only ever see a fresh linear output (see above)."""
    out = set()
    for mod in model.modules():
        cls = type(mod)
        if not cls.__module__.startswith("transformers."):
            continue
        try:
            src = "".join(inspect.getsource(cls.forward).split())
        except (OSError, TypeError):
            continue
        for body, attr in _FFN_BODIES.items():
            act = getattr(mod, attr, None)
            if body in src and isinstance(act, nn.Module) and not list(act.children()):
                out.add(id(act))
    return out


# Post-norm residual tails (BERT, RoBERTa, ELECTRA, ... ``*SelfOutput`` / ``*Output``) whose
# forward is exactly dense -> dropout -> + input -> LayerNorm: run as one lean node.
_RESIDUAL_NORM_HEAD = re.compile(
    r"defforward\(self,hidden_states(:[\w.]+)?,input_tensor(:[\w.]+)?\)(->[\w.]+)?:"
)
_RESIDUAL_NORM_BODY = (
    "hidden_states=self.dense(hidden_states)hidden_states=self.dropout(hidden_states)"
    "hidden_states=self.LayerNorm(hidden_states+input_tensor)returnhidden_states"
)


def _is_residual_norm(module: nn.Module) -> bool:
    cls = type(module)
    if not cls.__module__.startswith("transformers."):
        return False
    kinds = (nn.Linear, nn.Dropout, nn.LayerNorm)
    parts = [module.__dict__["_modules"].get(n) for n in ("dense", "dropout", "LayerNorm")]
    if any(type(p) is not k for p, k in zip(parts, kinds)):
        return False
    try:
        src = "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return False
    if not src.endswith(_RESIDUAL_NORM_BODY):
        return False
    return _RESIDUAL_NORM_HEAD.fullmatch(src[: -len(_RESIDUAL_NORM_BODY)]) is not None


# -- the swapped-in forwards -----------------------------------------------------------------------
def _linear_forward(self, input):
    return lean_linear(input, self.weight, self.bias, self._slimfit_cfg, self._slimfit_compress)


def _layer_norm_forward(self, input):
    return lean_layer_norm(self, input, self._slimfit_cfg)


def _rms_norm_forward(self, hidden_states):
    return lean_rms_norm(
        self, hidden_states, lambda t: self._slimfit_base.forward(self, t), self._slimfit_cfg
    )


def _activation_forward(self, input):
    return lean_activation(
        input, lambda t: self._slimfit_base.forward(self, t), self._slimfit_kind,
        self._slimfit_cfg, self.__dict__.get("_slimfit_inplace", False),
    )  # fmt: skip


def _gated_mlp_forward(self, x):
    act = self.act_fn
    base = type(act).__dict__.get("_slimfit_base", type(act))
    return self.down_proj(
        lean_gated(
            self.gate_proj(x), self.up_proj(x), lambda t: base.forward(act, t),
            self._slimfit_kind, self._slimfit_cfg,
        )
    )  # fmt: skip


def _residual_norm_forward(self, hidden_states, input_tensor):
    return lean_dropout_add_norm(
        self.dense(hidden_states), input_tensor, self.dropout, self.LayerNorm, self._slimfit_cfg
    )


def _dropout_forward(self, input):
    return lean_dropout(
        input, self.p, self.training, self._slimfit_cfg.dropout,
        lambda t: self._slimfit_base.forward(self, t),
    )  # fmt: skip


_FORWARDS = {
    "linear": _linear_forward,
    "layernorm": _layer_norm_forward,
    "rmsnorm": _rms_norm_forward,
    "activation": _activation_forward,
    "dropout": _dropout_forward,
    "gated_mlp": _gated_mlp_forward,
    "residual_norm": _residual_norm_forward,
}
_SUBCLASSES: dict = {}


def _rebuild(base: type, kind: str, state: dict):
    """Unpickle a converted module (its class is made on demand, in any process)."""
    cls = _lean_class(base, kind)
    _attention.register()  # a converted model may name "slimfit_sdpa"
    obj = cls.__new__(cls)
    obj.__setstate__(state) if hasattr(obj, "__setstate__") else obj.__dict__.update(state)
    return obj


def _reduce_ex(self, protocol):
    return _rebuild, (self._slimfit_base, self._slimfit_conv, self.__getstate__())


def _lean_class(base: type, kind: str) -> type:
    key = (base, kind)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        cls = type(
            f"SlimFit{base.__name__}",
            (base,),
            {
                "forward": _FORWARDS[kind],
                "_slimfit_base": base,
                "_slimfit_conv": kind,
                "__module__": __name__,
                "__reduce_ex__": _reduce_ex,
            },
        )
        _SUBCLASSES[key] = cls
    return cls


# -- report ------------------------------------------------------------------------------------------
_KEPT_REASON = {
    "Embedding": "lookup: keeps only token ids, and only when its weight trains",
    "Conv2d": "no lean conv: kept as is (saves its input only when its weight trains)",
    "Tanh": "pooler activation on one token per sequence: kept as is",
    "ReLU": "no lean ReLU: kept as is",
}


@dataclass
class ConversionReport:
    """What ``convert`` did: converted modules per kind and what it left as it was."""

    compression: CompressionConfig
    converted: Counter = field(default_factory=Counter)
    unconverted: list = field(default_factory=list)  # (module name, class name, reason)
    attention: str = "not converted"
    attention_previous: str | None = None
    names: dict = field(default_factory=dict)  # kind -> [module names]

    def __str__(self) -> str:
        lines = ["slimfit conversion:"]
        for kind, n in sorted(self.converted.items()):
            lines.append(f"  {kind:<22} {n:>4} converted")
        lines.append(f"  attention              {self.attention}")
        if self.unconverted:
            groups: dict = {}
            for name, cls, reason in self.unconverted:
                groups.setdefault((cls, reason), []).append(name)
            lines.append("  not converted:")
            for (cls, reason), names in sorted(groups.items()):
                head = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                lines.append(f"    {cls} x{len(names)} ({head}): {reason}")
        return "\n".join(lines)


# -- convert / restore -----------------------------------------------------------------------------------
def is_converted(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def convert(model: nn.Module, compression="default") -> ConversionReport:
    """Convert ``model`` in place to the lean ops; returns a :class:`ConversionReport`.

    ``compression``: a preset name (``"default"``, ``"paper"``, ``"none"``), a
    ``CompressionConfig`` or a dict of its fields. A transformers model switched to
    ``slimfit_sdpa`` gets its own copy of its config, so that other models built from the
    same config object keep their attention (and cannot switch this one's).
    """
    cfg = CompressionConfig.resolve(compression)
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert expects a torch.nn.Module, got {type(model).__name__}.")
    if is_converted(model) or any("_slimfit_base" in type(m).__dict__ for m in model.modules()):
        raise ValueError(
            "this model (or a module in it) is already converted by slimfit; call "
            "slimfit.convert.restore on the converted model before converting it again."
        )
    report = ConversionReport(cfg)
    try:
        _convert_modules(model, cfg, report)
        _convert_attention(model, cfg, report)
    except Exception:
        setattr(model, _ATTR, report)
        restore(model)  # all or nothing
        raise
    setattr(model, _ATTR, report)
    return report


def _convert_modules(model: nn.Module, cfg: CompressionConfig, report: ConversionReport) -> None:
    ffn_out = re.compile(cfg.ffn_out_pattern)
    inplace = _inplace_activations(model) if cfg.activation_bits is not None else set()
    for name, mod in model.named_modules():
        cls = type(mod)
        kind = None
        if cls is nn.Linear:
            kind = "linear"
            mod._slimfit_compress = cfg.linear_scope == "all" or bool(ffn_out.search(name))
        elif cls is nn.LayerNorm:
            kind = "layernorm"
        elif _is_rms_norm(mod):
            kind = "rmsnorm"
        elif cls is nn.Dropout:
            kind = "dropout"
        elif (act := _activation_kind(mod)) is not None:
            kind = "activation"
            mod._slimfit_kind = act
            if id(mod) in inplace and same_as_inplace(mod, act):
                mod._slimfit_inplace = True
        elif (act := _gated_mlp_kind(mod)) is not None:
            kind = "gated_mlp"
            mod._slimfit_kind = act
        elif cfg.norm == "int8" and cfg.dropout == "regenerate" and _is_residual_norm(mod):
            kind = "residual_norm"
        if kind is None:
            if not list(mod.children()) and not isinstance(mod, nn.Identity):
                is_act = cls.__module__.startswith(
                    ("transformers.activations", "torch.nn.modules.activation")
                )
                if list(mod.parameters(recurse=False)) or is_act or "Dropout" in cls.__name__:
                    reason = _KEPT_REASON.get(cls.__name__, "no lean version: kept as is")
                    if isinstance(mod, nn.Linear) or isinstance(mod, nn.LayerNorm):
                        reason = "subclass with its own forward: kept as is"
                    report.unconverted.append((name, cls.__name__, reason))
            continue
        mod._slimfit_cfg = cfg
        mod.__class__ = _lean_class(cls, kind)
        label = f"{kind}:{mod._slimfit_kind}" if kind in ("activation", "gated_mlp") else kind
        report.converted[label] += 1
        report.names.setdefault(label, []).append(name)


def _current_attn(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def _set_attn(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def _own_config(model: nn.Module) -> None:
    """Give ``model`` its own copy of its config (and of the sub-configs its modules hold).

    transformers' modules keep the config object they were built from and look the
    attention implementation up on it in every forward. Models built from one config object
    share it: switching this model to ``slimfit_sdpa`` would switch the others too, and
    building another model from that object later would switch this one back to plain
    SDPA, silently dropping the lean attention (found in slimfit's own bench)."""
    memo: dict = {}
    try:
        copy.deepcopy(model.config, memo)  # memo: id of every object copied -> its copy
    except (TypeError, AttributeError, copy.Error):  # a config that cannot be copied
        return  # stays shared: only a second model built from that object would be affected
    for mod in model.modules():
        shared = mod.__dict__.get("config")
        if shared is not None and id(shared) in memo and memo[id(shared)] is not shared:
            mod.config = memo[id(shared)]


def _convert_attention(model: nn.Module, cfg: CompressionConfig, report: ConversionReport) -> None:
    current = _current_attn(model)
    if current is None:
        report.attention = "not a transformers model: attention kept as is"
        return
    if cfg.attention_bits is None:
        report.attention = f"{current!r} kept (attention_bits=None)"
        return
    if current != "sdpa":
        report.attention = (
            f"{current!r} kept: only models on 'sdpa' switch to {_attention.NAME!r} "
            "(load with attn_implementation='sdpa')"
        )
        return
    _attention.register()
    _own_config(model)
    try:
        _set_attn(model, _attention.NAME)
    except (ValueError, AttributeError, KeyError) as err:  # pragma: no cover - defensive
        report.attention = f"'sdpa' kept: transformers refused {_attention.NAME!r} ({err})"
        return
    if _current_attn(model) != _attention.NAME:
        report.attention = "'sdpa' kept: the model does not follow AttentionInterface"
        return
    for mod in model.modules():  # travels with the module (deepcopy, pickle)
        mod.__dict__[_attention.CONFIG_ATTR] = cfg
    report.attention_previous = current
    kept = f"Q, K, V int{cfg.attention_bits}"
    if cfg.recompute_qkv:  # where they are plain projections of a lean LayerNorm's output
        kept = f"Q, K, V rebuilt from their LayerNorm's code, else {kept}"
    report.attention = f"'sdpa' -> {_attention.NAME!r} ({kept})"


def restore(model: nn.Module) -> None:
    """Undo :func:`convert`: original classes, attention implementation, no extra attributes."""
    report = getattr(model, _ATTR, None)
    if report is None:
        raise ValueError("this model is not converted by slimfit; there is nothing to restore.")
    for mod in model.modules():
        base = type(mod).__dict__.get("_slimfit_base")
        if base is not None:
            mod.__class__ = base
        for attr in ("_slimfit_cfg", "_slimfit_kind", "_slimfit_compress", "_slimfit_inplace",
                     _attention.CONFIG_ATTR):  # fmt: skip
            mod.__dict__.pop(attr, None)
    if report.attention_previous is not None:
        _set_attn(model, report.attention_previous)
    delattr(model, _ATTR)


__all__ = ["ConversionReport", "convert", "is_converted", "restore"]
