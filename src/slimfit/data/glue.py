"""The GLUE benchmark (Wang et al. 2019) as slimfit tasks, with each task's official metric.

===============  ===============================  ===================  ==================
task             inputs (hub columns)             labels               metric (also)
===============  ===============================  ===================  ==================
glue-cola        sentence                         2 (acceptability)    matthews
glue-sst2        sentence                         2 (sentiment)        accuracy
glue-mrpc        (sentence1, sentence2)           2 (paraphrase)       f1 (accuracy)
glue-qqp         (question1, question2)           2 (duplicate)        f1 (accuracy)
glue-stsb        (sentence1, sentence2)           a score in [0, 5]    pearson (spearman)
glue-mnli        (premise, hypothesis)            3 (entailment)       accuracy
glue-mnli-mm     (premise, hypothesis)            3 (entailment)       accuracy
glue-qnli        (question, sentence)             2 (entailment)       accuracy
glue-rte         (sentence1, sentence2)           2 (entailment)       accuracy
glue-wnli        (sentence1, sentence2)           2 (entailment)       accuracy
===============  ===============================  ===================  ==================

Splits: GLUE's test labels are hidden, so, as papers do, ``test`` is the official validation
split (``validation_matched`` for ``glue-mnli``, ``validation_mismatched`` for
``glue-mnli-mm``), and the official train split is cut into ``train`` (90%) and ``dev``
(10%, for model selection) by :func:`~slimfit.data.registry.split_by_hash` on each
example's text with a fixed seed: the same cut on every machine, whatever the file order
(both MNLI tasks share it). Pair tasks yield ``(text_a, text_b)`` tuples, which the
training loop tokenizes as pairs; STS-B is a regression task (one output, float labels).

Data: without a data folder the splits come from the Hugging Face hub
(``datasets.load_dataset("nyu-mll/glue", config)``). Offline, ``--data-dir`` (or
``$SLIMFIT_DATA_DIR``) names a folder holding each split as a file in the hub's column
layout (the text columns above and ``label``; ``idx`` and other columns are ignored)::

    folder/train.jsonl         # or train.json (JSON lines), train.parquet
    folder/validation.jsonl    # MNLI: validation_matched.jsonl, validation_mismatched.jsonl

The files may also sit in ``folder/<config>/`` (config: cola, sst2, mrpc, qqp, stsb, mnli,
qnli, rte, wnli), and parquet shards named ``<split>-*.parquet`` are read too, so a
snapshot of the hub repository (``hf download nyu-mll/glue --repo-type dataset
--local-dir folder``) works as it is. Labels are class indices or the class names above.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .fetch import DATA_DIR_ENV
from .registry import Split, TaskData, TaskSpec, register_task, split_by_hash

HUB_ID = "nyu-mll/glue"
DEV_FRACTION = 0.1
# file patterns of one split, first match wins; "{split}-*" are the hub's parquet shards
SPLIT_FILES = ("{split}.jsonl", "{split}.json", "{split}.parquet", "{split}-*.parquet")


@dataclass(frozen=True)
class GlueTask:
    config: str  # the hub config name
    columns: tuple[str, ...]  # one text column, or the two of a sentence pair
    label_names: tuple[str, ...]  # () for regression (STS-B)
    metric: str
    extra_metrics: tuple[str, ...] = ()
    test_split: str = "validation"
    description: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1


_NLI = ("entailment", "not_entailment")
GLUE: dict[str, GlueTask] = {
    "glue-cola": GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), "matthews",
                          description="CoLA: is the sentence grammatical"),
    "glue-sst2": GlueTask("sst2", ("sentence",), ("negative", "positive"), "accuracy",
                          description="SST-2: movie-review sentiment"),
    "glue-mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                          "f1", ("accuracy",), description="MRPC: are the sentences paraphrases"),
    "glue-qqp": GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
                         "f1", ("accuracy",), description="QQP: are the questions duplicates"),
    "glue-stsb": GlueTask("stsb", ("sentence1", "sentence2"), (), "pearson", ("spearman",),
                          description="STS-B: similarity score 0-5 (regression)"),
    "glue-mnli": GlueTask("mnli", ("premise", "hypothesis"),
                          ("entailment", "neutral", "contradiction"), "accuracy",
                          test_split="validation_matched",
                          description="MNLI: entailment, tested on validation_matched"),
    "glue-mnli-mm": GlueTask("mnli", ("premise", "hypothesis"),
                             ("entailment", "neutral", "contradiction"), "accuracy",
                             test_split="validation_mismatched",
                             description="MNLI: entailment, tested on validation_mismatched"),
    "glue-qnli": GlueTask("qnli", ("question", "sentence"), _NLI, "accuracy",
                          description="QNLI: does the sentence answer the question"),
    "glue-rte": GlueTask("rte", ("sentence1", "sentence2"), _NLI, "accuracy",
                         description="RTE: textual entailment"),
    "glue-wnli": GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
                          "accuracy", description="WNLI: pronoun resolution as entailment"),
}  # fmt: skip


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "the GLUE tasks need the datasets library; install it with pip install 'slimfit[hub]'."
        ) from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _folder(data_dir) -> Path | None:
    value = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"the data folder {path} does not exist; pass --data-dir (or set {DATA_DIR_ENV}) "
            "to a folder holding the GLUE task's train and validation files."
        )
    return path


def split_files(folder: Path, config: str, split: str) -> list[Path]:
    """The local files of one split (see the module docstring), or [] when there are none."""
    for base in (folder / config, folder):
        for pattern in SPLIT_FILES:
            files = sorted(base.glob(pattern.format(split=split)))
            if files:
                return files
    return []


def read_split(task: GlueTask, split: str, folder: Path | None) -> dict[str, list]:
    """The split's columns (``task.columns`` and ``label``), from ``folder`` or the hub."""
    datasets = _datasets()
    if folder is None:
        try:
            ds = datasets.load_dataset(HUB_ID, task.config, split=split)
        except Exception as err:  # no network, no hub access, a changed hub layout
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"could not load GLUE {task.config} {split} from the Hugging Face hub "
                f"({first.rstrip('.')}); pass --data-dir with a folder holding train.jsonl and "
                f"{task.test_split}.jsonl (or parquet) in the hub's column layout."
            ) from None
    else:
        files = split_files(folder, task.config, split)
        if not files:
            raise ValueError(
                f"{folder} holds no {split}.jsonl, {split}.json or {split}.parquet of GLUE "
                f"{task.config} (nor does {folder / task.config}); put the split there in the "
                f"hub's column layout ({', '.join(task.columns)}, label)."
            )
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        try:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
        except Exception as err:  # malformed JSON or parquet
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"could not read {files[0]} ({first.rstrip('.')}); write one JSON object per "
                "line (or parquet) in the hub's column layout."
            ) from None
    missing = [c for c in (*task.columns, "label") if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"the GLUE {task.config} {split} data lacks the column(s) {', '.join(missing)}; "
            f"it needs {', '.join(task.columns)} and label, as on the hub."
        )
    return {c: ds[c] for c in (*task.columns, "label")}


def _label(task: GlueTask, value, split: str, row: int) -> int | float:
    if not task.label_names:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"row {row} of GLUE {task.config} {split} has the non-numeric score {value!r}."
            ) from None
    if isinstance(value, str) and value in task.label_names:
        return task.label_names.index(value)
    if isinstance(value, int) and 0 <= value < len(task.label_names):
        return value
    raise ValueError(
        f"row {row} of GLUE {task.config} {split} has the label {value!r}, not one of "
        f"0-{len(task.label_names) - 1} or {', '.join(task.label_names)} (GLUE's test split "
        "hides its labels as -1: use train and validation)."
    )


def examples(task: GlueTask, split: str, folder: Path | None) -> list[tuple[str, object, object]]:
    """``(key, input, label)`` per row; the key is the text, the input a str or a pair."""
    cols = read_split(task, split, folder)
    texts = list(zip(*(cols[c] for c in task.columns)))
    out = []
    for row, (parts, value) in enumerate(zip(texts, cols["label"])):
        parts = tuple("" if p is None else str(p) for p in parts)
        x = parts if len(parts) == 2 else parts[0]
        out.append(("\t".join(parts), x, _label(task, value, split, row)))
    return out


def load_glue(name: str, data_dir=None) -> TaskData:
    task = GLUE[name]
    folder = _folder(data_dir)
    # seeded by config, not task name: glue-mnli and glue-mnli-mm train on the same cut
    train, dev, _ = split_by_hash(
        examples(task, "train", folder),
        f"glue-{task.config}",
        fractions=(1 - DEV_FRACTION, DEV_FRACTION, 0.0),
    )
    held = examples(task, task.test_split, folder)
    test = Split([x for _, x, _ in held], [y for _, _, y in held])
    return TaskData(name, train, dev, test, list(task.label_names) or ["score"])


def _loader(name: str):
    def load(data_dir=None) -> TaskData:
        return load_glue(name, data_dir)

    return load


for _name, _task in GLUE.items():
    register_task(
        TaskSpec(
            _name,
            _loader(_name),
            num_labels=_task.num_labels,
            metric=_task.metric,
            extra_metrics=_task.extra_metrics,
            modality="text",
            description=_task.description,
            source=f"{HUB_ID} ({_task.config}; test = {_task.test_split})",
        )
    )

__all__ = ["GLUE", "GlueTask", "load_glue", "split_files"]
