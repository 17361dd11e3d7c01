"""`slimfit report RUN_DIR`: a run's schedule and metrics as figures and a summary.

Reads from the run directory:

- ``schedule.jsonl`` (required): one ``{"step", "frozen": [...], "trained": [...]}`` per
  optimizer step (``slimfit finetune`` / ``SlimFit.add_step_callback``);
- ``metrics.json`` (optional): the run's final metrics; a ``"memory"`` dict with
  ``weights_bytes``, ``gradients_bytes``, ``optimizer_bytes``,
  ``static_activations_bytes``, ``dynamic_activations_bytes`` (and ``peak_bytes``) is drawn
  as measured; otherwise the breakdown is predicted by :mod:`slimfit.plan` for the run's
  model and settings and labelled so;
- ``train_log.jsonl`` (optional): one JSON object per logging step with at least
  ``step`` and ``loss``; any of ``lr``, ``accuracy``/``eval_*``/``dev_*`` keys are drawn too.

Writes into the run directory: ``schedule_heatmap.png`` (units x steps, trained or frozen,
block boundaries marked), ``trained_per_block.png`` (trained fraction per transformer
block over time), ``memory_breakdown.png``, ``training_curves.png`` (when there is a log)
and ``report.md``. :func:`make_report` returns their paths.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .units import block_of

GiB = 2**30

# The most step columns a figure shows; longer runs are binned (mean over each bin).
MAX_COLUMNS = 400

_EMBED = re.compile(r"embed|patch|cls_token|pos_embed|position|wte|wpe|word_|token_type")

MEMORY_PARTS = (
    ("weights", "weights_bytes", "#4c72b0"),
    ("gradients", "gradients_bytes", "#dd8452"),
    ("optimizer state", "optimizer_bytes", "#8172b3"),
    ("static activations", "static_activations_bytes", "#55a868"),
    ("dynamic activations", "dynamic_activations_bytes", "#c44e52"),
    ("transient / other", "transient_bytes", "#b0b0b0"),
)


# Metrics that are fractions of examples (shown as percent); the others (matthews,
# pearson, spearman) are correlation coefficients in [-1, 1], shown as they are.
PERCENT_METRICS = ("accuracy", "f1", "exact")
_METRIC_NAMES = ("accuracy", "matthews", "f1", "pearson", "spearman", "exact")


def is_percent_metric(name: str) -> bool:
    return any(k in name for k in PERCENT_METRICS)


def format_metric(name: str, value) -> str:
    """``value`` of metric ``name`` for a summary: ``85.00%`` for accuracy and F1, ``0.8512``
    for a correlation (a pearson of 0.85 is no 85% of anything), ``n/a`` for NaN/None."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}%" if is_percent_metric(name) else f"{value:.4f}"


def format_metrics(split: dict, metric: str, extra: tuple[str, ...] | list[str] = ()) -> str:
    """The primary metric of one split, then the others in parentheses:
    ``0.8512 (spearman 0.8433)``."""
    text = format_metric(metric, split.get(metric))
    others = [f"{m} {format_metric(m, split.get(m))}" for m in extra if m in split]
    return f"{text} ({', '.join(others)})" if others else text


# ----------------------------------------------------------------------------------------
# reading a run
def read_schedule(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(unit names in model order, steps, trained matrix [units, steps] of bool)."""
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
                frozen, trained = list(rec.get("frozen", [])), list(rec.get("trained", []))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{path}:{lineno} is not a schedule record like "
                    '{"step": 0, "frozen": [...], "trained": [...]}; check the file.'
                ) from None
            records.append((step, frozen, trained, rec.get("units")))
    if not records:
        raise ValueError(f"{path} holds no steps; run at least one optimizer step first.")
    units = _unit_order(records)
    index = {n: i for i, n in enumerate(units)}
    steps = np.array([r[0] for r in records])
    trained = np.zeros((len(units), len(records)), dtype=bool)
    for j, (_, _, tr, _) in enumerate(records):
        trained[[index[n] for n in tr], j] = True
    order = np.argsort(steps, kind="stable")
    return units, steps[order], trained[:, order]


def _unit_order(records) -> list[str]:
    """Model order of the units: an explicit ``units`` list, else the order implied by the
    frozen/trained lists (each is in model order) merged over steps, then grouped so that
    embeddings come first and head/pooler units last."""
    explicit = next((r[3] for r in records if r[3]), None)
    if explicit:
        names = list(explicit)
    else:
        first_seen: dict[str, int] = {}
        after: dict[str, set] = defaultdict(set)
        indeg: dict[str, int] = defaultdict(int)
        for _, frozen, trained, _ in records[:500]:
            for seq in (frozen, trained):
                for n in seq:
                    first_seen.setdefault(n, len(first_seen))
                for a, b in zip(seq, seq[1:]):
                    if b not in after[a]:
                        after[a].add(b)
                        indeg[b] += 1
        for _, frozen, trained, _ in records[500:]:
            for n in frozen + trained:
                first_seen.setdefault(n, len(first_seen))
        # Kahn's algorithm, ties by first appearance (cycles cannot happen for real runs;
        # if they do, the remaining names keep their first-seen order)
        ready = sorted((n for n in first_seen if indeg[n] == 0), key=first_seen.get)
        names, done = [], set()
        while ready:
            n = ready.pop(0)
            names.append(n)
            done.add(n)
            for m in sorted(after[n], key=first_seen.get):
                indeg[m] -= 1
                if indeg[m] == 0:
                    ready.append(m)
            ready.sort(key=first_seen.get)
        names += [n for n in sorted(first_seen, key=first_seen.get) if n not in done]
    pos = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (_group_rank(n), pos[n]))


def _group_rank(name: str) -> float:
    b = block_of(name)
    if b is not None:
        return b
    return -1 if _EMBED.search(name) else math.inf


def group_label(name: str) -> str:
    b = block_of(name)
    if b is not None:
        return f"block {b}"
    return "embeddings" if _EMBED.search(name) else "head / other"


def read_log(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                int(rec["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{path}:{lineno} is not a log record like "
                    '{"step": 10, "loss": 0.52}; check the file.'
                ) from None
            out.append(rec)
    return out


def _bins(n_steps: int, max_columns: int = MAX_COLUMNS) -> int:
    return max(1, math.ceil(n_steps / max_columns))


def binned(matrix: np.ndarray, width: int) -> np.ndarray:
    """Mean over consecutive groups of ``width`` columns (the last group may be shorter)."""
    rows, cols = matrix.shape
    n = math.ceil(cols / width)
    pad = n * width - cols
    m = np.pad(matrix.astype(float), ((0, 0), (0, pad)), constant_values=np.nan)
    return np.nanmean(m.reshape(rows, n, width), axis=2)


def _groups(units: list[str]) -> list[tuple[str, int, int]]:
    """(label, first row, last row + 1) of consecutive units of one block."""
    out = []
    for i, n in enumerate(units):
        label = group_label(n)
        if out and out[-1][0] == label:
            out[-1] = (label, out[-1][1], i + 1)
        else:
            out.append((label, i, i + 1))
    return out


# ----------------------------------------------------------------------------------------
# figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    """'bert.encoder.layer.3.attention.self.query.weight' -> 'attention.self.query'."""
    m = re.search(r"(?:layer|layers|blocks|h|block)\.\d+\.(.*)", name)
    s = m.group(1) if m else name
    return re.sub(r"\.weight$", "", s)


def _block_rows(units: list[str]) -> list[str]:
    """Short names of the units of the first transformer block, in row order."""
    first = next((block_of(n) for n in units if block_of(n) is not None), None)
    return [_short(n) for n in units if first is not None and block_of(n) == first]


def plot_heatmap(units, steps, trained, path: Path, title_suffix: str = "") -> Path:
    plt = _plt()
    from matplotlib.colors import LinearSegmentedColormap

    width = _bins(trained.shape[1])
    data = binned(trained, width)
    groups = _groups(units)
    n_units = len(units)
    height = min(max(4.5, 0.11 * n_units + 2.0), 16)
    fig = plt.figure(figsize=(13, height))
    gs = fig.add_gridspec(1, 2, width_ratios=[12, 1.3], wspace=0.04)
    ax = fig.add_subplot(gs[0])
    side = fig.add_subplot(gs[1], sharey=ax)
    cmap = LinearSegmentedColormap.from_list("frozen_trained", ["#e8e8e8", "#1a7f37"])
    x0, x1 = steps[0] - 0.5, steps[0] + data.shape[1] * width - 0.5
    im = ax.imshow(
        data,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=0,
        vmax=1,
        extent=(x0, x1, n_units - 0.5, -0.5),
    )
    for _, start, _ in groups[1:]:
        ax.axhline(start - 0.5, color="#d62728", lw=0.9)
        side.axhline(start - 0.5, color="#d62728", lw=0.9)
    ax.set_yticks([(a + b - 1) / 2 for _, a, b in groups])
    ax.set_yticklabels([g[0] for g in groups], fontsize=8 if len(groups) > 16 else 9)
    ax.set_ylim(n_units - 0.5, -0.5)
    ax.set_xlabel("optimizer step" + (f" (bins of {width} steps)" if width > 1 else ""))
    ax.set_ylabel("unit (grouped by transformer block; red lines = block boundaries)")
    n_steps = trained.shape[1]
    ax.set_title(
        f"Which units trained when: {n_units} units x {n_steps} steps{title_suffix}\n"
        f"green = trained, grey = frozen"
        + (" (shade = fraction of the bin's steps trained)" if width > 1 else ""),
        fontsize=11,
        loc="left",
    )
    frac = trained.mean(axis=1)
    side.barh(np.arange(n_units), frac, height=0.9, color="#1a7f37")
    side.set_xlim(0, max(0.05, float(frac.max()) * 1.1))
    side.set_xlabel("trained\nfraction", fontsize=9)
    side.tick_params(axis="y", left=False, labelleft=False)
    side.tick_params(axis="x", labelsize=8)
    side.set_title("over the run", fontsize=9)
    cbar = fig.colorbar(im, ax=[ax, side], fraction=0.025, pad=0.01)
    cbar.set_label("fraction of steps trained")
    rows = _block_rows(units)
    if rows:
        ax.annotate(
            "rows in each block, top to bottom: " + ", ".join(rows),
            xy=(0, 0),
            xycoords="axes fraction",
            xytext=(0, -40),
            textcoords="offset points",
            fontsize=8.5,
            va="top",
        )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def block_fractions(units, trained) -> tuple[list[str], np.ndarray]:
    """(group labels, [groups, steps] fraction of each group's units that trained)."""
    groups = _groups(units)
    frac = np.stack([trained[a:b].mean(axis=0) for _, a, b in groups])
    return [g[0] for g in groups], frac


def plot_block_fraction(units, steps, trained, path: Path, freeze_ratio=None) -> Path:
    plt = _plt()
    labels, frac = block_fractions(units, trained)
    width = _bins(trained.shape[1])
    data = binned(frac, width)
    x = steps[0] + (np.arange(data.shape[1]) + 0.5) * width - 0.5
    height = min(max(5.0, 0.32 * len(labels) + 3.0), 14)
    fig, (top, ax) = plt.subplots(
        2, 1, figsize=(13, height), sharex=True, gridspec_kw={"height_ratios": [1, 3.2]}
    )
    overall = binned(trained.mean(axis=0, keepdims=True), width)[0]
    top.plot(x, overall, color="#1a7f37", lw=1.3, label="all units")
    if freeze_ratio is not None:
        top.axhline(1 - freeze_ratio, color="k", ls="--", lw=0.8, label="1 - freeze ratio")
    top.set_ylabel("trained\nfraction")
    top.set_ylim(0, max(0.05, float(np.nanmax(overall)) * 1.25))
    top.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9)
    top.set_title(
        "Trained fraction per transformer block over time"
        + (f" (bins of {width} steps)" if width > 1 else ""),
        loc="left",
        fontsize=11,
    )
    top.grid(alpha=0.3)
    # the scale follows the blocks and embeddings: an always-trained head would wash it out
    body = [i for i, name in enumerate(labels) if name != "head / other"] or list(
        range(len(labels))
    )
    vmax = max(0.05, float(np.nanmax(data[body])))
    x0, x1 = steps[0] - 0.5, steps[0] + data.shape[1] * width - 0.5
    im = ax.imshow(
        data,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0,
        vmax=vmax,
        extent=(x0, x1, len(labels) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8 if len(labels) > 20 else 9)
    for i in range(1, len(labels)):
        ax.axhline(i - 0.5, color="white", lw=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("block")
    cbar = fig.colorbar(
        im, ax=[top, ax], fraction=0.025, pad=0.01, extend="max" if vmax < 1 else "neither"
    )
    cbar.set_label("fraction of the block's units trained")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_memory(memory: dict, path: Path, source: str, measured_peak: int | None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.4))
    left = 0.0
    total = sum(memory.get(key, 0) or 0 for _, key, _ in MEMORY_PARTS)
    for label, key, color in MEMORY_PARTS:
        v = (memory.get(key) or 0) / GiB
        if v <= 0:
            continue
        ax.barh(
            [0],
            [v],
            left=left,
            color=color,
            edgecolor="white",
            height=0.55,
            label=f"{label}: {v:.2f} GiB",
        )
        if v / max(total / GiB, 1e-9) > 0.07:
            ax.text(
                left + v / 2,
                0,
                f"{v:.2f}",
                ha="center",
                va="center",
                color="white",
                fontsize=9,
                weight="bold",
            )
        left += v
    if measured_peak:
        ax.axvline(measured_peak / GiB, color="k", ls="--", lw=1.2)
        ax.text(
            measured_peak / GiB,
            0.36,
            f" measured peak {measured_peak / GiB:.2f} GiB",
            va="bottom",
            fontsize=9,
        )
    ax.set_yticks([])
    ax.set_xlabel("GiB at the peak of a training step")
    ax.set_xlim(0, max(left, (measured_peak or 0) / GiB) * 1.12 or 1)
    ax.set_ylim(-0.5, 0.75)
    ax.set_title(
        f"Where the memory went ({source}): {total / GiB:.2f} GiB in all", loc="left", fontsize=11
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=9, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = np.array([y[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def _accuracy_series(log: list[dict], metric: str | None) -> dict[str, tuple[list, list]]:
    keys = set()
    for r in log:
        for k, v in r.items():
            if k in ("step", "loss", "lr", "epoch") or not isinstance(v, (int, float)):
                continue
            if re.search(r"acc|f1|mcc|pearson|spearman|exact|" + (metric or "^$"), k):
                keys.add(k)
    out = {}
    for k in sorted(keys):
        pts = [(int(r["step"]), float(r[k])) for r in log if isinstance(r.get(k), (int, float))]
        if pts:
            out[k] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def plot_curves(log: list[dict], metrics: dict, path: Path) -> Path | None:
    loss_pts = [
        (int(r["step"]), float(r["loss"])) for r in log if isinstance(r.get("loss"), (int, float))
    ]
    acc = _accuracy_series(log, metrics.get("metric"))
    if not loss_pts and not acc:
        return None
    plt = _plt()
    n = 1 + bool(acc)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.2), squeeze=False)
    ax = axes[0][0]
    if loss_pts:
        x = np.array([p[0] for p in loss_pts])
        y = np.array([p[1] for p in loss_pts])
        window = max(1, len(y) // 50)
        ax.plot(x, y, color="#4c72b0", alpha=0.3 if window > 1 else 1.0, lw=0.8, label="loss")
        if window > 1:
            ax.plot(
                x, _smooth(y, window), color="#4c72b0", lw=1.8, label=f"mean of {window} points"
            )
        ax.set_title("Training loss", loc="left", fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no loss in train_log.jsonl", ha="center", va="center")
    if acc:
        ax2 = axes[0][1]
        for k, (xs, ys) in acc.items():
            ax2.plot(
                xs, [100 * v if v <= 1.0 else v for v in ys], marker="o", ms=3, lw=1.4, label=k
            )
        for split, style in (("dev", ":"), ("test", "--")):
            m = metrics.get("metric")
            v = metrics.get(split, {}).get(m) if isinstance(metrics.get(split), dict) else None
            if isinstance(v, (int, float)):
                ax2.axhline(
                    100 * v,
                    color="k",
                    ls=style,
                    lw=1,
                    label=f"final {split} {m}: {format_metric(m, v)}",
                )
        ax2.set_title("Accuracy / metric", loc="left", fontsize=11)
        ax2.set_xlabel("optimizer step")
        shown = [*acc, metrics.get("metric") or "accuracy"]
        correlations = any(not is_percent_metric(k) for k in shown)
        ax2.set_ylabel("% (correlations x 100)" if correlations else "%")
        ax2.legend(fontsize=8, frameon=False)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# memory numbers
def measured_memory(metrics: dict) -> dict | None:
    mem = metrics.get("memory")
    if isinstance(mem, dict) and any(mem.get(k) for _, k, _ in MEMORY_PARTS):
        return mem
    return None


def predicted_memory(metrics: dict) -> tuple[dict | None, str]:
    """The run's breakdown from :mod:`slimfit.plan` (or None and why not)."""
    cfg = metrics.get("config") or {}
    model = metrics.get("model_path") or metrics.get("model")
    batch = cfg.get("batch_size")
    if not model or not batch:
        return None, "metrics.json names no model and batch size to predict from"
    policy = metrics.get("policy") or cfg.get("policy") or "ils"
    compression = (
        cfg.get("compression") or (metrics.get("slimfit") or {}).get("compression") or "none"
    )
    ratio = cfg.get("freeze_ratio", 0.95)
    if policy == "none":
        mode = "full"
    else:
        mode = {"paper": "slimfit-paper", "default": "slimfit"}.get(str(compression), "freeze-only")
    try:
        from . import plan

        work = plan.resolve_workload(str(model), cfg.get("max_length"))
        precision = cfg.get("precision")
        work.precision = precision if precision in ("bf16", "fp32") else None
        pred, static, dynamic = plan.activation_split(
            work, mode, int(batch), float(ratio), freeze_steps=3, allow_cpu=False
        )
    except Exception as err:  # noqa: BLE001 - a figure we cannot draw is a note, not a failure
        return None, f"slimfit plan could not predict it ({type(err).__name__}: {str(err)[:120]})"
    b = pred.breakdown
    mem = {
        "weights_bytes": b["weights"] + b["weight_casts"],
        "gradients_bytes": b["gradients"],
        "optimizer_bytes": b["optimizer"],
        "static_activations_bytes": static,
        "dynamic_activations_bytes": dynamic,
        "transient_bytes": b["transient"],
        "peak_bytes": pred.peak_bytes,
    }
    prec = "fp32" if work.precision == "fp32" else "bf16 autocast"
    note = f"predicted by slimfit plan (mode {mode}, batch {batch}, {prec} + SDPA on CUDA)"
    if pred.notes:
        note += "; " + "; ".join(pred.notes)
    return mem, note


# ----------------------------------------------------------------------------------------
# the report
def make_report(run_dir, predict: bool = True) -> list[Path]:
    """Write the figures and ``report.md`` into ``run_dir``; returns their paths.

    ``predict``: when metrics.json has no memory breakdown, predict one with slimfit plan.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(
            f"run directory {str(run)!r} does not exist; pass the folder a slimfit finetune run wrote."
        )
    sched_path = run / "schedule.jsonl"
    if not sched_path.is_file():
        raise ValueError(
            f"{str(run)!r} has no schedule.jsonl; pass the folder of a slimfit finetune run "
            "(or write one record per step with SlimFit.add_step_callback)."
        )
    metrics = {}
    if (run / "metrics.json").is_file():
        try:
            metrics = json.loads((run / "metrics.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{run / 'metrics.json'} is not valid JSON ({err.msg}, line {err.lineno})."
            ) from None
        if not isinstance(metrics, dict):
            raise ValueError(f"{run / 'metrics.json'} should hold a JSON object of metrics.")
    units, steps, trained = read_schedule(sched_path)
    log = read_log(run / "train_log.jsonl")
    freeze_ratio = (metrics.get("config") or {}).get("freeze_ratio") or (
        metrics.get("slimfit") or {}
    ).get("freeze_ratio")
    if metrics.get("policy") == "none":
        freeze_ratio = None

    files = [
        plot_heatmap(units, steps, trained, run / "schedule_heatmap.png", _title_suffix(metrics)),
        plot_block_fraction(units, steps, trained, run / "trained_per_block.png", freeze_ratio),
    ]
    mem = measured_memory(metrics)
    mem_note = "measured (metrics.json)"
    if mem is None:
        mem, mem_note = (
            predicted_memory(metrics) if predict else (None, "not predicted (predict=False)")
        )
        if mem is None and not metrics:
            mem_note = "no metrics.json"
    measured_peak = metrics.get("peak_memory_bytes")
    for stale in ("memory_breakdown.png", "training_curves.png"):  # from an earlier report
        (run / stale).unlink(missing_ok=True)
    if mem is not None:
        source = "measured" if mem_note.startswith("measured") else "predicted by slimfit plan"
        files.append(plot_memory(mem, run / "memory_breakdown.png", source, measured_peak))
    curves = plot_curves(log, metrics, run / "training_curves.png")
    if curves is not None:
        files.append(curves)
    md = run / "report.md"
    md.write_text(
        _markdown(run, metrics, units, steps, trained, log, mem, mem_note, measured_peak, files)
    )
    files.append(md)
    return files


def _title_suffix(metrics: dict) -> str:
    parts = []
    if metrics.get("model"):
        parts.append(Path(str(metrics["model"])).name)
    if metrics.get("task"):
        parts.append(str(metrics["task"]))
    if metrics.get("policy"):
        parts.append(f"policy {metrics['policy']}")
    return (" (" + ", ".join(parts) + ")") if parts else ""


def _extra_metrics(values: dict, metric: str) -> list[str]:
    """The split's other metrics (MRPC's accuracy, STS-B's spearman), not loss or counts."""
    return [k for k in values if k not in (metric, "loss", "examples") and k in _METRIC_NAMES]


def _markdown(run, metrics, units, steps, trained, log, mem, mem_note, measured_peak, files) -> str:
    cfg = metrics.get("config") or {}
    lines = [f"# slimfit run report: `{run.name}`", ""]
    rows = []
    for label, value in (
        ("model", metrics.get("model")),
        ("task", metrics.get("task")),
        ("policy", metrics.get("policy")),
        ("freeze ratio", cfg.get("freeze_ratio")),
        ("compression", cfg.get("compression")),
        ("batch size", cfg.get("batch_size")),
        ("steps", f"{trained.shape[1]} (schedule), step {int(steps[0])} to {int(steps[-1])}"),
        ("units", f"{len(units)}; {trained.sum(axis=0).mean():.1f} trained per step on average"),
    ):
        if value is not None:
            rows.append((label, value))
    m = metrics.get("metric")
    for split in ("dev", "test"):
        values = metrics.get(split) if isinstance(metrics.get(split), dict) else {}
        if isinstance(values.get(m), (int, float)):
            rows.append((f"{split} {m}", format_metrics(values, m, _extra_metrics(values, m))))
    if measured_peak:
        rows.append(("peak GPU memory (measured)", f"{measured_peak / GiB:.2f} GiB"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]

    never = [u for u, c in zip(units, trained.sum(axis=1)) if c == 0]
    labels, frac = block_fractions(units, trained)
    lines += ["## Which units trained when", "", "![units x steps](schedule_heatmap.png)", ""]
    lines += ["| block | units | trained fraction (mean over steps) |", "|---|---:|---:|"]
    for (label, a, b), f in zip(_groups(units), frac.mean(axis=1)):
        lines.append(f"| {label} | {b - a} | {f:.3f} |")
    lines.append("")
    counts = trained.sum(axis=1)
    top = np.argsort(-counts, kind="stable")[:5]
    lines.append(
        "Most trained units: "
        + ", ".join(f"`{units[i]}` ({int(counts[i])} of {trained.shape[1]} steps)" for i in top)
        + "."
    )
    if never:
        shown = ", ".join(f"`{n}`" for n in never[:10]) + (" ..." if len(never) > 10 else "")
        lines.append(f"Never trained ({len(never)} units): {shown}.")
    else:
        lines.append("Every unit trained at least once.")
    lines += [
        "",
        "## Trained fraction per transformer block",
        "",
        "![trained fraction per block](trained_per_block.png)",
        "",
    ]

    lines += ["## Memory", ""]
    if mem is not None:
        lines += [f"Source: {mem_note}.", "", "![memory breakdown](memory_breakdown.png)", ""]
        lines += ["| part | GiB |", "|---|---:|"]
        for label, key, _ in MEMORY_PARTS:
            if mem.get(key) is not None:
                lines.append(f"| {label} | {mem[key] / GiB:.3f} |")
        if mem.get("peak_bytes"):
            lines.append(f"| **peak** | **{mem['peak_bytes'] / GiB:.3f}** |")
        lines.append("")
    else:
        lines += [f"No memory breakdown: {mem_note}.", ""]

    lines += ["## Training curves", ""]
    if any(p.name == "training_curves.png" for p in files):
        lines += ["![loss and accuracy](training_curves.png)", ""]
        losses = [r["loss"] for r in log if isinstance(r.get("loss"), (int, float))]
        if losses:
            k = max(1, len(losses) // 10)
            lines.append(
                f"Loss: first {k} logged steps mean {np.mean(losses[:k]):.4f}, "
                f"last {k} mean {np.mean(losses[-k:]):.4f}."
            )
            lines.append("")
    else:
        lines += [
            "No `train_log.jsonl` with `step` and `loss` in the run directory: no curves.",
            "",
        ]
    lines.append("Files: " + ", ".join(f"`{p.name}`" for p in files if p.suffix == ".png") + ".")
    return "\n".join(lines) + "\n"
