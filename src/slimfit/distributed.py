"""Data-parallel training with dynamic freezing (torchrun / ``torch.distributed``).

DistributedDataParallel cannot follow SlimFit: it builds its reducer over the parameters
that require grad when it wraps the model, so a unit unfrozen later is never averaged, and
a unit frozen later raises "Expected to have finished reduction" unless
``find_unused_parameters=True``, which still all-reduces every parameter. So slimfit does
data parallelism itself, on the bare model, and :func:`slimfit.attach` turns it on when
``torch.distributed`` is initialized with more than one rank:

- at attach, parameters and buffers are broadcast from rank 0 (ranks start identical, as
  under DDP) and the SlimFit configuration, unit list and scheduler state are compared
  across ranks (a clear error if a rank differs, e.g. a per-rank seed);
- gradients are averaged across ranks for exactly the parameters that require grad, i.e.
  the trained units plus the always-trainable parameters (biases, head): frozen units send
  nothing, so the bytes per step follow the trained fraction. Gradients are coalesced into
  flat buckets (one dtype each, at most ``BUCKET_BYTES``), all-reduced asynchronously;
- the averaging runs at the end of every backward (so gradient clipping sees averaged
  gradients, as under DDP), skipped inside ``sf.no_sync()`` for gradient accumulation, and
  done at the optimizer step for whatever is still local (so a loop that never uses
  ``no_sync`` is still correct, it just communicates once per micro-batch);
  ``extra={"gradient_sync": "overlap"}`` instead sends each bucket from the gradient
  hooks as soon as it is full, overlapping backward (buckets in reverse parameter order,
  launched strictly in order, so a parameter without a gradient holds back later buckets
  until the end of backward); ``"step"`` averages only at the optimizer step;
- a parameter that got a gradient on some ranks only gets zeros on the others (its
  average is then the single-process gradient of the global batch); one that got none on
  every rank keeps ``grad=None``, so the optimizer skips it as it would in one process;
- after each step the fresh ILS scores are broadcast from rank 0, so every rank freezes
  the same units at every step (the ``random`` policy draws from a generator seeded
  identically on every rank, checked at attach).

A model already inside DDP when attach runs (the transformers Trainer and accelerate wrap
it before callbacks run) is accepted only with ``find_unused_parameters=True`` (the
Trainer's default for a model without activation checkpointing): DDP is then correct under
changing frozen sets (a frozen unit is an unused parameter: zeros in its bucket, its grad
left None) but all-reduces every parameter; slimfit only agrees the scores. Passing the
DDP wrapper itself to attach, FSDP (1 and 2) and DeepSpeed are refused at attach with a
one-sentence error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

# Cap on one flat gradient bucket (DDP's default is 25 MiB too).
BUCKET_BYTES = 25 * 1024 * 1024
# Cap on one flat bucket of the start-up broadcast (DDP uses 250 MiB).
BROADCAST_BYTES = 250 * 1024 * 1024
# Buckets in flight at once: bounds the extra memory of the flat copies.
MAX_INFLIGHT = 4

SYNC_MODES = ("backward", "overlap", "step")  # "ddp" is chosen, never asked: see _outer_ddp


class GradientSync:
    """Gradient averaging and score agreement across the ranks of the default group.

    Built by :class:`slimfit.attach.SlimFit` when ``torch.distributed`` is initialized with
    world size > 1. ``sf.config.extra["gradient_sync"]`` picks when gradients are averaged:
    ``"backward"`` (default: at the end of every backward outside ``no_sync``),
    ``"overlap"`` (buckets sent from the gradient hooks during backward, outside
    ``no_sync``) or ``"step"`` (only at the optimizer step: the least communication with
    accumulation, but gradient clipping then sees each rank's local gradients).
    ``extra["bucket_mb"]`` caps a bucket (default 25).

    Counters (read them for benchmarks): ``bytes_last_step`` / ``bytes_total`` (gradient
    payload all-reduced, including the presence flags), ``control_bytes_total`` (score
    broadcasts), ``collectives_last_step``, ``full_bytes`` (what averaging every trainable
    parameter would send per step, i.e. plain DDP), ``steps``.
    """

    def __init__(self, sf, process_group=None):
        self.sf = sf
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.mode = sf.config.extra.get("gradient_sync", "backward")
        if self.mode not in SYNC_MODES:
            raise ValueError(
                f"extra['gradient_sync'] must be one of {', '.join(SYNC_MODES)}, got {self.mode!r}."
            )
        _refuse_wrappers(sf.model, sf.optimizer)
        self.outer_ddp = _outer_ddp(sf.model)
        if self.outer_ddp is not None:
            # The bare model is already inside a DDP wrapper (the transformers Trainer /
            # accelerate wrap it before callbacks run). DDP with find_unused_parameters=True
            # is correct under changing frozen sets (frozen units are "unused": their bucket
            # slots are zeros and their grad stays None); it averages everything, though.
            if not self.outer_ddp.find_unused_parameters:
                raise ValueError(
                    "the model is wrapped in DistributedDataParallel without "
                    "find_unused_parameters=True, which fails once units freeze; do not wrap "
                    "it (slimfit averages only the trained units' gradients itself), or wrap "
                    "it with find_unused_parameters=True (Trainer: "
                    "ddp_find_unused_parameters=True)."
                )
            self.mode = "ddp"
        self.params = _all_params(sf.model, sf.optimizer)
        if not self.params:
            raise ValueError("the model has no parameters to train; nothing to synchronise.")
        self.device = self.params[0].device
        backend = str(dist.get_backend(process_group))
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(
                "the process group uses NCCL but the model is on the CPU; move the model to "
                "its GPU (torch.cuda.set_device(local_rank); model.cuda()) before attach, "
                "or use the gloo backend."
            )
        self.full_bytes = sum(_nbytes(p) for p in self.params if p.requires_grad)
        self.bytes_last_step = 0
        self.bytes_total = 0
        self.control_bytes_total = 0
        self.collectives_last_step = 0
        self.syncs_last_step = 0
        self.steps = 0
        self.profile = False  # when True, CUDA-synchronize and time every average
        self.seconds_total = 0.0
        self._bytes_this_step = 0
        self._collectives_this_step = 0
        self._syncs_this_step = 0
        self._early_this_step = 0  # overlap: buckets sent while backward was still running
        self.early_collectives_last_step = 0
        self._local = False  # some gradient changed since it was last averaged
        self._queued = False  # an end-of-backward average is queued for this backward
        self._no_sync = False
        self._check_same_setup()
        self._handles = []
        if self.mode == "ddp":
            # DDP broadcast the weights when it wrapped the model and averages gradients.
            self.full_bytes = sum(
                _nbytes(p) for p in self.outer_ddp.module.parameters() if p.requires_grad
            )
            return
        self._broadcast_state()
        mb = sf.config.extra.get("bucket_mb", BUCKET_BYTES / 2**20)
        self.bucket_bytes = int(float(mb) * 2**20)
        self._active = False  # overlap: this backward launches buckets as they fill
        self._plan_key: tuple = ()
        if self.mode in ("backward", "overlap"):
            self._handles.append(sf.model.register_forward_hook(self._on_forward))
        for p in self.params:
            if p.requires_grad:  # units too: attach freezes them only after this
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_accumulate))

    # -- what the user calls ----------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside keep their gradients local (gradient accumulation).

        As with DDP: run every micro-batch but the last of an optimizer step inside it.
        Whatever is still local is averaged at the latest by the optimizer step.
        """
        if self.mode == "ddp":
            with self.outer_ddp.no_sync():
                yield
            return
        previous, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = previous

    def synchronize(self) -> None:
        """Average now whatever gradients changed since they were last averaged."""
        if self._local:
            self._average()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- hooks called by SlimFit --------------------------------------------------------------
    def before_step(self) -> None:
        """Optimizer pre-step: every gradient is averaged (and present on the same ranks)."""
        if self.mode == "ddp":
            self._bytes_this_step = self.full_bytes  # DDP's buckets: every trainable param
            self.bytes_total += self.full_bytes
        elif self._local:
            self._average()
        self.bytes_last_step = self._bytes_this_step
        self.collectives_last_step = self._collectives_this_step
        self.syncs_last_step = self._syncs_this_step
        self.early_collectives_last_step = self._early_this_step
        self._early_this_step = 0
        self._bytes_this_step = self._collectives_this_step = self._syncs_this_step = 0
        self.steps += 1

    def agree_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Rank 0's fresh scores on every rank, so frozen sets never diverge."""
        out = scores.detach().to(self._comm_device(), torch.float32).contiguous()
        dist.broadcast(out, src=self._global_rank(0), group=self.group)
        self.control_bytes_total += _nbytes(out)
        return out.to(scores.device, scores.dtype)

    # -- autograd hooks ---------------------------------------------------------------------
    def _on_accumulate(self, param: torch.Tensor) -> None:
        self._local = True
        if self._active:
            k = self._where.get(id(param))
            if k is None or id(param) in self._seen:
                raise ValueError(
                    "a gradient was accumulated twice in one backward pass (reentrant "
                    "activation checkpointing?) after its bucket was sent; use "
                    "extra['gradient_sync']='backward' (the default) or non-reentrant "
                    "checkpointing."
                )
            self._seen.add(id(param))
            self._ready[k] += 1
            plan = self._plan
            while self._next < len(plan) and self._ready[self._next] == len(plan[self._next]):
                self._launch([p.grad for p in plan[self._next]])
                self._next += 1
                self._early_this_step += 1

    def _on_forward(self, module, args, output) -> None:
        if not torch.is_grad_enabled():
            return
        for t in _tensors(output):
            if t.requires_grad:
                t.register_hook(self._on_backward_start)

    def _on_backward_start(self, grad):
        # Queued from the outermost backward's graph task (the model output), so it runs
        # once every gradient of this backward is accumulated, also under reentrant
        # activation checkpointing (whose inner backward passes are separate tasks).
        if not self._queued:
            self._queued = True
            if self.mode == "overlap" and not self._no_sync:
                self._start_overlap()
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        return None

    def _end_of_backward(self) -> None:
        self._queued = False
        if self._active:
            self._active = False
            self._finish_overlap()
        elif not self._no_sync and self._local:
            self._average()

    # -- overlap: buckets launched from the gradient hooks -------------------------------------
    def _start_overlap(self) -> None:
        """Plan this backward's buckets: parameters that require grad, in reverse order
        (roughly the order backward produces them), the same on every rank."""
        params = [p for p in self.params if p.requires_grad]
        key = tuple(id(p) for p in params)
        if key != self._plan_key:
            self._plan = _buckets(params[::-1], self.bucket_bytes)
            self._where = {id(p): k for k, bucket in enumerate(self._plan) for p in bucket}
            self._plan_key = key
        self._ready = [0] * len(self._plan)
        self._seen: set[int] = set()
        self._next = 0  # buckets are launched strictly in plan order on every rank
        self._inflight: list = []
        self._active = True

    def _launch(self, grads: list[torch.Tensor], extra: torch.Tensor | None = None) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads] + ([extra] if extra is not None else []))
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._bytes_this_step += _nbytes(flat)
        self._collectives_this_step += 1
        self._inflight.append((work, flat, grads))

    @torch.no_grad()
    def _finish_overlap(self) -> None:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # what is left once backward is done
        start = time.perf_counter()
        params = [p for p in self.params if p.requires_grad]
        bytes_before = self._bytes_this_step - sum(_nbytes(f) for _, f, _ in self._inflight)
        missing = [i for i, p in enumerate(params) if p.grad is None]
        for i in missing:
            params[i].grad = torch.zeros_like(params[i])
        for k in range(self._next, len(self._plan)):  # blocked by a missing gradient, or last
            self._launch([p.grad for p in self._plan[k]])
        flags = torch.ones(len(params), dtype=torch.float32, device=self.device)
        if missing:
            flags[torch.tensor(missing, device=self.device)] = 0.0
        self._launch([], flags)
        flags = self._inflight[-1][1]  # the reduced copy: how many ranks had each gradient
        for work, flat, grads in self._inflight:
            work.wait()
            if grads:
                flat.mul_(1.0 / self.world)
                sizes = [g.numel() for g in grads]
                views = [v.view(g.shape) for v, g in zip(flat.split(sizes), grads)]
                torch._foreach_copy_(grads, views)
        self._inflight = []
        self._local = False
        self._close_sync(params, missing, flags, bytes_before, start)

    def _close_sync(self, params, missing, presence, bytes_before, start) -> None:
        """Drop grads no rank produced, count the sync's bytes, and time it if profiling."""
        if missing:  # only ranks that lacked a gradient read the flags (a host sync)
            present = presence.tolist()
            for i in missing:
                if present[i] == 0:
                    params[i].grad = None
        self._syncs_this_step += 1
        self.bytes_total += self._bytes_this_step - bytes_before
        if self.profile:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds_total += time.perf_counter() - start

    # -- the collective work ----------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    @torch.no_grad()
    def _average(self) -> None:
        """All-reduce (mean) the gradients of every parameter that requires grad."""
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # time the averaging, not the backward
        start = time.perf_counter()
        # Same list, same order on every rank: requires_grad follows the agreed frozen set.
        params = [p for p in self.params if p.requires_grad]
        bytes_before = self._bytes_this_step
        self._local = False
        if not params:
            return
        missing = [i for i, p in enumerate(params) if p.grad is None]
        for i in missing:
            params[i].grad = torch.zeros_like(params[i])
        for p in params:
            if p.grad.is_sparse:
                raise ValueError(
                    "slimfit's gradient averaging does not handle sparse gradients; build "
                    "the embedding with sparse=False."
                )
        # Built on the device without a host copy: the common case never waits for the GPU.
        flags = torch.ones(len(params), dtype=torch.float32, device=self.device)
        if missing:
            flags[torch.tensor(missing, device=self.device)] = 0.0
        buckets = _buckets([p.grad for p in params], self.bucket_bytes)
        # The presence flags ride in the last float32 bucket (or alone if there is none).
        flag_bucket = max(
            (k for k, b in enumerate(buckets) if b[0].dtype == torch.float32), default=None
        )
        inflight: list = []
        for k, grads in enumerate(buckets):
            parts = [g.reshape(-1) for g in grads]
            if k == flag_bucket:
                parts.append(flags)
            flat = torch.cat(parts)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._bytes_this_step += _nbytes(flat)
            self._collectives_this_step += 1
            inflight.append((work, flat, grads, k == flag_bucket))
            if len(inflight) >= MAX_INFLIGHT:
                self._finish(inflight.pop(0), len(params))
        if flag_bucket is None:
            work = dist.all_reduce(flags, group=self.group, async_op=True)
            self._bytes_this_step += _nbytes(flags)
            self._collectives_this_step += 1
            inflight.append((work, flags, [], True))
        counts = None
        for item in inflight:
            got = self._finish(item, len(params))
            if got is not None:
                counts = got
        self._close_sync(params, missing, counts, bytes_before, start)

    def _finish(self, item, n_flags: int):
        work, flat, grads, has_flags = item
        work.wait()
        counts = None
        if has_flags:
            counts = flat[flat.numel() - n_flags :]
            flat = flat[: flat.numel() - n_flags]
        if grads:
            flat.mul_(1.0 / self.world)
            views = [v.view(g.shape) for v, g in zip(flat.split([g.numel() for g in grads]), grads)]
            torch._foreach_copy_(grads, views)  # one launch for the whole bucket
        return counts

    # -- start-up -------------------------------------------------------------------------
    def _check_same_setup(self) -> None:
        """Every rank must run the same SlimFit setup, or frozen sets would differ."""
        sf = self.sf
        cfg = sf.config
        sched = sf.scheduler
        fields = {
            "the number of units": len(sf.units),
            "the unit names": _crc("\n".join(sf.unit_names)),
            "the parameter names and shapes": _crc(
                "\n".join(
                    f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}"
                    for n, p in sf.model.named_parameters()
                )
            ),
        }
        # Every SlimFitConfig field (seed, freeze_ratio, policy, score, ...), so a new field
        # is covered too; `extra` only for what slimfit itself reads from it.
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name == "extra":
                value = {k: v for k, v in value.items() if k == "gradient_sync"}
            text = repr(value)
            # An object without a stable repr cannot be compared (same count on every rank).
            fields[f.name] = 0 if " at 0x" in text else _crc(text)
        fields.update(
            {
                "the scheduler scores": _crc(sched.scores.numpy().tobytes()),
                "the scheduler RNG state": _crc(sched.generator.get_state().numpy().tobytes()),
                "the scheduler step": sched.step,
            }
        )
        values = torch.tensor(list(fields.values()), dtype=torch.int64, device=self.device)
        lo, hi = values.clone(), values.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        differ = [name for name, a, b in zip(fields, lo.tolist(), hi.tolist()) if a != b]
        if differ:
            raise ValueError(
                f"ranks disagree on {', '.join(differ)}; build the same model and pass the same "
                "SlimFitConfig (same seed) on every rank before slimfit.attach."
            )

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Rank 0's parameters and buffers on every rank (like DDP at construction)."""
        tensors = [p.detach() for p in self.params] + [
            b for b in self.sf.model.buffers() if b.numel()
        ]
        src = self._global_rank(0)
        for bucket in _buckets(tensors, BROADCAST_BYTES):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            if flat.dtype == torch.bool:  # not every backend broadcasts bool
                flat = flat.to(torch.uint8)
            dist.broadcast(flat, src=src, group=self.group)
            if self.rank != 0:
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                    offset += t.numel()


class PassThrough(nn.Module):
    """A do-nothing wrapper that keeps the transformers Trainer from wrapping in DDP.

    The Trainer skips ``accelerator.prepare(model)`` (and so DDP) when its ``_wrap_model``
    returns another module; with this one, slimfit's own averaging sends only the trained
    units' gradients. ``no_sync`` is what accelerate calls for gradient accumulation. Use::

        class MyTrainer(SlimFitTrainer):
            def _wrap_model(self, model, training=True, dataloader=None):
                if training and dist.is_initialized() and not isinstance(model, PassThrough):
                    # autocast like accelerate's prepare_model, but no DDP
                    model = self.accelerator.prepare_model(
                        model, device_placement=False, evaluation_mode=True
                    )
                    return PassThrough(model, lambda: self.slimfit)
                return super()._wrap_model(model, training, dataloader)

    ``handle`` returns the SlimFit handle once attached (None before).
    """

    def __init__(self, module: nn.Module, handle):
        super().__init__()
        self.module = module
        self._handle = handle

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        sf = self._handle()
        return sf.no_sync() if sf is not None else contextlib.nullcontext()


def stats(sf) -> dict:
    """Communication counters of a SlimFit handle (zeros when it runs on one process)."""
    d = getattr(sf, "_dist", None)
    if d is None:
        return {"world_size": 1, "bytes_last_step": 0, "bytes_total": 0, "full_bytes": 0}
    return {
        "world_size": d.world,
        "mode": d.mode,
        "steps": d.steps,
        "bytes_last_step": d.bytes_last_step,
        "bytes_total": d.bytes_total,
        "control_bytes_total": d.control_bytes_total,
        "collectives_last_step": d.collectives_last_step,
        "syncs_last_step": d.syncs_last_step,
        "early_collectives_last_step": d.early_collectives_last_step,
        "full_bytes": d.full_bytes,
        "seconds_total": d.seconds_total,
    }


def _refuse_wrappers(model: nn.Module, optimizer) -> None:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    for m in model.modules():
        if isinstance(m, DistributedDataParallel):
            raise ValueError(
                "slimfit.attach got a model wrapped in DistributedDataParallel, which cannot "
                "follow a frozen set that changes every step; attach to the bare model "
                "(no DDP wrapper): slimfit averages the trained units' gradients across "
                "ranks itself."
            )
        if isinstance(m, DataParallel):
            raise ValueError(
                "slimfit does not support nn.DataParallel; launch one process per GPU with "
                "torchrun and attach to the bare model on each rank."
            )
        names = {c.__module__ + "." + c.__name__ for c in type(m).__mro__}
        if any("fully_sharded_data_parallel" in n or "FSDPModule" in n for n in names):
            raise ValueError(
                "slimfit does not support FSDP (1 or 2) yet; for data parallelism attach to "
                "the bare, unsharded model on each rank under torchrun (slimfit averages the "
                "gradients itself)."
            )
        if any(n.startswith("deepspeed.") for n in names):
            raise ValueError(
                "slimfit does not support DeepSpeed engines yet; for data parallelism attach "
                "to the bare model and a torch optimizer on each rank under torchrun."
            )
    for p in model.parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            raise ValueError(
                "slimfit does not support DeepSpeed ZeRO-partitioned parameters yet; attach "
                "to the bare model and a torch optimizer on each rank under torchrun."
            )
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise ValueError(
                "slimfit does not support sharded (DTensor) parameters such as FSDP2 or "
                "tensor parallelism yet; attach to the bare, unsharded model on each rank."
            )
    opt_names = {c.__module__ for c in type(optimizer).__mro__}
    if any(n.startswith("deepspeed") for n in opt_names):
        raise ValueError(
            "slimfit does not support DeepSpeed optimizers yet; pass a torch.optim optimizer "
            "built from the bare model's parameters."
        )


def _outer_ddp(model: nn.Module):
    """The DistributedDataParallel wrapper holding ``model``, if one exists (checked once)."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    for obj in gc.get_objects():  # once, at attach (~0.3 s with transformers loaded)
        if issubclass(type(obj), DistributedDataParallel) and obj.module is model:
            return obj
    return None


def _all_params(model: nn.Module, optimizer) -> list[nn.Parameter]:
    """The model's parameters, then any extra ones the optimizer holds; no duplicates."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for p in list(model.parameters()) + [
        p for group in optimizer.param_groups for p in group["params"]
    ]:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _buckets(tensors: list[torch.Tensor], cap: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of one (device, dtype), each at most ``cap`` bytes (or one tensor)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    out: list[list[torch.Tensor]] = []
    for group in groups.values():
        current: list[torch.Tensor] = []
        size = 0
        for t in group:
            if current and size + _nbytes(t) > cap:
                out.append(current)
                current, size = [], 0
            current.append(t)
            size += _nbytes(t)
        if current:
            out.append(current)
    return out


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):  # also HF ModelOutput (an OrderedDict)
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _crc(data) -> int:
    if isinstance(data, str):
        data = data.encode()
    return zlib.crc32(data)
