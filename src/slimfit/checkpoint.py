"""Crash-safe checkpoints for plain training loops (``slimfit finetune``) and the Trainer.

A checkpoint is one folder ``<run_dir>/checkpoint-<step>/``::

    model.safetensors       model.state_dict(), keys unchanged (tied copies stored once)
    config.json             the model's config when it has one, so the folder loads with
                            plain ``transformers`` ``from_pretrained``
    training_state.pt       optimizer, lr scheduler, grad scaler, torch/numpy/python (and
                            CUDA) RNG states, and the caller's ``extra`` dict (data position)
    slimfit_state.pt        the SlimFit scheduler state (scores, RNG, step, history); the
                            same file the Trainer callback writes into Trainer checkpoints
    slimfit_checkpoint.json the manifest, written last: format, version, step, file sizes
                            and SHA-256 digests

The whole folder is written under a hidden temporary name in ``run_dir`` and renamed into
place with ``os.replace``, so a process killed at any instant leaves either the previous
set of checkpoints or the new complete one, never a folder that looks complete but is not.
:func:`latest_checkpoint` ignores temporary folders and anything without a valid manifest.

Typical loop::

    ckpt = latest_checkpoint(run_dir)
    extra = load_checkpoint(ckpt, model, optimizer, lr_scheduler, sf) if ckpt else {}
    ...
    if not check_loss(loss, step, run_dir=run_dir, on_nonfinite="raise"):
        optimizer.zero_grad(); continue                      # only with on_nonfinite="skip"
    ...
    save_checkpoint(run_dir, step, model=model, optimizer=optimizer,
                    lr_scheduler=lr_scheduler, slimfit=sf, extra={"epoch": e, "batch": b})
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_NAME = "slimfit-checkpoint"
FORMAT_VERSION = 1
STATE_FORMAT_NAME = "slimfit-state"
STATE_FORMAT_VERSION = 1

MANIFEST_FILE = "slimfit_checkpoint.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"
SLIMFIT_STATE_FILE = "slimfit_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
ABANDONED_DIR = "abandoned"
_TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
NONFINITE_POLICIES = ("raise", "skip")

__all__ = [
    "NonFiniteLossError",
    "NonFiniteGuard",
    "check_loss",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_slimfit_state",
    "read_manifest",
    "read_slimfit_state",
    "save_checkpoint",
    "save_slimfit_state",
]


# -- small atomic-write helpers ---------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_save_atomic(obj: Any, path: Path, fsync: bool = True) -> None:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _torch_load(path: Path, what: str, where: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, bit-flipped, foreign pickle...
        raise ValueError(
            f"the {what} in {where} cannot be read ({type(err).__name__}); the checkpoint is "
            "corrupted: delete that folder and resume from an earlier checkpoint."
        ) from None


# -- the SlimFit state file (shared with the Trainer integration) -------------------------------
def save_slimfit_state(
    path: str | os.PathLike, sf, *, step: int | None = None, fsync: bool = True
) -> None:
    """Write ``sf.state_dict()`` (plus its config, for checks) atomically to ``path``.

    ``step``: the training step this state belongs to (the checkpoint's step, the Trainer's
    ``global_step``); default ``sf.step``. The two differ when steps were skipped (fp16
    overflow, non-finite loss): the optimizer, hence SlimFit, did not step for those.
    """
    payload = {
        "format": STATE_FORMAT_NAME,
        "format_version": STATE_FORMAT_VERSION,
        "step": int(sf.step if step is None else step),
        "slimfit_step": int(sf.step),
        "config": _plain(sf.config.to_dict()),
        "state": sf.state_dict(),
    }
    _torch_save_atomic(payload, Path(path), fsync=fsync)


def read_slimfit_state(path: str | os.PathLike, sf, *, expect_step: int | None = None) -> dict:
    """Read and validate a :func:`save_slimfit_state` file for ``sf`` without applying it.

    ``expect_step``: the optimizer step the caller resumes at; a state from another step
    would silently desynchronize the schedule, so it is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist; the checkpoint was written without SlimFit (or the run "
            "died while saving it): resume from an earlier checkpoint that has it."
        )
    payload = _torch_load(path, "SlimFit state", path.parent)
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT_NAME:
        raise ValueError(
            f"{path} is not a SlimFit state file; point the resume at a checkpoint written "
            "by slimfit."
        )
    if payload.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(
            f"{path} has SlimFit state format version {payload.get('format_version')!r} but "
            f"this slimfit reads version {STATE_FORMAT_VERSION}; resume with the slimfit "
            "version that wrote it."
        )
    if expect_step is not None and int(payload["step"]) != int(expect_step):
        raise ValueError(
            f"{path} holds the SlimFit state of step {payload['step']} but training resumes "
            f"at step {expect_step}; resume from the checkpoint folder that state belongs to."
        )
    if list(payload["state"].get("unit_names", [])) != list(sf.unit_names):
        raise ValueError(
            f"the SlimFit state in {path} was saved for a model with different units; load it "
            "into the same model and configuration it was saved from."
        )
    saved = payload.get("config") or {}
    now = _plain(sf.config.to_dict())
    changed = [
        k
        for k in (
            "freeze_ratio",
            "policy",
            "seed",
            "warmup_steps",
            "score",
            "max_stale_steps",
            "explore",
        )
        if k in now and saved.get(k) != now.get(k)
    ]
    if changed:
        warnings.warn(
            "resuming SlimFit with a different "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed)
            + "; the run will not continue identically.",
            stacklevel=2,
        )
    return payload


def load_slimfit_state(path: str | os.PathLike, sf, *, expect_step: int | None = None) -> dict:
    """Restore a :func:`save_slimfit_state` file into ``sf``; returns the stored payload."""
    payload = read_slimfit_state(path, sf, expect_step=expect_step)
    sf.load_state_dict(payload["state"])
    return payload


# -- RNG ---------------------------------------------------------------------------------------
def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the checkpoint holds CUDA RNG states of {len(cuda)} devices but "
                f"{torch.cuda.device_count()} are visible; CUDA RNG states not restored.",
                stacklevel=3,
            )


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _plain(x):
    """JSON-able copy of a config dict (non-plain leaves become strings)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


# -- model weights ------------------------------------------------------------------------------
def _dedup_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write (keys unchanged) and aliases: ``{tied_key: stored_key}``.

    Tensors that are the very same view of one storage (tied weights) are stored once, as
    ``save_pretrained`` does; other overlapping views are stored as copies.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(
                f"the model's tensor {key!r} is on the meta device; materialize the model "
                "before saving a checkpoint."
            )
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if ptr is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ptr is not None:
            seen[ident] = key
            if ptr in storages:
                t = t.clone()
            storages.add(ptr)
        tensors[key] = t.contiguous()
    return tensors, aliases


def _write_model(model: torch.nn.Module, folder: Path) -> dict:
    from safetensors.torch import save_file

    tensors, aliases = _dedup_state_dict(model)
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        try:
            config.to_json_file(str(folder / CONFIG_FILE))
        except Exception as err:  # a config that cannot serialize must not block a checkpoint
            warnings.warn(f"model config not saved with the checkpoint: {err}", stacklevel=3)
    return {
        "class": type(model).__name__,
        "n_tensors": len(tensors),
        "aliases": aliases,
    }


def _read_model(model: torch.nn.Module, folder: Path, manifest: dict) -> dict:
    """The stored weights, checked against ``model``'s keys and shapes (not applied)."""
    from safetensors.torch import load_file

    try:
        stored = load_file(str(folder / MODEL_FILE), device="cpu")
    except Exception as err:
        raise ValueError(
            f"the model weights in {folder} cannot be read ({type(err).__name__}); the "
            "checkpoint is corrupted: delete that folder and resume from an earlier one."
        ) from None
    for alias, key in (manifest.get("model", {}).get("aliases") or {}).items():
        if key in stored:
            stored[alias] = stored[key]
    expected = model.state_dict()
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    wrong_shape = [
        k for k in expected if k in stored and tuple(stored[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's tensors are missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} are not in the model (e.g. {unexpected[0]!r})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(
                f"{len(wrong_shape)} have another shape (e.g. {k!r}: "
                f"{tuple(stored[k].shape)} vs {tuple(expected[k].shape)})"
            )
        raise ValueError(
            f"the checkpoint {folder} was saved from a different model ({'; '.join(parts)}); "
            "resume with the model and options it was saved from, or use a fresh run directory."
        )
    return stored


# -- manifest -----------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of checkpoint folder ``path``, validated; ValueError when it is not one."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"the checkpoint {folder} does not exist or is not a folder; pass a "
            "checkpoint-<step> folder written by slimfit (or the run directory holding them)."
        )
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        if (folder / "trainer_state.json").is_file():
            raise ValueError(
                f"{folder} is a transformers Trainer checkpoint, not a slimfit one; resume it "
                "with Trainer(..., callbacks=[SlimFitCallback(...)]).train(resume_from_checkpoint=...)."
            )
        raise ValueError(
            f"{folder} is not a slimfit checkpoint (it has no {MANIFEST_FILE}); point the "
            "resume at a checkpoint-<step> folder written by slimfit, or start a fresh run."
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(
            f"the manifest {mpath} is unreadable; the checkpoint is corrupted: delete that "
            "folder and resume from an earlier checkpoint."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{folder} is not a slimfit checkpoint (its manifest has format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}); point the "
            "resume at a checkpoint-<step> folder written by slimfit."
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} has checkpoint format version {manifest.get('format_version')!r} but this "
            f"slimfit reads version {FORMAT_VERSION}; resume with the slimfit version that wrote it."
        )
    for name, info in (manifest.get("files") or {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != info.get("bytes"):
            raise ValueError(
                f"{f} is missing or has the wrong size; the checkpoint is corrupted: delete "
                "that folder and resume from an earlier checkpoint."
            )
    return manifest


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint folder was saved at."""
    return int(read_manifest(path)["step"])


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        m = _CHECKPOINT_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        try:
            manifest = read_manifest(entry)
        except ValueError as err:
            warnings.warn(f"skipping {entry}: {err}", stacklevel=2)
            continue
        found.append((int(manifest["step"]), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in ``run_dir`` (or ``run_dir`` itself when it is
    one), or None. Temporary folders of an interrupted save are never returned."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST_FILE).is_file():
        read_manifest(run_dir)
        return run_dir
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# -- save / load --------------------------------------------------------------------------------
def ensure_writable_dir(path: Path, what: str, fix: str) -> None:
    """Create ``path``; a one-sentence ValueError (naming ``what`` and ``fix``) if it cannot
    be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the {what} {path} ({err.strerror or err}); choose {fix}."
        ) from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"the {what} {path} is not writable; choose {fix}.")


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    slimfit=None,
    extra: dict | None = None,
    scaler=None,
    keep_last: int | None = 3,
    fsync: bool = True,
) -> Path:
    """Write ``<run_dir>/checkpoint-<step>`` atomically and return its path.

    ``extra``: plain values (numbers, strings, lists, dicts, tensors) the loop needs to
    continue, typically the data-loader position ``{"epoch": e, "batch": b}``; returned by
    :func:`load_checkpoint`. ``keep_last``: keep only the newest N complete checkpoints
    (None keeps all). ``fsync``: also survive power loss, not only a killed process.
    """
    try:
        step = operator.index(step)
    except TypeError:
        step = -1
    if step < 0:
        raise ValueError("step must be a non-negative integer; pass the optimizer step count.")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last!r}.")
    run_dir = Path(run_dir)
    ensure_writable_dir(run_dir, "run directory", "a writable output directory")
    _remove_stale_temporaries(run_dir)
    _check_plain(extra or {}, "extra")
    newer = [(s, p) for s, p in list_checkpoints(run_dir) if s > step]
    if newer:
        # Resumed from an older checkpoint: the newer ones belong to an abandoned run and
        # would be picked by latest_checkpoint after a crash. Moved aside (never deleted)
        # before anything is written, so a crash from here on resumes from the right one.
        aside = run_dir / ABANDONED_DIR
        aside.mkdir(exist_ok=True)
        for _, p in newer:
            dest = aside / p.name
            n = 1
            while dest.exists():
                dest, n = aside / f"{p.name}.{n}", n + 1
            os.replace(p, dest)
        warnings.warn(
            f"moved {len(newer)} checkpoint(s) newer than step {step} (from the run this one "
            f"resumed before) to {aside}.",
            stacklevel=2,
        )

    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = run_dir / f"{_TMP_PREFIX}{CHECKPOINT_PREFIX}{step}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model_info = _write_model(model, tmp)
        training = {
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(),
            "extra": dict(extra or {}),
        }
        with open(tmp / TRAINING_STATE_FILE, "wb") as f:
            torch.save(training, f)
        if slimfit is not None:
            save_slimfit_state(tmp / SLIMFIT_STATE_FILE, slimfit, step=step, fsync=False)
        files = {}
        for entry in sorted(tmp.iterdir()):
            if fsync:
                _fsync_file(entry)
            files[entry.name] = {"bytes": entry.stat().st_size, "sha256": _sha256(entry)}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "created_unix": time.time(),
            "slimfit_version": _slimfit_version(),
            "torch_version": torch.__version__,
            "has_slimfit_state": slimfit is not None,
            "model": model_info,
            "files": files,
        }
        mpath = tmp / MANIFEST_FILE
        mpath.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if fsync:
            _fsync_file(mpath)
            _fsync_dir(tmp)
        _replace_dir(tmp, final)
        if fsync:
            _fsync_dir(run_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"could not write the checkpoint of step {step} into {run_dir} "
            f"({err.strerror or err}); free space or choose another output directory (the "
            "earlier checkpoints are intact)."
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            if old != final:
                _remove_dir(old)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    slimfit=None,
    *,
    scaler=None,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict:
    """Restore a checkpoint folder (or the newest one in a run directory) and return ``extra``.

    Restores, in order: model weights (in place, so the optimizer's references stay valid),
    the SlimFit state (frozen set first, so the optimizer-state pager sees it), optimizer,
    lr scheduler, grad scaler, and the torch/numpy/python/CUDA RNG states. ``verify`` checks
    every file's SHA-256 against the manifest. Anything inconsistent raises ValueError, and
    every check runs before anything is changed: a refused checkpoint leaves the model,
    optimizer, scheduler, SlimFit state and RNGs as they were.
    """
    folder = Path(path)
    if folder.is_dir() and not (folder / MANIFEST_FILE).exists():
        newest = latest_checkpoint(folder) if any(folder.glob(f"{CHECKPOINT_PREFIX}*")) else None
        if newest is not None:
            folder = newest
    manifest = read_manifest(folder)
    if verify:
        for name, info in manifest["files"].items():
            if _sha256(folder / name) != info.get("sha256"):
                raise ValueError(
                    f"{folder / name} does not match its checksum; the checkpoint is corrupted: "
                    "delete that folder and resume from an earlier checkpoint."
                )
    if MODEL_FILE not in manifest["files"] or TRAINING_STATE_FILE not in manifest["files"]:
        raise ValueError(
            f"{folder} lacks {MODEL_FILE} or {TRAINING_STATE_FILE}; the checkpoint is "
            "incomplete: delete that folder and resume from an earlier checkpoint."
        )
    training = _torch_load(folder / TRAINING_STATE_FILE, "training state", folder)
    if not isinstance(training, dict) or int(training.get("step", -1)) != int(manifest["step"]):
        raise ValueError(
            f"the training state in {folder} does not belong to step {manifest['step']} of its "
            "manifest; delete that folder and resume from an earlier one."
        )
    # Check everything first, so that a refused checkpoint changes nothing.
    stored = _read_model(model, folder, manifest)
    sf_payload = None
    if slimfit is not None:
        if not manifest.get("has_slimfit_state"):
            raise ValueError(
                f"{folder} was saved without SlimFit state; resume it without slimfit.attach, "
                "or start a fresh run directory."
            )
        sf_payload = read_slimfit_state(
            folder / SLIMFIT_STATE_FILE, slimfit, expect_step=int(manifest["step"])
        )
    parts = (("optimizer", optimizer), ("lr_scheduler", lr_scheduler), ("scaler", scaler))
    for name, obj in parts:
        if obj is not None and training.get(name) is None:
            raise ValueError(
                f"{folder} holds no {name.replace('_', ' ')} state; resume with the same "
                "training setup it was saved from."
            )
    if optimizer is not None:
        _check_optimizer_fits(optimizer, training["optimizer"], folder)

    model.load_state_dict(stored, strict=True)
    if sf_payload is not None:  # before the optimizer: the state pager pages by frozen set
        slimfit.load_state_dict(sf_payload["state"])
    for name, obj in parts:
        if obj is None:
            continue
        try:
            obj.load_state_dict(training[name])
        except (ValueError, KeyError, RuntimeError, IndexError, TypeError) as err:
            raise ValueError(
                f"the {name.replace('_', ' ')} state in {folder} does not fit this "
                f"{type(obj).__name__} ({str(err).strip().rstrip('.')}); resume with the "
                "training setup it was saved from."
            ) from None
    if restore_rng:
        _set_rng_state(training["rng"])
    return training.get("extra") or {}


def _check_optimizer_fits(optimizer, state: dict, folder: Path) -> None:
    saved = [len(g["params"]) for g in state.get("param_groups", [])]
    have = [len(g["params"]) for g in optimizer.param_groups]
    if saved != have:
        raise ValueError(
            f"the optimizer state in {folder} does not fit this {type(optimizer).__name__} "
            f"(parameter groups of sizes {saved} vs {have}); resume with the training setup "
            "it was saved from."
        )


_PLAIN = (bool, int, float, str, bytes, type(None), torch.Tensor)


def _check_plain(value, where: str) -> None:
    """``extra`` must load back with ``torch.load(weights_only=True)``."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise ValueError(
            f"{where} is a {type(value).__name__}, which a checkpoint cannot hold safely; "
            "store numbers, strings, lists, dicts or tensors instead."
        )


def _slimfit_version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an existing ``dst`` (same step saved again) is replaced.

    ``os.replace`` cannot replace a non-empty folder, so the old one is first renamed to a
    temporary name: at every instant ``dst`` is either the old or the new complete folder,
    or absent (then the previous checkpoint is the latest).
    """
    old = None
    if dst.exists():
        old = dst.with_name(f"{_TMP_PREFIX}old-{dst.name}.{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_dir(folder: Path) -> None:
    """Rename first, then delete: a half-deleted folder never looks like a checkpoint."""
    trash = folder.with_name(f"{_TMP_PREFIX}del-{folder.name}.{os.getpid()}")
    try:
        os.replace(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary folders/files left by a process killed while saving.

    A process killed between the two renames of :func:`_replace_dir` left the previous
    ``checkpoint-N`` under a temporary name and no ``checkpoint-N``: that one is put back.
    """
    for entry in run_dir.iterdir():
        m = re.match(rf"^{re.escape(_TMP_PREFIX)}old-(checkpoint-\d+)\.\d+$", entry.name)
        if m and entry.is_dir() and not (run_dir / m.group(1)).exists():
            os.replace(entry, run_dir / m.group(1))
    for entry in run_dir.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                try:
                    entry.unlink()
                except OSError:
                    pass


# -- non-finite loss --------------------------------------------------------------------------
class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


class NonFiniteGuard:
    """Checks every loss; ``policy`` ``"raise"`` stops, ``"skip"`` tells the loop to skip.

    ``max_consecutive_skips``: with ``"skip"``, stop anyway after that many non-finite
    losses in a row (a diverged run would otherwise skip forever).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        policy: str = "raise",
        max_consecutive_skips: int = 10,
    ):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"unknown non-finite loss policy {policy!r}; choose one of "
                f"{', '.join(NONFINITE_POLICIES)}."
            )
        self.run_dir = run_dir
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped: list[int] = []
        self._in_a_row = 0

    def check(self, loss, step: int) -> bool:
        """True when ``loss`` is finite; False when the loop must skip this optimizer step
        (zero the gradients, do not call ``optimizer.step()``); raises otherwise."""
        value = float(loss.detach().float().item() if torch.is_tensor(loss) else loss)
        if math.isfinite(value):
            self._in_a_row = 0
            return True
        last = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        where = (
            f"the last good checkpoint is {last}"
            if last is not None
            else "no checkpoint has been written yet"
        )
        if self.policy == "skip" and self._in_a_row < self.max_consecutive_skips:
            self._in_a_row += 1
            self.skipped.append(step)
            warnings.warn(f"skipping step {step}: the loss is {value}.", stacklevel=2)
            return False
        if self.policy == "skip":
            raise NonFiniteLossError(
                f"the loss was non-finite for {self._in_a_row + 1} steps in a row up to step "
                f"{step} and {where}; resume from it with a lower learning rate."
            )
        raise NonFiniteLossError(
            f"the loss is {value} at step {step} and {where}; resume from it with a lower "
            "learning rate (or bf16 instead of fp16), or skip such steps with "
            "on_nonfinite='skip'."
        )


def check_loss(
    loss, step: int, *, run_dir: str | os.PathLike | None = None, on_nonfinite: str = "raise"
) -> bool:
    """One-shot form of :class:`NonFiniteGuard` (no consecutive-skip limit)."""
    guard = NonFiniteGuard(run_dir, on_nonfinite, max_consecutive_skips=1 << 62)
    return guard.check(loss, step)
