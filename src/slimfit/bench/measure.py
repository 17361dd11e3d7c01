"""Measurements: saved-activation bytes (with a per-module and per-op breakdown), static
memory from the tensors themselves, device memory counters, step-time statistics and the
time spent in optimizer hooks.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

# -- device memory ------------------------------------------------------------------------


class DeviceMemory:
    """CUDA memory counters, or ``None`` everywhere on a device without them (CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.available = device.type == "cuda"

    def sync(self) -> None:
        if self.available:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.available:
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.available else None

    def peak_allocated(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.available else None

    def peak_reserved(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.available else None

    def free(self) -> None:
        import gc

        gc.collect()
        if self.available:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


# -- tensor bytes -------------------------------------------------------------------------


def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (str(t.device), s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(t)), t.numel() * t.element_size()


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key, n = _storage_key(t)
            seen[key] = n
    return sum(seen.values())


def static_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | None = None
) -> dict:
    """Bytes of weights, buffers and optimizer state, measured from the tensors.

    Optimizer state held off ``device`` (e.g. paged to pinned host memory) is counted apart
    in ``optimizer_state_host_bytes``; ``optimizer_state_bytes`` is what lives on ``device``.
    """
    params = list(model.parameters())
    state = [
        v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    ]
    dev_type = device.type if device is not None else None
    # AdamW's scalar "step" counters live on the CPU even for CUDA params; count them as on-device
    # state only when the device is the CPU (they are a few bytes either way).
    on_dev = [t for t in state if dev_type is None or t.device.type == dev_type]
    off_dev = [
        t for t in state if dev_type is not None and t.device.type != dev_type and t.dim() > 0
    ]
    return {
        "weights_bytes": unique_bytes(params),
        "buffers_bytes": unique_bytes(model.buffers()),
        "optimizer_state_bytes": unique_bytes(on_dev),
        "optimizer_state_host_bytes": unique_bytes(off_dev),
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
    }


def grad_bytes(model: nn.Module) -> int:
    return unique_bytes(p.grad for p in model.parameters() if p.grad is not None)


# -- saved activations --------------------------------------------------------------------

_INDEX = re.compile(r"\.\d+(?=\.|$)")


def module_group(name: str, prefixes: tuple[str, ...] = ()) -> str:
    """``bert.encoder.layer.3.attention.self`` -> ``encoder.layer.*.attention.self``."""
    for p in ("base_model.model.", *prefixes):
        if p and name.startswith(p):
            name = name[len(p) :]
    return _INDEX.sub(".*", name) or "(model)"


class SavedTensorCounter:
    """Counts the unique storages autograd saves during one forward.

    Tensors are attributed to the innermost module running when they were saved (global
    forward pre-hooks) and, after the forward, to the autograd node that holds them
    (``grad_fn._saved_*``). Parameter storages are counted apart: they are not activations.
    Tensors saved inside non-reentrant checkpointed regions or stashed on ``ctx`` outside
    ``save_for_backward`` are invisible to these hooks (see ``graph_retained_bytes``).
    """

    def __init__(self, model: nn.Module):
        base = getattr(model, "base_model_prefix", "") or ""
        inner = getattr(model, "get_base_model", None)
        if inner is not None:  # peft
            base = getattr(inner(), "base_model_prefix", base) or base
        self._prefixes = (f"{base}.",) if base else ()
        self._names = {id(m): n for n, m in model.named_modules()}
        self._param_keys = {_storage_key(p)[0] for p in model.parameters()}
        # shapes of weight matrices: a saved tensor of such a shape in another dtype is taken
        # to be an autocast copy of a weight (a heuristic, reported as weight_copy_bytes)
        self._weight_shapes = {
            (tuple(p.shape), p.dtype) for p in model.parameters() if p.dim() >= 2
        }
        self._weight_copies: set = set()
        self._stack: list[str] = []
        self.storages: dict = {}  # key -> [bytes, module group, dtype, shape]
        self.param_bytes: dict = {}
        self._handles: list = []
        self._ctx = None

    # hooks
    def _pre(self, module, args):
        self._stack.append(self._names.get(id(module), type(module).__name__))

    def _post(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def _pack(self, t):
        if isinstance(t, torch.Tensor):
            key, n = _storage_key(t)
            if key in self._param_keys:
                self.param_bytes[key] = n
            elif key not in self.storages and n:
                where = (
                    module_group(self._stack[-1], self._prefixes)
                    if self._stack
                    else "(outside modules)"
                )
                self.storages[key] = [n, where, str(t.dtype).replace("torch.", ""), list(t.shape)]
                shape = tuple(t.shape)
                if any(shape == s and t.dtype != d for s, d in self._weight_shapes):
                    self._weight_copies.add(key)
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        from torch.nn.modules import module as mod

        self._handles = [
            mod.register_module_forward_pre_hook(self._pre),
            mod.register_module_forward_hook(self._post),
        ]
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def attribute_ops(self, root: torch.Tensor) -> dict:
        """Map each counted storage to the autograd node(s) holding it; bytes per node type."""
        owner: dict = {}
        fn = getattr(root, "grad_fn", None)
        # ``seen`` keeps the node objects alive: the Python wrapper of an autograd node is
        # only cached while referenced, so a freed wrapper's id() can be reused by another
        # node's wrapper and a set of ids would stop the walk early.
        stack, seen = ([fn] if fn is not None else []), {}
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            op = type(node).__name__
            for t in _saved_of(node):
                key, _ = _storage_key(t)
                owner.setdefault(key, op)
            stack.extend(nxt for nxt, _ in getattr(node, "next_functions", ()) if nxt is not None)
        by_op: dict = defaultdict(int)
        for key, (n, *_rest) in self.storages.items():
            by_op[owner.get(key, "(not in graph)")] += n
        return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))

    def report(self, root: torch.Tensor | None = None) -> dict:
        by_module: dict = defaultdict(int)
        by_dtype: dict = defaultdict(int)
        for n, where, dtype, _shape in self.storages.values():
            by_module[where] += n
            by_dtype[dtype] += n
        out = {
            "saved_bytes": sum(v[0] for v in self.storages.values()),
            "saved_param_bytes": sum(self.param_bytes.values()),
            "weight_copy_bytes": sum(self.storages[k][0] for k in self._weight_copies),
            "n_storages": len(self.storages),
            "by_module": dict(sorted(by_module.items(), key=lambda kv: -kv[1])),
            "by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])),
        }
        if root is not None:
            try:
                out["by_op"] = self.attribute_ops(root)
            except Exception as err:  # noqa: BLE001 - a breakdown must not fail the mode
                out["by_op_error"] = f"{type(err).__name__}: {err}"[:300]
        return out


def _saved_of(node) -> list[torch.Tensor]:
    out = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            v = getattr(node, name)
        except Exception:  # noqa: BLE001 - freed or non-tensor saved values
            continue
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(x for x in v if isinstance(x, torch.Tensor))
    try:  # custom autograd.Function nodes
        saved = node.saved_tensors
        out.extend(x for x in saved if isinstance(x, torch.Tensor))
    except Exception:  # noqa: BLE001
        pass
    return out


# -- time ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values.")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_stats(seconds: list[float], batch_size: int) -> dict:
    med = statistics.median(seconds)
    return {
        "steps": len(seconds),
        "median_s": med,
        "p10_s": percentile(seconds, 10),
        "p90_s": percentile(seconds, 90),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "mean_s": statistics.fmean(seconds),
        "samples_per_s": batch_size / med if med > 0 and batch_size else None,
        "all_s": [round(s, 6) for s in seconds],
    }


def paired_rounds(
    runs: dict[str, Callable[[int], None]],
    rounds: int,
    steps: int,
    sync: Callable[[], None],
    clock: Callable[[], float] = time.perf_counter,
    probe: Callable[[], float] | None = None,
) -> dict:
    """Time two (or more) set-up runs in alternating rounds of ``steps`` back-to-back steps.

    ``runs[name](n)`` issues ``n`` steps. Round ``r`` runs every name once, in order on even
    rounds and reversed on odd ones, synchronizing around each; so a host whose speed drifts
    over minutes (host-bound step times here move by up to 2x) slows both alike. The ratio
    of the first name to the second is taken per round; its median is the comparison.
    ``probe()`` (e.g. the host-speed probe) is recorded at the start of every round.
    """
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    probes: list[float] = []
    for r in range(rounds):
        if probe is not None:
            probes.append(probe())
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = clock()
            runs[name](steps)
            sync()
            times[name].append((clock() - t0) / steps)
    first, second = names[0], names[1]
    ratios = [a / b for a, b in zip(times[first], times[second])]
    return {
        "modes": names,
        "rounds": rounds,
        "steps_per_round": steps,
        "step_s_rounds": times,
        "step_s_median": {n: statistics.median(v) for n, v in times.items()},
        "ratio": f"{first} / {second}",
        "ratio_rounds": ratios,
        "ratio_median": statistics.median(ratios),
        **({"probe_rounds": probes} if probe is not None else {}),
    }


class HookTimer:
    """Times the optimizer hooks registered between its ``first`` and ``last`` hooks.

    Register ``install_first`` before ``slimfit.attach`` and ``install_last`` after it:
    optimizer hooks run in registration order, so the gaps are the time spent in the
    hooks in between (synchronized, so GPU work they launch is included).
    """

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.enabled = False
        self.pre: list[float] = []
        self.post: list[float] = []
        self._t = 0.0

    def _start(self, *_):
        if self.enabled:
            self.sync()
            self._t = time.perf_counter()

    def _stop_pre(self, *_):
        if self.enabled:
            self.sync()
            self.pre.append(time.perf_counter() - self._t)

    def _stop_post(self, *_):
        if self.enabled:
            self.sync()
            self.post.append(time.perf_counter() - self._t)

    def install_first(self, optimizer) -> list:
        return [
            optimizer.register_step_pre_hook(self._start),
            optimizer.register_step_post_hook(self._start),
        ]

    def install_last(self, optimizer) -> list:
        return [
            optimizer.register_step_pre_hook(self._stop_pre),
            optimizer.register_step_post_hook(self._stop_post),
        ]

    def stats(self) -> dict | None:
        n = min(len(self.pre), len(self.post))
        if n == 0:
            return None
        total = [(a + b) * 1e3 for a, b in zip(self.pre[:n], self.post[:n])]
        return {
            "steps": n,
            "median_ms": statistics.median(total),
            "p90_ms": percentile(total, 90),
            "pre_median_ms": statistics.median(x * 1e3 for x in self.pre[:n]),
            "post_median_ms": statistics.median(x * 1e3 for x in self.post[:n]),
        }
