"""Accuracy benchmark: fine-tuning policies side by side, several seeds, on one GPU.

Every (variant, seed) job is one `slimfit.train.finetune` run; jobs run in parallel worker
processes (a small model leaves the GPU mostly idle, so several runs share it). Writes
`accuracy.json` (every run) and `accuracy.md` (mean and std per variant) to --out.

    python benchmarks/accuracy.py --task sentiment --model PATH --data-dir DIR \
        --grid explore --seeds 0,1,2 --workers 8 --out results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

# name -> TrainConfig overrides; "slimfit" holds extra SlimFitConfig fields.
GRIDS = {
    "explore": {
        "full": {"policy": "none", "lr": 5e-5},
        "ils90-paper": {
            "policy": "ils",
            "freeze_ratio": 0.9,
            "lr": 5e-5,
            "slimfit": {"score": "relative"},
        },
        "ils95-paper": {
            "policy": "ils",
            "freeze_ratio": 0.95,
            "lr": 5e-5,
            "slimfit": {"score": "relative"},
        },
        "ils90-lr2e-4": {
            "policy": "ils",
            "freeze_ratio": 0.9,
            "lr": 2e-4,
            "slimfit": {"score": "relative"},
        },
        "ils95-lr2e-4": {
            "policy": "ils",
            "freeze_ratio": 0.95,
            "lr": 2e-4,
            "slimfit": {"score": "relative"},
        },
        "ils95-lr4e-4": {
            "policy": "ils",
            "freeze_ratio": 0.95,
            "lr": 4e-4,
            "slimfit": {"score": "relative"},
        },
        "ils90-norm-lr2e-4": {
            "policy": "ils",
            "freeze_ratio": 0.9,
            "lr": 2e-4,
            "slimfit": {"score": "normalized"},
        },
        "ils95-norm-lr2e-4": {
            "policy": "ils",
            "freeze_ratio": 0.95,
            "lr": 2e-4,
            "slimfit": {"score": "normalized"},
        },
        "ils90-stale20-lr2e-4": {
            "policy": "ils",
            "freeze_ratio": 0.9,
            "lr": 2e-4,
            "slimfit": {"score": "relative", "max_stale_steps": 20},
        },
        "ils95-stale40-lr2e-4": {
            "policy": "ils",
            "freeze_ratio": 0.95,
            "lr": 2e-4,
            "slimfit": {"score": "relative", "max_stale_steps": 40},
        },
        "random90-lr2e-4": {"policy": "random", "freeze_ratio": 0.9, "lr": 2e-4},
        "random95-lr2e-4": {"policy": "random", "freeze_ratio": 0.95, "lr": 2e-4},
    },
}


# Accuracy parity: plain full fine-tuning (no compression) swept over learning rates as the
# reference, SlimFit with its default compression (and once without), random freezing.
_PLAIN = {"compression": "none"}


def _frozen(policy: str, lr: float, ratio: float = 0.9, **slimfit) -> dict:
    """A freezing variant; ``slimfit``: further SlimFitConfig fields (explore, exclude, a
    compression dict, ...)."""
    return {
        "policy": policy,
        "freeze_ratio": ratio,
        "lr": lr,
        **({"slimfit": slimfit} if slimfit else {}),
    }


GRIDS["parity"] = {
    "full-lr5e-5": {"policy": "none", "lr": 5e-5, **_PLAIN},
    "full-lr1e-4": {"policy": "none", "lr": 1e-4, **_PLAIN},
    "full-lr2e-4": {"policy": "none", "lr": 2e-4, **_PLAIN},
    "ils90-lr2e-4": {"policy": "ils", "freeze_ratio": 0.9, "lr": 2e-4},
    "ils90-lr4e-4": {"policy": "ils", "freeze_ratio": 0.9, "lr": 4e-4},
    "ils90-lr2e-4-plain": {"policy": "ils", "freeze_ratio": 0.9, "lr": 2e-4, **_PLAIN},
    "ils95-lr4e-4": {"policy": "ils", "freeze_ratio": 0.95, "lr": 4e-4},
    "random90-lr2e-4": {"policy": "random", "freeze_ratio": 0.9, "lr": 2e-4},
    "random90-lr4e-4": {"policy": "random", "freeze_ratio": 0.9, "lr": 4e-4},
}


# Follow-up on trec: higher learning rates for the freezing policies.
GRIDS["trec-lr"] = {
    "full-lr1e-4": {"policy": "none", "lr": 1e-4, **_PLAIN},
    "ils90-lr8e-4": {"policy": "ils", "freeze_ratio": 0.9, "lr": 8e-4},
    "ils90-lr1.6e-3": {"policy": "ils", "freeze_ratio": 0.9, "lr": 1.6e-3},
    "random90-lr8e-4": {"policy": "random", "freeze_ratio": 0.9, "lr": 8e-4},
}

# Which units ILS starves (trec): with the normalized score the word embeddings train ~96%
# of steps (sparse rows: their relative update grows after the first step), so they hold
# one of the few trained slots; some dense units never come back.
GRIDS["trec-ils"] = {
    "ils90-lr4e-4": {"policy": "ils", "freeze_ratio": 0.9, "lr": 4e-4},
    "ils90-lr4e-4-emb-always": _frozen("ils", 4e-4, exclude=r"embeddings\.word_embeddings"),
    "ils90-lr4e-4-stale20": _frozen("ils", 4e-4, max_stale_steps=20),
    "random90-lr4e-4": {"policy": "random", "freeze_ratio": 0.9, "lr": 4e-4},
}

# The update budget: with 90% of units frozen each unit trains in ~10% of the steps. Same
# learning rate and decay, twice the epochs (so twice the steps and the time).
GRIDS["epochs"] = {
    "full-lr1e-4": GRIDS["parity"]["full-lr1e-4"],
    "ils90-lr4e-4-6ep": {"policy": "ils", "freeze_ratio": 0.9, "lr": 4e-4, "epochs": 6},
    "random90-lr4e-4-6ep": {"policy": "random", "freeze_ratio": 0.9, "lr": 4e-4, "epochs": 6},
    "ils90-lr2e-4-6ep": {"policy": "ils", "freeze_ratio": 0.9, "lr": 2e-4, "epochs": 6},
    "ils90-lr4e-4-9ep": {"policy": "ils", "freeze_ratio": 0.9, "lr": 4e-4, "epochs": 9},
}

# ILS with exploration: part of the trained slots drawn at random from the units the
# scores would freeze (random freezing beat ILS on trec at 6 epochs).
GRIDS["explore"] = {
    "full-lr1e-4": GRIDS["parity"]["full-lr1e-4"],
    "ils90-lr4e-4": GRIDS["parity"]["ils90-lr4e-4"],
    "ils90-lr4e-4-explore0.25": _frozen("ils", 4e-4, explore=0.25),
    "ils90-lr4e-4-explore0.5": _frozen("ils", 4e-4, explore=0.5),
    "random90-lr4e-4": GRIDS["parity"]["random90-lr4e-4"],
}

# The rest of issue 5's table on the text tasks: freeze 0.95 and LoRA (peft, r=8 on
# query/value, head trained, no compression; as vision's lora-r8-lr1e-3).
GRIDS["ratios-lora"] = {
    "full-lr1e-4": GRIDS["parity"]["full-lr1e-4"],
    "ils90-lr4e-4": GRIDS["parity"]["ils90-lr4e-4"],
    "random90-lr4e-4": GRIDS["parity"]["random90-lr4e-4"],
    "ils95-lr4e-4": GRIDS["parity"]["ils95-lr4e-4"],
    "random95-lr4e-4": {"policy": "random", "freeze_ratio": 0.95, "lr": 4e-4},
    "lora-r8-lr1e-3": {"policy": "none", "lr": 1e-3, "lora": {}},
    "lora-r8-lr5e-4": {"policy": "none", "lr": 5e-4, "lora": {}},
}

# The default preset rebuilds Q, K, V from their LayerNorm's int8 code in backward (since
# 2026-11-23-freeze-0.90-recompute-h100); against keeping their int8 codes, same run.
GRIDS["recompute-ab"] = {
    "full-lr1e-4": GRIDS["parity"]["full-lr1e-4"],
    "ils90-lr4e-4": GRIDS["parity"]["ils90-lr4e-4"],
    "ils90-lr4e-4-qkv-codes": _frozen("ils", 4e-4, compression={"attention_recompute": False}),
}

# The units' learning rate apart from the rest: a freezing policy trains each unit in ~10%
# of the steps and takes a larger step (4e-4), but the task head and the biases train at
# every step, as in full fine-tuning, whose best lr is 1e-4: give them that one.
GRIDS["unit-lr"] = {
    "full-lr1e-4": GRIDS["parity"]["full-lr1e-4"],
    "ils90-lr4e-4": GRIDS["parity"]["ils90-lr4e-4"],
    "ils90-lr1e-4-units4e-4": {**_frozen("ils", 1e-4), "units": {"lr": 4e-4}},
    "random90-lr1e-4-units4e-4": {**_frozen("random", 1e-4), "units": {"lr": 4e-4}},
    "ils90-lr1e-4-units8e-4": {**_frozen("ils", 1e-4), "units": {"lr": 8e-4}},
}

# The word embeddings train in ~96% of ILS's steps on trec (../results/2026-11-23-trec-ils-cpu)
# at the freezing policies' 4e-4, four times full fine-tuning's best lr: give them 1e-4.
GRIDS["unit-lr"]["ils90-lr4e-4-emb1e-4"] = {
    **_frozen("ils", 4e-4),
    "units": {"match": r"word_embeddings", "lr": 1e-4},
}
GRIDS["unit-lr"]["ils90-lr4e-4-emb2e-4"] = {
    **_frozen("ils", 4e-4),
    "units": {"match": r"word_embeddings", "lr": 2e-4},
}

# The pooler (dense + tanh on the first token) feeds the classifier directly: in full
# fine-tuning it trains at every step like the head, under ILS on trec in ~9% of the steps
# (../results/2026-11-23-trec-ils-cpu). One d x d unit on a (batch, d) input: training it
# always costs next to no memory.
GRIDS["pooler"] = {
    "ils90-lr4e-4": GRIDS["parity"]["ils90-lr4e-4"],
    # 0.905 of the 52 units left once the pooler is out freezes int(0.905 * 52) = 47, the
    # same count as 0.9 of all 53 (MiniLM-L6): the pooler takes no trained slot.
    "ils90-lr4e-4-pooler-always": _frozen("ils", 4e-4, 0.905, exclude=r"(^|\.)pooler\."),
    "ils90-lr2e-4-pooler-always": _frozen("ils", 2e-4, 0.905, exclude=r"(^|\.)pooler\."),
    "random90-lr4e-4": GRIDS["parity"]["random90-lr4e-4"],
    "random90-lr4e-4-pooler-always": _frozen("random", 4e-4, 0.905, exclude=r"(^|\.)pooler\."),
}

# Stale momentum: a unit that trains again after k frozen steps resumes with a first moment
# averaged over its last trained steps, which may lie ~100 global steps back; a smaller
# beta1 for the units keeps their update closer to the current gradient.
GRIDS["unit-betas"] = {
    "ils90-lr4e-4": GRIDS["parity"]["ils90-lr4e-4"],
    "ils90-lr4e-4-units-beta1-0.5": {**_frozen("ils", 4e-4), "units": {"betas": (0.5, 0.999)}},
    "ils90-lr4e-4-units-beta1-0": {**_frozen("ils", 4e-4), "units": {"betas": (0.0, 0.999)}},
    "random90-lr4e-4-units-beta1-0.5": {
        **_frozen("random", 4e-4),
        "units": {"betas": (0.5, 0.999)},
    },
}

# Warm-up before freezing (REFERENCE.md's calibration names it): the first steps train every
# unit, then ILS freezes 90%. trec at batch 32 runs 405 steps; 40 steps is ~10% of them.
# During the warm-up every linear keeps its (int8) input, so those steps peak higher.
GRIDS["warmup"] = {
    name: {"policy": policy, "freeze_ratio": 0.9, "lr": lr, "freeze_warmup_steps": warm}
    for name, policy, lr, warm in [
        ("ils90-lr4e-4-warm40", "ils", 4e-4, 40),
        ("ils90-lr2e-4-warm40", "ils", 2e-4, 40),
        ("ils90-lr4e-4-warm80", "ils", 4e-4, 80),
        ("random90-lr4e-4-warm40", "random", 4e-4, 40),
    ]
}


def pin_score(grids: dict, score: str) -> None:
    """Give every ILS variant of ``grids`` that names no score this one (in place).

    Grids written before the taylor default (2026-12-03) ran the normalized score without
    naming it (each committed run's slimfit_config says so); both sweep scripts pin them
    before any grid of the taylor era is defined, so that re-running one reproduces its
    committed results."""
    for grid in grids.values():
        for v in grid.values():
            if v.get("policy") == "ils" and "score" not in v.get("slimfit", {}):
                v["slimfit"] = {**v.get("slimfit", {}), "score": score}


pin_score(GRIDS, "normalized")  # every grid above is from before the taylor default

# The score itself: ILS with the first-order loss decrease of each unit's update
# (``score="taylor"``) instead of its (normalized) relative change, which under AdamW is
# about the same for every unit and leaves ILS close to random freezing.
GRIDS["score"] = {
    "ils90-lr4e-4": GRIDS["parity"]["ils90-lr4e-4"],
    "ils90-lr4e-4-taylor": _frozen("ils", 4e-4, score="taylor"),
    "ils90-lr2e-4-taylor": _frozen("ils", 2e-4, score="taylor"),
    "ils90-lr4e-4-taylor-pooler-always": _frozen(
        "ils", 4e-4, 0.905, score="taylor", exclude=r"(^|\.)pooler\."
    ),
}

# The taylor score against full fine-tuning, the normalized score and random freezing,
# on the GPU (default compression), at freeze 0.90 and 0.95. Grids written before
# 2026-12-03 name no score: they ran the default of their day, normalized (each run's
# slimfit_config records the score it used).
GRIDS["taylor"] = {
    "full-lr1e-4": GRIDS["parity"]["full-lr1e-4"],
    "ils90-lr4e-4-normalized": _frozen("ils", 4e-4, score="normalized"),
    "ils90-lr2e-4-taylor": GRIDS["score"]["ils90-lr2e-4-taylor"],
    "ils90-lr4e-4-taylor": GRIDS["score"]["ils90-lr4e-4-taylor"],
    "ils95-lr2e-4-taylor": _frozen("ils", 2e-4, 0.95, score="taylor"),
    "random90-lr4e-4": GRIDS["parity"]["random90-lr4e-4"],
}

# Closing the taylor score's last gap on trec (2026-12-03-taylor-score-h200: 0.31 below full
# at lr 4e-4, with a seed spread 7x full's): the lr around 4e-4, a warm-up, a cap on
# staleness, freeze 0.95, and random freezing at taylor's lr.
GRIDS["taylor-tune"] = {
    "full-lr1e-4": GRIDS["parity"]["full-lr1e-4"],
    "ils90-lr4e-4-taylor": GRIDS["taylor"]["ils90-lr4e-4-taylor"],
    "ils90-lr3e-4-taylor": _frozen("ils", 3e-4, score="taylor"),
    "ils90-lr6e-4-taylor": _frozen("ils", 6e-4, score="taylor"),
    "ils90-lr4e-4-taylor-warm40": {
        **_frozen("ils", 4e-4, score="taylor"),
        "freeze_warmup_steps": 40,
    },
    "ils90-lr4e-4-taylor-stale50": _frozen("ils", 4e-4, score="taylor", max_stale_steps=50),
    "ils95-lr4e-4-taylor": _frozen("ils", 4e-4, 0.95, score="taylor"),
    "random90-lr2e-4": GRIDS["parity"]["random90-lr2e-4"],
}

# Does the word embedding (the largest unit, so favoured by the summed taylor score; on
# trec it trains in 3 of 4 steps) spend trained slots better left to the encoder?
GRIDS["taylor-embed"] = {
    "full-lr1e-4": GRIDS["parity"]["full-lr1e-4"],
    "ils90-lr4e-4-taylor": GRIDS["taylor"]["ils90-lr4e-4-taylor"],
    # frozen for the whole run
    "ils90-lr4e-4-taylor-embfrozen": _frozen("ils", 4e-4, score="taylor", frozen="word_embeddings"),
    # not a unit: trained at every step
    "ils90-lr4e-4-taylor-embtrained": _frozen(
        "ils", 4e-4, score="taylor", units=r"^(?!.*word_embeddings).*weight$"
    ),
}

# A bound of 400 steps on how long a unit stays frozen gained +0.14 points (paired over 10
# seeds) on Fashion-MNIST at 24 epochs (2026-12-04-vision-epochs24-seeds-h200): does it cost
# anything on the text tasks, each at its best lr (trec 4e-4, sentiment 2e-4)?
GRIDS["taylor-stale400"] = {
    "ils90-lr4e-4-taylor": GRIDS["taylor"]["ils90-lr4e-4-taylor"],
    "ils90-lr4e-4-taylor-stale400": _frozen("ils", 4e-4, score="taylor", max_stale_steps=400),
    "ils90-lr2e-4-taylor": GRIDS["taylor"]["ils90-lr2e-4-taylor"],
    "ils90-lr2e-4-taylor-stale400": _frozen("ils", 2e-4, score="taylor", max_stale_steps=400),
}


def pin_sync_scores(grids: dict) -> None:
    """Every ILS variant of ``grids`` that does not say otherwise reports its scores at once
    (``async_scores=False``, the scheduler of every run before 2026-12-06), in place."""
    for grid in grids.values():
        for v in grid.values():
            if v.get("policy") == "ils" and "async_scores" not in v.get("slimfit", {}):
                v["slimfit"] = {**v.get("slimfit", {}), "async_scores": False}


pin_sync_scores(GRIDS)  # every grid above is from before async_scores

# Scores reported one step late (async_scores: the optimizer step never waits for the
# device) against at once, each task at its best lr (trec 4e-4, sentiment 2e-4).
GRIDS["async-scores"] = {
    "ils90-lr4e-4-taylor": GRIDS["taylor"]["ils90-lr4e-4-taylor"],
    "ils90-lr4e-4-taylor-async": _frozen("ils", 4e-4, score="taylor", async_scores=True),
    "ils90-lr2e-4-taylor": GRIDS["taylor"]["ils90-lr2e-4-taylor"],
    "ils90-lr2e-4-taylor-async": _frozen("ils", 2e-4, score="taylor", async_scores=True),
}


def _settings(overrides: dict) -> dict:
    return {**overrides, **overrides.get("slimfit", {})}


def best_full(summary: list[dict]) -> dict | None:
    """The reference: the best full fine-tuning variant without compression (else any full)."""
    full = [
        s
        for s in summary
        if s["overrides"].get("policy") == "none"
        and "lora" not in s["overrides"]
        and s["test_mean"]
    ]
    plain = [s for s in full if _settings(s["overrides"]).get("compression") == "none"]
    return max(plain or full, key=lambda s: s["test_mean"], default=None)


def run_job(job: dict) -> dict:
    from slimfit.train import TrainConfig, finetune

    overrides = dict(job["overrides"])
    extra = {"slimfit": overrides.pop("slimfit", {})}
    if "lora" in overrides:  # the peft LoRA baseline: LoraConfig overrides
        extra["lora"] = overrides.pop("lora")
    if "units" in overrides:  # the freezable units' own AdamW options (lr, betas)
        extra["unit_options"] = overrides.pop("units")
    epochs = overrides.pop("epochs", job["epochs"])  # a variant may train longer
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            model=job["model"],
            task=job["task"],
            seed=job["seed"],
            epochs=epochs,
            batch_size=job["batch_size"],
            max_length=job["max_length"],
            precision=job["precision"],
            device=job["device"],
            data_dir=job["data_dir"],
            output_dir=tmp,
            extra=extra,
            **overrides,
        )
        try:
            m = finetune(cfg, progress=False)
        except Exception as err:  # record the failure, keep the sweep going
            return {**job, "error": f"{type(err).__name__}: {err}"}
    metric = m["metric"]
    return {
        **job,
        "metric": metric,
        "dev": m[f"dev_{metric}"],
        "test": m[f"test_{metric}"],
        "steps": m["steps"],
        "train_loss_last50": m["train_loss_last50"],
        "wall_time_s": m["wall_time_s"],
        "peak_memory_bytes": m["peak_memory_bytes"],
        "lr": m["learning_rate"],
        "slimfit_config": m["slimfit"],
        "trained_steps_per_unit": m["trained_steps_per_unit"],
        "versions": m["versions"],
        "device_name": m["device"],
    }


def summarize(runs: list[dict]) -> list[dict]:
    rows = {}
    for r in runs:
        rows.setdefault(r["variant"], []).append(r)
    out = []
    for name, rs in rows.items():
        ok = [r for r in rs if "error" not in r]
        tests = [100 * r["test"] for r in ok]
        devs = [100 * r["dev"] for r in ok]
        out.append(
            {
                "variant": name,
                "overrides": rs[0]["overrides"],
                "runs": len(ok),
                "errors": [r["error"] for r in rs if "error" in r],
                "test_mean": statistics.mean(tests) if tests else None,
                "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "dev_mean": statistics.mean(devs) if devs else None,
                "tests": tests,
                "wall_time_s": statistics.mean(r["wall_time_s"] for r in ok) if ok else None,
                "peak_memory_gib": max((r["peak_memory_bytes"] or 0) for r in ok) / 2**30
                if ok
                else None,
            }
        )
    return out


def peak_mib(gib: float | None) -> str:
    # max_memory_allocated of the job's process; "-" where a run did not record it (CPU)
    return f"{gib * 1024:.0f}" if gib else "-"


def write_report(out: str, meta: dict, runs: list[dict]) -> str:
    """Write ``accuracy-<task>.json`` (meta, summary, every run) and ``accuracy-<task>.md``;
    return the markdown."""
    task, model = meta["settings"]["task"], meta["settings"]["model"]
    summary = summarize(runs)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"accuracy-{task}.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
    full_row = best_full(summary)
    full = full_row["test_mean"] if full_row else None
    lines = [
        f"# Accuracy: {task}, {model} ({meta['device']}, {meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
        *(f"- merged from `{c}`" for c in meta.get("merged_commands", [])),
        *([""] if meta.get("merged_commands") else []),
        f"Versions: {meta['versions']}. Settings: {meta['settings']}.",
        "",
        "| variant | settings | runs | test mean (%) | std | vs full (pts) | dev mean (%) | wall (s) "
        "| peak alloc (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if s["test_mean"] is None:
            lines.append(
                f"| {s['variant']} | {s['overrides']} | 0 | error: {s['errors'][:1]} | | | | | |"
            )
            continue
        delta = f"{s['test_mean'] - full:+.2f}" if full is not None else ""
        lines.append(
            f"| {s['variant']} | `{json.dumps(s['overrides'])}` | {s['runs']} | {s['test_mean']:.2f} | "
            f"{s['test_std']:.2f} | {delta} | {s['dev_mean']:.2f} | {s['wall_time_s']:.0f} | "
            f"{peak_mib(s.get('peak_memory_gib'))} |"
        )
    lines += [
        "",
        "Activation compression: the `default` preset on CUDA unless a variant says "
        '`"compression": "none"`. `vs full` is against the best plain full fine-tuning run'
        + (f" (`{full_row['variant']}`)." if full_row else ".")
        + " Peak alloc: the largest `torch.cuda.max_memory_allocated` over a variant's runs "
        "(model, optimizer state, activations; jobs shared the GPU in worker processes).",
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, f"accuracy-{task}.md"), "w") as f:
        f.write(text)
    return text


def merge(paths: list[str], variants: list[str] | None) -> tuple[dict, list[dict]]:
    """The runs of several sweeps of one task and setting (e.g. more seeds of the same
    variants from a later call) as one sweep; fails on anything that would mix settings."""
    metas, runs, seen = [], [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        metas.append(data["meta"])
        for r in data["runs"]:
            if variants is not None and r["variant"] not in variants:
                continue
            key = (r["variant"], r["seed"])
            if key in seen:
                sys.exit(
                    f"{path} repeats variant {key[0]!r} seed {key[1]} of {seen[key]}; merge sweeps of different seeds."
                )
            seen[key] = path
            runs.append(r)
    fixed = ("task", "epochs", "batch_size", "max_length", "precision")
    for m, path in zip(metas[1:], paths[1:]):
        diff = [k for k in fixed if m["settings"].get(k) != metas[0]["settings"].get(k)]
        if diff or m["device"] != metas[0]["device"]:
            sys.exit(
                f"{path} differs from {paths[0]} in {diff or ['device']}; only sweeps of one setting merge."
            )
    for name in {r["variant"] for r in runs}:
        if (
            len({json.dumps(r["overrides"], sort_keys=True) for r in runs if r["variant"] == name})
            > 1
        ):
            sys.exit(f"variant {name!r} has different settings in the merged sweeps; rename one.")
    seeds = sorted({int(r["seed"]) for r in runs})
    meta = {
        **metas[0],
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**metas[0]["settings"], "seeds": ",".join(map(str, seeds))},
        "merged_commands": [m["command"] for m in metas],
        "merged_dates": [m["date"] for m in metas],
        "merged_versions": [m["versions"] for m in metas],
    }
    return meta, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--grid", default="explore", choices=sorted(GRIDS))
    ap.add_argument("--variants", default=None, help="comma-separated subset of the grid")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="write one report from these accuracy-<task>.json of the same setting "
        "(e.g. more seeds from a later call; --variants keeps some) and run nothing",
    )
    args = ap.parse_args()
    if args.merge:
        meta, runs = merge(args.merge, args.variants.split(",") if args.variants else None)
        print(write_report(args.out, meta, runs))
        return

    grid = GRIDS[args.grid]
    names = args.variants.split(",") if args.variants else list(grid)
    unknown = [n for n in names if n not in grid]
    if unknown:
        sys.exit(f"unknown variants {unknown}; the grid {args.grid!r} has {list(grid)}")
    jobs = [
        {
            "variant": name,
            "overrides": grid[name],
            "seed": int(seed),
            "task": args.task,
            "model": args.model,
            "data_dir": args.data_dir,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "precision": args.precision,
            "device": args.device,
        }
        for seed in args.seeds.split(",")
        for name in names
    ]
    runs = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_job, j) for j in jobs]
        for fut in as_completed(futures):
            r = fut.result()
            runs.append(r)
            shown = f"test {100 * r['test']:.2f}" if "error" not in r else r["error"]
            print(f"{r['variant']:<24} seed {r['seed']}: {shown}", flush=True)
    meta = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": next((r["device_name"] for r in runs if "device_name" in r), None),
        "versions": next((r["versions"] for r in runs if "versions" in r), None),
        "settings": {
            k: getattr(args, k)
            for k in ("task", "model", "epochs", "batch_size", "max_length", "precision", "seeds")
        },
    }
    print(write_report(args.out, meta, runs))


if __name__ == "__main__":
    main()
