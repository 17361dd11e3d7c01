"""What transformers' check of the attention mask costs a step (issue 4).

With an SDPA attention (``"sdpa"``, ``"slimfit_sdpa"``), transformers drops a BERT-style
mask when no token is padded, after reading the padding mask on the host
(``_ignore_bidirectional_mask_sdpa``): one device synchronization in every forward. The
host then cannot issue the next step's forward while the device runs this step's backward;
a step whose host work exceeds its device work in the forward (slimfit's Python nodes)
pays for that. Timed in interleaved rounds at batch 128, per mode, for three inputs:

- ``ones``: the bench's batch (an all-ones mask; transformers reads it and drops it);
- ``none``: the same batch without ``attention_mask`` (nothing read, nothing masked: the
  same attention, what an unpadded batch needs);
- ``built``: the all-ones mask, with the mask always built and never read (the attention
  runs with an explicit mask: what a padded batch costs, without the read).

Since 6a940ac a converted model's ``slimfit_sdpa`` builds every given mask unread, so for
the slimfit modes ``ones`` is ``built``; the rows of full fine-tuning (``"sdpa"``) still
show transformers' read.

Plus fused SDPA forward + backward alone (CUDA events) at the workloads' shapes, with no
mask and with an explicit all-True mask.

    PYTHONPATH=src python benchmarks/mask_sync_gpu.py --workload bert-base-seqcls,bert-base-qa

Writes ``mask_sync.json`` into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import torch
import torch.nn.functional as F

from slimfit.bench.env import collect
from slimfit.bench.measure import DeviceMemory
from slimfit.bench.modes import get_modes
from slimfit.bench.runner import BenchSettings, _release, trainer_and_batch
from slimfit.bench.workloads import get_workload, load_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_rounds_gpu import round_ms, summarize  # noqa: E402 - a sibling script

_BUILD = {"on": False}  # read by the mask builders registered below


def _always_build_when_on() -> None:
    """Re-register the SDPA mask builders so that, while ``_BUILD['on']``, they build the
    mask instead of reading it to decide whether to skip it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for name in ("sdpa", "slimfit_sdpa"):
        if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            continue
        original = ALL_MASK_ATTENTION_FUNCTIONS[name]

        def builder(*args, original=original, **kwargs):
            if _BUILD["on"]:
                kwargs["allow_is_bidirectional_skip"] = False
            return original(*args, **kwargs)

        AttentionMaskInterface.register(name, builder)


def _sdpa_ms(batch: int, seq: int, heads: int = 12, dim: int = 64, reps: int = 20) -> dict:
    q, k, v = (
        torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    g = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, mask in (
        ("no mask", None),
        ("all-True mask", torch.ones(batch, 1, seq, seq, dtype=torch.bool, device="cuda")),
    ):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(g)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(g)
        end.record()
        torch.cuda.synchronize()
        out[name] = start.elapsed_time(end) / reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="bert-base-seqcls,bert-base-qa")
    ap.add_argument("--mode", default="full,slimfit")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--freeze-ratio", type=float, default=0.9)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/mask-sync"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    mem = DeviceMemory(dev)
    result = {
        "command": "python benchmarks/mask_sync_gpu.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "env": collect(dev),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "workloads": {},
    }
    for wname in args.workload.split(","):
        w = get_workload(wname)
        s = BenchSettings(args.batch_size, w.seq_len, args.steps, 3, dev,
                          freeze_ratio=args.freeze_ratio, attention_mask="ones")  # fmt: skip
        modes = get_modes(args.mode.split(","))
        trainers = {m.name: trainer_and_batch(w, load_config(w, "base"), m, s, mem) for m in modes}
        _always_build_when_on()  # after the trainers: slimfit registered its attention
        runs = {}
        for name, (tr, batch) in trainers.items():
            unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
            runs[f"{name}, ones"] = (tr, batch, False)
            runs[f"{name}, none"] = (tr, unmasked, False)
            runs[f"{name}, built"] = (tr, batch, True)
        for tr, batch, build in runs.values():
            _BUILD["on"] = build
            for _ in range(5):
                tr.step(batch)
        rounds: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, (tr, batch, build) in runs.items():
                _BUILD["on"] = build
                rounds[key].append(round_ms(tr, batch, args.steps, mem))
        _BUILD["on"] = False
        for tr, _batch in trainers.values():
            _release(tr)
        del trainers, runs
        mem.free()
        first = next(iter(rounds))
        summary = summarize(rounds, "ratio_to_full_ones")
        sdpa = _sdpa_ms(args.batch_size, w.seq_len)
        result["workloads"][wname] = {"rounds": rounds, "summary": summary, "sdpa_fwd_bwd_ms": sdpa}
        print(f"{wname}: batch {args.batch_size}, {args.rounds} rounds of {args.steps} steps")
        for key, r in summary.items():
            print(f"  {key:18} min {r['min_ms']:7.2f} ms  median {r['median_ms']:7.2f} ms  "
                  f"x{first} {r['ratio_to_full_ones']:.3f}")  # fmt: skip
        print("  SDPA fwd+bwd alone: " + ", ".join(f"{k} {v:.3f} ms" for k, v in sdpa.items()))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mask_sync.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
