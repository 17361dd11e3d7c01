"""Tiny stand-ins for the task files, in their exact formats, for tests and demos.

``write_sample_data(folder)`` writes ``movieReviewSnippets_GroundTruth.csv.gz`` and
``question_labels.txt`` so that ``load_task(name, data_dir=folder)`` works offline.
"""

from __future__ import annotations

import csv
import gzip
import io
import random
from pathlib import Path

POSITIVE = [
    "a gorgeous , moving film",
    "funny and smart",
    "the best movie this year",
    "warm , witty , wise",
]
NEGATIVE = [
    "a dull , tedious mess",
    "boring and far too long",
    "the worst script ever",
    "flat , lifeless , silly",
]
TREC_SAMPLES = {
    "ABBR": ["What does NASA stand for ?", "What is the full form of .com ?"],
    "DESC": ["How did serfdom develop in Russia ?", "Why is the sky blue ?"],
    "ENTY": ["What fowl grabs the spotlight ?", "What currency is used in Australia ?"],
    "HUM": ["Who wrote Hamlet ?", "Who was the first president ?"],
    "LOC": ["Where is the Eiffel Tower ?", "What is the largest county in Massachusetts ?"],
    "NUM": ["How many feet in a mile ?", "When did the war end ?"],
}


def sample_sentiment_rows(n: int = 60, seed: int = 0) -> list[tuple[int, float, str]]:
    """``(id, rating, text)`` rows: mixed ratings (some exactly 0), commas and quotes."""
    rng = random.Random(seed)
    rows = []
    for i in range(1, n + 1):
        if i % 10 == 0:
            rating = 0.0
        else:
            rating = round(rng.uniform(0.1, 3.9), 11) * (1 if i % 2 else -1)
        words = POSITIVE if rating > 0 else NEGATIVE
        text = f"{rng.choice(words)} number {i}"
        if i % 7 == 0:
            text += ' with quotes and "double" ones'
        rows.append((i, rating, text))
    return rows


def write_sample_data(folder: str | Path, n_sentiment: int = 60) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "sentiment", "text"])
    for row in sample_sentiment_rows(n_sentiment):
        writer.writerow(row)
    (folder / "movieReviewSnippets_GroundTruth.csv.gz").write_bytes(
        gzip.compress(buf.getvalue().encode())
    )
    lines = []
    for coarse, questions in TREC_SAMPLES.items():
        for j, q in enumerate(questions):
            lines.append(f"{coarse}:fine{j} {q}")
    lines += lines[:3]  # repeated lines, as in the real file
    (folder / "question_labels.txt").write_text("\n".join(lines) + "\n")
    return folder
