"""Configuration of a SlimFit run: which units freeze, how many, and by which policy."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

POLICIES = ("ils", "random", "none")
SCORES = ("relative", "normalized", "taylor")

# Parameter names of task heads, which stay trainable by default (the paper trains the
# classifier at every step). Matched with re.search against the full parameter name.
DEFAULT_HEAD_PATTERN = r"(^|\.)(classifier|qa_outputs|score|head|heads|lm_head|fc)(\.|$)"

# The LoRA baseline slimfit is compared with (peft ``LoraConfig`` keyword arguments; the
# bench's `lora` mode, the accuracy sweeps, `slimfit plan`): rank 8 on the attention
# query/value projections under both transformers 5.x layouts, the task head trained.
LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["query", "value", "q_proj", "v_proj"],
}


@dataclass
class SlimFitConfig:
    """What `slimfit.attach` does to a model and its optimizer.

    Freezing (inter-layer scheduling, ILS):
        freeze_ratio: fraction of units frozen at every optimizer step, in [0, 1);
            exactly ``int(freeze_ratio * n_units)`` units are frozen each step.
        policy: ``"ils"`` (the published scheduler: freeze the units with the lowest
            relative update), ``"random"`` (a fresh uniform random frozen set each step),
            or ``"none"`` (full fine-tuning, nothing frozen).
        seed: seeds the initial random scores and the ``random`` policy.
        warmup_steps: optimizer steps of full training before freezing starts (costs the
            peak memory of full fine-tuning during those steps).
        score: the ILS score of a unit that trained. ``"taylor"`` (default): the
            first-order loss decrease of the unit's own update, ``|<grad, W_prev - W_new>|``
            summed over its elements (the Gauss-Southwell rule of block coordinate descent:
            the units whose step lowered the loss most keep training). Measured on MiniLM-L6,
            3 seeds, freeze 0.9, lr 2e-4, CPU without compression
            (benchmarks/results/2026-12-03-taylor-score-cpu): trec 93.82 against 92.89 for
            ``"normalized"`` and 94.25 for full fine-tuning; sentiment above full
            fine-tuning. ``"normalized"``: the published relative update divided by the
            unit's first measured value (under AdamW the relative update is mostly
            lr / |W|, which starves norm gains; the default until 2026-12-03).
            ``"relative"``: the published score, mean |W_prev - W_new| / |W_prev|.
        max_stale_steps: a unit frozen this many consecutive steps trains next, whatever
            its (stale) score; ``None`` is the published scheduler. Measured at 400 (H200,
            benchmarks/results/2026-12-04-vision-epochs24-seeds-h200 and
            2026-12-04-text-stale400-h200): +0.14 points on Fashion-MNIST at 24 epochs
            (10 seeds), a no-op on trec (405 steps), -0.20 on sentiment (795 steps, 6
            seeds); hence not the default.
        explore: ILS only: the fraction of the trained slots (``1 - freeze_ratio`` of the
            units) filled with units drawn at random from those the scores would freeze;
            ``0.0`` is the published scheduler, ``1.0`` is random freezing. Measured on
            trec (MiniLM-L6, 3 seeds, benchmarks/results/2026-11-23-accuracy-explore-h100):
            0.5 and 0.25 within noise of plain ILS and random freezing.
        async_scores: ILS only: the scores of step ``t`` reach the scheduler at the end of
            step ``t + 1`` (they choose the units of step ``t + 2``), copied to the host
            while step ``t + 1`` runs. With ``False`` (the published scheduler) the end of
            every step waits for the device to finish it before the next frozen set can be
            chosen, so the host cannot issue step ``t + 1`` while the device still runs
            step ``t``: a step whose host work is close to its device work (bert-base
            seq-cls on an H100) loses that overlap. Measured on MiniLM-L6, 6 seeds, H100
            (benchmarks/results/2026-12-06-async-scores-h100): trec +0.37 and sentiment
            +0.66 points against ``False`` (paired SE 0.36 / 0.35).
        units: regex (``re.search`` on parameter names) selecting the freezable units.
            ``None`` selects the published units: every weight with 2+ dims plus every
            norm gain. Biases are never units.
        exclude: regex of parameter names that are never frozen; ``None`` means none.
        frozen: regex of parameter names frozen for the whole run (``requires_grad=False``
            from attach to detach), e.g. ``"word_embeddings"``: they are not units, so they
            take none of the trained slots, and get no gradient or optimizer state.
        train_head: keep the task head (``DEFAULT_HEAD_PATTERN``) always trainable.

    Memory:
        offload_optimizer_state: keep the optimizer state of frozen units in pinned host
            memory, copied back asynchronously before the unit trains again. ``"auto"``
            turns it on when the model is on a CUDA device.
        resident_state_fraction: with ``offload_optimizer_state``, the fraction (0 to 1) of
            the units' elements whose optimizer state stays on the device when they freeze,
            smallest units first (``slimfit.optim.paging.resident_units``): it trades a
            known amount of GPU memory (about this fraction of the frozen units' AdamW
            moments) for fewer page copies a step.
        compression: activation compression of the converted modules: a preset name
            (``"default"``, ``"paper"``, ``"none"``) or a ``slimfit.ops.CompressionConfig``.
            ``"none"`` leaves the model's modules untouched.
    """

    freeze_ratio: float = 0.9
    policy: str = "ils"
    seed: int = 0
    warmup_steps: int = 0
    score: str = "taylor"
    max_stale_steps: int | None = None
    explore: float = 0.0
    async_scores: bool = True
    units: str | None = None
    exclude: str | None = None
    frozen: str | None = None
    train_head: bool = True
    compression: Any = "default"
    offload_optimizer_state: Any = "auto"
    resident_state_fraction: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.freeze_ratio, (int, float)) or not 0.0 <= self.freeze_ratio < 1.0:
            raise ValueError(
                f"freeze_ratio must be in [0, 1), got {self.freeze_ratio!r}; "
                "use e.g. 0.9 to freeze 90% of units at every step."
            )
        if self.policy not in POLICIES:
            raise ValueError(
                f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}."
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(
                f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}."
            )
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}.")
        if self.max_stale_steps is not None and (
            not isinstance(self.max_stale_steps, int) or self.max_stale_steps < 1
        ):
            raise ValueError(
                f"max_stale_steps must be a positive integer or None, got {self.max_stale_steps!r}."
            )
        if not isinstance(self.explore, (int, float)) or not 0.0 <= self.explore <= 1.0:
            raise ValueError(f"explore must be a fraction in [0, 1], got {self.explore!r}.")
        if self.explore and self.max_stale_steps is not None:
            raise ValueError(
                "explore and max_stale_steps both hand trained slots to units the scores "
                "would freeze; set one of them, not both."
            )
        if not isinstance(self.async_scores, bool):
            raise ValueError(f"async_scores must be True or False, got {self.async_scores!r}.")
        if self.offload_optimizer_state not in ("auto", True, False):
            raise ValueError(
                "offload_optimizer_state must be 'auto', True or False, "
                f"got {self.offload_optimizer_state!r}."
            )
        fraction = self.resident_state_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0.0 <= fraction <= 1.0
        ):
            raise ValueError(
                f"resident_state_fraction must be a fraction in [0, 1], got {fraction!r}."
            )
        if fraction and self.offload_optimizer_state is False:
            raise ValueError(
                "resident_state_fraction keeps part of the paged optimizer state on the "
                "device, but offload_optimizer_state=False pages none; drop one of them."
            )
        for name in ("units", "exclude", "frozen"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{name} is not a valid regular expression: {err}.") from None

    def to_dict(self) -> dict:
        out = asdict(self)
        if not isinstance(self.compression, str) and self.compression is not None:
            out["compression"] = (
                asdict(self.compression)
                if hasattr(self.compression, "__dataclass_fields__")
                else str(self.compression)
            )
        return out
