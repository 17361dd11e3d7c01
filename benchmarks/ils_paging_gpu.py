"""GPU check of ILS alone and optimizer-state paging (issues 2 and 6).

bert-base seq-cls (seq 128) and ViT-B/16 (224 px), batch 128, bf16 autocast + SDPA,
random init, AdamW. Modes from one process: full fine-tuning, ILS 0.95 without paging,
ILS 0.95 with paging. Per mode: median step time, peak allocated, static memory
(weights + grads + optimizer state after the warm-up), slimfit hook time per step; then
allocated memory over a long ILS run (creep check).

    python benchmarks/ils_paging_gpu.py [--creep-steps 2000] [--out DIR]
    python benchmarks/ils_paging_gpu.py --paired-rounds 8   # paging overhead only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch
import transformers

import slimfit
from slimfit import SlimFitConfig
from slimfit.bench.measure import paired_rounds

GiB = 1024**3


def build(workload: str):
    if workload == "bert-base-seqcls":
        from transformers import BertConfig, BertForSequenceClassification

        model = BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation="sdpa"))

        def batch(b):
            return {
                "input_ids": torch.randint(0, 30522, (b, 128), device="cuda"),
                "labels": torch.randint(0, 2, (b,), device="cuda"),
            }
    else:
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig(num_labels=10, attn_implementation="sdpa"))

        def batch(b):
            return {
                "pixel_values": torch.randn(b, 3, 224, 224, device="cuda"),
                "labels": torch.randint(0, 10, (b,), device="cuda"),
            }

    return model.cuda(), batch


def hook_timer(sf):
    """Wrap slimfit's optimizer hooks to time them (synchronized: includes their kernels)."""
    spent = []
    for attr in ("_pre_step", "_post_step"):
        fn = getattr(sf, attr)

        def timed(*a, _fn=fn):
            torch.cuda.synchronize()
            t = time.perf_counter()
            _fn(*a)
            torch.cuda.synchronize()
            spent.append(time.perf_counter() - t)

        setattr(sf, attr, timed)
    sf.optimizer._optimizer_step_pre_hooks.clear()
    sf.optimizer._optimizer_step_post_hooks.clear()
    sf.optimizer.register_step_pre_hook(sf._pre_step)
    sf.optimizer.register_step_post_hook(sf._post_step)
    return spent


def train_step(model, opt, batch) -> None:
    """One bf16-autocast AdamW step (SlimFit's hooks run inside ``opt.step``)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_mode(workload, mode, batch_size, steps, creep_steps=0):
    torch.manual_seed(0)
    model, batch = build(workload)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    sf = spent = None
    if mode != "full":
        sf = slimfit.attach(
            model,
            opt,
            SlimFitConfig(freeze_ratio=0.95, offload_optimizer_state=(mode == "ils-paged")),
        )
    data = [batch(batch_size) for _ in range(4)]

    def step(i):
        train_step(model, opt, data[i % 4])

    for i in range(3):  # warm-up: every unit state gets created over the ILS visiting cycle
        step(i)
    for i in range(25):
        step(i)
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    # Steps back to back, one synchronize at the end: the paging copies issued after a
    # step overlap the next forward, which the per-step synchronize above forbids.
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    pipelined = (time.perf_counter() - t) / steps
    out = {
        "workload": workload,
        "step_s_pipelined": pipelined,
        "mode": mode,
        "batch_size": batch_size,
        "step_s_median": statistics.median(times),
        "step_s_p10": sorted(times)[len(times) // 10],
        "step_s_p90": sorted(times)[(9 * len(times)) // 10],
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        "static_gib": static / GiB,
    }
    if sf is not None:  # hooks timed apart: the synchronizes would distort the step time
        spent = hook_timer(sf)
        for i in range(10):
            step(i)
        out["hook_ms_per_step"] = 1000 * sum(spent) / 10
    if creep_steps:
        allocated = []
        for i in range(creep_steps):
            step(i)
            if i % 100 == 99:
                torch.cuda.synchronize()
                allocated.append(torch.cuda.memory_allocated())
        out["creep_allocated_gib"] = [a / GiB for a in allocated]
        # The resident set differs step to step (which units train), so allocated memory
        # moves within a band; creep is the band's top drifting upward over the run.
        half = len(allocated) // 2
        out["creep_relative_range"] = max(allocated[half:]) / max(allocated[:half]) - 1
    return out


def paired(workload: str, batch_size: int, steps: int, rounds: int) -> dict:
    """ILS 0.95 without and with paging, built side by side and timed back to back in
    alternating rounds, so the host's drift (this machine's host-bound step times move by
    up to 2x between minutes) hits both modes alike. Overhead = median round ratio."""
    runs = {}
    for mode in ("ils", "ils-paged"):
        torch.manual_seed(0)
        model, batch = build(workload)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
        slimfit.attach(
            model, opt, SlimFitConfig(freeze_ratio=0.95, offload_optimizer_state=mode != "ils")
        )
        runs[mode] = (model, opt, [batch(batch_size) for _ in range(4)])

    def run(mode, n):
        model, opt, data = runs[mode]
        for i in range(n):
            train_step(model, opt, data[i % 4])

    for mode in runs:
        run(mode, 25)  # warm-up: every unit has trained (and has state) by now
    res = paired_rounds(
        {m: (lambda n, m=m: run(m, n)) for m in ("ils-paged", "ils")},
        rounds,
        steps,
        torch.cuda.synchronize,
    )
    return {
        "workload": workload,
        "rounds": rounds,
        "steps_per_round": steps,
        "step_s_rounds": res["step_s_rounds"],
        "step_s_median": res["step_s_median"],
        "overhead_median": res["ratio_median"] - 1,
        "overhead_rounds": [x - 1 for x in res["ratio_rounds"]],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--creep-steps", type=int, default=2000)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument(
        "--paired-rounds",
        type=int,
        default=0,
        help="only the interleaved paging-overhead measurement, with this many rounds",
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.paired_rounds:
        out = [
            paired(w, args.batch_size, args.steps, args.paired_rounds)
            for w in ("bert-base-seqcls", "vit-base")
        ]
        meta = {
            "command": " ".join(sys.argv),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(os.path.join(args.out, "paging_overhead.json"), "w") as f:
            json.dump({"meta": meta, "results": out}, f, indent=1)
        for r in out:
            print(
                f"{r['workload']}: ils {1e3 * r['step_s_median']['ils']:.1f} ms, paged "
                f"{1e3 * r['step_s_median']['ils-paged']:.1f} ms, overhead (median of "
                f"{r['rounds']} paired rounds) {100 * r['overhead_median']:+.1f}%",
                flush=True,
            )
        return
    results = []
    for workload in ("bert-base-seqcls", "vit-base"):
        for mode in ("full", "ils", "ils-paged"):
            creep = (
                args.creep_steps if (mode == "ils-paged" and workload == "bert-base-seqcls") else 0
            )
            try:
                r = run_mode(workload, mode, args.batch_size, args.steps, creep)
            except Exception as err:  # record and go on
                r = {"workload": workload, "mode": mode, "error": f"{type(err).__name__}: {err}"}
            results.append(r)
            gc.collect()
            torch.cuda.empty_cache()
            print(
                json.dumps({k: v for k, v in r.items() if k != "creep_allocated_gib"}), flush=True
            )
    meta = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(args.out, "ils_paging.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = [
        f"# ILS alone and optimizer-state paging ({meta['device']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['date']})",
        "",
        f"`{meta['command']}`; batch {args.batch_size}, bf16 autocast + SDPA, AdamW, freeze 0.95.",
        "",
        "| workload | mode | step (s) | back-to-back step (s) | peak alloc (GiB) | static (GiB) | hook (ms/step) | creep |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['mode']} | error: {r['error']} | | | | |")
            continue
        creep = (
            f"{100 * r['creep_relative_range']:+.2f}% (max of 2nd half vs 1st half of {args.creep_steps} steps)"
            if "creep_relative_range" in r
            else ""
        )
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['step_s_median']:.4f} | {r['step_s_pipelined']:.4f} | {r['peak_allocated_gib']:.2f} | "
            f"{r['static_gib']:.2f} | {r.get('hook_ms_per_step', float('nan')):.2f} | {creep} |"
        )
    with open(os.path.join(args.out, "ils_paging.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
