"""`slimfit.attach`: dynamic freezing inside any PyTorch training loop.

The optimizer's own step hooks do the work, so the user's loop stays
``loss.backward(); optimizer.step(); optimizer.zero_grad()``:

- before the step, frozen units lose any stale gradient (so neither momentum nor weight
  decay moves them: a frozen unit is bit-identical across the step), and the units that
  train are snapshotted (only those: never a full copy of the weights);
- after the step, the trained units get a fresh score (``SlimFitConfig.score``),
  the scheduler chooses the next frozen set, and ``requires_grad`` is set accordingly, so
  autograd computes no weight gradient and keeps no input for the frozen units.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import torch
from torch import nn

from .config import DEFAULT_HEAD_PATTERN, SlimFitConfig
from .ops.linear import (
    cast_biases_together,
    forget_bias_casts,
    forget_frozen_casts,
    keep_frozen_casts,
)
from .scheduler import InterLayerScheduler
from .units import Unit, find_units, params_in

# Keeps |W_prev| = 0 elements (e.g. a zeroed padding row) from turning a score into inf.
_SCORE_EPS = 1e-12

StepCallback = Callable[[dict], None]


class SlimFit:
    """Handle returned by :func:`attach`. See the module docstring for what it does."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: SlimFitConfig):
        self.model = model
        self.optimizer = optimizer
        self.config = config
        held = params_in(optimizer)
        if not any(id(p) in held for p in model.parameters()):
            raise ValueError(
                "the optimizer holds none of the model's parameters; build it from "
                "model.parameters() (or groups of them) before calling slimfit.attach."
            )
        self._fixed = _freeze_matching(model, config)
        self.units: list[Unit] = find_units(model, config, held)
        if not self.units:
            raise ValueError(
                "the model has no freezable units (weights with 2+ dims or norm gains that "
                "require grad and are in the optimizer); check the `units`/`exclude` patterns."
            )
        self.unit_names = [u.name for u in self.units]
        self.scheduler = InterLayerScheduler(
            len(self.units),
            config.freeze_ratio,
            config.policy,
            config.seed,
            config.warmup_steps,
            score=config.score,
            max_stale_steps=config.max_stale_steps,
            explore=config.explore,
        )
        self._callbacks: list[StepCallback] = []
        self._snapshot: list[torch.Tensor] = []
        self._snapshot_idx: torch.Tensor | None = None
        # async_scores: (unit indices, their scores on the host or on their way there, the
        # event after which the copy is complete) of the last step, not yet reported
        self._pending: tuple | None = None
        self._measure = config.policy == "ils"
        self.history: list[torch.Tensor] = []  # frozen mask of every completed step
        self.conversion = None
        if config.compression not in (None, "none"):
            from .convert import convert

            self.conversion = convert(model, config.compression)
        self._dist = None
        if _distributed_world() > 1:
            from .distributed import GradientSync

            self._dist = GradientSync(self)
        self.pager = None
        if _wants_paging(config.offload_optimizer_state, self.units):
            from .optim.paging import OptimizerStatePager, resident_units

            params = [u.param for u in self.units]
            self.pager = OptimizerStatePager(
                optimizer,
                params,
                lambda: self.scheduler.frozen,
                resident_units([p.numel() for p in params], config.resident_state_fraction),
            )
        # a frozen unit's linear keeps its weight's low-precision cast until the unit trains
        keep_frozen_casts([u.param for u in self.units] + self._fixed)
        # The converted linears' biases are cast in one node per forward. Their gradients
        # then all arrive at the end of backward: not where buckets are sent from backward's
        # gradient hooks (gradient_sync "overlap", or an outer DDP), which would wait for them.
        overlapping = self._dist is not None and self._dist.mode in ("overlap", "ddp")
        lean = [
            m for m in model.modules() if isinstance(m, nn.Linear) and "_slimfit_cfg" in m.__dict__
        ]
        self._biases = [] if overlapping else [m.bias for m in lean if m.bias is not None]
        cast_biases_together(self._biases)
        self._apply(self.scheduler.frozen)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        if self._biases:  # each forward casts them afresh
            self._handles.append(model.register_forward_pre_hook(lambda *_: forget_bias_casts()))
        if self.pager is not None:
            # the state of the units about to train comes back after the forward's peak
            pager = self.pager
            self._handles.append(model.register_forward_hook(lambda *_: pager.prefetch()))

    # -- state the user can read -------------------------------------------------------
    @property
    def step(self) -> int:
        return self.scheduler.step

    @property
    def frozen_mask(self) -> torch.Tensor:
        return self.scheduler.frozen.clone()

    @property
    def frozen_units(self) -> list[str]:
        return [n for n, f in zip(self.unit_names, self.scheduler.frozen.tolist()) if f]

    @property
    def trained_units(self) -> list[str]:
        return [n for n, f in zip(self.unit_names, self.scheduler.frozen.tolist()) if not f]

    def trained_steps_per_unit(self) -> dict[str, int]:
        """How many completed optimizer steps each unit trained in (which units ILS favours
        and which it starves)."""
        if not self.history:
            return dict.fromkeys(self.unit_names, 0)
        counts = (~torch.stack(self.history)).sum(0).tolist()
        return dict(zip(self.unit_names, counts))

    def schedule(self):
        """One record per completed optimizer step: ``{"step", "frozen", "trained"}``."""
        for step, mask in enumerate(self.history):
            yield self._record(step, mask)

    def _record(self, step: int, mask: torch.Tensor) -> dict:
        flags = mask.tolist()
        return {
            "step": step,
            "frozen": [n for n, f in zip(self.unit_names, flags) if f],
            "trained": [n for n, f in zip(self.unit_names, flags) if not f],
        }

    def no_sync(self):
        """Under torchrun: backward passes inside keep gradients local (gradient
        accumulation, like DDP's ``no_sync``); they are averaged by the next backward
        outside it or at the optimizer step. A no-op context on one process."""
        return self._dist.no_sync() if self._dist is not None else contextlib.nullcontext()

    def add_step_callback(self, fn: StepCallback) -> None:
        """Call ``fn(record)`` after every optimizer step with that step's schedule record."""
        self._callbacks.append(fn)

    # -- the optimizer hooks -------------------------------------------------------------
    def _apply(self, frozen: torch.Tensor) -> None:
        for unit, is_frozen in zip(self.units, frozen.tolist()):
            unit.param.requires_grad_(not is_frozen)
            if is_frozen:
                unit.param.grad = None
        if self.pager is not None:
            self.pager.sync_to(frozen)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self._dist is None and _distributed_world() > 1:  # slimfit.distributed
            raise ValueError(
                "torch.distributed was initialized after slimfit.attach, so no rank averages "
                "gradients; call init_process_group before attach."
            )
        frozen = self.scheduler.frozen.tolist()
        for unit, is_frozen in zip(self.units, frozen):
            if is_frozen:
                unit.param.grad = None
        if self._dist is not None:
            # slimfit.distributed: average what is still local; afterwards the same units
            # have gradients on every rank, so `trained` (and the scores) agree across ranks.
            self._dist.before_step()
        trained = [
            i
            for i, (unit, is_frozen) in enumerate(zip(self.units, frozen))
            if not is_frozen and unit.param.grad is not None
        ]
        # the step changes these (fused optimizers without moving their version counters)
        forget_frozen_casts([self.units[i].param for i in trained])
        if self._biases:
            forget_bias_casts()
        if self.pager is not None:
            self.pager.ready()
        if self._measure and trained:
            self._snapshot_idx = torch.tensor(trained, dtype=torch.long)
            # one multi-tensor kernel instead of a clone per trained unit (x * 1 keeps
            # every bit, -0.0 and NaN included)
            self._snapshot = torch._foreach_mul(
                [self.units[i].param.detach() for i in trained], 1.0
            )
        else:
            self._snapshot_idx, self._snapshot = None, []

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        scores = None
        if self._snapshot:
            params = [self.units[i].param for i in self._snapshot_idx.tolist()]
            if self.config.score == "taylor":
                scores = _loss_drops(self._snapshot, params)
            else:
                scores = torch.stack(
                    [_relative_update(prev, p) for prev, p in zip(self._snapshot, params)]
                )
            if self._dist is not None:
                scores = self._dist.agree_scores(scores)  # rank 0's scores on every rank
        mask = self.scheduler.frozen.clone()
        self.history.append(mask)
        if self.config.async_scores:
            # report the last step's scores (their copy ran while this step did) and start
            # this step's: nothing here waits for the device to finish this step
            scored, late = _landed(self._pending)
            self._pending = None if scores is None else (self._snapshot_idx, *_to_host(scores))
            self.scheduler.advance(self._snapshot_idx, late, scored=scored)
        else:
            scores = None if scores is None else scores.cpu()
            self.scheduler.advance(self._snapshot_idx, scores)
        self._snapshot, self._snapshot_idx = [], None
        self._apply(self.scheduler.frozen)
        if self._callbacks:
            record = self._record(len(self.history) - 1, mask)
            for fn in self._callbacks:
                fn(record)

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "scheduler": self.scheduler.state_dict(),
            "unit_names": list(self.unit_names),
            "history": torch.stack(self.history)
            if self.history
            else torch.zeros(0, len(self.units), dtype=torch.bool),
        }
        scored, scores = _landed(self._pending)
        if scored is not None:  # async_scores: the last step's, not yet reported
            state["pending_scores"] = {"units": scored.clone(), "scores": scores.clone()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if list(state["unit_names"]) != self.unit_names:
            raise ValueError(
                "the SlimFit state was saved for a model with different units; load it into the "
                "same model and configuration it was saved from."
            )
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"].unbind(0)) if len(state["history"]) else []
        pending = state.get("pending_scores")
        self._pending = None if pending is None else (pending["units"], pending["scores"], None)
        self._apply(self.scheduler.frozen)

    def detach(self) -> None:
        """Remove the hooks, unfreeze every unit and restore converted modules."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._dist is not None:
            self._dist.remove()
        if self.pager is not None:
            self.pager.remove()
            self.pager = None
        forget_frozen_casts([u.param for u in self.units] + self._fixed, unregister=True)
        forget_bias_casts(self._biases)
        self._biases = []
        for unit in self.units:
            unit.param.requires_grad_(True)
        for param in self._fixed:
            param.requires_grad_(True)
        self._fixed = []
        if self.conversion is not None:
            from .convert import restore

            restore(self.model)
            self.conversion = None


def _freeze_matching(model: nn.Module, config: SlimFitConfig) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on the trainable parameters ``config.frozen`` matches."""
    if config.frozen is None:
        return []
    hits = [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and re.search(config.frozen, name)
    ]
    if not hits:
        raise ValueError(
            f"frozen={config.frozen!r} matches no trainable parameter of the model; "
            "check the pattern against model.named_parameters()."
        )
    for key, pattern in (("exclude", config.exclude), ("train_head", DEFAULT_HEAD_PATTERN)):
        if pattern is None or (key == "train_head" and not config.train_head):
            continue
        clash = [n for n, _ in hits if re.search(pattern, n)]
        if clash:
            raise ValueError(
                f"frozen={config.frozen!r} and {key} both claim {clash[0]!r} (frozen for "
                f"the run vs never frozen); narrow one of them."
            )
    for _, p in hits:
        p.requires_grad_(False)
        p.grad = None
    return [p for _, p in hits]


def _to_host(scores: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``scores`` to (pinned) host memory; the event marks its completion."""
    if scores.device.type != "cuda":
        return scores, None
    host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
    host.copy_(scores, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _landed(pending) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(unit indices, host scores) of a pending copy, once complete; (None, None) if none."""
    if pending is None:
        return None, None
    units, scores, done = pending
    if done is not None:
        done.synchronize()  # recorded a step ago: long complete, unless the host ran ahead
    return units, scores


def _wants_paging(setting, units: list[Unit]) -> bool:
    if setting == "auto":
        return any(u.param.is_cuda for u in units)
    return bool(setting)


def _distributed_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _relative_update(prev: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """Mean over elements of |W_prev - W_new| / |W_prev| (the paper's score), in fp32."""
    prev32 = prev.float()
    return ((prev32 - param.detach().float()).abs_() / prev32.abs().clamp_min_(_SCORE_EPS)).mean()


def _loss_drop(prev: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """|<grad, W_prev - W_new>|: the loss decrease the update predicts to first order, in fp32."""
    return ((prev.float() - param.detach().float()) * param.grad.float()).sum().abs()


def _loss_drops(prevs: list[torch.Tensor], params: list[nn.Parameter]) -> torch.Tensor:
    """``_loss_drop`` of every trained unit; fp32 units (the usual master weights) take
    two multi-tensor kernels for the differences and products instead of two kernels per
    unit, with the same values bit for bit (a launch-bound step pays per kernel)."""
    if not all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params):
        return torch.stack([_loss_drop(prev, p) for prev, p in zip(prevs, params)])
    diffs = torch._foreach_sub(prevs, [p.detach() for p in params])
    torch._foreach_mul_(diffs, [p.grad for p in params])
    return torch.stack([d.sum() for d in diffs]).abs_()


def attach(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: SlimFitConfig | None = None
) -> SlimFit:
    """Adopt SlimFit in one line: ``sf = slimfit.attach(model, optimizer, SlimFitConfig(...))``."""
    return SlimFit(model, optimizer, config or SlimFitConfig())
