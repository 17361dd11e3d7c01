"""Whether bf16 autocast pays on this CPU: one matmul at MiniLM-L6 sizes, fp32 against bf16.

On CPUs without AVX512-BF16 or AMX, PyTorch emulates bf16 matmuls, and a bf16 step is many
times slower than an fp32 one; ``slimfit finetune --precision auto`` (the default) then
runs fp32 (``slimfit.train.resolve_precision``). Prints and writes (``--out``) the CPU,
its flags as torch sees them, the milliseconds per matmul of each dtype and what "auto"
resolves to here.

    python benchmarks/cpu_bf16_matmul.py --out runs/cpu-bf16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time

import torch

from slimfit.train import resolve_precision


def _ms(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="rows: batch 32 x 64 tokens")
    ap.add_argument("--hidden", type=int, default=384, help="MiniLM-L6's width")
    ap.add_argument("--ffn", type=int, default=1536, help="MiniLM-L6's FFN width")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    a, b = torch.randn(args.tokens, args.hidden), torch.randn(args.hidden, args.ffn)
    fp32 = _ms(a, b, args.reps)
    bf16 = _ms(a.bfloat16(), b.bfloat16(), args.reps)
    model = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    ) if os.path.exists("/proc/cpuinfo") else platform.processor()  # fmt: skip
    result = {
        "command": "python benchmarks/cpu_bf16_matmul.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": model,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "shape": [args.tokens, args.hidden, args.ffn],
        "fp32_ms": fp32,
        "bf16_ms": bf16,
        "bf16_over_fp32": bf16 / fp32,
        "auto_resolves_to": resolve_precision("auto", torch.device("cpu")),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_bf16_matmul.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
