"""SlimFit for the Hugging Face ``transformers.Trainer``: one callback, or a thin subclass.

One line in an existing script::

    from slimfit import SlimFitConfig
    from slimfit.integrations.transformers import SlimFitCallback

    trainer = Trainer(..., callbacks=[SlimFitCallback(SlimFitConfig(freeze_ratio=0.9))])

What the callback does:

- ``on_train_begin`` (the Trainer has created, prepared and, on resume, loaded the model,
  optimizer and scheduler by then): ``slimfit.attach`` to the Trainer's model and to the
  torch optimizer inside accelerate's wrapper. From then on the optimizer's own step hooks
  change the frozen set at every *optimizer* step, so gradient accumulation, bf16/fp16
  autocast, gradient clipping and skipped fp16 steps all behave (a step the grad scaler
  skips never reaches the optimizer, so the schedule does not move either).
- ``on_save``: writes ``slimfit_state.pt`` (scores, RNG, step, history; the same file as
  :mod:`slimfit.checkpoint`) atomically into the Trainer's ``checkpoint-<step>`` folder.
- on resume (``trainer.train(resume_from_checkpoint=...)``): restores that state, so the
  resumed run continues exactly as the uninterrupted one would.
- ``on_log``: adds ``slimfit/frozen_fraction`` (mean over the steps since the last log),
  ``slimfit/frozen_units``, ``slimfit/frozen_param_fraction`` and, on CUDA,
  ``slimfit/cuda_mem_gib`` / ``slimfit/cuda_peak_mem_gib`` to every training log.
- ``on_train_end``: detaches (hooks removed, every unit trainable again).

Use :class:`SlimFitTrainer` instead when you need the metrics in ``report_to``
integrations, crash-safe ``resume_from_checkpoint=True``, or unpadded batches without
their all-ones attention mask; its docstring says why a callback alone cannot do those.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..attach import SlimFit, attach
from ..checkpoint import SLIMFIT_STATE_FILE, load_slimfit_state, save_slimfit_state
from ..config import SlimFitConfig
from ..train import without_full_mask

CHECKPOINT_PREFIX = "checkpoint-"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
_GIB = float(1 << 30)

__all__ = ["SlimFitCallback", "SlimFitTrainer", "latest_trainer_checkpoint"]


def _unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar)."""
    seen = set()
    while (
        hasattr(optimizer, "optimizer")
        and isinstance(optimizer.optimizer, torch.optim.Optimizer)
        and id(optimizer) not in seen
    ):
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def _saved_step(path: Path) -> int | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return int(payload["step"])
    except Exception:
        return None


def latest_trainer_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest *complete* Trainer checkpoint in ``output_dir`` that carries SlimFit state.

    ``transformers.trainer_utils.get_last_checkpoint`` returns the highest-numbered
    ``checkpoint-*`` folder even when the run died while writing it. The SlimFit state is
    the last file written into a checkpoint (``on_save`` runs after the Trainer's own
    files), atomically, so a folder holding it for its own step is complete.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for entry in output_dir.iterdir():
        name = entry.name
        if not (name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit()):
            continue
        step = int(name[len(CHECKPOINT_PREFIX) :])
        if not (entry / TRAINER_STATE_FILE).is_file():
            continue
        if _saved_step(entry / SLIMFIT_STATE_FILE) != step:
            continue
        found.append((step, entry))
    return str(max(found)[1]) if found else None


class SlimFitCallback(TrainerCallback):
    """Attaches SlimFit to the Trainer's model and optimizer; saves/restores its state.

    Args:
        config: the :class:`~slimfit.SlimFitConfig` (default ``SlimFitConfig()``).
        log_memory: log CUDA memory with every training log when the model is on CUDA.
        allow_missing_state: on resume from a checkpoint without ``slimfit_state.pt`` (e.g.
            written before slimfit was added), start a fresh schedule with a warning instead
            of raising ValueError.

    After (or during) training, ``callback.slimfit`` is the :class:`~slimfit.SlimFit` handle
    (``schedule()``, ``history``, ``frozen_units``...).
    """

    def __init__(
        self,
        config: SlimFitConfig | None = None,
        *,
        log_memory: bool = True,
        allow_missing_state: bool = False,
    ):
        self.config = config if config is not None else SlimFitConfig()
        if not isinstance(self.config, SlimFitConfig):
            raise ValueError(
                f"SlimFitCallback takes a SlimFitConfig, got {type(config).__name__}; "
                "pass SlimFitCallback(SlimFitConfig(freeze_ratio=...))."
            )
        self.log_memory = log_memory
        self.allow_missing_state = allow_missing_state
        self.slimfit: SlimFit | None = None
        # Set by SlimFitTrainer.train: the exact folder the Trainer resumes from.
        self.resume_path: str | None = None
        self._logged_upto = 0
        self._metrics_cache: tuple[int, dict] | None = None

    # -- attach / detach ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.slimfit is not None:  # a previous train() call ended by an exception
            self.slimfit.detach()
            self.slimfit = None
        if model is None or optimizer is None:
            raise ValueError(
                "SlimFitCallback found no model or optimizer at the start of training; use "
                "SlimFitTrainer, or a Trainer that creates its optimizer before on_train_begin."
            )
        self.slimfit = attach(model, _unwrap_optimizer(optimizer), self.config)
        self._metrics_cache = None
        if state.global_step > 0:
            self._restore(args, state)
        self._logged_upto = len(self.slimfit.history)

    def on_train_end(self, args, state, control, **kwargs):
        if self.slimfit is not None:
            self.slimfit.detach()

    def _restore(self, args, state) -> None:
        step = state.global_step
        candidates = []
        for folder in (
            self.resume_path,
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{step}"),
        ):
            if folder and folder not in candidates:
                candidates.append(folder)
        for folder in candidates:
            path = Path(folder) / SLIMFIT_STATE_FILE
            if path.is_file() and _saved_step(path) == step:
                load_slimfit_state(path, self.slimfit, expect_step=step)
                return
        message = (
            f"training resumes at step {step} but no {SLIMFIT_STATE_FILE} of that step was "
            f"found in {' or '.join(candidates)}; resume from a checkpoint saved with "
            "SlimFitCallback (SlimFitTrainer finds the newest complete one), or pass "
            "SlimFitCallback(..., allow_missing_state=True) to start a fresh schedule."
        )
        if not self.allow_missing_state:
            self.slimfit.detach()
            self.slimfit = None
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)

    # -- checkpoints -------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if self.slimfit is None or not args.should_save:
            return
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if not folder.is_dir():
            warnings.warn(
                f"SlimFit state not saved: the Trainer checkpoint {folder} does not exist "
                "(hyper-parameter search runs are not supported).",
                stacklevel=2,
            )
            return
        # Keyed by global_step: a step the fp16 grad scaler skipped moved the Trainer's
        # counter but not the optimizer's, so sf.step may be smaller.
        save_slimfit_state(folder / SLIMFIT_STATE_FILE, self.slimfit, step=state.global_step)

    # -- logging -----------------------------------------------------------------------------
    def metrics(self, args, state) -> dict:
        """The SlimFit metrics of the current logging step (computed once per global step)."""
        if self.slimfit is None:
            return {}
        if self._metrics_cache is not None and self._metrics_cache[0] == state.global_step:
            return self._metrics_cache[1]
        sf = self.slimfit
        out: dict = {}
        window = sf.history[self._logged_upto :]
        n = len(sf.units)
        if window:
            latest = window[-1]
            out["slimfit/frozen_fraction"] = (
                float(torch.stack(window).double().mean()) if n else 0.0
            )
            out["slimfit/frozen_units"] = int(latest.sum())
            numels = torch.tensor([u.numel for u in sf.units], dtype=torch.float64)
            out["slimfit/frozen_param_fraction"] = float(
                (numels * latest.to(torch.float64)).sum() / numels.sum()
            )
        self._logged_upto = len(sf.history)
        if self.log_memory and torch.cuda.is_available():
            device = next((u.param.device for u in sf.units if u.param.is_cuda), None)
            if device is not None:
                out["slimfit/cuda_mem_gib"] = torch.cuda.memory_allocated(device) / _GIB
                out["slimfit/cuda_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / _GIB
                # Per-window peaks, unless the Trainer's own memory tracker uses the counter.
                if getattr(args, "skip_memory_metrics", True):
                    torch.cuda.reset_peak_memory_stats(device)
        self._metrics_cache = (state.global_step, out)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.slimfit is None:
            return
        added = {k: v for k, v in self.metrics(args, state).items() if k not in logs}
        logs.update(added)
        # Trainer.log appended a copy of `logs` to log_history before the callbacks ran.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            entry = state.log_history[-1]
            if "loss" in entry:
                for k, v in added.items():
                    entry.setdefault(k, v)


class SlimFitTrainer(Trainer):
    """``transformers.Trainer`` with SlimFit: ``SlimFitTrainer(..., slimfit_config=SlimFitConfig())``.

    Everything :class:`SlimFitCallback` does (it adds one, or uses the one in ``callbacks``),
    plus two things a callback cannot do:

    1. ``report_to`` logging. The Trainer runs its reporting callbacks (TensorBoard, W&B,
       MLflow...) *before* any user callback and passes callbacks no handle to the Trainer
       or the callback list, so metrics a callback adds in ``on_log`` reach the printed
       logs and ``state.log_history`` but not the reporters. This class overrides the
       public ``log()`` to add the SlimFit metrics before any callback sees the logs.
    2. Crash-safe ``resume_from_checkpoint=True``. The Trainer's ``get_last_checkpoint``
       returns the highest-numbered ``checkpoint-*`` folder even when the run died while
       writing it, and callbacks are never told which folder the Trainer resumes from
       (the callback alone looks in ``args.resume_from_checkpoint`` and
       ``output_dir/checkpoint-<global_step>``). ``train()`` here resolves ``True`` to the
       newest complete checkpoint (:func:`latest_trainer_checkpoint`) and hands the exact
       folder, wherever it is, to the callback.
    3. Unpadded batches without their attention mask. A batch with no padded position gets
       the same attention without its all-ones mask, which transformers would otherwise
       read back from the GPU in every forward (a synchronization that stalls a step bound
       by the host, as SlimFit's often is: ``slimfit.train.without_full_mask``). The
       collator's output is checked on the host, before the batch is moved; only for a
       model whose ``forward`` takes ``attention_mask=None``.
    """

    def __init__(self, *args, slimfit_config: SlimFitConfig | None = None, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        mine = [c for c in callbacks if isinstance(c, SlimFitCallback)]
        if len(mine) > 1:
            raise ValueError("pass at most one SlimFitCallback to SlimFitTrainer.")
        if mine and slimfit_config is not None:
            raise ValueError(
                "pass the SlimFit config either as slimfit_config or inside the "
                "SlimFitCallback, not both."
            )
        callback = mine[0] if mine else SlimFitCallback(slimfit_config)
        if not mine:
            callbacks.append(callback)
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.slimfit_callback = callback
        if self.data_collator is not None and _mask_is_optional(self.model):
            self.data_collator = _WithoutFullMask(self.data_collator)

    @property
    def slimfit(self) -> SlimFit | None:
        """The :class:`~slimfit.SlimFit` handle of the current (or last) training run."""
        return self.slimfit_callback.slimfit

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_trainer_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"no complete checkpoint with SlimFit state in {self.args.output_dir}; "
                    "start without resume_from_checkpoint or point it at a checkpoint folder."
                )
        self.slimfit_callback.resume_path = (
            str(resume_from_checkpoint) if resume_from_checkpoint else None
        )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.slimfit_callback.resume_path = None

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            for k, v in self.slimfit_callback.metrics(self.args, self.state).items():
                logs.setdefault(k, v)
        super().log(logs, *args, **kwargs)


def _mask_is_optional(model) -> bool:
    forward = getattr(model, "forward", None)  # no model yet: a `model_init` Trainer
    if forward is None:
        return False
    try:
        param = inspect.signature(forward).parameters.get("attention_mask")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is None


class _WithoutFullMask:
    """A Trainer's collator, then ``without_full_mask`` on the batch it makes (on the host,
    in the data loader, before the batch is moved to the device)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features):
        return without_full_mask(self.collate(features))

    def __getattr__(self, name):  # the Trainer reads e.g. `.tokenizer` of its collator
        if name == "collate":  # not set yet (unpickling in a data-loader worker)
            raise AttributeError(name)
        return getattr(self.collate, name)
