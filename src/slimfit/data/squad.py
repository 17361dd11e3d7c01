"""SQuAD 2.0 (``rajpurkar/squad_v2``): loading, features with a sliding window, answer
post-processing and the official metric.

- :func:`load_squad`: the hub dataset through ``datasets``, or offline from ``--data-dir``
  / ``$SLIMFIT_DATA_DIR`` holding the hub's files (``train.jsonl``/``validation.jsonl``,
  ``.json``, or the parquet files, also in the hub's ``squad_v2/`` sub-folder) with the
  columns id, title, context, question, answers{text, answer_start}.
- :func:`train_features` / :func:`eval_features`: question + context cut into windows
  of ``max_length`` tokens overlapping by ``doc_stride`` (the fast tokenizer's overflowing
  tokens and offset mapping). Training windows label the answer's first and last token,
  or the CLS token when the window does not hold the whole answer or the question has
  none; evaluation windows keep the example id and the context offsets.
- :func:`postprocess_predictions`: the best span of each example over all its windows
  (n-best starts x n-best ends, at most ``max_answer_length`` tokens), or the empty
  answer when the null score (CLS start + CLS end) beats it by more than the threshold.
- :func:`squad_v2_metrics`: the official SQuAD 2.0 evaluation script's EM and F1.
"""

from __future__ import annotations

import collections
import math
import os
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .fetch import DATA_DIR_ENV

HUB_ID = "rajpurkar/squad_v2"
SPLITS = ("train", "validation")
COLUMNS = ("id", "title", "context", "question", "answers")
MAX_LENGTH = 384
DOC_STRIDE = 128
N_BEST = 20
MAX_ANSWER_LENGTH = 30


# -- loading -------------------------------------------------------------------------------


def _schema():
    from datasets import Features, List, Value

    return Features(
        {
            "id": Value("string"),
            "title": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
        }
    )


def _split_files(folder: Path, split: str) -> tuple[str, list[str]] | None:
    """``(datasets builder, files)`` of one split in ``folder``, or None."""
    candidates = (
        ("json", (f"{split}.jsonl", f"{split}.json")),
        ("parquet", (f"{split}.parquet", f"{split}-*.parquet", f"*/{split}-*.parquet")),
    )
    for builder, patterns in candidates:
        for pattern in patterns:
            files = sorted(str(f) for f in folder.glob(pattern) if f.is_file())
            if files:
                return builder, files
    return None


def load_squad(data_dir=None, splits: Sequence[str] = SPLITS, cache_dir=None):
    """A ``datasets.DatasetDict`` of the SQuAD 2.0 ``splits``: from ``data_dir`` (else
    ``$SLIMFIT_DATA_DIR``) when given, else from the hub."""
    import datasets

    folder = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if folder is None:
        try:
            hub = datasets.load_dataset(HUB_ID, cache_dir=cache_dir)
        except Exception as err:  # no network, no hub access, a proxy error: all one fix
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"could not load {HUB_ID} from the Hugging Face hub ({first.rstrip('.')}); pass "
                "--data-dir with a folder of its files (train.jsonl and validation.jsonl, or "
                "its parquet files)."
            ) from None
        return datasets.DatasetDict({s: hub[s] for s in splits})
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"the SQuAD 2.0 data folder {folder} does not exist; pass --data-dir (or set "
            f"{DATA_DIR_ENV}) to a folder with train.jsonl and validation.jsonl."
        )
    out = {}
    for split in splits:
        found = _split_files(folder, split)
        if found is None:
            raise ValueError(
                f"{folder} has no SQuAD 2.0 {split} split ({split}.jsonl, {split}.json or "
                f"{split}*.parquet); pass --data-dir a folder with the {HUB_ID} files."
            )
        builder, files = found
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
        missing = [c for c in COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"{files[0]} lacks the column(s) {', '.join(missing)}; SQuAD 2.0 files need "
                "id, title, context, question and answers{text, answer_start}."
            )
        out[split] = ds.select_columns(list(COLUMNS)).cast(_schema())
    return datasets.DatasetDict(out)


def gold_answers(examples) -> dict[str, list[str]]:
    """``{id: gold answer texts}`` (an empty list for an unanswerable question)."""
    return {i: list(a["text"]) for i, a in zip(examples["id"], examples["answers"])}


# -- features ------------------------------------------------------------------------------


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "SQuAD features need a fast tokenizer (for offset mappings); load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) or pick a model that has one."
        )


def _encode(examples: dict, tokenizer, max_length: int, doc_stride: int):
    # Some SQuAD questions start with many spaces that would only eat the window.
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    _check_room(examples["id"], questions, tokenizer, max_length, doc_stride)
    question_first = tokenizer.padding_side == "right"  # the context sits next to the padding
    return tokenizer(
        questions if question_first else contexts,
        contexts if question_first else questions,
        truncation="only_second" if question_first else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    ), (1 if question_first else 0)


def _check_room(ids, questions, tokenizer, max_length: int, doc_stride: int) -> None:
    """The tokenizers library panics (an uncatchable Rust abort with a backtrace) when a
    window has no room for the stride; say which question and what to change instead."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = tokenizer(questions, add_special_tokens=False)["input_ids"]
    for qid, q in zip(ids, lengths):
        room = max_length - specials - len(q)
        if room <= doc_stride:
            raise ValueError(
                f"question {qid} has {len(q)} tokens, which leaves {max(room, 0)} context tokens "
                f"per window at --max-length {max_length}, not more than --doc-stride "
                f"{doc_stride}; raise --max-length or lower --doc-stride."
            )


def _cls_index(input_ids: list[int], tokenizer) -> int:
    cls = tokenizer.cls_token_id
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0


def answer_tokens(
    offsets: Sequence, sequence_ids: Sequence, context_id: int, start_char: int, end_char: int
) -> tuple[int, int] | None:
    """First and last token of the characters ``[start_char, end_char)`` in this window,
    or None when the window's context does not hold all of them."""
    context = [k for k, s in enumerate(sequence_ids) if s == context_id]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    start = next(k for k in context if offsets[k][1] > start_char)
    end = max(k for k in context if offsets[k][0] < end_char)
    return start, end


def prepare_train_features(examples: dict, tokenizer, max_length: int, doc_stride: int) -> dict:
    """A batched ``datasets.map`` function: one row per window, with ``start_positions``
    and ``end_positions`` (both the CLS index when the window holds no whole answer)."""
    enc, context_id = _encode(examples, tokenizer, max_length, doc_stride)
    starts, ends = [], []
    for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
        cls = _cls_index(enc["input_ids"][i], tokenizer)
        answers = examples["answers"][sample]
        span = None
        if answers["text"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            span = answer_tokens(
                enc["offset_mapping"][i], enc.sequence_ids(i), context_id, start_char, end_char
            )
        start, end = span or (cls, cls)
        starts.append(start)
        ends.append(end)
    out = {
        k: v for k, v in enc.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")
    }
    out["start_positions"], out["end_positions"] = starts, ends
    out["length"] = [len(x) for x in enc["input_ids"]]
    return out


def prepare_eval_features(examples: dict, tokenizer, max_length: int, doc_stride: int) -> dict:
    """A batched ``datasets.map`` function: one row per window, with ``example_id``,
    ``cls_index`` and ``offset_mapping`` (None for tokens outside the context)."""
    enc, context_id = _encode(examples, tokenizer, max_length, doc_stride)
    out = {
        k: v for k, v in enc.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")
    }
    samples = enc["overflow_to_sample_mapping"]
    out["example_id"] = [examples["id"][s] for s in samples]
    out["cls_index"] = [_cls_index(ids, tokenizer) for ids in enc["input_ids"]]
    out["offset_mapping"] = [
        [
            o if s == context_id else None
            for o, s in zip(enc["offset_mapping"][i], enc.sequence_ids(i))
        ]
        for i in range(len(samples))
    ]
    out["length"] = [len(x) for x in enc["input_ids"]]
    return out


def check_window(max_length: int, doc_stride: int) -> None:
    """One-sentence ValueErrors for a window size and stride that cannot work."""
    if max_length < 8:
        raise ValueError(f"--max-length must be at least 8 tokens for SQuAD, got {max_length}.")
    if not 0 <= doc_stride < max_length:
        raise ValueError(
            f"--doc-stride must be in [0, --max-length), got {doc_stride} with --max-length "
            f"{max_length}."
        )


def _features(examples, tokenizer, max_length, doc_stride, prepare):
    _check_tokenizer(tokenizer)
    check_window(max_length, doc_stride)
    return examples.map(
        prepare,
        batched=True,
        remove_columns=examples.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "doc_stride": doc_stride},
        desc="tokenizing",
    )


def train_features(examples, tokenizer, max_length: int = MAX_LENGTH, doc_stride: int = DOC_STRIDE):
    """The training windows of a SQuAD ``datasets.Dataset`` (see the module docstring)."""
    return _features(examples, tokenizer, max_length, doc_stride, prepare_train_features)


def eval_features(examples, tokenizer, max_length: int = MAX_LENGTH, doc_stride: int = DOC_STRIDE):
    """The evaluation windows of a SQuAD ``datasets.Dataset`` (see the module docstring)."""
    return _features(examples, tokenizer, max_length, doc_stride, prepare_eval_features)


# -- post-processing -------------------------------------------------------------------------


def _top(logits, n: int) -> list[int]:
    return np.argsort(-np.asarray(logits, dtype=np.float64), kind="stable")[:n].tolist()


def postprocess_predictions(
    examples,
    features,
    start_logits: Sequence[Sequence[float]],
    end_logits: Sequence[Sequence[float]],
    n_best: int = N_BEST,
    max_answer_length: int = MAX_ANSWER_LENGTH,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """``{example id: answer text}``, ``""`` for no answer.

    ``features`` are the evaluation windows (:func:`eval_features`, or a dict with their
    example_id, cls_index and offset_mapping columns) and ``start_logits[i]`` /
    ``end_logits[i]`` the model's logits on window ``i`` (its own length). As in the
    BERT reference code, the null score is the smallest CLS score over the windows, and
    the empty answer wins when it exceeds the best span's score by more than
    ``null_threshold``.
    """
    windows = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        windows[example_id].append(i)
    offsets_of, cls_of = features["offset_mapping"], features["cls_index"]
    predictions = {}
    for example_id, context in zip(examples["id"], examples["context"]):
        null, best, best_text = math.inf, -math.inf, ""
        for i in windows[example_id]:
            start, end, offsets, cls = start_logits[i], end_logits[i], offsets_of[i], cls_of[i]
            null = min(null, float(start[cls]) + float(end[cls]))
            for s in _top(start, n_best):
                for e in _top(end, n_best):
                    if max(s, e) >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue  # a question, special or padding token
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(start[s]) + float(end[e])
                    if score > best:
                        best, best_text = score, context[offsets[s][0] : offsets[e][1]]
        predictions[example_id] = best_text if null - best <= null_threshold else ""
    return predictions


# -- the official SQuAD 2.0 metric (evaluate-v2.0.py) ----------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, then the articles a/an/the, then collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_match(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    if not gold_toks or not pred_toks:  # a no-answer: 1 when both are empty, else 0
        return float(gold_toks == pred_toks)
    same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_v2_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float | int]:
    """The official SQuAD 2.0 scores (percentages) of ``predictions`` (``{id: text}``,
    ``""`` for no answer) against ``references`` (``{id: gold texts}``, empty when the
    question has no answer): exact, f1, total, and the same over the HasAns and NoAns
    questions."""
    if not references:
        raise ValueError("there are no SQuAD references to score; pass at least one question.")
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(references)} questions have no prediction (e.g. "
            f"{missing[0]}); predict every question, with '' for no answer."
        )
    exact, f1 = {}, {}
    for qid, golds in references.items():
        # as the official script: golds that normalise to nothing count as no answer
        golds = [g for g in golds if normalize_answer(g)] or [""]
        exact[qid] = max(exact_match(g, predictions[qid]) for g in golds)
        f1[qid] = max(f1_score(g, predictions[qid]) for g in golds)

    def summary(qids: list[str], prefix: str = "") -> dict:
        return {
            f"{prefix}exact": 100.0 * sum(exact[q] for q in qids) / len(qids),
            f"{prefix}f1": 100.0 * sum(f1[q] for q in qids) / len(qids),
            f"{prefix}total": len(qids),
        }

    out = summary(list(references))
    has_ans = [q for q, golds in references.items() if golds]
    no_ans = [q for q, golds in references.items() if not golds]
    if has_ans:
        out |= summary(has_ans, "HasAns_")
    if no_ans:
        out |= summary(no_ans, "NoAns_")
    return out
