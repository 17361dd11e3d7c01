"""Optimizer state of frozen units lives off the GPU and comes back before it is needed.

With 95% of units frozen, AdamW would still keep two fp32 moments for every unit that
ever trained (under ILS soon all of them). The pager moves a unit's state tensors to a
host buffer when the unit freezes and back when it is scheduled to train. The next frozen
set is known at the end of every optimizer step: the state of newly frozen units leaves
right then, on a side stream. The state of the units about to train comes back once the
next forward has finished (``prefetch``, from a forward hook on the model: after the
forward's memory peak, which would otherwise hold it, e.g. 188 MB for bert's word
embeddings) and overlaps the backward; the pre-step hook issues whatever is still due
(no forward hook fired) and waits for the copies.

The host buffers are pinned and reused (one block per unit holding all its moments), and
the first page-out allocates them for every unit at once, so paging never allocates host
memory after that: no creep, and no pinning stalls spread over the first training steps.
Torch optimizers skip parameters whose grad is None, which is exactly the frozen units, so
a paged-out state is never read by a step.

Host cost: this runs every optimizer step, so the per-step work is kept to the units whose
frozen flag changed since the last call (a frozen unit gains no state: it has no grad), and
all of a step's copies go out as one ``torch._foreach_copy_`` inside one side-stream
context, one copy per unit (its moments as one block). Across devices that op falls back
to a per-tensor ``copy_(src, non_blocking)`` loop in C++ (the same as the Python loop it
replaces, minus the Python).
"""

from __future__ import annotations

import os
from itertools import compress
from operator import ne

import torch


def resident_units(sizes: list[int], fraction: float) -> set[int]:
    """The units whose optimizer state never leaves the device: the smallest first, until
    they hold ``fraction`` of all the units' elements.

    Smallest first because a unit's page-out and page-in cost host time per unit (Python
    bookkeeping, one copy call and one allocation each way) whatever its size, while the
    memory it keeps on the device is its size: bert-base's 25 LayerNorm gains are a quarter
    of its units and 0.02% of its elements."""
    budget = fraction * sum(sizes)
    keep, used = set(), 0
    for i in sorted(range(len(sizes)), key=lambda i: (sizes[i], i)):
        if used + sizes[i] > budget:
            break
        keep.add(i)
        used += sizes[i]
    return keep


class _Batch:
    """The copies of one ``_move`` call that go to (or come from) one device."""

    __slots__ = ("out_dst", "out_src", "in_buf", "in_place")

    def __init__(self):
        self.out_dst: list[torch.Tensor] = []  # host blocks (or one key's slot) being filled
        self.out_src: list[torch.Tensor] = []  # device state leaving: blocks or single tensors
        self.in_buf: list[torch.Tensor] = []  # host blocks being read back
        self.in_place: list[tuple[dict, tuple[str, ...]]] = []  # where each block's rows go


def _packed_block(state: dict, keys: tuple[str, ...]) -> torch.Tensor | None:
    """The ``(len(keys), *shape)`` device block whose rows are ``state[k]`` in ``keys`` order
    (what a page-in leaves), or None when the state tensors are not laid out that way
    (e.g. the optimizer's own first tensors, or state loaded from a checkpoint)."""
    first = state[keys[0]]
    base = first._base
    if base is None or base.dim() != first.dim() + 1 or base.shape[0] != len(keys):
        return None
    if not base.is_contiguous() or base.dtype != first.dtype:
        return None
    offset, step = base.storage_offset(), first.numel()
    for j, k in enumerate(keys):
        t = state[k]
        if t._base is not base or t.storage_offset() != offset + j * step:
            return None
    return base


class OptimizerStatePager:
    """Pages optimizer state tensors of frozen parameters to ``storage`` and back.

    ``storage`` is ``"cpu"``; on a CUDA model the host buffers are pinned and copies are
    asynchronous. On a CPU model the same bookkeeping runs against separate host buffers
    (synchronously), which is how the tests exercise it.

    A unit's per-element state tensors of one shape and dtype (AdamW's two moments) travel
    as one block: one host buffer, one device allocation and one copy each way, whose rows
    the optimizer state then holds (views). That halves the CUDA calls per unit
    (allocation, copy, ``record_stream``): ~15% less host time a step on bert-base
    (``benchmarks/results/2026-12-06-allcopy-default-h100``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        frozen,
        resident: set[int] = frozenset(),
    ):
        self.optimizer = optimizer
        self.params = params
        self._frozen = frozen  # callable: the bool mask of currently frozen params
        self._resident = frozenset(resident)  # indices whose state is never paged
        # reused host buffers: (unit, keys) -> (pinned block, its rows, one per key)
        self._host: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, tuple]] = {}
        self._reserved: set[tuple[str, ...]] = set()  # key groups with buffers for all units
        self._paged: set[int] = set()  # indices of params whose state is on the host
        # the frozen flags the state was last paged to; None: look at every unit next time
        self._applied: list[bool] | None = None
        # i -> (len(state), its movable keys grouped by shape and dtype)
        self._keys: dict[int, tuple[int, list[tuple[str, ...]]]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending = False  # side-stream copies issued since the last ready()
        self._due_in: list[int] = []  # units about to train whose state is still on the host
        # bytes copied so far, (to the host, back to the device): the bench reports them
        # per step (what the side stream carries; ~130 MiB a step on bert-base seq-cls)
        self.moved_bytes = [0, 0]
        # SLIMFIT_PAGING_STREAM=0: copies go on the compute stream (still asynchronous,
        # pinned buffers), for measuring what the side stream buys.
        self._use_side_stream = os.environ.get("SLIMFIT_PAGING_STREAM", "1") != "0"
        self._handles = [
            optimizer.register_state_dict_pre_hook(lambda opt: self.synchronize()),
            optimizer.register_load_state_dict_post_hook(lambda opt: self._after_load()),
        ]

    # -- moving state ---------------------------------------------------------------------
    def _side_stream(self, device: torch.device):
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    @staticmethod
    def _groups(state: dict) -> list[tuple[str, ...]]:
        # Per-element state only (moments, momentum buffers); scalar `step` counters stay.
        groups: dict[tuple, list[str]] = {}
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                groups.setdefault((tuple(v.shape), v.dtype), []).append(k)
        return [tuple(keys) for keys in groups.values()]

    def _groups_cached(self, i: int, state: dict) -> list[tuple[str, ...]]:
        cached = self._keys.get(i)
        if cached is None or cached[0] != len(state):
            cached = self._keys[i] = (len(state), self._groups(state))
        return cached[1]

    def page_out(self, indices: list[int]) -> None:
        self._applied = None  # moved outside sync_to: its next call looks at every unit
        self._move([], indices)

    def page_in(self, indices: list[int]) -> None:
        self._applied = None
        done = set(indices)
        self._due_in = [i for i in self._due_in if i not in done]
        self._move(indices, [])

    def _move(self, ins, outs) -> None:
        """Bring the state of ``ins`` back and send the state of ``outs`` to the host."""
        opt_state, params, paged, host = self.optimizer.state, self.params, self._paged, self._host
        batches: dict[torch.device, _Batch] = {}
        for i in ins:
            if i not in paged:
                continue
            p = params[i]
            state = opt_state[p]
            b = batches.get(p.device) or batches.setdefault(p.device, _Batch())
            for keys in self._groups_cached(i, state):
                block, rows = host[(i, keys)]
                if all(state[k] is r for k, r in zip(keys, rows)):
                    b.in_buf.append(block)
                    b.in_place.append((state, keys))
                else:  # replaced while paged (not by torch's optimizers): key by key
                    for k in keys:
                        b.in_buf.append(state[k].unsqueeze(0))
                        b.in_place.append((state, (k,)))
            paged.discard(i)
        for i in outs:
            if i in paged or i in self._resident:
                continue
            p = params[i]
            state = opt_state.get(p)
            if not state:
                continue
            b = batches.get(p.device) or batches.setdefault(p.device, _Batch())
            for keys in self._groups_cached(i, state):
                first = state[keys[0]]
                shape = (len(keys), *first.shape)
                entry = host.get((i, keys))
                if entry is None or entry[0].shape != shape or entry[0].dtype != first.dtype:
                    if keys not in self._reserved and first.shape == p.shape:
                        self._reserve(keys, None if first.dtype == p.dtype else first.dtype)
                        entry = host.get((i, keys))
                if entry is None or entry[0].shape != shape or entry[0].dtype != first.dtype:
                    entry = host[(i, keys)] = self._host_block(shape, first.dtype, p.device)
                block, rows = entry
                src = _packed_block(state, keys)
                if src is not None:  # one copy for the unit's block
                    b.out_dst.append(block)
                    b.out_src.append(src)
                else:
                    b.out_dst += rows
                    b.out_src += [state[k] for k in keys]
                for k, r in zip(keys, rows):
                    state[k] = r
            paged.add(i)
        for device, b in batches.items():
            self._issue(device, b)

    @staticmethod
    def _host_block(shape, dtype, device: torch.device) -> tuple[torch.Tensor, tuple]:
        block = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=device.type == "cuda")
        return block, block.unbind(0)

    def _reserve(self, keys: tuple[str, ...], dtype: torch.dtype | None) -> None:
        """Host blocks for the state ``keys`` of every unit, the first time one unit pages them.

        Pinning host memory is slow (cudaHostAlloc, ~0.1-0.2 ms per MB) and a new unit pages
        out for the first time on most of the first hundred ILS steps: allocated one by one,
        those stalls land in the training steps (the bench's timed steps among them). A
        per-element state has its parameter's shape in torch's optimizers, so the first
        one seen sizes them all, once (``dtype``: the state's, None where it is the
        parameter's)."""
        self._reserved.add(keys)
        for j, q in enumerate(self.params):
            if (j, keys) not in self._host:
                self._host[(j, keys)] = self._host_block(
                    (len(keys), *q.shape), dtype or q.dtype, q.device
                )

    def _issue(self, device: torch.device, b: _Batch) -> None:
        """Issue one batch of copies: host blocks <- leaving state, new blocks <- host."""
        if not (b.out_src or b.in_buf):  # e.g. SGD without momentum: nothing per element
            return
        self.moved_bytes[0] += sum(t.nbytes for t in b.out_src)
        self.moved_bytes[1] += sum(t.nbytes for t in b.in_buf)
        if device.type != "cuda":
            back = [torch.empty_like(buf, device=device) for buf in b.in_buf]
            torch._foreach_copy_(b.out_dst + back, b.out_src + b.in_buf)
        elif not self._use_side_stream:  # compute stream: ordered with the step already
            back = [torch.empty_like(buf, device=device) for buf in b.in_buf]
            torch._foreach_copy_(b.out_dst + back, b.out_src + b.in_buf, non_blocking=True)
        else:
            stream = self._side_stream(device)
            current = torch.cuda.current_stream(device)
            if b.out_src:  # the leaving state was last written by the step on `current`
                stream.wait_stream(current)
            with torch.cuda.stream(stream):
                # allocated on the side stream, which writes them; `current` reads them
                back = [torch.empty_like(buf, device=device) for buf in b.in_buf]
                torch._foreach_copy_(b.out_dst + back, b.out_src + b.in_buf, non_blocking=True)
            for src in b.out_src:  # read on the side stream: no reuse before the copy ran
                src.record_stream(stream)
            for t in back:
                t.record_stream(current)
            self._pending = True
        for (state, keys), t in zip(b.in_place, back):
            for k, row in zip(keys, t.unbind(0)):
                state[k] = row

    def synchronize(self) -> None:
        """Wait for in-flight copies (before a step reads state, or a checkpoint is taken)."""
        for stream in self._streams.values():
            torch.cuda.current_stream(stream.device).wait_stream(stream)
            stream.synchronize()
        self._pending = False
        if not self._use_side_stream and any(p.is_cuda for p in self.params):
            torch.cuda.synchronize()  # copies were issued on the compute stream

    def prefetch(self) -> None:
        """Bring back the state of the units that train next (called after a forward)."""
        if not self._due_in:
            return
        due, self._due_in = self._due_in, []
        flags = self._applied
        self._move([i for i in due if flags is None or not flags[i]], [])

    def ready(self) -> None:
        """Called before the optimizer step: make pending copies visible to the step."""
        self.prefetch()
        if self._pending:
            for stream in self._streams.values():
                torch.cuda.current_stream(stream.device).wait_stream(stream)
            self._pending = False

    def sync_to(self, frozen: torch.Tensor) -> None:
        """Page out the state of frozen params and bring back the state of the others."""
        flags = frozen.tolist()
        applied = self._applied
        if applied is None or len(applied) != len(flags):
            changed = range(len(flags))
        elif applied == flags:
            return
        else:
            changed = list(compress(range(len(flags)), map(ne, flags, applied)))
        self._applied = flags
        self._move([], [i for i in changed if flags[i]])  # _move keeps resident units
        self._due_in += [i for i in changed if not flags[i]]

    def _after_load(self) -> None:
        # load_state_dict put every state tensor on its parameter's device: page again.
        self._paged.clear()
        self._due_in = []
        self._keys.clear()
        self._applied = None
        self.sync_to(self._frozen())

    def resident_bytes(self) -> int:
        """Bytes of per-element optimizer state currently on the parameters' devices."""
        total = 0
        for i, p in enumerate(self.params):
            if i in self._paged:
                continue
            state = self.optimizer.state.get(p, {})
            keys = [k for group in self._groups(state) for k in group]
            total += sum(state[k].numel() * state[k].element_size() for k in keys)
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.page_in(sorted(self._paged))
        self.synchronize()
