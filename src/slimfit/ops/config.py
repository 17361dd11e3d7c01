"""`CompressionConfig`: what each converted op keeps for backward, and the presets.

Every field is a per-op switch; ``None`` means "keep what the op needs as is".

Fixed-point codes (``scale="fixed"``, the paper's choice) use a constant step per op: code
``= clamp(floor(x / step + 1/2), -2^(b-1), 2^(b-1) - 1)``, value ``= code * step``.
Per-block codes (``scale="block"``) split the tensor (in memory order) into blocks of
``block_size`` elements with one fp32 scale ``absmax / (2^(b-1) - 1)`` per block, so a
block's largest value is exact and nothing is clipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

SCALES = ("fixed", "block")
NORM_MODES = (None, "int8", "int4", "topk")
DROPOUT_MODES = (None, "regenerate", "bitmask")
LINEAR_SCOPES = ("all", "ffn_out")
PRESETS = ("default", "paper", "none")
WEIGHT_COPIES = ("none", "projections", "all")

# Name patterns (re.search on the module's qualified name) of FFN-output linears, whose
# input is the activation output (the paper compresses only this linear's input).
FFN_OUT_PATTERN = (
    r"(^|\.)(?<!attention\.)output\.dense$|(^|\.)ffn\.lin2$|(^|\.)mlp\.(down_proj|fc2|c_proj)$"
    r"|(^|\.)intermediate\.dense_4h_to_h$"
)


@dataclass(frozen=True)
class CompressionConfig:
    """Per-op compression of the activations backward keeps.

    linear_bits: input saved by a *trainable* linear: ``None`` = as is, ``8`` = int8.
        A frozen linear never saves its input, whatever this says.
    linear_scope: ``"all"`` trainable linears, or only ``"ffn_out"`` (the paper).
    linear_step: fixed-point step of the linear input code (``scale="fixed"`` only).
    activation_bits: code of the GELU/SiLU input: ``None``, ``4`` (published) or ``8``.
    activation_step: fixed-point step of the activation code (paper: 0.5, range [-4, 3.5]).
    activation_scale: ``"fixed"``/``"block"`` for the activation code, ``None`` = ``scale``.
    activation_clip: per-block mode only: each block's absmax is clipped to this first
        (``None``: no clip; SiLU uses twice this). GELU/SiLU derivatives are flat beyond about +-3, so clipping
        there spends the 16 levels where the derivative changes. Measured (4 bits, GELU,
        inputs N(mu, sigma), tests/test_ops.py::test_default_choices): clipped per-block
        is within 10% of the best of fixed / plain per-block for every sigma in 0.1 .. 4,
        while fixed step 0.5 loses 9x at sigma 0.1 and plain per-block 3x at sigma 4.
    norm: frozen norm's saved normalized output: ``None`` (the original op), ``"int8"``
        (per-block int8 + per-row rstd), ``"int4"`` (the same at 4 bits: half the bytes,
        still 3x more accurate than top-10%) or ``"topk"`` (keep ``norm_keep`` of each row by
        magnitude: fp16 values + int16 indices, plus per-row rstd; published).
    norm_trained_gain: a norm whose gain trains: ``"compressed"`` keeps the same int8 code
        of the normalized output as a frozen one and takes the gain's gradient
        ``sum(grad * y)`` from it (1-2% gradient error, like an int8 linear input), so a
        norm's memory does not depend on whether its gain trains; ``"exact"`` runs the
        original op, which keeps its fp32 input (4 B/elem) on the steps where the gain
        trains. ``norm="int4"``/``"topk"`` gains always train exactly (their codes are too
        coarse for it); LayerNorm only (RMSNorm gains train through the original op).
    attention_bits: Q, K, V saved around fused SDPA: ``None`` (the model's own SDPA) or ``8``.
    attention_step: fixed-point step of the attention code (paper: 1/16, range [-8, 8)).
    attention_recompute: keep no code of Q, K, V where they are plain projections of a lean
        LayerNorm's output (BERT/ViT-style blocks): backward rebuilds them from the int8
        code the norm keeps anyway, running the three projections again (a forward's worth
        of their matmuls). Saves the Q, K, V codes (3.2 B per hidden element per layer);
        elsewhere (e.g. rotary embeddings in between) the codes are kept as usual.
        ``None`` (default): on whenever ``norm="int8"`` and ``attention_bits=8`` (there is a
        code to rebuild from), off otherwise; ``True``: on, and an error if those are not
        set; ``False``: off (keeps the codes: more memory, no second projection). Measured
        at freeze 0.90 on an H100 (``benchmarks/results/2026-11-23-freeze-0.90-recompute-h100``):
        peak 20-24% lower on bert-base (seq-cls, QA) and ViT-B, the step 8% slower on QA,
        whose step is bound by the device.
    dropout: ``None`` (as is: a byte mask), ``"regenerate"`` (an 8-byte seed) or
        ``"bitmask"`` (1 bit per element).
    frozen_weight_copy: which frozen linears, under autocast, keep autocast's bf16 copy of
        their weight for the input gradient (as plain PyTorch does) and run as the plain op,
        instead of a custom autograd node that casts the fp32 weight again in backward.
        ``"none"``: none (bert-base keeps ~163 MiB less at the step's peak);
        ``"projections"``: those reading a lean norm's output (Q, K, V and FFN-in in
        BERT/ViT blocks; ~99 MiB on bert-base, ~45 fewer Python autograd nodes a step);
        ``"all"`` (default): every frozen linear (+0.04-0.06 GiB of peak over
        ``"projections"`` at batch 128 on bert-base / ViT-B, whose steps are bound by the
        host issuing them: no Python node for the frozen attention-output and FFN-output
        projections either; ``benchmarks/results/2026-12-06-allcopy-default-h100``).
        Under ``slimfit.attach`` a unit's copy is kept across steps while the unit stays
        frozen and unchanged, so it is cast once rather than at every step
        (``slimfit.ops.linear.keep_frozen_casts``).
    scale: ``"fixed"`` (paper) or ``"block"`` (per-block absmax scales of ``block_size``).
    ffn_out_pattern: regex of FFN-output linear names (for ``linear_scope="ffn_out"``).
    """

    linear_bits: int | None = 8
    linear_scope: str = "all"
    linear_step: float = 1.0 / 16.0
    activation_bits: int | None = 4
    activation_step: float = 0.5
    activation_scale: str | None = "block"
    activation_clip: float | None = 3.0
    norm: str | None = "int8"
    norm_keep: float = 0.1
    norm_trained_gain: str = "compressed"
    attention_bits: int | None = 8
    attention_step: float = 1.0 / 16.0
    attention_recompute: bool | None = None
    dropout: str | None = "regenerate"
    frozen_weight_copy: str = "all"
    scale: str = "block"
    block_size: int = 64
    ffn_out_pattern: str = FFN_OUT_PATTERN

    def __post_init__(self) -> None:
        if self.linear_bits not in (None, 8):
            raise ValueError(f"linear_bits must be None or 8, got {self.linear_bits!r}.")
        if self.linear_scope not in LINEAR_SCOPES:
            raise ValueError(
                f"linear_scope must be one of {', '.join(LINEAR_SCOPES)}, got {self.linear_scope!r}."
            )
        if self.activation_bits not in (None, 4, 8):
            raise ValueError(f"activation_bits must be None, 4 or 8, got {self.activation_bits!r}.")
        if self.attention_bits not in (None, 8):
            raise ValueError(f"attention_bits must be None or 8, got {self.attention_bits!r}.")
        for name in ("activation_step", "attention_step", "linear_step"):
            step = getattr(self, name)
            if not isinstance(step, (int, float)) or not step > 0 or not math.isfinite(step):
                raise ValueError(f"{name} must be a positive finite number, got {step!r}.")
        if self.norm not in NORM_MODES:
            raise ValueError(f"norm must be None, 'int8', 'int4' or 'topk', got {self.norm!r}.")
        if self.attention_recompute is not None and not isinstance(self.attention_recompute, bool):
            raise ValueError(
                "attention_recompute must be None (where possible), True or False, got "
                f"{self.attention_recompute!r}."
            )
        if self.attention_recompute is True and not self._can_recompute:
            raise ValueError(
                "attention_recompute rebuilds Q, K, V from the int8 code of the norm before "
                "them; it needs attention_bits=8 and norm='int8', got attention_bits="
                f"{self.attention_bits!r} and norm={self.norm!r}."
            )
        if self.norm_trained_gain not in ("compressed", "exact"):
            raise ValueError(
                "norm_trained_gain must be 'compressed' or 'exact', "
                f"got {self.norm_trained_gain!r}."
            )
        if not isinstance(self.norm_keep, (int, float)) or not 0.0 < self.norm_keep <= 1.0:
            raise ValueError(f"norm_keep must be in (0, 1], got {self.norm_keep!r}.")
        if self.dropout not in DROPOUT_MODES:
            raise ValueError(
                f"dropout must be None, 'regenerate' or 'bitmask', got {self.dropout!r}."
            )
        if self.frozen_weight_copy not in WEIGHT_COPIES:
            raise ValueError(
                f"frozen_weight_copy must be one of {', '.join(WEIGHT_COPIES)}, "
                f"got {self.frozen_weight_copy!r}."
            )
        if self.activation_scale is not None and self.activation_scale not in SCALES:
            raise ValueError(
                f"activation_scale must be None, 'fixed' or 'block', got {self.activation_scale!r}."
            )
        clip = self.activation_clip
        if clip is not None and (not isinstance(clip, (int, float)) or not clip > 0):
            raise ValueError(f"activation_clip must be None or a positive number, got {clip!r}.")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be 'fixed' or 'block', got {self.scale!r}.")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 2 or bs % 2 or bs > 4096:
            raise ValueError(f"block_size must be an even integer in [2, 4096], got {bs!r}.")

    # -- presets ----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> CompressionConfig:
        """A named configuration.

        ``"paper"``: the published choices (GELU input 4-bit fixed point, step 0.5 over
        [-4, 3.5]; Q, K, V 8-bit fixed point, step 1/16 over [-8, 8); FFN-out linear input
        8-bit; frozen norm top-10% values + indices + rstd; dropout as is).

        ``"default"``: the best measured trade-off (CPU measurements asserted in
        ``tests/test_ops.py``; relative error of the input gradient):

        - norm int8 per-block (1.06 B/elem): 5e-4, vs the published top-10% (0.40 B/elem):
          2.7e-2 and top-25% (1.0 B/elem): 2.0e-2; int8 wins per byte (``norm="int4"``,
          0.56 B/elem: 8.7e-3, is the leaner option); a trained gain takes its gradient
          from the same code, so a norm's memory does not depend on which gains train;
        - GELU input 4-bit per-block clipped at 3 (0.56 B/elem): within 10% of the best of
          fixed-step / plain per-block for input spreads 0.1 .. 4 (fixed step 0.5 is 9x worse
          at spread 0.1, plain per-block 3x worse at spread 4);
        - Q, K, V int8 per-block (1.06 B/elem): 0.6% value error for any spread, where the
          fixed [-8, 8) range clips (27% at spread 6); gradient error 1-5%;
        - trainable-linear inputs int8 per-block, all linears (Q, K, V share one copy); a
          linear reading a LayerNorm's output shares the norm's code instead;
        - Q, K, V rebuilt in backward from their LayerNorm's code where they are its plain
          projections (``attention_recompute``), so no code of them is kept;
        - dropout keeps an 8-byte seed and regenerates its mask in backward.

        ``"none"``: nothing compressed (converted modules behave exactly as the originals).
        """
        if name == "default":
            return cls()
        if name == "paper":
            return cls(
                linear_bits=8,
                linear_scope="ffn_out",
                activation_bits=4,
                activation_step=0.5,
                norm="topk",
                norm_keep=0.1,
                norm_trained_gain="exact",
                attention_bits=8,
                attention_step=1.0 / 16.0,
                attention_recompute=False,
                dropout=None,
                scale="fixed",
                activation_scale="fixed",
            )
        if name == "none":
            return cls(
                linear_bits=None, activation_bits=None, norm=None, attention_bits=None, dropout=None
            )
        raise ValueError(
            f"unknown compression preset {name!r}; choose one of {', '.join(PRESETS)}."
        )

    @classmethod
    def resolve(cls, value) -> CompressionConfig:
        """A preset name, a ``CompressionConfig`` or a dict of its fields -> a config."""
        if value is None:
            return cls.preset("none")
        if isinstance(value, CompressionConfig):
            return value
        if isinstance(value, str):
            return cls.preset(value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(
                    f"unknown compression field(s) {', '.join(unknown)}; use {', '.join(sorted(known))}."
                )
            return cls(**value)
        raise ValueError(
            f"compression must be a preset name, a CompressionConfig or a dict, got {type(value).__name__}."
        )

    @property
    def _can_recompute(self) -> bool:
        return self.attention_bits is not None and self.norm == "int8"

    @property
    def recompute_qkv(self) -> bool:
        """Whether attention rebuilds Q, K, V from their norm's code (``attention_recompute``
        resolved: ``None`` means wherever the config allows it)."""
        if self.attention_recompute is None:
            return self._can_recompute
        return self.attention_recompute

    @property
    def act_scale(self) -> str:
        return self.activation_scale or self.scale

    def replace(self, **changes) -> CompressionConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_noop(self) -> bool:
        return (
            self.linear_bits is None
            and self.activation_bits is None
            and self.norm is None
            and self.attention_bits is None
            and self.dropout is None
        )
