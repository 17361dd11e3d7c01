"""The README's multi-GPU block, generated from a committed ``ddp_gpu.json`` (never typed in).

python benchmarks/readme_ddp.py benchmarks/results/<run>/ddp_gpu.json --write README.md
python benchmarks/readme_ddp.py ... --check README.md   # exit 1 when out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slimfit.bench.readme_blocks import main


def block(path: str) -> str:
    d = json.loads(Path(path).read_text())
    s, w = d["summary"], d["workload"]
    n = d["world_size"]
    lines = [
        f"| mode | 1 GPU samples/s | {n} GPUs samples/s | scaling | MiB all-reduced per step |",
        "|---|---|---|---|---|",
    ]
    keys = {  # summary label -> (single-GPU result, multi-GPU result)
        "full (plain DDP)": ("full", "ddp_full"),
        "slimfit ILS": ("slimfit", "slimfit"),
        "slimfit ILS overlap": ("slimfit", "slimfit_overlap"),
        "slimfit ILS in DDP(find_unused)": ("slimfit", "slimfit_in_ddp"),
    }
    for label, (one, many) in keys.items():
        lines.append(
            f"| {label} | {d['single'][one]['samples_per_s']:.0f} | "
            f"{d['multi'][many]['samples_per_s']:.0f} | {100 * s[label]['scaling_efficiency']:.1f}% | "
            f"{s[label]['mib_per_step']:.1f} |"
        )
    c = s["curve"]
    v = d["versions"]
    lines += [
        "",
        f"{w['model']}, seq {w['seq']}, batch {w['batch_per_gpu']} per GPU, {w['precision']}, "
        f"freeze {w['freeze_ratio']}; slimfit all-reduces {100 * s['bytes_ratio_vs_ddp']:.1f}% "
        f"of DDP's bytes. Loss over {c['steps']} steps at global batch {n} x "
        f"{w['batch_per_gpu']}: {c['first_loss']:.3f} -> {c['final_loss_1gpu']:.3f} on 1 GPU, "
        f"-> {c['final_loss_ngpu']:.3f} on {n} (identical frozen sets for the first "
        f"{c['steps_with_identical_frozen_set']} steps). {n} x {d['device']}, torch {v['torch']}, "
        f"NCCL {v['nccl']}, {d['date']}; from `{path}`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main("ddp", __doc__, lambda results: "\n".join(block(r) for r in results)))
