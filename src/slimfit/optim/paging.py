"""Optimizer state of frozen units lives off the GPU and comes back before it is needed.

With 95% of units frozen, AdamW would still keep two fp32 moments for every unit that
ever trained (under ILS soon all of them). The pager moves a unit's state tensors to a
host buffer when the unit freezes and back when it is scheduled to train. The next frozen
set is known at the end of every optimizer step, so both copies are issued right then on
a side stream and overlap the next forward/backward; the pre-step hook only waits for them.

The host buffers are pinned and reused (one per state tensor), so paging never allocates
after a unit's first round trip: no creep. Torch optimizers skip parameters whose grad is
None, which is exactly the frozen units, so a paged-out state is never read by a step.
"""

from __future__ import annotations

import os

import torch


class OptimizerStatePager:
    """Pages optimizer state tensors of frozen parameters to ``storage`` and back.

    ``storage`` is ``"cpu"``; on a CUDA model the host buffers are pinned and copies are
    asynchronous. On a CPU model the same bookkeeping runs against separate host buffers
    (synchronously), which is how the tests exercise it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], frozen):
        self.optimizer = optimizer
        self.params = params
        self._frozen = frozen  # callable: the bool mask of currently frozen params
        self._host: dict[tuple[int, str], torch.Tensor] = {}  # reused host buffers
        self._paged: set[int] = set()  # indices of params whose state is on the host
        self._stream = None
        # SLIMFIT_PAGING_STREAM=0: copies go on the compute stream (still asynchronous,
        # pinned buffers), for measuring what the side stream buys.
        self._use_side_stream = os.environ.get("SLIMFIT_PAGING_STREAM", "1") != "0"
        self._handles = [
            optimizer.register_state_dict_pre_hook(lambda opt: self.synchronize()),
            optimizer.register_load_state_dict_post_hook(lambda opt: self._after_load()),
        ]

    # -- moving state ---------------------------------------------------------------------
    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _movable(self, state: dict) -> list[str]:
        # Per-element state only (moments, momentum buffers); scalar `step` counters stay.
        return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]

    def page_out(self, indices: list[int]) -> None:
        for i in indices:
            if i in self._paged:
                continue
            p = self.params[i]
            state = self.optimizer.state.get(p)
            if not state:
                continue
            cuda = p.device.type == "cuda"
            stream = self._side_stream(p.device) if cuda and self._use_side_stream else None
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(p.device))
            for k in self._movable(state):
                src = state[k]
                buf = self._host.get((i, k))
                if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                    buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=cuda)
                    self._host[(i, k)] = buf
                if stream is not None:
                    with torch.cuda.stream(stream):
                        buf.copy_(src, non_blocking=True)
                        src.record_stream(stream)
                else:
                    buf.copy_(src, non_blocking=cuda)
                state[k] = buf
            self._paged.add(i)

    def page_in(self, indices: list[int]) -> None:
        for i in indices:
            if i not in self._paged:
                continue
            p = self.params[i]
            state = self.optimizer.state[p]
            cuda = p.device.type == "cuda"
            stream = self._side_stream(p.device) if cuda and self._use_side_stream else None
            for k in self._movable(state):
                buf = state[k]
                if stream is not None:
                    with torch.cuda.stream(stream):
                        dev = torch.empty(buf.shape, dtype=buf.dtype, device=p.device)
                        dev.copy_(buf, non_blocking=True)
                    dev.record_stream(torch.cuda.current_stream(p.device))
                else:
                    dev = buf.to(p.device, copy=True, non_blocking=cuda)
                state[k] = dev
            self._paged.discard(i)

    def synchronize(self) -> None:
        """Wait for in-flight copies (before a step reads state, or a checkpoint is taken)."""
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._stream.synchronize()
        elif not self._use_side_stream and any(p.is_cuda for p in self.params):
            torch.cuda.synchronize()  # copies were issued on the compute stream

    def ready(self) -> None:
        """Called before the optimizer step: make pending copies visible to the step."""
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)

    def sync_to(self, frozen: torch.Tensor) -> None:
        """Page out the state of frozen params and bring back the state of the others."""
        flags = frozen.tolist()
        self.page_in([i for i in sorted(self._paged) if not flags[i]])
        self.page_out([i for i, f in enumerate(flags) if f])

    def _after_load(self) -> None:
        # load_state_dict put every state tensor on its parameter's device: page again.
        self._paged.clear()
        self.sync_to(self._frozen())

    def resident_bytes(self) -> int:
        """Bytes of per-element optimizer state currently on the parameters' devices."""
        total = 0
        for i, p in enumerate(self.params):
            if i in self._paged:
                continue
            state = self.optimizer.state.get(p, {})
            total += sum(state[k].numel() * state[k].element_size() for k in self._movable(state))
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.page_in(sorted(self._paged))
        self.synchronize()
