"""What training each unit costs at the peak: `slimfit plan`'s simulation, unit by unit.

For each workload (random-init configs, as `slimfit bench` builds them) and one SlimFit mode:

- the predicted peak with every unit frozen (what is left: weights, biases and head,
  their state, the activations frozen units still need);
- for every unit, the peak when it alone trains, and the difference: the unit's gradient,
  its optimizer state (paged back in, in the paged modes) and whatever its training makes
  autograd keep (e.g. a trained linear's int8 input);
- the peak of the most expensive trained set a step can have (the k costliest units, k the
  trained slots at the freeze ratio) against ILS's first pass (each unit once, random
  order: what `slimfit plan` predicts): how much a score that prefers costly units can
  raise the peak.

No GPU: the simulation runs on the meta device or on CPU tensors at batch 1 and 2,
extrapolated (see `slimfit.plan`). Run from the repository root (a few minutes):

    PYTHONPATH=src python benchmarks/unit_memory_cost.py --out runs/unit-memory

Writes ``unit_memory_cost.json`` and ``unit_memory_cost.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys

import torch

from slimfit import plan

MiB = 1024**2

# unit kinds across BERT / ViT naming, for the per-kind summary
KINDS = [
    ("embeddings", r"embeddings\.|cls_token|position_embeddings"),
    ("q/k/v", r"attention\.(self\.)?(query|key|value)\.|(q|k|v)_proj\."),
    ("attention out", r"attention\.output\.dense\.|o_proj\."),
    ("ffn in", r"intermediate\.dense\.|mlp\.fc1\.|fc1\."),
    ("ffn out", r"(^|\.)output\.dense\.|mlp\.fc2\.|fc2\."),
    ("norm gain", r"(layer_?norm|LayerNorm|norm)[^.]*\.weight$"),
    ("other", r"."),
]


def kind_of(name: str) -> str:
    return next(k for k, pattern in KINDS if re.search(pattern, name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="bert-base-seqcls,bert-base-qa,vit-base")
    ap.add_argument("--mode", default="slimfit", choices=sorted(plan.FREEZE_MODES))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--freeze-ratio", type=float, default=0.9)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/unit-memory"))
    args = ap.parse_args()
    result = {
        "command": "python benchmarks/unit_memory_cost.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": vars(args) | {"out": None},
        "workloads": {},
    }
    md = [
        f"# Peak cost of training each unit ({args.mode}, batch {args.batch_size}, "
        f"freeze {args.freeze_ratio}; `slimfit plan` simulation)\n"
    ]
    for wname in args.workload.split(","):
        work = plan.resolve_workload(wname)
        names = plan.unit_names(work)
        k = len(names) - int(args.freeze_ratio * len(names))

        def peak(trained, work=work):
            pred = plan.simulate(
                work, args.mode, args.batch_size, args.freeze_ratio, trained=tuple(trained)
            )
            return pred.peak_bytes

        base = peak(())
        first_pass = plan.simulate(work, args.mode, args.batch_size, args.freeze_ratio)
        costs = {n: peak((n,)) - base for n in names}
        costly = sorted(names, key=lambda n: -costs[n])[:k]
        worst = peak(costly)
        by_kind: dict[str, list[int]] = {}
        for n, c in costs.items():
            by_kind.setdefault(kind_of(n), []).append(c)
        w = {
            "units": len(names),
            "trained_slots": k,
            "peak_all_frozen_bytes": base,
            "peak_ils_first_pass_bytes": first_pass.peak_bytes,
            "peak_costliest_slots_bytes": worst,
            "costliest_units": costly,
            "unit_cost_bytes": costs,
            "kind_mean_cost_bytes": {kk: sum(v) // len(v) for kk, v in by_kind.items()},
        }
        result["workloads"][wname] = w
        md += [
            f"\n## {wname}: {len(names)} units, {k} trained per step\n",
            f"- peak, every unit frozen: {base / MiB:.0f} MiB",
            f"- peak, ILS's first pass (each unit once, random order; `slimfit plan`): "
            f"{first_pass.peak_bytes / MiB:.0f} MiB",
            f"- peak, the {k} costliest units trained together: {worst / MiB:.0f} MiB "
            f"({', '.join(costly)})\n",
            "| unit kind | units | mean cost (MiB) | max cost (MiB) |",
            "|---|---|---|---|",
        ]
        for kk, v in sorted(by_kind.items(), key=lambda kv: -max(kv[1])):
            md.append(f"| {kk} | {len(v)} | {sum(v) / len(v) / MiB:.1f} | {max(v) / MiB:.1f} |")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "unit_memory_cost.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "unit_memory_cost.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        print("\n".join(md[-(8 + len(by_kind)) :]), flush=True)


if __name__ == "__main__":
    main()
