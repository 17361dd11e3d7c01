"""Predicted peak memory of `slimfit-recompute` (slimfit with ``attention_recompute=True``:
Q, K, V rebuilt in backward from the int8 code of the LayerNorm before them) next to
`slimfit` and `ckpt`, at freeze 0.95 and 0.90, batch 128. Run from the repository root
(CPU, about two minutes):

    PYTHONPATH=src python benchmarks/results/plan/freeze-0.90-vs-0.95/attention_recompute.py OUT.json
"""

import json
import sys

from slimfit import plan

rows = []
for workload in ("bert-base-seqcls", "bert-base-qa", "vit-base"):
    work = plan.resolve_workload(workload)
    ckpt = plan.simulate(work, "ckpt", 128).peak_bytes
    for ratio in (0.95, 0.9):
        row = {"workload": workload, "freeze_ratio": ratio, "ckpt": round(ckpt / 2**30, 3)}
        for mode in ("slimfit", "slimfit-recompute"):
            row[mode] = round(
                plan.simulate(work, mode, 128, freeze_ratio=ratio).peak_bytes / 2**30, 3
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
