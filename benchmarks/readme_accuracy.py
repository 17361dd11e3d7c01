"""The README's accuracy table, generated from committed accuracy results (never typed in).

python benchmarks/readme_accuracy.py benchmarks/results/<run>/accuracy-<task>.json --write README.md
python benchmarks/readme_accuracy.py ... --check README.md   # exit 1 when out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import best_full, peak_mib  # noqa: E402

from slimfit.bench.readme_blocks import main  # noqa: E402


def table(paths: list[str]) -> str:
    lines = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta, summary = data["meta"], data["summary"]
        # against the best-tuned plain full fine-tuning of the sweep
        full = best_full(summary)["test_mean"]
        # the score each run actually used (recorded per run where the sweep kept it)
        used = {
            r["variant"]: r["slimfit_config"].get("score")
            for r in data.get("runs", [])
            if isinstance(r.get("slimfit_config"), dict)
        }
        s0 = meta["settings"]
        task = s0.get("task") or Path(path).stem.removeprefix("accuracy-")
        length = f", max length {s0['max_length']}" if s0.get("max_length") else ""
        lines += [
            f"{task}: {s0['epochs']:g} epochs unless the table says otherwise, batch {s0['batch_size']}{length}, "
            f"{s0['precision']}, seeds {s0['seeds']}; {meta['device']}; from `{path}`.",
            "",
            "| variant | policy | freeze | lr | epochs | score | compression "
            "| test acc. mean ± std (%) | vs best full (pts) | peak alloc (MiB) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in sorted(summary, key=lambda s: -(s["test_mean"] or 0)):
            o = s["overrides"]
            extra = o.get("slimfit", {})
            policy = "lora" if "lora" in o else o.get("policy")
            score = "-"
            if policy in ("ils", "random"):
                # runs that did not record their config used SlimFitConfig's default then
                score = extra.get("score") or used.get(s["variant"]) or "default"
                if policy == "random":
                    score = "-"
            if "max_stale_steps" in extra:
                score += f", max stale {extra['max_stale_steps']}"
            # the LoRA baseline never compresses (slimfit.train.build_slimfit)
            compression = (
                "none" if policy == "lora" else {**o, **extra}.get("compression", "default")
            )
            if isinstance(compression, dict):  # the default preset with some fields changed
                compression = "default, " + ", ".join(f"{k}={v}" for k, v in compression.items())
            lines.append(
                f"| {s['variant']} | {policy} | {o.get('freeze_ratio', '-')} | {o.get('lr')} | "
                f"{o.get('epochs', s0['epochs']):g} | {score} | {compression} | "
                f"{s['test_mean']:.2f} ± {s['test_std']:.2f} | {s['test_mean'] - full:+.2f} | "
                f"{peak_mib(s.get('peak_memory_gib'))} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main("accuracy", __doc__, table))
