"""The task registry: task name -> loader, number of labels, metric.

A task is anything with a ``load(data_dir) -> TaskData`` function. Text tasks yield
strings or ``(text_a, text_b)`` pairs (tokenized by the training loop); other modalities
(e.g. ``fashion-mnist`` with ``modality="image"``) yield their own inputs, and the loop
picks its collate function by ``TaskSpec.modality``. Add a task with :func:`register_task`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Fixed seed of the train/dev/test split: the split never depends on the run's --seed.
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class Split:
    """One split of a task: ``inputs[i]`` has label ``labels[i]`` (an int class index, or
    a float target for a regression task such as STS-B)."""

    inputs: list[Any]
    labels: list[int] | list[float]

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise ValueError(
                f"a split has {len(self.inputs)} inputs but {len(self.labels)} labels."
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    name: str
    train: Split
    dev: Split
    test: Split
    label_names: list[str]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    load: Callable[[Any], TaskData]  # load(data_dir: str | Path | None) -> TaskData
    num_labels: int
    metric: str = "accuracy"  # the primary metric, a key of METRICS
    extra_metrics: tuple[str, ...] = ()  # reported next to it (e.g. MRPC's accuracy)
    modality: str = "text"
    description: str = ""
    source: str = ""


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels.")
    if not labels:
        return float("nan")
    return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)


def _checked(predictions: Sequence, labels: Sequence) -> bool:
    """False for an empty split (its metric is NaN, as accuracy's)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels.")
    return len(labels) > 0


def _sklearn_metrics():
    try:
        from sklearn import metrics
    except ImportError:
        raise ValueError(
            "this metric needs scikit-learn; install it with pip install 'slimfit[hub]'."
        ) from None
    return metrics


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        raise ValueError(
            "this metric needs scipy; install it with pip install 'slimfit[hub]'."
        ) from None
    return stats


def matthews(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient (CoLA's official metric)."""
    if not _checked(predictions, labels):
        return float("nan")
    return float(_sklearn_metrics().matthews_corrcoef(list(labels), list(predictions)))


def f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1, the positive class (MRPC's and QQP's official metric)."""
    if not _checked(predictions, labels):
        return float("nan")
    return float(
        _sklearn_metrics().f1_score(list(labels), list(predictions), pos_label=1, zero_division=0)
    )


def _correlation(name: str, predictions: Sequence[float], labels: Sequence[float]) -> float:
    if not _checked(predictions, labels):
        return float("nan")
    stats = _scipy_stats()
    with warnings.catch_warnings():
        # constant predictions (an untrained model) have no correlation: NaN, without the
        # ConstantInputWarning on every evaluation
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        fn = stats.pearsonr if name == "pearson" else stats.spearmanr
        return float(fn([float(p) for p in predictions], [float(y) for y in labels])[0])


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation of predicted and true scores (STS-B's official metric)."""
    return _correlation("pearson", predictions, labels)


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation of predicted and true scores (STS-B's second metric)."""
    return _correlation("spearman", predictions, labels)


# Metric name -> fn(predictions, labels) -> float (higher is better). Regression tasks get
# float predictions (the raw output), classification tasks class indices.
METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "matthews": matthews,
    "f1": f1,
    "pearson": pearson,
    "spearman": spearman,
}

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    if spec.name in TASKS and not replace:
        raise ValueError(f"a task named {spec.name!r} is already registered; pass replace=True.")
    for metric in (spec.metric, *spec.extra_metrics):
        if metric not in METRICS:
            raise ValueError(
                f"unknown metric {metric!r}; known metrics: {', '.join(sorted(METRICS))}."
            )
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}."
        ) from None


def load_task(name: str, data_dir=None) -> TaskData:
    """Load a registered task's train/dev/test splits (``data_dir``: local files, optional)."""
    return get_task(name).load(data_dir)


def split_by_hash(
    examples: Sequence[tuple[str, Any, int]],
    name: str,
    seed: int = SPLIT_SEED,
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
) -> tuple[Split, Split, Split]:
    """Deterministic train/dev/test split of ``(key, input, label)`` examples.

    Examples are ordered by sha256 of ``"{name}:{seed}:{key}"`` (ties: by original index)
    and cut at the fractions' cumulative sums. The order depends on neither the file
    order nor any library's RNG, so the split is the same on every machine and version.
    """
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {fractions}.")

    def digest(i: int) -> tuple[str, int]:
        key = f"{name}:{seed}:{examples[i][0]}".encode()
        return hashlib.sha256(key).hexdigest(), i

    order = sorted(range(len(examples)), key=digest)
    n = len(order)
    cut1 = int(fractions[0] * n)
    cut2 = int((fractions[0] + fractions[1]) * n)
    parts = (order[:cut1], order[cut1:cut2], order[cut2:])
    return tuple(Split([examples[i][1] for i in p], [examples[i][2] for i in p]) for p in parts)
