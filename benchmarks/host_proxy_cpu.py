"""Host cost of a training step on the CPU, a proxy for the GPU's launch-bound step (issue 4).

A 12-layer BERT layout at width 32 (2 heads, FFN 64, vocabulary 256), batch 1, sequence 8,
one thread (``--hidden 64 --batch 2 --seq 16``: the 2026-12-04 layout, whose CPU arithmetic
makes the rounds noisier): the arithmetic is tiny, so a step's time is mostly the Python
and dispatch cost of issuing its ops, as on the GPU at batch 2. Modes are built exactly as ``slimfit bench`` builds
them; they are timed in interleaved rounds (the host drifts), with Python's cyclic garbage
collector on and off, and one cProfile of the last mode.

``--kernels alloc`` (default) runs the converted ops' Triton path with stand-in kernels that
only allocate their outputs (``benchmarks/alloc_kernels.py``): the Python of a GPU step,
minus each launch's own cost. ``--kernels torch`` runs the PyTorch path instead (set
``SLIMFIT_BACKEND=torch``), a longer chain of ops than the GPU issues. ``--foreach`` (default)
gives AdamW the multi-tensor implementation it uses on CUDA (on the CPU it loops per
parameter).

    PYTHONPATH=src python benchmarks/host_proxy_cpu.py --out runs/host-proxy
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch
from transformers import BertConfig

import slimfit
from slimfit.bench.env import collect
from slimfit.bench.measure import DeviceMemory
from slimfit.bench.modes import get_modes
from slimfit.bench.runner import BenchSettings, trainer_and_batch
from slimfit.bench.workloads import get_workload, load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="full,freeze-only,slimfit-nopage")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--kernels", choices=("alloc", "torch"), default="alloc")
    ap.add_argument("--foreach", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--gc-off", action=argparse.BooleanOptionalAction, default=True,
                    help="also time every mode with the cyclic garbage collector off")  # fmt: skip
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/host-proxy"))
    args = ap.parse_args()
    if args.kernels == "alloc":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import alloc_kernels

        alloc_kernels.install()
    if args.foreach:
        adamw = torch.optim.AdamW
        torch.optim.AdamW = lambda *a, **k: adamw(*a, **{"foreach": True, **k})
    torch.set_num_threads(1)
    dev = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        h = args.hidden
        BertConfig(hidden_size=h, num_hidden_layers=12, num_attention_heads=max(1, h // 16),
                   intermediate_size=4 * h, vocab_size=256 if h <= 32 else 1000,
                   max_position_embeddings=128, num_labels=2).save_pretrained(tmp)  # fmt: skip
        workload = get_workload("bert-base-seqcls")
        config = load_config(workload, "tiny", tmp)
    s = BenchSettings(batch_size=args.batch, seq_len=args.seq, steps=args.steps, warmup=3,
                      device=dev, freeze_ratio=0.9)  # fmt: skip
    mem = DeviceMemory(dev)
    modes = get_modes(args.mode.split(","))
    trainers = {m.name: trainer_and_batch(workload, config, m, s, mem) for m in modes}
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, (trainer, batch) in trainers.items():
            for collect_garbage in (True, False) if args.gc_off else (True,):
                (gc.enable if collect_garbage else gc.disable)()
                for _ in range(3):
                    trainer.step(batch)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainer.step(batch)
                key = f"{name}, gc {'on' if collect_garbage else 'off'}"
                times.setdefault(key, []).append((time.perf_counter() - t0) / args.steps * 1e3)
                gc.enable()
    trainer, batch = trainers[modes[-1].name]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        trainer.step(batch)
    prof.disable()
    top = io.StringIO()
    pstats.Stats(prof, stream=top).sort_stats("tottime").print_stats(25)
    result = {
        "command": " ".join([sys.argv[0], *sys.argv[1:]]),
        "env": {**collect(dev), "SLIMFIT_BACKEND": os.environ.get("SLIMFIT_BACKEND")},
        "settings": {
            "layers": 12,
            "hidden": args.hidden,
            "batch": args.batch,
            "seq": args.seq,
            "freeze_ratio": 0.9,
            "threads": 1,
            "rounds": args.rounds,
            "steps": args.steps,
            "kernels": args.kernels,
            "adamw_foreach": args.foreach,
            "slimfit": os.path.dirname(slimfit.__file__),
        },  # fmt: skip
        "median_ms_per_step": {k: statistics.median(v) for k, v in times.items()},
        "min_ms_per_step": {k: min(v) for k, v in times.items()},
        "ms_per_step_by_round": times,
        "cprofile_mode": modes[-1].name,
        "cprofile_top_20_steps": top.getvalue(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_proxy.json"), "w") as f:
        json.dump(result, f, indent=1)
    for k, v in result["median_ms_per_step"].items():
        print(f"{k:32s} median {v:6.2f} ms  min {result['min_ms_per_step'][k]:6.2f} ms")


if __name__ == "__main__":
    main()
