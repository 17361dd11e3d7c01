"""`slimfit plan`: predict peak GPU memory per training mode, without a GPU.

How: the model is built from its config on PyTorch's ``meta`` device (shapes and dtypes,
no data), and one whole training step (forward, loss, backward, AdamW step) runs on it
under a dispatch mode that plays the CUDA caching allocator's bookkeeping: every new
storage adds its bytes, every freed storage removes them, and the largest sum is the
predicted ``torch.cuda.max_memory_allocated``. Saved-for-backward tensors are tagged
through ``torch.autograd.graph.saved_tensors_hooks``, so the breakdown at the peak reads
weights (fp32 masters + bf16 casts), gradients, optimizer state, saved activations, and
transient workspace (everything else alive at that instant). Whatever a mode changes in
what autograd saves (autocast, SDPA, checkpointing, frozen units, LoRA, slimfit's
converted ops) is therefore counted rather than modelled.

What the meta device cannot run is emulated: CUDA autocast (a torch-function mode that
casts like CUDA autocast: matmul-like ops to bf16, norms/softmax/losses to fp32, leaf
weights cast once per forward), and SDPA's fused kernels (flash/memory-efficient: they
save q, k, v, the output and an fp32 log-sum-exp, and allocate dq/dk/dv plus an fp32
accumulator in backward). A constant for the cuBLAS/cuBLASLt workspaces is added.

slimfit's converted ops run through their PyTorch path; each ``run_kernel`` call (a
Triton kernel on CUDA) counts as fused: its temporaries are not part of the peak.
Freezing modes take the largest peak over ILS's first pass over the units (seed 0).
Validated against H100 measurements: benchmarks/results/plan/.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .bench.modes import MAIN
from .bench.modes import MODES as BENCH_MODES
from .bench.workloads import WORKLOADS, get_workload  # plan's named models are the bench's
from .config import LORA

GiB = 1024**3
MiB = 1024**2

# the bench's main modes, by name: `slimfit plan --compare` pairs predictions with them
MODES = tuple(MAIN)
_HELP = {
    "full-fp32-eager": "full fine-tuning, fp32, eager attention (the paper's baseline)",
    "full": "full fine-tuning, bf16 autocast + SDPA",
    "ckpt": "full + activation checkpointing of every block",
    "lora": "LoRA r=8 on query/value, head trained, bf16 autocast + SDPA",
    "freeze-only": "SlimFit freezing at --freeze-ratio, no activation compression",
    "slimfit-paper": "SlimFit freezing + the paper's activation compression",
    "slimfit": "SlimFit freezing + slimfit's default activation compression + optimizer-state paging",
    "slimfit-nopage": "slimfit without optimizer-state paging (frozen units' AdamW state stays on the GPU)",
    "slimfit-qkv-codes": "slimfit keeping int8 codes of Q, K, V instead of rebuilding them in backward",
}
# every mode `slimfit plan` takes is the bench's: its own description where none is above
MODE_HELP = {name: _HELP.get(name, BENCH_MODES[name].description) for name in MODES}
# What the bench's modes attach: freezing (a SlimFit config), its compression where it
# converts modules, and optimizer-state paging unless the mode turns it off.
_SLIMFIT = {name: BENCH_MODES[name].slimfit for name in MAIN if BENCH_MODES[name].slimfit}
COMPRESSION = {
    name: sf.get("compression", "default")
    for name, sf in _SLIMFIT.items()
    if sf.get("compression", "default") != "none"
}

# cuBLAS (32 MiB on Hopper) + cuBLASLt workspaces are allocated through the caching
# allocator on first use, so they show in max_memory_allocated.
CUDA_WORKSPACE_BYTES = 40 * MiB

FREEZE_MODES = tuple(_SLIMFIT)
# Modes whose frozen units' optimizer state is paged to host memory (slimfit's default on
# CUDA, as in `slimfit bench`): only the trained units' state is resident.
PAGED_MODES = tuple(
    n for n, sf in _SLIMFIT.items() if sf.get("offload_optimizer_state") is not False
)

# Freezing modes: steps of the ILS schedule simulated (the peak is their maximum); None:
# ILS's whole first pass over the units (every unit trains once).
FREEZE_STEPS: int | None = None
CPU_FREEZE_STEPS = 3  # when a mode has to be simulated on CPU tensors (slower)

LORA_RANK = LORA["r"]
LORA_ALPHA = LORA["lora_alpha"]
LORA_TARGETS = r"(^|\.)(query|value|q_proj|v_proj|q|v)$"


# ----------------------------------------------------------------------------------------
# results
@dataclass
class Prediction:
    mode: str
    batch_size: int
    peak_bytes: int
    phase: str
    breakdown: dict[str, int]
    notes: list[str] = field(default_factory=list)
    max_batch: int | None = None
    worst_step: int | None = None

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def to_dict(self) -> dict:
        out = asdict(self)
        out["peak_gib"] = round(self.peak_gib, 4)
        return out


CATEGORIES = ("weights", "weight_casts", "gradients", "optimizer", "activations", "transient")


# ----------------------------------------------------------------------------------------
# the allocator model
class _MemorySim(TorchDispatchMode):
    """Live bytes of the simulated device's storages; peak and its breakdown.

    ``device_type``: whose tensors count (``meta``; ``cpu`` when a model's ops cannot run
    on meta). ``skip_compute``: on real tensors, matmul-like ops return zeros of the right
    shape instead of computing (the memory is the same, the time is not).
    """

    def __init__(self, device_type: str = "meta", skip_compute: bool = False):
        super().__init__()
        self.device_type = device_type
        self.skip_compute = skip_compute
        self.suspended = 0  # > 0 inside an emulated fused kernel: its temporaries do not count
        self.phase_breakdown: dict[str, dict[str, int]] = {}
        self.live: dict[int, int] = {}
        self.cat: dict[int, str] = {}
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_phase = ""
        self.peak_breakdown: dict[str, int] = {}
        self.phase = "forward"
        self.phase_peaks: dict[str, int] = {}
        self.grad_params: list[nn.Parameter] = []

    # -- bookkeeping
    def track(self, t: torch.Tensor, category: str = "transient") -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        nbytes = _rounded(st.nbytes())
        self.live[key] = nbytes
        self.cat[key] = category
        self.totals[category] += nbytes
        self.current += nbytes
        weakref.finalize(st, self._free, key)
        self._update_peak()

    def retag(self, t: torch.Tensor, category: str, only_from: str = "transient") -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        key = id(t.untyped_storage())
        if key in self.live and self.cat[key] == only_from:
            self.totals[only_from] -= self.live[key]
            self.totals[category] += self.live[key]
            self.cat[key] = category

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key, None)
        if nbytes is None:
            return
        self.current -= nbytes
        self.totals[self.cat.pop(key)] -= nbytes

    def _update_peak(self) -> None:
        if self.suspended or self.current <= self.phase_peaks.get(self.phase, -1):
            return
        self.phase_peaks[self.phase] = self.current
        breakdown = dict(self.totals)
        if self.phase != "forward":
            # gradients are produced as transients and adopted by AccumulateGrad
            seen = set()
            for p in self.grad_params:
                g = p.grad
                if g is None or g.device.type != self.device_type:
                    continue
                key = id(g.untyped_storage())
                if key in seen or self.cat.get(key) != "transient":
                    continue
                seen.add(key)
                breakdown["transient"] -= self.live[key]
                breakdown["gradients"] += self.live[key]
        self.phase_breakdown[self.phase] = breakdown
        if self.current > self.peak:
            self.peak = self.current
            self.peak_phase = self.phase
            self.peak_breakdown = breakdown

    def reset_peak(self) -> None:
        self.peak = 0
        self.phase_peaks = {}
        self.phase_breakdown = {}
        self._update_peak()

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.skip_compute and func in _HEAVY:
            out = _zeros_like_result(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


_aten = torch.ops.aten
_HEAVY = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.convolution.default,
    _aten.convolution_backward.default,
}


def _zeros_like_result(func, args, kwargs):
    """The op's result shapes (from its meta kernel) as zero tensors on the real device."""
    device = next(t.device for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor))
    to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    meta_args = [
        [to_meta(v) for v in a] if isinstance(a, (list, tuple)) else to_meta(a) for a in args
    ]
    out = func(*meta_args, **{k: to_meta(v) for k, v in kwargs.items()})

    def real(t):
        if not isinstance(t, torch.Tensor):
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)

    if isinstance(out, (list, tuple)):
        return type(out)(real(t) for t in out)
    return real(out)


def _rounded(nbytes: int) -> int:
    """The caching allocator hands out multiples of 512 bytes."""
    return 512 * math.ceil(nbytes / 512) if nbytes else 0


# ----------------------------------------------------------------------------------------
# CUDA autocast, emulated on meta tensors
def _fn_set(*candidates) -> set:
    return {c for c in candidates if c is not None}


_T = torch.Tensor
_LOWER = _fn_set(
    F.linear, torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm, torch.bmm, _T.bmm,
    torch.addmm, _T.addmm, torch.baddbmm, _T.baddbmm, torch.addbmm, torch.einsum,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.scaled_dot_product_attention, torch.mv, torch.addmv, F.prelu,
)  # fmt: skip
_FP32 = _fn_set(
    F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.softmax, torch.softmax,
    _T.softmax, F.log_softmax, torch.log_softmax, _T.log_softmax, F.cross_entropy, F.nll_loss,
    F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.binary_cross_entropy_with_logits, F.kl_div,
    torch.exp, _T.exp, torch.log, _T.log, torch.pow, _T.pow, torch.rsqrt, _T.rsqrt,
    torch.cumsum, _T.cumsum, torch.logsumexp, F.softplus, torch.cosine_similarity,
    getattr(F, "rms_norm", None),
)  # fmt: skip


_DROPOUT = _fn_set(F.dropout, torch.dropout, _T.dropout if hasattr(_T, "dropout") else None)


# The autocast dtype of the _CudaEmulation running now: torch.is_autocast_enabled is False
# during a simulation (autocast is emulated), so slimfit's lean linear is told the dtype
# here and takes the path it takes under CUDA autocast (no bf16 weight copy kept).
_EMULATED_DTYPE: list = []


class _CudaEmulation(TorchFunctionMode):
    """What CUDA does differently from the meta device, as a torch-function mode (so
    autograd records it exactly as it does on the GPU):

    - autocast's casting policy when ``dtype`` is given (matmul-like ops to bf16, norms,
      softmax and losses to fp32; leaf weights cast once per forward while ``cache``);
    - dropout through the fused ``native_dropout`` kernel (a bool mask is saved; off CUDA
      PyTorch saves a float noise tensor instead).
    """

    def __init__(self, dtype: torch.dtype | None, sim: _MemorySim | None, cache: bool = True):
        super().__init__()
        self.dtype = dtype
        self.sim = sim
        self.use_cache = cache
        self.cache: dict[int, torch.Tensor] = {}

    def __enter__(self):
        _EMULATED_DTYPE.append(self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        _EMULATED_DTYPE.pop()
        return super().__exit__(*exc)

    def _cast(self, x, dtype):
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, dtype) for v in x)
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype in (
            dtype,
            torch.float64,
        ):
            return x
        cacheable = self.use_cache and x.is_leaf and x.requires_grad and dtype == self.dtype
        if cacheable and id(x) in self.cache:
            return self.cache[id(x)]
        y = x.to(dtype)
        if cacheable:
            self.cache[id(x)] = y
        if isinstance(x, nn.Parameter) and self.sim is not None:
            self.sim.retag(y, "weight_casts")
        return y

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUT:
            return _dropout(*args, **kwargs)
        if self.dtype is not None and func in _LOWER:
            args = self._cast(args, self.dtype)
            kwargs = {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return _sdpa(*args, **kwargs)
        if self.dtype is None:
            return func(*args, **kwargs)
        if func in _FP32:
            args = self._cast(args, torch.float32)
            kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _dropout(input, p=0.5, training=True, inplace=False):
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input * 0.0
    return torch.native_dropout(input, p, True)[0]


# ----------------------------------------------------------------------------------------
# fused SDPA (flash / memory-efficient), emulated
class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):  # (B, H, S, d) each
        b, h, s, _ = q.shape
        out = q.new_empty(b, s, h, v.shape[-1])  # kernels write (B, S, H, d)
        lse = q.new_empty(b, h, 32 * math.ceil(s / 32), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        acc = q.new_empty(q.shape, dtype=torch.float32)  # dq accumulator
        delta = lse.new_empty(lse.shape)  # rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del acc, delta
        return dq, dk, dv


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """``F.scaled_dot_product_attention`` as the fused CUDA kernels use memory: the output
    is written (B, S, H, d) and returned transposed; the S x S matrix never exists."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out = _FusedAttention.apply(query, key, value)
    else:
        b, h, s, _ = query.shape
        out = query.new_empty(b, s, h, value.shape[-1])
    return out.transpose(1, 2)


def _run_backward(loss: torch.Tensor) -> None:
    from torch.autograd.variable import Variable

    Variable._execution_engine.run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), True, True
    )


# ----------------------------------------------------------------------------------------
# models
@dataclass
class Workload:
    name: str
    family: str  # bert, vit, auto
    task: str  # seqcls, qa, image
    seq_len: int
    num_labels: int = 2
    config: object = None
    precision: str | None = None  # None: the mode's (fp32 for full-fp32-eager, else bf16)
    head: tuple[str, ...] = ()  # task-head modules LoRA trains; (): DEFAULT_HEAD_PATTERN's


_VISION_TYPES = ("vit", "deit", "beit", "dinov2", "swin", "convnext")


def resolve_workload(model: str, seq_len: int | None = None, task: str | None = None) -> Workload:
    """A bench workload name, or a Hugging Face model id / local folder (config only).

    ``task`` (seqcls, qa, image) overrides the task guessed from the config (image for
    vision model types, else sequence classification).
    """
    if task is not None and task not in ("seqcls", "qa", "image"):
        raise ValueError(f"unknown task {task!r}; use seqcls, qa or image.")
    if model in WORKLOADS:
        # the bench's workload at its base size: its config, task, sequence length and head
        bench = get_workload(model)
        config = bench.config("base")
        if bench.task == "image":
            default = config.image_size  # pixels per side stand in for the sequence length
            if seq_len:
                config.image_size = seq_len
        else:
            default = bench.seq_len
        return Workload(
            model,
            config.model_type,
            task or bench.task,
            seq_len or default,
            config.num_labels,
            config,
            head=bench.head if task in (None, bench.task) else (),  # another task: another head
        )
    import os

    from transformers import AutoConfig

    path = os.path.expanduser(model)
    if model.startswith((".", "/", "~")) and not os.path.isdir(path):
        raise ValueError(
            f"no model folder at {model!r}; give a folder with config.json, a cached Hugging "
            f"Face id, or one of {', '.join(WORKLOADS)}."
        )
    try:
        config = AutoConfig.from_pretrained(path if os.path.isdir(path) else model)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot read a model config for {model!r} ({first}); give a local model folder, "
            f"a cached Hugging Face id, or one of {', '.join(WORKLOADS)}."
        ) from None
    vision = getattr(config, "model_type", "") in _VISION_TYPES
    task = task or ("image" if vision else "seqcls")
    if seq_len is None:
        size = getattr(config, "image_size", 224)
        seq_len = (size if isinstance(size, int) else size[0]) if task == "image" else 128
    if task == "image":
        config.image_size = seq_len
    return Workload(model, "auto", task, seq_len, getattr(config, "num_labels", 2) or 2, config)


def _build(work: Workload, attn: str) -> nn.Module:
    import copy

    from transformers import (
        AutoModelForImageClassification,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    config = copy.deepcopy(work.config)
    config.num_labels = work.num_labels
    if work.task == "seqcls":
        config.problem_type = "single_label_classification"
    cls = {
        "seqcls": AutoModelForSequenceClassification,
        "qa": AutoModelForQuestionAnswering,
        "image": AutoModelForImageClassification,
    }[work.task]
    with torch.device("meta"):
        model = cls.from_config(config, attn_implementation=attn)
    if getattr(model.config, "pad_token_id", None) is None and hasattr(model.config, "vocab_size"):
        model.config.pad_token_id = 0
    for mod in model.modules():  # a data-dependent check (pad token in input_ids), not on meta
        if hasattr(mod, "warn_if_padding_and_no_attention_mask"):
            mod.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
    return model.train()


def _inputs(work: Workload, model: nn.Module, batch: int, device: str = "meta") -> dict:
    meta = torch.device(device)
    if work.task == "image":
        size = work.seq_len
        ch = getattr(model.config, "num_channels", 3)
        return {
            "pixel_values": torch.zeros(batch, ch, size, size, device=meta),
            "labels": torch.zeros(batch, dtype=torch.long, device=meta),
        }
    shape = (batch, work.seq_len)
    # no attention_mask: an all-ones mask (what bench feeds, unpadded batches) is dropped
    # by transformers before SDPA, and its data-dependent check cannot run on meta.
    out = {"input_ids": torch.zeros(shape, dtype=torch.long, device=meta)}
    if getattr(model.config, "type_vocab_size", 0):
        out["token_type_ids"] = torch.zeros(shape, dtype=torch.long, device=meta)
    if work.task == "qa":
        out["start_positions"] = torch.zeros(batch, dtype=torch.long, device=meta)
        out["end_positions"] = torch.zeros(batch, dtype=torch.long, device=meta)
    else:
        out["labels"] = torch.zeros(batch, dtype=torch.long, device=meta)
    return out


class _LoRALinear(nn.Module):
    """peft's LoRA layer (dropout 0 -> identity): base(x) + B(A(x)) * alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: int):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _apply_lora(model: nn.Module, head: tuple[str, ...] = ()) -> None:
    """LoRA on the query/value linears; trained besides: the ``head`` modules (a bench
    workload's, as bench's peft ``modules_to_save``), else what ``DEFAULT_HEAD_PATTERN`` names."""
    from .config import DEFAULT_HEAD_PATTERN

    head_pattern = (
        r"(^|\.)(" + "|".join(map(re.escape, head)) + r")(\.|$)" if head else DEFAULT_HEAD_PATTERN
    )
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and re.search(LORA_TARGETS, n)
    ]
    if not targets:
        raise ValueError(
            "found no query/value linear layers for LoRA in this model; plan another mode."
        )
    for name, p in model.named_parameters():
        p.requires_grad_(bool(re.search(head_pattern, name)))
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _LoRALinear(mod, LORA_RANK, LORA_ALPHA))


def _units(model: nn.Module, optimizer, freeze_ratio: float, seed: int):
    from .config import SlimFitConfig
    from .units import find_units, params_in

    config = SlimFitConfig(freeze_ratio=freeze_ratio, seed=seed)
    return find_units(model, config, params_in(optimizer))


def unit_names(work: Workload) -> list[str]:
    """The freezable units of ``work``'s model (parameter names, in order): the names
    :func:`simulate`'s ``trained`` takes. Built on the meta device (no memory)."""
    with torch.device("meta"):
        model = _build(work, "sdpa")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return [u.name for u in _units(model, opt, 0.0, 0)]


def _ils_frozen_masks(n_units: int, freeze_ratio: float, seed: int, steps: int) -> list:
    """Frozen masks of ILS's first ``steps`` steps (seeded as ``slimfit.attach`` seeds it).

    In its first pass ILS visits units in the order of their random initial scores: each
    step trains the next ``n - int(ratio * n)`` units (units that trained get a real, tiny
    score and drop to the bottom), so these masks are exact for that pass.
    """
    from .scheduler import InterLayerScheduler

    sched = InterLayerScheduler(n_units, freeze_ratio, "ils", seed)
    masks = []
    for step in range(steps):
        masks.append(sched.frozen.clone())
        trained = (~sched.frozen).nonzero().flatten()
        tiny = torch.full((len(trained),), 1e-6 * (1 + step), dtype=torch.float64)
        sched.advance(trained, tiny)
    return masks


def _convert(model: nn.Module, preset) -> str | None:
    """Apply slimfit's converted ops; returns a note when they are not available."""
    try:
        from .convert import convert
    except ImportError:
        return "slimfit.convert is not available yet: predicted as freeze-only (no compression)"
    try:
        convert(model, preset)
    except Exception as err:  # noqa: BLE001 - any failure means: account without it
        return f"slimfit.convert({preset!r}) failed on the meta device ({type(err).__name__}): predicted as freeze-only"
    return None


# ----------------------------------------------------------------------------------------
# one simulated training step
def simulate(
    work: Workload,
    mode: str,
    batch: int,
    freeze_ratio: float = 0.95,
    seed: int = 0,
    freeze_steps: int | None = FREEZE_STEPS,
    only_step: int | None = None,
    allow_cpu: bool = True,
    trained: tuple[str, ...] | None = None,
) -> Prediction:
    """Peak memory of an optimizer step after warm-up (AdamW state exists, grads None).

    Freezing modes: the frozen set changes every step, so the peak is the largest over
    ILS's first ``freeze_steps`` steps (default: its whole first pass, where every unit
    trains once; measured peaks are maxima over many steps). ``only_step`` simulates that
    one step of the schedule (``Prediction.worst_step`` names the one that peaked).

    Modes whose ops cannot run on the meta device (slimfit's converted ops, when
    :func:`_meta_compat` is not enough) run on real CPU tensors at batch 1 and 2, with matmuls skipped, and are
    extrapolated along the batch (memory is affine in it); the notes say so. With
    ``allow_cpu=False`` (fast) they are predicted as freeze-only instead, also noted.
    ``only_step=-1`` freezes every unit (what remains is the static memory of the mode).
    ``trained`` (freezing modes): the one step where exactly these units (parameter names)
    train and every other unit is frozen, instead of ILS's schedule.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}.")
    if batch < 1:
        raise ValueError(f"batch size must be at least 1, got {batch}.")
    try:
        with _meta_compat():
            return _simulate_on(
                work, mode, batch, freeze_ratio, seed, freeze_steps, only_step, "meta", trained
            )
    except Exception as err:  # noqa: BLE001
        if mode not in COMPRESSION:
            raise
        if not allow_cpu:
            pred = simulate(
                work, "freeze-only", batch, freeze_ratio, seed, freeze_steps, only_step,
                trained=trained,
            )  # fmt: skip
            pred.mode = mode
            pred.notes.append("slimfit's ops do not run on meta: predicted as freeze-only")
            return pred
        meta_error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:100] if str(err).strip() else ''}"
    try:
        steps = freeze_steps or CPU_FREEZE_STEPS
        pred = _simulate_on(work, mode, batch, freeze_ratio, seed, steps, only_step, "cpu", trained)
        pred.notes.append(
            f"slimfit ops do not run on meta ({meta_error}): simulated on CPU tensors at batch "
            "1 and 2 and extrapolated (optimizer step not simulated)"
        )
        return pred
    except Exception as err:  # noqa: BLE001 - any failure: account without compression
        pred = simulate(
            work, "freeze-only", batch, freeze_ratio, seed, freeze_steps, only_step,
            trained=trained,
        )  # fmt: skip
        pred.mode = mode
        pred.notes.append(
            f"slimfit's converted ops could not be simulated ({type(err).__name__}); "
            "predicted as freeze-only (no compression)"
        )
        return pred


@contextlib.contextmanager
def _meta_compat():
    """Lets slimfit's lean ops (their PyTorch path) and transformers run on meta tensors,
    for the duration of a simulation: a seeded generator, the autocast queries and
    ``torch.autocast`` are not available for the meta device, and transformers' packed-
    sequence check reads data. Temporary for the ops: once slimfit.ops guards these for
    ``device.type == "meta"`` those patches are no-ops; what else fails falls back to CPU."""
    patches = []

    def patch(obj, name, new):
        if hasattr(obj, name):
            patches.append((obj, name, getattr(obj, name)))
            setattr(obj, name, new)

    try:
        from .ops import dropout as _dropout_ops

        gen = getattr(_dropout_ops, "_generator", None)
        if gen is not None:
            patch(
                _dropout_ops,
                "_generator",
                lambda device, seed: (
                    None if torch.device(device).type == "meta" else gen(device, seed)
                ),
            )
    except ImportError:
        pass
    enabled, get_dtype, autocast = (
        torch.is_autocast_enabled,
        torch.get_autocast_dtype,
        torch.autocast,
    )

    def is_enabled(*args):
        return False if args and str(args[0]) == "meta" else enabled(*args)

    def autocast_dtype(device_type):
        return torch.bfloat16 if str(device_type) == "meta" else get_dtype(device_type)

    def autocast_or_null(device_type, *args, **kwargs):
        if str(device_type) == "meta":
            return contextlib.nullcontext()
        return autocast(device_type, *args, **kwargs)

    # slimfit's Triton kernels allocate their outputs only; on meta their PyTorch
    # fallbacks run instead, whose temporaries must not count towards the peak
    import importlib
    import pkgutil

    try:
        from . import ops as _ops

        for info in pkgutil.iter_modules(_ops.__path__):
            mod = importlib.import_module(f"{_ops.__name__}.{info.name}")
            if callable(getattr(mod, "run_kernel", None)):
                patch(mod, "run_kernel", _fused_run_kernel)
    except ImportError:
        pass
    try:  # data-dependent check for packed sequences (decoders without a mask): none here
        from transformers import masking_utils

        patch(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    except ImportError:
        pass
    try:
        from .ops import linear as _linear_ops

        real_dtype = _linear_ops.autocast_dtype
        patch(
            _linear_ops,
            "autocast_dtype",
            lambda device_type: (
                _EMULATED_DTYPE[-1]
                if _EMULATED_DTYPE and _EMULATED_DTYPE[-1] is not None
                else real_dtype(device_type)
            ),
        )
    except ImportError:
        pass
    patch(torch, "is_autocast_enabled", is_enabled)
    patch(torch, "get_autocast_dtype", autocast_dtype)
    patch(torch, "autocast", autocast_or_null)
    try:
        yield
    finally:
        for obj, name, old in reversed(patches):
            setattr(obj, name, old)


_ACTIVE_SIM: list = []  # the simulation running now (for _fused_run_kernel)


def _fused_run_kernel(name, x, kernel, fallback):
    """slimfit.ops.quant.run_kernel as the Triton kernel uses memory: the PyTorch path's
    result, with the peak only taken once its temporaries are gone (outputs only)."""
    sim = _ACTIVE_SIM[-1] if _ACTIVE_SIM else None
    if sim is None:
        return fallback()
    sim.suspended += 1
    try:
        out = fallback()
    finally:
        sim.suspended -= 1
    sim._update_peak()
    return out


# Real-tensor simulations at batch 1 and 2, per (workload, mode, settings): extrapolating
# them to another batch needs no new simulation (max_batch asks for many batches).
_RAW_CACHE: dict[tuple, tuple] = {}


def _simulate_on(
    work: Workload,
    mode: str,
    batch: int,
    freeze_ratio: float,
    seed: int,
    freeze_steps: int | None,
    only_step: int | None,
    device: str,
    trained: tuple[str, ...] | None = None,
) -> Prediction:
    if device == "meta":
        notes, results = _run_steps(
            work, mode, freeze_ratio, seed, freeze_steps, only_step, device, batch, trained
        )
    else:
        key = (work.name, work.seq_len, work.precision, mode, freeze_ratio, seed)
        key += (freeze_steps, only_step, device, trained)
        if key not in _RAW_CACHE:
            _RAW_CACHE[key] = _run_steps(
                work, mode, freeze_ratio, seed, freeze_steps, only_step, device, None, trained
            )
        notes, raws = _RAW_CACHE[key]
        results = [(i, _extrapolate(r1, r2, batch)) for i, (r1, r2) in raws]
        notes = list(notes)
    if mode in COMPRESSION and not any("convert" in n for n in notes):
        notes.append(
            "slimfit's ops run through their PyTorch path, Triton kernels counted as "
            "fused (saved bytes exact; transient outside the kernels may be a little high)"
        )
    step, (peak, phase, breakdown) = max(results, key=lambda r: r[1][0])
    return Prediction(
        mode,
        batch,
        peak,
        phase,
        breakdown,
        notes,
        worst_step=step if mode in FREEZE_MODES else None,
    )


def _run_steps(work, mode, freeze_ratio, seed, freeze_steps, only_step, device, batch, trained):
    """[(ILS step or None, result)]: meta results at ``batch``, else raw pairs at 1 and 2."""
    notes: list[str] = []
    bf16 = (work.precision or ("fp32" if mode == "full-fp32-eager" else "bf16")) == "bf16"
    model = _build(work, "eager" if mode == "full-fp32-eager" else "sdpa")
    if device != "meta":
        _materialize(model, device)
    if mode == "ckpt":
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"{work.name} does not support activation checkpointing; plan another mode."
            )
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    if mode == "lora":
        _apply_lora(model, work.head)
    if mode in COMPRESSION:
        note = _convert(model, COMPRESSION[mode])
        if note:
            notes.append(note)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True)
    # after warm-up: AdamW state for every parameter the optimizer holds
    for p in params:
        opt.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.empty_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.empty_like(p, memory_format=torch.preserve_format),
        }

    late: list = []  # state paged back in after the forward (slimfit.optim.paging.prefetch)

    def run():
        if device == "meta":
            inputs = _inputs(work, model, batch, device)
            return _step_peak(model, opt, params, inputs, bf16, device, late=late)
        r1 = _step_peak(
            model, opt, params, _inputs(work, model, 1, device), bf16, device, True, late
        )
        r2 = _step_peak(
            model, opt, params, _inputs(work, model, 2, device), bf16, device, True, late
        )
        return r1, r2

    if mode not in FREEZE_MODES:
        return notes, [(None, run())]

    units = _units(model, opt, freeze_ratio, seed)
    n_trained = len(units) - int(freeze_ratio * len(units))
    steps = freeze_steps or math.ceil(len(units) / max(n_trained, 1))
    if only_step is not None:
        steps = max(steps, only_step + 1, 1)
    masks = _ils_frozen_masks(len(units), freeze_ratio, seed, steps)
    if only_step == -1:
        masks = [torch.ones(len(units), dtype=torch.bool)]
    chosen = range(steps) if only_step is None else [max(only_step, 0)]
    if trained is not None:
        names = [u.name for u in units]
        unknown = sorted(set(trained) - set(names))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a unit of {work.name}; name unit parameters.")
        masks, chosen = [torch.tensor([n not in trained for n in names])], [0]
        n_trained = len(set(trained))
    results = []
    paged: dict = {}
    resident = set()
    if mode in PAGED_MODES:
        from .optim.paging import resident_units

        fraction = _SLIMFIT[mode].get("resident_state_fraction", 0.0)
        resident = resident_units([u.param.numel() for u in units], fraction)
    for i in chosen:
        late.clear()
        for j, (unit, frozen) in enumerate(zip(units, masks[i].tolist())):
            unit.param.requires_grad_(not frozen)
            if mode in PAGED_MODES and j not in resident:  # frozen: its state is on the host
                if frozen and unit.param in opt.state:
                    paged[unit.param] = opt.state.pop(unit.param)
                elif not frozen and unit.param in paged:
                    opt.state[unit.param] = paged.pop(unit.param)
                    late += [v for v in opt.state[unit.param].values() if v.dim() > 0]
        results.append((i, run()))
    if paged:
        notes.append("frozen units' optimizer state paged to host memory (not counted)")
    notes.append(
        f"{len(units) - n_trained} of {len(units)} units frozen; "
        + (
            "the given units trained"
            if trained is not None
            else f"max over ILS steps 0-{steps - 1}"
            if only_step is None
            else ("every unit frozen" if only_step == -1 else f"ILS step {only_step}")
        )
    )
    return notes, results


def _materialize(model: nn.Module, device: str) -> None:
    """Real, finite parameter values on ``device`` (fast: no real initialisation)."""
    buffers = {n: (b.shape, b.dtype) for n, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if "position_ids" in name:
                b.copy_(torch.arange(buffers[name][0][-1]).expand(buffers[name][0]))
            else:
                b.zero_()


def _extrapolate(r1: tuple, r2: tuple, batch: int) -> tuple[int, str, dict]:
    """Per-phase peaks at batch 1 and 2 -> the peak at ``batch`` (affine in the batch)."""
    best = None
    for phase, bd1 in r1[3].items():
        bd2 = r2[3].get(phase, bd1)
        bd = {k: max(int(bd1[k] + (batch - 1) * (bd2[k] - bd1[k])), 0) for k in bd1}
        total = sum(bd.values())
        if best is None or total > best[0]:
            best = (total, phase, bd)
    best[2]["transient"] += CUDA_WORKSPACE_BYTES
    return best[0] + CUDA_WORKSPACE_BYTES, best[1], best[2]


def _step_peak(
    model, opt, params, inputs: dict, bf16: bool, device: str = "meta", raw: bool = False,
    late=(),
) -> tuple:  # fmt: skip
    """(peak, phase, breakdown) of one simulated step; ``raw``: also the per-phase
    breakdowns, without the CUDA workspace constant. ``late``: optimizer state tensors
    that arrive on the device after the forward (paged back in by ``prefetch``)."""
    sim = _MemorySim(device, skip_compute=device != "meta")
    sim.grad_params = params
    for p in model.parameters():
        sim.track(p, "weights")
    for b in model.buffers():
        sim.track(b, "weights")
    late_ids = {id(v) for v in late}
    for state in opt.state.values():
        for v in state.values():
            if id(v) not in late_ids:
                sim.track(v, "optimizer")
    for t in inputs.values():
        sim.track(t, "activations")
    sim.reset_peak()
    dtype = torch.bfloat16 if bf16 else None
    _ACTIVE_SIM.append(sim)
    try:
        return _run_step(sim, model, opt, inputs, dtype, device, raw, late)
    finally:
        _ACTIVE_SIM.pop()


def _run_step(sim, model, opt, inputs, dtype, device, raw, late=()):
    def pack(t):
        sim.retag(t, "activations")
        return t

    with sim:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cuda = _CudaEmulation(dtype, sim)
            with cuda:
                loss = model(**inputs).loss
            cuda.cache.clear()  # autocast drops its cast cache when the region exits
        sim.phase = "backward"
        for v in late:
            sim.track(v, "optimizer")
        # Under the emulation again: checkpointed blocks and lean ops re-run forward code in
        # backward (with a fresh autocast cache, as on CUDA). The engine is called directly
        # because Tensor.backward itself would be intercepted by (and run outside) the mode.
        with _CudaEmulation(dtype, sim, cache=False):
            _run_backward(loss)
        del loss
        sim.phase = "optimizer"
        if device == "meta":  # on real tensors too slow; never the peak of a freezing mode
            opt.step()
        opt.zero_grad(set_to_none=True)
    if raw:
        return sim.peak, sim.peak_phase, dict(sim.peak_breakdown), sim.phase_breakdown
    breakdown = dict(sim.peak_breakdown)
    breakdown["transient"] += CUDA_WORKSPACE_BYTES
    return sim.peak + CUDA_WORKSPACE_BYTES, sim.peak_phase, breakdown


def activation_split(
    work: Workload, mode: str, batch: int, freeze_ratio: float = 0.95, seed: int = 0, **kw
) -> tuple[Prediction, int, int]:
    """(prediction, static, dynamic activation bytes) of a freezing mode, in SlimFit's terms.

    Static: saved whatever is frozen (what backward needs to pass the gradient on); it is
    measured with every unit frozen. Dynamic: the rest, saved only for the weight
    gradients of the units that train.
    """
    pred = simulate(work, mode, batch, freeze_ratio, seed, **kw)
    if mode not in FREEZE_MODES:
        return pred, pred.breakdown["activations"], 0
    kw.pop("only_step", None)
    base = simulate(work, mode, batch, freeze_ratio, seed, only_step=-1, **kw)
    static = min(base.breakdown["activations"], pred.breakdown["activations"])
    return pred, static, pred.breakdown["activations"] - static


def predict(
    model: str,
    batch_size: int,
    seq_len: int | None = None,
    modes: list[str] | tuple[str, ...] = MODES,
    freeze_ratio: float = 0.95,
    memory_cap: int | None = None,
    seed: int = 0,
    task: str | None = None,
    precision: str | None = None,
    log=None,
) -> dict:
    """Predictions for each mode (and the largest batch under ``memory_cap`` bytes).

    ``precision`` ("bf16" autocast or "fp32") overrides the modes' own."""
    if precision not in (None, "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; use bf16 or fp32.")
    work = resolve_workload(model, seq_len, task)
    work.precision = precision
    out = {
        "model": work.name,
        "task": work.task,
        "seq_len": work.seq_len,
        "batch_size": batch_size,
        "freeze_ratio": freeze_ratio,
        "precision": precision or "per mode",
        "memory_cap_bytes": memory_cap,
        "assumes": "CUDA caching allocator peak (torch.cuda.max_memory_allocated) of one AdamW "
        "step after warm-up, fp32 master weights; bf16 autocast and fused SDPA except full-fp32-eager",
        "modes": {},
    }
    for mode in modes:
        if log is not None:
            log(mode)
        try:
            pred = simulate(work, mode, batch_size, freeze_ratio, seed)
            if memory_cap is not None:
                pred.max_batch = max_batch(
                    work, mode, memory_cap, freeze_ratio, seed, only_step=pred.worst_step
                )
        except Exception as err:  # noqa: BLE001 - one mode that cannot be planned is a row
            text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            reason = text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"
            out["modes"][mode] = {"mode": mode, "error": reason}
            continue
        out["modes"][mode] = pred.to_dict()
    if all("error" in m for m in out["modes"].values()):
        first = next(iter(out["modes"].values()))["error"]
        raise ValueError(f"no mode could be planned for {work.name}: {first.rstrip('.')}.")
    return out


def max_batch(
    work: Workload,
    mode: str,
    memory_cap: int,
    freeze_ratio: float = 0.95,
    seed: int = 0,
    only_step: int | None = None,
    limit: int = 1 << 16,
) -> int:
    """Largest batch whose predicted peak is within ``memory_cap`` bytes (0 if none fits).

    Peak memory is affine in the batch (activations and workspaces scale linearly, the
    rest is constant), so simulations at batch 8 and 16 give the line; its answer is then
    confirmed by simulating it and its neighbour (bisecting if the line was off).
    Freezing modes simulate one ILS step (``only_step``; default the worst at batch 16).
    """
    if memory_cap <= 0:
        raise ValueError(f"the memory cap must be positive, got {memory_cap} bytes.")
    if only_step is None and mode in FREEZE_MODES:
        only_step = simulate(work, mode, 16, freeze_ratio, seed).worst_step

    cache: dict[int, int] = {}

    def fits(b: int) -> bool:
        if b not in cache:
            cache[b] = simulate(work, mode, b, freeze_ratio, seed, only_step=only_step).peak_bytes
        return cache[b] <= memory_cap

    b1, b2 = 8, 16
    fits(b1), fits(b2)
    slope = (cache[b2] - cache[b1]) / (b2 - b1)
    if slope <= 0:
        return limit if fits(b1) else 0
    guess = int((memory_cap - (cache[b1] - slope * b1)) // slope)
    guess = min(max(guess, 1), limit)
    if fits(guess):
        lo, hi, step = guess, None, 1
        while hi is None:
            if lo + step > limit:
                return lo
            if fits(lo + step):
                lo, step = lo + step, step * 2
            else:
                hi = lo + step
    else:
        lo, hi, step = 0, guess, 1
        while hi - step >= 1:
            if fits(hi - step):
                lo = hi - step
                break
            hi, step = hi - step, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------------
# sizes and comparisons
def parse_size(text: str | int) -> int:
    """'24GiB' -> bytes, read exactly as ``slimfit bench --memory-cap`` reads it (GiB/MiB are
    powers of 2, GB/MB powers of 10, a bare G/M means GiB/MiB)."""
    from .bench import parse_bytes

    return parse_bytes(text)


def comparison_markdown(rows: list[dict]) -> str:
    """Markdown table of predicted vs measured peaks.

    ``rows``: dicts with ``workload``, ``mode``, ``batch_size``, ``predicted_gib`` and
    ``measured_gib`` (e.g. from ``slimfit bench --json``); rows without a measurement are
    listed with a dash.
    """
    lines = [
        "| workload | mode | batch | predicted GiB | measured GiB | error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    errors = []
    for r in rows:
        pred, meas = r.get("predicted_gib"), r.get("measured_gib")
        if pred is not None and meas:
            err = (pred - meas) / meas
            errors.append(abs(err))
            err_s = f"{err:+.1%}"
        else:
            err_s = "-"
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r.get('batch_size', '-')} | {fmt(pred)} | {fmt(meas)} | {err_s} |"
        )
    if errors:
        lines.append("")
        lines.append(
            f"{len(errors)} comparisons; mean |error| {sum(errors) / len(errors):.1%}, "
            f"worst {max(errors):.1%}, within 10%: {sum(e <= 0.10 for e in errors)}/{len(errors)}."
        )
    return "\n".join(lines) + "\n"


def bench_records(bench: dict) -> list[dict]:
    """Measured peaks from a ``slimfit bench`` result (its bench.json, loaded): one record
    per workload and mode that ran on CUDA at the base size."""
    settings = bench.get("settings") or {}
    out = []
    for w in bench.get("workloads", []):
        for mode, res in (w.get("modes") or {}).items():
            peak = (res.get("memory") or {}).get("peak_allocated_bytes")
            if res.get("status") != "ok" or not peak or mode not in MODES:
                continue
            out.append(
                {
                    "workload": w.get("workload"),
                    "model": settings.get("model"),
                    "size": settings.get("size", "base"),
                    "task": w.get("task"),
                    "seq_len": w.get("seq_len"),
                    "batch_size": w.get("batch_size") or settings.get("batch_size"),
                    "freeze_ratio": settings.get("freeze_ratio") or 0.95,
                    "mode": mode,
                    "peak_bytes": peak,
                }
            )
    return out


def compare_with_bench(records: list[dict], allow_cpu: bool = True) -> list[dict]:
    """Rows for :func:`comparison_markdown`: each bench record (see :func:`bench_records`;
    ``workload``, ``mode``, ``batch_size`` and ``peak_bytes`` or ``peak_gib``; ``model``,
    ``task``, ``seq_len``, ``freeze_ratio`` when present) with its prediction."""
    rows = []
    for rec in records:
        measured = rec.get("peak_gib")
        if measured is None and rec.get("peak_bytes") is not None:
            measured = rec["peak_bytes"] / GiB
        label = rec["workload"] if not rec.get("model") else f"{rec['workload']} ({rec['model']})"
        row = {"workload": label, "mode": rec["mode"], "batch_size": rec["batch_size"]}
        row.update(measured_gib=measured, predicted_gib=None, notes=[])
        if rec.get("size", "base") != "base":
            row["notes"] = [f"bench size {rec['size']!r}: plan predicts the base configs only"]
            rows.append(row)
            continue
        if rec.get("model"):
            work = resolve_workload(rec["model"], rec.get("seq_len"), rec.get("task"))
        else:
            image = (
                rec.get("task") == "image"
                or getattr(WORKLOADS.get(rec["workload"]), "task", None) == "image"
            )
            work = resolve_workload(rec["workload"], None if image else rec.get("seq_len"))
        pred = simulate(
            work,
            rec["mode"],
            int(rec["batch_size"]),
            float(rec.get("freeze_ratio") or 0.95),
            allow_cpu=allow_cpu,
        )
        row.update(predicted_gib=pred.peak_gib, notes=pred.notes, phase=pred.phase)
        rows.append(row)
    return rows


def write_comparison(bench_paths: list, out_dir, allow_cpu: bool = True) -> list:
    """``plan_vs_measured.md`` and ``.json`` in ``out_dir`` from bench.json files (or their
    folders); returns the paths. For the lead: ``slimfit plan --compare runs/bench-*/``."""
    import datetime as _dt
    import json
    from pathlib import Path

    records, sources = [], []
    for p in bench_paths:
        path = Path(p)
        path = path / "bench.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"no bench result at {str(path)!r}; pass a bench.json or its folder.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}).") from None
        recs = bench_records(data)
        records += recs
        env = data.get("env") or {}
        sources.append(
            f"- `{path}`: {data.get('date', '?')}, `{data.get('command', '?')}`, "
            f"device {env.get('device') or env.get('gpu') or '?'}, {len(recs)} measured modes"
        )
    if not records:
        raise ValueError(
            "the bench results hold no measured CUDA peaks; run slimfit bench on a GPU."
        )
    rows = compare_with_bench(records, allow_cpu=allow_cpu)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch as _torch
    import transformers as _tf

    md = [
        "# slimfit plan vs measured peaks",
        "",
        f"Predicted by `slimfit plan` on "
        f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
        f"(torch {_torch.__version__}, transformers {_tf.__version__}, no GPU); measured "
        "peak = `torch.cuda.max_memory_allocated` from:",
        "",
        *sources,
        "",
        comparison_markdown(rows),
    ]
    notes = [
        f"- {r['workload']} / {r['mode']}: {'; '.join(r['notes'])}" for r in rows if r["notes"]
    ]
    if notes:
        md += ["Notes:", "", *notes, ""]
    md_path, json_path = out / "plan_vs_measured.md", out / "plan_vs_measured.json"
    md_path.write_text("\n".join(md) + "\n")
    json_path.write_text(
        json.dumps({"rows": rows, "sources": [str(p) for p in bench_paths]}, indent=2) + "\n"
    )
    return [md_path, json_path]
