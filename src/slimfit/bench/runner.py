"""Run modes on a workload in one process and measure each (see ``run_bench``)."""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .env import gpu_state, host_speed
from .measure import (
    DeviceMemory,
    HookTimer,
    SavedTensorCounter,
    grad_bytes,
    is_oom,
    paired_rounds,
    static_memory,
    time_stats,
)
from .modes import Mode, unavailable_reason
from .workloads import Workload, build_model, describe_config, make_batch


@dataclass
class BenchSettings:
    batch_size: int
    seq_len: int | None
    steps: int
    warmup: int
    device: torch.device
    seed: int = 0
    lr: float = 2e-5
    freeze_ratio: float | None = None  # overrides the modes' SlimFit freeze_ratio
    b2b_steps: int = 20  # steps timed back to back (one sync at the end); 0: off
    diag_steps: int = 10  # extra steps timed per phase (forward/backward/optimizer, hooks)
    profile: bool = False  # one step under torch.profiler: top ops by self time
    max_batch: bool = False
    memory_cap: int | None = None
    max_batch_limit: int = 4096
    max_probes: int = 8
    probe_steps: int = 2
    schedule_probe_steps: int = 8  # probe steps of a mode whose frozen set changes every step
    paired_rounds: int = 0  # rounds of slimfit vs full timed alternately (0: off)
    attention_mask: str = "none"  # text batches: "none", "ones" or "padded" (make_batch)
    deadline: float | None = None  # time.monotonic() after which max-batch searches are skipped
    extra: dict = field(default_factory=dict)


@dataclass
class Trainer:
    """A model, its optimizer and one training step under a mode."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    mode: Mode
    device: torch.device
    slimfit: object = None
    hook_timer: HookTimer | None = None

    def autocast(self):
        if self.mode.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.mode.precision == "fp32":
            return contextlib.nullcontext()
        raise ValueError(
            f"unknown precision {self.mode.precision!r} in mode {self.mode.name!r}; use fp32 or bf16."
        )

    def forward(self, batch) -> torch.Tensor:
        with self.autocast():
            return self.model(**batch).loss

    def step(self, batch) -> None:
        loss = self.forward(batch)
        loss.backward()
        del loss
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_trainer(
    workload: Workload, config, mode: Mode, settings: BenchSettings, mem: DeviceMemory
) -> Trainer:
    torch.manual_seed(settings.seed)
    model = build_model(workload, config, mode.attention)
    if mode.checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable()
            else:
                model.gradient_checkpointing_enable()
    if mode.lora is not None:
        from peft import LoraConfig, get_peft_model

        kwargs = dict(mode.lora)
        kwargs.setdefault("modules_to_save", list(workload.head))
        model = get_peft_model(model, LoraConfig(**kwargs))
    model.to(settings.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    trainer = Trainer(model, optimizer, mode, settings.device)
    if mode.slimfit is not None:
        from slimfit import SlimFitConfig, attach

        kwargs = dict(mode.slimfit)
        if settings.freeze_ratio is not None:
            kwargs["freeze_ratio"] = settings.freeze_ratio
        trainer.hook_timer = HookTimer(mem.sync)
        trainer.hook_timer.install_first(optimizer)
        trainer.slimfit = attach(model, optimizer, SlimFitConfig(**kwargs))
        trainer.hook_timer.install_last(optimizer)
    if mode.setup is not None:
        mode.setup(model, optimizer)
    return trainer


def trainer_and_batch(
    workload: Workload, config, mode: Mode, s: BenchSettings, mem: DeviceMemory
) -> tuple[Trainer, dict]:
    """A mode's trainer and the workload's batch of ``s.batch_size``, as measurements use."""
    trainer = build_trainer(workload, config, mode, s, mem)
    return trainer, _batch(workload, config, trainer, s, s.batch_size)


def _batch(workload: Workload, config, trainer: Trainer, s: BenchSettings, batch_size: int):
    """The workload's synthetic batch of ``batch_size`` for ``trainer``'s model."""
    return make_batch(
        workload, config, _base(trainer.model), batch_size, s.seq_len, s.device, s.seed,
        s.attention_mask,
    )  # fmt: skip


def _timed_steps(trainer: Trainer, batch, n: int, mem: DeviceMemory) -> list[float]:
    out = []
    for _ in range(n):
        mem.sync()
        t0 = time.perf_counter()
        trainer.step(batch)
        mem.sync()
        out.append(time.perf_counter() - t0)
    return out


def _back_to_back(trainer: Trainer, batch, n: int, mem: DeviceMemory) -> dict:
    """``n`` steps issued back to back (one synchronization at the end, as a training loop
    runs): per-step times from CUDA events between steps, and wall time / n. Unlike the
    synchronized steps, work a step leaves in flight (async copies) may overlap the next."""
    mem.sync()
    t0 = time.perf_counter()
    if mem.device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            trainer.step(batch)
            events[i + 1].record()
        mem.sync()
        per = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(n)]
    else:
        per, last = [], t0
        for _ in range(n):
            trainer.step(batch)
            now = time.perf_counter()
            per.append(now - last)
            last = now
    wall = time.perf_counter() - t0
    out = time_stats(per, 0)
    out.pop("samples_per_s", None)
    out.update({"wall_per_step_s": wall / n, "samples_per_s": trainer_batch(batch) * n / wall})
    return out


def trainer_batch(batch: dict) -> int:
    return next(iter(batch.values())).shape[0]


def _phase_times(trainer: Trainer, batch, n: int, mem: DeviceMemory) -> dict:
    """Median milliseconds of forward, backward and optimizer step (with its hooks)."""
    fwd, bwd, opt = [], [], []
    for _ in range(n):
        mem.sync()
        t0 = time.perf_counter()
        loss = trainer.forward(batch)
        mem.sync()
        t1 = time.perf_counter()
        loss.backward()
        del loss
        mem.sync()
        t2 = time.perf_counter()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        mem.sync()
        t3 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        opt.append(t3 - t2)
    return {
        "steps": n,
        "forward_ms": statistics.median(fwd) * 1e3,
        "backward_ms": statistics.median(bwd) * 1e3,
        "optimizer_ms": statistics.median(opt) * 1e3,
    }


def _profile_step(trainer: Trainer, batch, mem: DeviceMemory, top: int = 15) -> dict:
    """One step under torch.profiler: the ops with the most self time (device, else CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if mem.available else [])
    try:
        mem.sync()
        with profile(activities=acts) as prof:
            trainer.step(batch)
            mem.sync()
        rows = []
        for e in prof.key_averages():
            dev = getattr(e, "self_device_time_total", None)
            if dev is None:
                dev = getattr(e, "self_cuda_time_total", 0)
            rows.append(
                {
                    "op": e.key,
                    "count": e.count,
                    "self_device_ms": (dev or 0) / 1e3,
                    "self_cpu_ms": e.self_cpu_time_total / 1e3,
                }
            )
        key = "self_device_ms" if mem.available else "self_cpu_ms"
        rows.sort(key=lambda r: -r[key])
        return {"sort": key, "total_ms": sum(r[key] for r in rows), "top": rows[:top]}
    except Exception as err:  # noqa: BLE001 - a profiler problem must not fail the mode
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def _counting_step(trainer: Trainer, batch, mem: DeviceMemory) -> tuple[dict, int, int | None]:
    """One step whose forward counts saved tensors; returns (activations, grad bytes, retained)."""
    mem.sync()
    before = mem.allocated()
    with SavedTensorCounter(trainer.model) as counter:
        loss = trainer.forward(batch)
    mem.sync()
    after = mem.allocated()
    # the graph walk reads grad_fn._saved_*; inside checkpointed regions that would unpack
    # (recompute) outside backward, so checkpointing modes get no per-op breakdown
    acts = counter.report(None if trainer.mode.checkpointing else loss)
    loss.backward()
    del loss
    grads = grad_bytes(trainer.model)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    retained = after - before if before is not None and after is not None else None
    return acts, grads, retained


def measure_mode(
    workload: Workload,
    config,
    mode: Mode,
    settings: BenchSettings,
    mem: DeviceMemory,
    log: Callable[[str], None] = print,
) -> dict:
    """Build, warm up, count and time one mode (its max-batch search comes later)."""
    s = settings
    result: dict = {"mode": mode.name, "description": mode.description, "spec": mode.spec()}
    mem.free()
    result["baseline_allocated_bytes"] = mem.allocated()
    t_build = time.perf_counter()
    trainer, batch = trainer_and_batch(workload, config, mode, s, mem)
    result["build_s"] = time.perf_counter() - t_build
    try:
        for _ in range(s.warmup):
            trainer.step(batch)
        acts, grads, retained = _counting_step(trainer, batch, mem)
        static = static_memory(trainer.model, trainer.optimizer, s.device)
        static["grads_bytes"] = grads
        static["total_bytes"] = (
            static["weights_bytes"]
            + static["buffers_bytes"]
            + static["optimizer_state_bytes"]
            + grads
        )
        mem.sync()
        resident = mem.allocated()
        mem.reset_peak()
        pager = getattr(trainer.slimfit, "pager", None)
        moved = list(pager.moved_bytes) if pager is not None else None
        gpu_before, host_before = gpu_state(s.device), host_speed()
        seconds = _timed_steps(trainer, batch, s.steps, mem)
        gpu_after, host_after = gpu_state(s.device), host_speed()
        if pager is not None:  # what the paging copies carry per step, each way
            moved = [(b - a) / s.steps for a, b in zip(moved, pager.moved_bytes)]
        result["memory"] = {
            "peak_allocated_bytes": mem.peak_allocated(),
            "peak_reserved_bytes": mem.peak_reserved(),
            "resident_bytes": resident,  # weights + optimizer state (+ anything else kept) between steps
            "graph_retained_bytes": retained,  # allocated after forward - before (saved tensors + outputs)
        }
        result["static"] = static
        result["activations"] = acts
        result["time"] = time_stats(seconds, s.batch_size)
        if gpu_before is not None or gpu_after is not None:
            result["gpu_state"] = {"before_timing": gpu_before, "after_timing": gpu_after}
        result["host_speed"] = {"before_timing": host_before, "after_timing": host_after}
        if s.b2b_steps > 0:
            mem.reset_peak()
            result["time_b2b"] = _back_to_back(trainer, batch, s.b2b_steps, mem)
            result["memory"]["peak_allocated_b2b_bytes"] = mem.peak_allocated()
        if s.diag_steps > 0:  # where the time goes (synchronized between phases; not the step time)
            if trainer.hook_timer is not None:
                trainer.hook_timer.enabled = True
            result["phases"] = _phase_times(trainer, batch, s.diag_steps, mem)
            if trainer.hook_timer is not None:
                trainer.hook_timer.enabled = False
        if trainer.slimfit is not None:
            sf = trainer.slimfit
            info = {"units": len(sf.units), "frozen_units": len(sf.frozen_units)}
            # which units the score sent the trained slots to, over every step of the mode
            # (warm-up included): a mode's peak follows the units it trains
            info["steps"] = len(sf.history)
            info["trained_steps_per_unit"] = sf.trained_steps_per_unit()
            if trainer.hook_timer is not None:
                info["hooks"] = trainer.hook_timer.stats()
            if moved is not None:
                info["paged_bytes_per_step"] = {"to_host": moved[0], "to_device": moved[1]}
            result["slimfit"] = info
        if s.profile:
            result["profile"] = _profile_step(trainer, batch, mem)
        result["status"] = "ok"
    finally:
        del batch
        _release(trainer)
        del trainer
        mem.free()
    return result


def measure_max_batch(
    workload, config, mode: Mode, s: BenchSettings, mem: DeviceMemory, result: dict, log
) -> dict:
    """The largest batch of ``mode`` under the memory cap, on a freshly built trainer.

    Runs after every mode's timing (and the paired rounds): a search runs thousands of
    samples a step for tens of seconds, and a mode timed right after one stepped up to 30%
    slower (ViT-B's slimfit after ckpt's search, 72.9 against 57.3 ms in the paired rounds of
    the same run: benchmarks/results/2026-12-06-bench-resident-h100/NOTES.md)."""
    if not mem.available:
        return {"status": "n/a", "reason": "no CUDA memory counters on this device"}
    if s.memory_cap is None:
        return {"status": "n/a", "reason": "no --memory-cap given"}
    if s.deadline is not None and time.monotonic() > s.deadline:
        return {"status": "skipped", "reason": "time budget spent"}
    mem.free()
    trainer, batch = trainer_and_batch(workload, config, mode, s, mem)
    try:
        for _ in range(s.warmup):
            trainer.step(batch)
        del batch
        return _max_batch(workload, config, trainer, s, mem, result, log)
    except Exception as err:  # noqa: BLE001 - keep the mode's main measurements
        return {"status": "error", "reason": f"{type(err).__name__}: {_first_line(err)}"}
    finally:
        _release(trainer)
        del trainer
        mem.free()


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _release(trainer: Trainer) -> None:
    with contextlib.suppress(Exception):
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.optimizer.state.clear()
    trainer.slimfit = None
    trainer.hook_timer = None


# -- largest batch under a memory cap -------------------------------------------------------


def search_max_batch(
    peak_at: Callable[[int], int | None],
    cap: int,
    known: list[tuple[int, int]],
    static: int,
    limit: int,
    max_probes: int,
    rel_tol: float = 0.02,
    out_of_time: Callable[[], bool] = lambda: False,
) -> dict:
    """Largest batch whose peak memory fits ``cap``: extrapolate, then a safeguarded secant.

    ``peak_at(b)`` runs batch ``b`` and returns its peak bytes (None: out of memory).
    ``known`` holds measured (batch, peak) pairs, ``static`` the batch-independent bytes.
    Memory is close to affine in the batch, so the first guess (the line through
    ``(0, static)`` and the largest fitting point) is usually right; the bracket
    ``[lo, hi)`` is then narrowed by interpolation, kept at least 1/8 inside the bracket so
    that every probe shrinks it, until ``hi - lo`` is within ``rel_tol`` of ``lo`` (at
    least 1), the probe budget or time is spent, or ``limit`` is reached.
    """
    peaks = {b: p for b, p in known if p is not None}
    lo = max((b for b, p in peaks.items() if p <= cap), default=0)
    hi = min((b for b, p in peaks.items() if p > cap), default=None)
    probes: list[dict] = []
    while True:
        if lo >= limit:
            stopped = "limit"
            break
        if hi is not None and hi - lo <= max(1, math.ceil(rel_tol * lo)):
            stopped = "converged"
            break
        if len(probes) >= max_probes:
            stopped = "probe budget"
            break
        if out_of_time():
            stopped = "time budget"
            break
        b = _next_probe(peaks, lo, hi, cap, static, limit, rel_tol, len(probes))
        t0 = time.perf_counter()
        peak = peak_at(b)
        fits = peak is not None and peak <= cap
        probes.append(
            {
                "batch": b,
                "peak_allocated_bytes": peak,
                "fits": fits,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        if peak is not None:
            peaks[b] = peak
        if fits:
            lo = b
        else:
            hi = b if hi is None else min(hi, b)
    return {"max_batch": lo or None, "upper_bound": hi, "stopped": stopped, "probes": probes}


def _next_probe(
    peaks: dict, lo: int, hi: int | None, cap: int, static: int, limit: int, rel_tol: float, n: int
) -> int:
    """Next batch to try: the secant/extrapolated guess, nudged inside the bracket; every
    third probe inside a bracket bisects, so the bracket always shrinks geometrically."""
    step = max(1, math.ceil(rel_tol * lo))
    x0, y0 = (lo, peaks[lo]) if lo in peaks else (0, static)
    guess = None
    if hi is not None and hi in peaks and peaks[hi] > y0:  # secant inside the bracket
        guess = x0 + (cap - y0) * (hi - x0) / (peaks[hi] - y0)
    elif x0 > 0 and y0 > static:  # extrapolate the line through (0, static)
        guess = x0 * (cap - static) / (y0 - static)
    elif hi is not None and hi in peaks and peaks[hi] > static:
        guess = hi * (cap - static) / (peaks[hi] - static)
    if hi is None:
        if guess is None:
            b = max(2 * lo, lo + 1)
        else:
            b = int(guess) if int(guess) > lo else lo + step
        return min(b, limit)
    if guess is None or n % 3 == 2:
        b = (lo + hi) // 2
    else:
        b = int(guess)
        if b <= lo:
            b = lo + step
        elif b >= hi:
            b = hi - step
    return min(max(b, lo + 1), hi - 1, limit)


def probe_steps(trainer: Trainer, s: BenchSettings) -> int:
    """Steps per max-batch probe. A SlimFit schedule trains a different set of units every
    step and the peak depends on which (a trained linear keeps its int8 input; on ViT-B a
    probe at batch 1647 peaked higher than one at 1675), so such modes are probed over more
    steps (benchmarks/results/2026-11-23-bench-all-after-attention-node-h100/NOTES.md)."""
    if trainer.slimfit is None:
        return s.probe_steps
    return max(s.probe_steps, s.schedule_probe_steps)


def _max_batch(
    workload, config, trainer: Trainer, s: BenchSettings, mem: DeviceMemory, result: dict, log
) -> dict:
    reserved: dict[int, int | None] = {}
    steps = probe_steps(trainer, s)

    def peak_at(b: int) -> int | None:
        batch = None
        try:
            batch = _batch(workload, config, trainer, s, b)
            mem.free()
            mem.reset_peak()
            for _ in range(steps):
                trainer.step(batch)
            mem.sync()
            reserved[b] = mem.peak_reserved()
            return mem.peak_allocated()
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            reserved[b] = None
            return None
        finally:
            del batch
            trainer.optimizer.zero_grad(set_to_none=True)
            mem.free()

    static = result["memory"]["resident_bytes"] or 0
    known = [(s.batch_size, result["memory"]["peak_allocated_bytes"])]
    out = search_max_batch(
        peak_at,
        s.memory_cap,
        known,
        static,
        s.max_batch_limit,
        s.max_probes,
        out_of_time=lambda: s.deadline is not None and time.monotonic() > s.deadline,
    )
    for p in out["probes"]:
        p["peak_reserved_bytes"] = reserved.get(p["batch"])
    by_reserved = [
        p["batch"]
        for p in out["probes"]
        if p["peak_reserved_bytes"] is not None and p["peak_reserved_bytes"] <= s.memory_cap
    ]
    # reserved (what the allocator holds, fragmentation included) is what a real GPU of that
    # size must also fit: the largest probed batch whose reserved peak is under the cap
    out["max_probed_batch_reserved_under_cap"] = max(by_reserved, default=None)
    out.update(
        {
            "status": "ok",
            "memory_cap_bytes": s.memory_cap,
            "probe_steps": steps,
            "criterion": "max_memory_allocated over probe steps <= cap",
        }
    )
    log(
        f"    max batch under cap: {out['max_batch']} (bound {out['upper_bound']}, {out['stopped']}, "
        f"{len(out['probes'])} probes)"
    )
    return out


# -- a whole run -----------------------------------------------------------------------------


def run_workload(
    workload: Workload,
    config,
    modes: list[Mode],
    settings: BenchSettings,
    log: Callable[[str], None] = print,
    on_mode: Callable[[dict], None] | None = None,
) -> dict:
    """Every mode on one workload, in this process, one after the other."""
    mem = DeviceMemory(settings.device)
    out = {
        "workload": workload.name,
        "task": workload.task,
        "model": describe_config(config),
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "modes": {},
    }
    broken = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers/peft deprecation notices
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        for mode in modes:
            broken = _run_one(workload, config, mode, settings, mem, broken, out, log, on_mode)
        pair = [m for name in PAIRED for m in modes if m.name == name]
        ok = all(out["modes"].get(name, {}).get("status") == "ok" for name in PAIRED)
        if settings.paired_rounds and len(pair) == len(PAIRED) and ok and broken is None:
            pair += [  # timed in the same rounds: what paging costs, free of drift
                m for m in modes
                if m.name in PAIRED_ALSO and out["modes"][m.name].get("status") == "ok"
            ]  # fmt: skip
            out["paired"] = _paired(workload, config, pair, settings, mem, log)
        if settings.max_batch and broken is None:
            for mode in modes:
                res = out["modes"][mode.name]
                if res.get("status") != "ok":
                    continue
                log(f"  {workload.name} / {mode.name}: largest batch under the cap ...")
                res["max_batch"] = measure_max_batch(
                    workload, config, mode, settings, mem, res, log
                )
                if on_mode is not None:
                    on_mode(out)
    return out


# The bar's step-time comparison, also timed in alternating rounds (--paired-rounds).
PAIRED = ("slimfit", "full")
PAIRED_ALSO = ("slimfit-nopage", "slimfit-resident")  # join the rounds when the run has them


def _paired(workload, config, pair: list[Mode], s: BenchSettings, mem: DeviceMemory, log) -> dict:
    """slimfit and full built side by side and timed in alternating rounds of ``s.steps``
    back-to-back steps (``paired_rounds``): the host's drift between minutes, which moves
    host-bound step times by up to 2x here, then slows both alike."""
    log(
        f"  {workload.name} / {' vs '.join(m.name for m in pair)}, {s.paired_rounds} paired rounds ..."
    )
    trainers: list[Trainer] = []
    runs = {}
    try:
        for mode in pair:
            mem.free()
            tr, batch = trainer_and_batch(workload, config, mode, s, mem)
            trainers.append(tr)

            def run(n: int, tr=tr, batch=batch) -> None:
                for _ in range(n):
                    tr.step(batch)

            runs[mode.name] = run
            run(s.warmup + 2)
        res = paired_rounds(
            runs, s.paired_rounds, s.steps, mem.sync, probe=lambda: host_speed()["python_us"]
        )
        res["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - a failed comparison is a result, not a crash
        res = {
            "status": "oom" if is_oom(err) else "error",
            "reason": f"{type(err).__name__}: {_first_line(err)}",
        }
    finally:
        runs.clear()
        for tr in trainers:
            _release(tr)
        trainers.clear()
        mem.free()
    if res["status"] == "ok":
        log(f"    median slimfit / full over {s.paired_rounds} rounds: {res['ratio_median']:.3f}")
        for name in res["modes"][2:]:
            log(
                f"    median {name} step over the rounds: {res['step_s_median'][name] * 1e3:.1f} ms"
            )
    else:
        log(f"    {res['status']}: {res['reason']}")
    return res


def _run_one(
    workload,
    config,
    mode: Mode,
    settings: BenchSettings,
    mem: DeviceMemory,
    broken: str | None,
    out: dict,
    log,
    on_mode,
) -> str | None:
    log(f"  {workload.name} / {mode.name} ...")
    if broken is not None:
        res = {"mode": mode.name, "status": "skipped", "reason": broken}
    elif (reason := unavailable_reason(mode)) is not None:
        res = {"mode": mode.name, "status": "unavailable", "reason": reason}
    else:
        t0 = time.perf_counter()
        failed = False
        try:
            res = measure_mode(workload, config, mode, settings, mem, log)
        except Exception as err:  # noqa: BLE001 - a failing mode is a result, not a crash
            failed = True
            res = {
                "mode": mode.name,
                "status": "oom" if is_oom(err) else "error",
                "reason": f"{type(err).__name__}: {_first_line(err)}",
                "traceback": traceback.format_exc(limit=8)[-4000:],
            }
        if failed:  # outside the except block, so the traceback's frames are gone
            gc.collect()
            broken = _check_device(mem, mode.name)
        res["wall_s"] = round(time.perf_counter() - t0, 2)
    out["modes"][mode.name] = res
    log(f"    {_summary(res)}")
    if on_mode is not None:
        on_mode(out)
    return broken


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def _check_device(mem: DeviceMemory, mode_name: str) -> str | None:
    """After a failure: can the device still run work? (A CUDA fault poisons the context.)"""
    try:
        mem.free()
        if mem.available:
            torch.zeros(1, device=mem.device).add_(1).item()
        return None
    except Exception as err:  # noqa: BLE001
        return f"device unusable after the error in {mode_name}: {_first_line(err)}"


def _summary(res: dict) -> str:
    if res.get("status") != "ok":
        return f"{res.get('status')}: {res.get('reason', '')}"
    t = res["time"]
    peak = res["memory"]["peak_allocated_bytes"]
    peak_s = f"peak {peak / 2**30:.2f} GiB, " if peak is not None else ""
    gpu = res.get("gpu_state") or {}
    after = gpu.get("after_timing") or {}
    clock = ""
    if after.get("clocks.sm") is not None:  # the GPU as the timed steps ended
        clock = f", SM {after['clocks.sm']:.0f} MHz"
        if after.get("temperature.gpu") is not None:
            clock += f" at {after['temperature.gpu']:.0f} C"
    host = ((res.get("host_speed") or {}).get("after_timing") or {}).get("python_us")
    probe = f", host probe {host:.0f} us" if host is not None else ""
    return (
        f"{peak_s}saved {res['activations']['saved_bytes'] / 2**20:.1f} MiB, "
        f"step {t['median_s'] * 1e3:.1f} ms (p10 {t['p10_s'] * 1e3:.1f}, p90 {t['p90_s'] * 1e3:.1f})"
        f"{clock}{probe}"
    )
