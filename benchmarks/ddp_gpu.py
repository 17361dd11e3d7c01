"""Data-parallel SlimFit against plain DDP on 1 and 2 GPUs (issue 8).

bert-base seq-cls (seq 128, random init, dropout 0), batch 128 per GPU, bf16 autocast +
SDPA, AdamW. One torchrun invocation measures everything:

1. 1 GPU (rank 0 alone, before any process group exists; the other ranks wait): full
   fine-tuning, SlimFit ILS 0.95 (samples/s), and the SlimFit loss curve at the global
   batch of the 2-GPU run (one batch of 128 * world on the one GPU).
2. all GPUs (NCCL): plain DDP full fine-tuning, SlimFit ILS 0.95 with slimfit's own
   gradient averaging (at the end of backward, and overlapped with it), and SlimFit ILS 0.95 inside DDP(find_unused_parameters=True) (the
   Trainer path) (samples/s, bytes all-reduced per step: DDP counted by a comm hook on a
   separate 2-step run, SlimFit by its own counters; time spent averaging, measured
   CUDA-synchronized on separate steps), and the SlimFit loss curve on the same global
   batches (each rank its slice).

Scaling efficiency = samples/s on N GPUs / (N * samples/s on 1 GPU). Writes ddp_gpu.json
and ddp_gpu.md into $OUT (or --out) and prints a compact table. From the repository root:

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --standalone --nproc-per-node 2 \
        benchmarks/ddp_gpu.py

About 2-3 minutes on 2 H200s. `--tiny` runs a 2-layer BERT (works on CPU with gloo:
a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import slimfit  # noqa: E402
from slimfit import SlimFitConfig  # noqa: E402
from slimfit.distributed import stats  # noqa: E402

SEQ = 128
VOCAB = 30522
MiB = 1024**2


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="samples per GPU per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--curve-steps", type=int, default=50)
    ap.add_argument("--freeze-ratio", type=float, default=0.95)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--compression",
        default="auto",
        help="SlimFit compression preset; auto = 'default' if slimfit.convert exists, else none",
    )
    ap.add_argument("--tiny", action="store_true", help="2-layer BERT (CPU smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/ddp-gpu"))
    return ap.parse_args()


# -- workload ------------------------------------------------------------------------------
def build(args, device):
    from transformers import BertConfig, BertForSequenceClassification

    kw = dict(
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    if args.tiny:
        kw.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**kw)).to(device)


def global_batch(step: int, size: int):
    """A learnable task: the label is written as a marker token at positions 1-4."""
    g = torch.Generator().manual_seed(10_000 + step)
    ids = torch.randint(1000, VOCAB, (size, SEQ), generator=g)
    labels = torch.randint(0, 2, (size,), generator=g)
    ids[:, 1:5] = (2000 + labels).unsqueeze(1)
    return ids, labels


def shard(batch, rank: int, per_rank: int, device):
    ids, labels = batch
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return {
        "input_ids": ids[sl].to(device, non_blocking=True),
        "labels": labels[sl].to(device, non_blocking=True),
    }


def make_step(model, opt, device):
    autocast = device.type == "cuda"

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(step, batch, args, device, samples_per_step: int) -> dict:
    for _ in range(args.warmup):
        step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(batch)
    sync(device)
    dt = time.perf_counter() - t
    out = {
        "step_s": dt / args.steps,
        "samples_per_s": samples_per_step * args.steps / dt,
    }
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return out


def slimfit_model(args, device, compression, sync="backward"):
    model = build(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    cfg = SlimFitConfig(
        freeze_ratio=args.freeze_ratio,
        seed=0,
        compression=compression,
        extra={"gradient_sync": sync},
    )
    sf = slimfit.attach(model, opt, cfg)
    return model, opt, sf


def slimfit_model_in_ddp(args, device, compression):
    model = build(args, device)
    ddp = DDP(  # noqa: F841 (attach finds the wrapper)
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    cfg = SlimFitConfig(freeze_ratio=args.freeze_ratio, seed=0, compression=compression)
    sf = slimfit.attach(model, opt, cfg)
    assert sf._dist.mode == "ddp"
    return model, opt, sf


def loss_curve(args, device, compression, rank: int, world: int):
    """SlimFit ILS on the global batches of `world` ranks (this rank's slice of each)."""
    model, opt, sf = slimfit_model(args, device, compression)
    step = make_step(model, opt, device)
    global_size = args.batch * args.world_for_curve
    per_rank = global_size // world
    losses = []
    for s in range(args.curve_steps):
        losses.append(step(shard(global_batch(s, global_size), rank, per_rank, device)))
    losses = torch.stack(losses).float()
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
    return {
        "global_batch": global_size,
        "per_rank": per_rank,
        "loss": [round(x, 5) for x in losses.tolist()],
        "frozen": [m.nonzero().flatten().tolist() for m in sf.history],
    }


# -- phases ---------------------------------------------------------------------------------
def phase_single(args, device) -> dict:
    out: dict = {}
    model = build(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    batch = shard(global_batch(0, args.batch), 0, args.batch, device)
    out["full"] = throughput(make_step(model, opt, device), batch, args, device, args.batch)
    del model, opt
    compression = args.compression
    if compression == "auto":
        compression = "default" if importlib.util.find_spec("slimfit.convert") else "none"
    try:
        model, opt, sf = slimfit_model(args, device, compression)
        out["slimfit"] = throughput(make_step(model, opt, device), batch, args, device, args.batch)
    except Exception as err:  # a broken compression path must not cost the comm numbers
        if compression == "none":
            raise
        out["compression_error"] = f"{type(err).__name__}: {err}"
        compression = "none"
        model, opt, sf = slimfit_model(args, device, compression)
        out["slimfit"] = throughput(make_step(model, opt, device), batch, args, device, args.batch)
    out["compression"] = compression
    del model, opt, sf
    out["curve"] = loss_curve(args, device, compression, 0, 1)
    return out


def phase_multi(args, device, rank: int, world: int, compression: str) -> dict:
    out: dict = {}
    local_batch = shard(global_batch(0, args.batch * world), rank, args.batch, device)
    # plain DDP, full fine-tuning
    model = build(args, device)
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=25,
        gradient_as_bucket_view=True,
    )
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.01)
    out["ddp_full"] = throughput(
        make_step(ddp, opt, device), local_batch, args, device, args.batch * world
    )
    del ddp, model, opt
    # bytes DDP all-reduces per step, counted by a comm hook (separate run: a Python
    # hook would slow the timed one)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = build(args, device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    counted = {"bytes": 0, "buckets": 0}

    def counting_hook(state, bucket):
        buf = bucket.buffer()
        state["bytes"] += buf.numel() * buf.element_size()
        state["buckets"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(counted, counting_hook)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.01)
    step = make_step(ddp, opt, device)
    for _ in range(2):
        step(local_batch)
    out["ddp_bytes_per_step"] = counted["bytes"] / 2
    out["ddp_buckets_per_step"] = counted["buckets"] / 2
    del ddp, model, opt, step
    # SlimFit with its own gradient averaging: at the end of backward, and overlapped
    for key, sync in (("slimfit", "backward"), ("slimfit_overlap", "overlap")):
        model, opt, sf = slimfit_model(args, device, compression, sync)
        step = make_step(model, opt, device)
        for _ in range(args.warmup):
            step(local_batch)
        before = stats(sf)
        res = throughput(step, local_batch, args, device, args.batch * world)
        after = stats(sf)
        n = after["steps"] - before["steps"]
        res["bytes_per_step"] = (after["bytes_total"] - before["bytes_total"]) / n
        res["collectives_last_step"] = after["collectives_last_step"]
        res["early_collectives_last_step"] = after["early_collectives_last_step"]
        res["full_bytes"] = after["full_bytes"]
        res["score_bytes_total"] = after["control_bytes_total"]
        # time the averaging leaves exposed (CUDA-synchronized around it: separate steps;
        # for overlap only the part after backward)
        sf._dist.profile = True
        sf._dist.seconds_total = 0.0
        k = 5
        for _ in range(k):
            step(local_batch)
        sf._dist.profile = False
        res["average_ms_per_step"] = 1e3 * sf._dist.seconds_total / k
        out[key] = res
        del model, opt, sf, step
    # SlimFit inside DDP(find_unused_parameters=True): the Trainer/accelerate path. Correct
    # (frozen units are unused parameters) but DDP averages every parameter.
    model, opt, sf = slimfit_model_in_ddp(args, device, compression)
    ddp = sf._dist.outer_ddp
    res = throughput(make_step(ddp, opt, device), local_batch, args, device, args.batch * world)
    res["bytes_per_step"] = stats(sf)["full_bytes"]  # DDP's buckets hold every parameter
    out["slimfit_in_ddp"] = res
    del model, opt, sf, ddp
    out["curve"] = loss_curve(args, device, compression, rank, world)
    return out


# -- main -----------------------------------------------------------------------------------
def main() -> int:
    args = parse()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    args.world_for_curve = world
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(world, 1)))
    started = time.time()
    handoff = Path(tempfile.gettempdir()) / (
        "slimfit-ddp-gpu-"
        + os.environ.get("TORCHELASTIC_RUN_ID", "run")
        + "-"
        + os.environ.get("MASTER_PORT", "0")
        + ".json"
    )
    # 1. one GPU: rank 0 alone, no process group yet (so attach runs single-process)
    if rank == 0:
        try:
            single = phase_single(args, device)
        except Exception:
            single = {"error": traceback.format_exc()}
        tmp = handoff.with_suffix(".tmp")
        tmp.write_text(json.dumps(single))
        tmp.replace(handoff)
    else:
        deadline = time.time() + 600
        while not handoff.exists():
            if time.time() > deadline:
                print("rank 0 never finished the 1-GPU phase", file=sys.stderr)
                return 1
            time.sleep(0.5)
        single = json.loads(handoff.read_text())
    if "error" in single:
        if rank == 0:
            print(single["error"], file=sys.stderr)
        return 1
    print(f"[rank {rank}] 1-GPU phase done after {time.time() - started:.0f} s", flush=True)
    result = {
        "command": " ".join([f"torchrun --nproc-per-node {world}"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version()))
            if device.type == "cuda"
            else None,
            "python": platform.python_version(),
        },
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
        "workload": {
            "model": "bert-tiny" if args.tiny else "bert-base seq-cls",
            "seq": SEQ,
            "batch_per_gpu": args.batch,
            "freeze_ratio": args.freeze_ratio,
            "precision": "bf16 autocast + SDPA" if device.type == "cuda" else "fp32",
            "optimizer": f"AdamW lr {args.lr} wd 0.01",
        },
        "single": single,
    }
    if world > 1:
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
        dist.barrier()  # every rank has read the hand-off file
        if rank == 0:
            handoff.unlink(missing_ok=True)
        try:
            multi = phase_multi(args, device, rank, world, single["compression"])
        finally:
            dist.barrier()
            dist.destroy_process_group()
        result["multi"] = multi
    result["elapsed_s"] = round(time.time() - started, 1)
    if rank == 0:
        summarize(result)
        write(result, Path(args.out))
    return 0


def summarize(r: dict) -> None:
    s, w = r["single"], r["world_size"]
    rows = [("mode", "1 GPU samples/s", f"{w} GPU samples/s", "scaling", "MiB all-reduced/step")]
    summary = {}
    if "multi" in r:
        m = r["multi"]
        for name, one, many, mib in (
            ("full (plain DDP)", s["full"], m["ddp_full"], m["ddp_bytes_per_step"] / MiB),
            ("slimfit ILS", s["slimfit"], m["slimfit"], m["slimfit"]["bytes_per_step"] / MiB),
            (
                "slimfit ILS overlap",
                s["slimfit"],
                m["slimfit_overlap"],
                m["slimfit_overlap"]["bytes_per_step"] / MiB,
            ),
            (
                "slimfit ILS in DDP(find_unused)",
                s["slimfit"],
                m["slimfit_in_ddp"],
                m["slimfit_in_ddp"]["bytes_per_step"] / MiB,
            ),
        ):
            eff = many["samples_per_s"] / (w * one["samples_per_s"])
            summary[name] = {"scaling_efficiency": eff, "mib_per_step": mib}
            rows.append(
                (
                    name,
                    f"{one['samples_per_s']:.0f}",
                    f"{many['samples_per_s']:.0f}",
                    f"{100 * eff:.1f}%",
                    f"{mib:.1f}",
                )
            )
        a, b = s["curve"], m["curve"]
        diffs = [abs(x - y) for x, y in zip(a["loss"], b["loss"])]
        same = 0
        for fa, fb in zip(a["frozen"], b["frozen"]):
            if fa != fb:
                break
            same += 1
        summary["curve"] = {
            "max_abs_loss_diff": max(diffs),
            "final_loss_1gpu": a["loss"][-1],
            "final_loss_ngpu": b["loss"][-1],
            "first_loss": a["loss"][0],
            "steps_with_identical_frozen_set": same,
            "steps": len(diffs),
        }
        summary["bytes_ratio_vs_ddp"] = m["slimfit"]["bytes_per_step"] / m["ddp_bytes_per_step"]
        summary["average_ms_per_step"] = m["slimfit"]["average_ms_per_step"]
    else:
        rows.append(("full", f"{s['full']['samples_per_s']:.0f}", "-", "-", "-"))
        rows.append(("slimfit ILS", f"{s['slimfit']['samples_per_s']:.0f}", "-", "-", "-"))
    r["summary"] = summary
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(wd) for c, wd in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * wd for wd in widths))
    r["table"] = lines
    print("\n".join(lines))
    if "curve" in summary:
        c = summary["curve"]
        print(
            f"loss curve, global batch {r['single']['curve']['global_batch']}, {c['steps']} steps: "
            f"1 GPU {c['first_loss']:.3f} -> {c['final_loss_1gpu']:.3f}, {w} GPUs -> "
            f"{c['final_loss_ngpu']:.3f}, max |diff| {c['max_abs_loss_diff']:.4f}, "
            f"identical frozen sets for the first {c['steps_with_identical_frozen_set']} steps"
        )
        print(
            f"slimfit all-reduces {100 * summary['bytes_ratio_vs_ddp']:.1f}% of DDP's bytes; "
            f"averaging takes {summary['average_ms_per_step']:.2f} ms/step (synchronized)"
        )


def write(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp_gpu.json").write_text(json.dumps(r, indent=1))
    md = [
        "# Data-parallel SlimFit vs plain DDP",
        "",
        f"`{r['command']}` on {r['world_size']} x {r['device']}, {r['date']}; "
        f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, "
        f"NCCL {r['versions']['nccl']}, NCCL_NVLS_ENABLE={r['NCCL_NVLS_ENABLE']}.",
        "",
        f"Workload: {r['workload']}; SlimFit compression: {r['single'].get('compression')}.",
        "",
        "```",
        *r["table"],
        "```",
        "",
    ]
    if "curve" in r.get("summary", {}):
        a, b = r["single"]["curve"]["loss"], r["multi"]["curve"]["loss"]
        md += ["| step | loss 1 GPU | loss N GPUs |", "|---|---|---|"]
        md += [f"| {i} | {x:.4f} | {y:.4f} |" for i, (x, y) in enumerate(zip(a, b))]
        md.append("")
        md.append(f"Summary: `{json.dumps(r['summary'])}`")
    (out / "ddp_gpu.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'ddp_gpu.json'} and {out / 'ddp_gpu.md'}")


if __name__ == "__main__":
    sys.exit(main())
