"""Regenerate this folder: `slimfit plan` predictions (no GPU) and their comparison with
the H100 baselines of REFERENCE.md.

    python benchmarks/results/plan/make.py            # all modes (slimfit modes are slow)
    python benchmarks/results/plan/make.py --fast     # without the slimfit-* modes

Writes predictions.json, predictions.md and plan_vs_reference.md next to this file.
Measured peaks of new bench runs are compared with `slimfit plan --compare bench.json`
(writes plan_vs_measured.md here).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

from slimfit import plan
from slimfit.bench.reference import REFERENCE_PEAKS_GIB

HERE = Path(__file__).resolve().parent
BATCH = 128


REFERENCE = REFERENCE_PEAKS_GIB  # measured H100 baselines (REFERENCE.md)

# (name in the tables, --model, --task): the bench workloads and two other models, whose
# configs are in configs/ (bench them with `slimfit bench --model <folder>`).
MODELS = [
    ("bert-base-seqcls", "bert-base-seqcls", None),
    ("bert-base-qa", "bert-base-qa", None),
    ("vit-base", "vit-base", None),
    ("minilm-l6 seq-cls", str(HERE / "configs" / "minilm-l6"), "seqcls"),
    ("bert-large seq-cls", str(HERE / "configs" / "bert-large"), "seqcls"),
]


def main() -> int:
    fast = "--fast" in sys.argv
    warnings.simplefilter("ignore")
    transformers.utils.logging.set_verbosity_error()
    modes = [m for m in plan.MODES if not (fast and m.startswith("slimfit"))]
    out = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/results/plan/make.py" + (" --fast" if fast else ""),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "batch_size": BATCH,
        "results": {},
    }
    for name, model, task in MODELS:
        work = plan.resolve_workload(model, None, task)
        out["results"][name] = {}
        for mode in modes:
            t0 = time.perf_counter()
            pred = plan.simulate(work, mode, BATCH)
            rec = pred.to_dict()
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            out["results"][name][mode] = rec
            print(
                f"{name:20s} {mode:16s} {pred.peak_gib:7.2f} GiB  ({rec['seconds']} s)", flush=True
            )
            (HERE / "predictions.json").write_text(json.dumps(out, indent=2) + "\n")

    header = (
        f"Predicted by `slimfit plan` (no GPU; torch {torch.__version__}, transformers "
        f"{transformers.__version__}) on {out['date']}, batch {BATCH}; regenerate with "
        f"`{out['command']}`."
    )
    # predictions.md: every model x mode
    lines = ["# slimfit plan: predicted peak GPU memory (GiB), batch 128", "", header, ""]
    lines.append("| model | " + " | ".join(modes) + " |")
    lines.append("|---|" + "---:|" * len(modes))
    for name in out["results"]:
        cells = [f"{out['results'][name][m]['peak_gib']:.2f}" for m in modes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = sorted(
        {
            f"- {w} / {m}: {n}"
            for w, r in out["results"].items()
            for m, p in r.items()
            for n in p["notes"]
        }
    )
    lines += ["", "Notes:", "", *notes, ""]
    (HERE / "predictions.md").write_text("\n".join(lines) + "\n")

    # plan_vs_reference.md: the baselines measured on the H100
    rows = [
        {
            "workload": w,
            "mode": m,
            "batch_size": BATCH,
            "predicted_gib": out["results"][w][m]["peak_gib"],
            "measured_gib": measured,
        }
        for (w, m), measured in REFERENCE.items()
    ]
    md = [
        "# slimfit plan vs the H100 baselines of REFERENCE.md",
        "",
        header,
        "Measured: /work/shared/REFERENCE.md (H100 80GB, torch 2.11, transformers 5.17, "
        "`torch.cuda.max_memory_allocated` after warm-up, batch 128).",
        "",
        plan.comparison_markdown(rows),
        "Freezing modes are predicted as the largest peak over ILS's first pass over the "
        "units (seed 0); the measured peak is the largest over 20 timed steps.",
        "",
    ]
    (HERE / "plan_vs_reference.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
