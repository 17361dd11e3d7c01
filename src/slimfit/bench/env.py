"""Where a bench ran: device, driver, CUDA and library versions, git commit."""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _driver() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - optional
        pass
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


_GPU_STATE = ("clocks.sm", "clocks.max.sm", "temperature.gpu", "power.draw",
              "clocks_throttle_reasons.active")  # fmt: skip


def gpu_state(device: torch.device) -> dict | None:
    """The GPU's SM clock (and its maximum), temperature, power draw and active throttle
    reasons now, from nvidia-smi; None off CUDA or without nvidia-smi. The bench records
    it around each mode's timed steps: a mode timed right after another's max-batch search
    stepped up to 30% slower, and the clocks tell whether the GPU or the host was slower."""
    if device.type != "cuda":
        return None
    index = device.index
    ids = []
    try:
        index = torch.cuda.current_device() if index is None else index
        # by UUID first: under CUDA_VISIBLE_DEVICES torch's index is not nvidia-smi's
        ids.append(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
    except (RuntimeError, AssertionError, AttributeError):  # no CUDA here, or no uuid
        pass
    out = None
    for gpu in [*ids, str(index)]:
        out = _run(["nvidia-smi", f"--id={gpu}", f"--query-gpu={','.join(_GPU_STATE)}",
                    "--format=csv,noheader,nounits"])  # fmt: skip
        if out is not None:
            break
    if out is None:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    if len(values) != len(_GPU_STATE):
        return None
    state = {}
    for key, value in zip(_GPU_STATE, values):
        try:
            state[key] = float(value) if key != "clocks_throttle_reasons.active" else value
        except ValueError:  # "[N/A]" on GPUs that do not report it
            state[key] = None
    return state


def host_cpu() -> str | None:
    """The host CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _python_work() -> int:
    return sum(i * i for i in range(1000))


def host_speed(repeats: int = 5, clock=time.perf_counter) -> dict:
    """Microseconds a fixed piece of host work takes now (median of ``repeats``): a
    pure-Python loop (``python_us``) and one small CPU tensor op through torch's dispatcher
    (``torch_op_us``). A step bound by the host issuing it (slimfit's on bert-base seq-cls
    and ViT-B) moves with these; the same GPU type comes with hosts whose speed differs
    and drifts, so the bench records them with every timing (~20 ms a probe)."""
    t = torch.zeros(1)
    py, op = [], []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(20):
            _python_work()
        t1 = clock()
        for _ in range(200):
            t.add(1.0)
        t2 = clock()
        py.append((t1 - t0) / 20 * 1e6)
        op.append((t2 - t1) / 200 * 1e6)
    return {"python_us": statistics.median(py), "torch_op_us": statistics.median(op)}


def collect(device: torch.device) -> dict:
    import slimfit

    env = {
        "device_type": device.type,
        "device": platform.processor() or platform.machine() or "cpu",
        "driver": None,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "gpu_memory_bytes": None,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton") or _version("pytorch-triton"),
        "peft": _version("peft"),
        "slimfit": getattr(slimfit, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "host_cpu": host_cpu(),
        "host_speed": host_speed(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            {
                "device": torch.cuda.get_device_name(device),
                "driver": _driver(),
                "cudnn": torch.backends.cudnn.version(),
                "gpu_memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
            }
        )
    root = Path(__file__).resolve().parents[3]
    commit = _run(["git", "rev-parse", "HEAD"], cwd=str(root))
    if commit:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(root))
        env["git"] = {"commit": commit, "dirty": bool(dirty)}
    return env
