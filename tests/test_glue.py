"""GLUE tasks offline: local files in the hub's layout, labels, splits, pair tokenization,
regression, the official metrics, the errors, and tiny `slimfit finetune` runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from cli_args import finetune_args

from slimfit.cli.main import main
from slimfit.data import METRICS, get_task, load_task
from slimfit.data.glue import GLUE
from slimfit.models import load_model_and_tokenizer, save_tiny_model
from slimfit.train import collate, evaluate, tokenize

WORDS = "the cat dog sat ran on a mat log red blue big small it was is not".split()


def _sentence(i: int, n: int = 4) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n + i % 3))


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mrpc_rows(n, offset=0):
    return [
        {"sentence1": _sentence(i), "sentence2": _sentence(i + i % 2), "label": int(i % 2 == 0),
         "idx": i}
        for i in range(offset, offset + n)
    ]  # fmt: skip


def _stsb_rows(n, offset=0):
    return [
        {"sentence1": _sentence(i), "sentence2": _sentence(i + 1), "label": (i % 11) / 2, "idx": i}
        for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture
def mrpc_dir(tmp_path):
    _write_jsonl(tmp_path / "glue" / "mrpc" / "train.jsonl", _mrpc_rows(40))
    _write_jsonl(tmp_path / "glue" / "mrpc" / "validation.jsonl", _mrpc_rows(8, offset=100))
    return tmp_path / "glue"


@pytest.fixture
def stsb_dir(tmp_path):
    _write_jsonl(tmp_path / "stsb" / "train.jsonl", _stsb_rows(40))
    _write_jsonl(tmp_path / "stsb" / "validation.jsonl", _stsb_rows(12, offset=100))
    return tmp_path / "stsb"


# -- registration ----------------------------------------------------------------------


def test_every_glue_task_is_registered_with_its_official_metric():
    expected = {
        "glue-cola": (2, "matthews", ()),
        "glue-sst2": (2, "accuracy", ()),
        "glue-mrpc": (2, "f1", ("accuracy",)),
        "glue-qqp": (2, "f1", ("accuracy",)),
        "glue-stsb": (1, "pearson", ("spearman",)),
        "glue-mnli": (3, "accuracy", ()),
        "glue-mnli-mm": (3, "accuracy", ()),
        "glue-qnli": (2, "accuracy", ()),
        "glue-rte": (2, "accuracy", ()),
        "glue-wnli": (2, "accuracy", ()),
    }
    assert set(GLUE) == set(expected)
    for name, (num_labels, metric, extra) in expected.items():
        spec = get_task(name)
        assert (spec.num_labels, spec.metric, spec.extra_metrics) == (num_labels, metric, extra)
        assert spec.modality == "text" and spec.metric in METRICS
    assert GLUE["glue-mnli"].test_split == "validation_matched"
    assert GLUE["glue-mnli-mm"].test_split == "validation_mismatched"


# -- loading ---------------------------------------------------------------------------


def test_mrpc_loads_pairs_labels_and_a_deterministic_train_dev_cut(mrpc_dir, tmp_path):
    data = load_task("glue-mrpc", mrpc_dir)  # finds the files in <folder>/mrpc/
    assert data.sizes() == {"train": 36, "dev": 4, "test": 8}
    assert data.label_names == ["not_equivalent", "equivalent"]
    truth = {(r["sentence1"], r["sentence2"]): r["label"] for r in _mrpc_rows(40)}
    seen = []
    for split in (data.train, data.dev):
        for x, y in zip(split.inputs, split.labels):
            assert isinstance(x, tuple) and len(x) == 2 and truth[x] == y
            seen.append(x)
    assert sorted(seen) == sorted(truth)  # train and dev partition the official train split
    # test is the official validation split, in file order
    val = _mrpc_rows(8, offset=100)
    assert data.test.inputs == [(r["sentence1"], r["sentence2"]) for r in val]
    assert data.test.labels == [r["label"] for r in val]

    # the cut follows the texts, not the file order, and labels may be the class names
    rows = list(reversed(_mrpc_rows(40)))
    for r in rows:
        r["label"] = data.label_names[r["label"]]
        del r["idx"]
    _write_jsonl(tmp_path / "shuffled" / "train.jsonl", rows)
    _write_jsonl(tmp_path / "shuffled" / "validation.jsonl", _mrpc_rows(8, offset=100))
    again = load_task("glue-mrpc", tmp_path / "shuffled")  # files directly in the folder
    assert again.train == data.train and again.dev == data.dev


def test_cola_reads_the_hubs_parquet_shards_as_single_sentences(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "snapshot" / "cola"
    folder.mkdir(parents=True)
    train = {"sentence": [_sentence(i) for i in range(30)], "label": [i % 2 for i in range(30)],
             "idx": list(range(30))}  # fmt: skip
    Dataset.from_dict(train).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    val = {"sentence": ["the cat sat", "cat the sat"], "label": [1, 0], "idx": [0, 1]}
    Dataset.from_dict(val).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    # a test shard with hidden labels sits next to them, as on the hub; it is never read
    Dataset.from_dict({**val, "label": [-1, -1]}).to_parquet(
        str(folder / "test-00000-of-00001.parquet")
    )
    data = load_task("glue-cola", tmp_path / "snapshot")
    assert data.sizes() == {"train": 27, "dev": 3, "test": 2}
    assert data.test.inputs == ["the cat sat", "cat the sat"] and data.test.labels == [1, 0]
    truth = dict(zip(train["sentence"], train["label"]))
    assert all(truth[x] == y for x, y in zip(data.train.inputs, data.train.labels))


def test_mnli_matched_and_mismatched_share_train_and_dev(tmp_path):
    names = ["entailment", "neutral", "contradiction"]

    def rows(n, offset):
        return [{"premise": _sentence(i), "hypothesis": _sentence(i + 5), "label": i % 3}
                for i in range(offset, offset + n)]  # fmt: skip

    _write_jsonl(tmp_path / "train.jsonl", rows(30, 0))
    _write_jsonl(tmp_path / "validation_matched.jsonl", rows(6, 100))
    _write_jsonl(tmp_path / "validation_mismatched.jsonl", rows(9, 200))
    m = load_task("glue-mnli", tmp_path)
    mm = load_task("glue-mnli-mm", tmp_path)
    assert m.label_names == names and get_task("glue-mnli").num_labels == 3
    assert m.train == mm.train and m.dev == mm.dev
    assert len(m.test) == 6 and len(mm.test) == 9
    assert m.test.inputs[0] == (_sentence(100), _sentence(105))
    assert mm.test.inputs[0] == (_sentence(200), _sentence(205))
    assert sorted(set(m.train.labels)) == [0, 1, 2]


def test_stsb_is_regression_with_float_scores(stsb_dir):
    data = load_task("glue-stsb", stsb_dir)
    assert get_task("glue-stsb").num_labels == 1
    scores = {(r["sentence1"], r["sentence2"]): r["label"] for r in _stsb_rows(40)}
    for x, y in zip(data.train.inputs, data.train.labels):
        assert isinstance(y, float) and y == scores[x]
    assert data.test.labels == [float(r["label"]) for r in _stsb_rows(12, offset=100)]


# -- errors ----------------------------------------------------------------------------


def test_missing_files_and_bad_data_are_one_sentence_errors(tmp_path, mrpc_dir):
    with pytest.raises(
        ValueError, match=r"holds no train\.jsonl.*of GLUE rte.*sentence1, sentence2"
    ):
        load_task("glue-rte", tmp_path)
    with pytest.raises(ValueError, match="the data folder .* does not exist; pass --data-dir"):
        load_task("glue-rte", tmp_path / "nowhere")
    (mrpc_dir / "mrpc" / "validation.jsonl").unlink()
    with pytest.raises(ValueError, match=r"holds no validation\.jsonl"):
        load_task("glue-mrpc", mrpc_dir)

    _write_jsonl(tmp_path / "hidden" / "train.jsonl", _mrpc_rows(10))
    _write_jsonl(tmp_path / "hidden" / "validation.jsonl", [{**r, "label": -1} for r in _mrpc_rows(3)])  # fmt: skip
    with pytest.raises(ValueError, match="row 0 .* label -1.*hides its labels"):
        load_task("glue-mrpc", tmp_path / "hidden")

    _write_jsonl(tmp_path / "cols" / "train.jsonl", [{"sentence": "a", "label": 0}])
    _write_jsonl(tmp_path / "cols" / "validation.jsonl", [{"sentence": "a", "label": 0}])
    with pytest.raises(ValueError, match="lacks the column.*sentence1, sentence2"):
        load_task("glue-mrpc", tmp_path / "cols")


def test_no_hub_and_no_data_dir_says_to_pass_data_dir(tmp_path):
    # a real load in offline mode with an empty cache: what a machine without hub access sees
    env = {k: v for k, v in os.environ.items() if k != "SLIMFIT_DATA_DIR"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = "from slimfit.data import load_task; load_task('glue-rte')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: could not load GLUE rte train from the Hugging Face hub")
    assert "pass --data-dir with a folder holding train.jsonl and validation.jsonl" in last


# -- metrics ---------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    preds, labels = [1, 1, 1, 0, 0], [1, 1, 0, 0, 1]  # TP 2, FP 1, FN 1, TN 1
    assert METRICS["accuracy"](preds, labels) == pytest.approx(3 / 5)
    assert METRICS["f1"](preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # class 1
    assert METRICS["f1"]([1 - p for p in preds], [1 - y for y in labels]) == pytest.approx(0.5)
    mcc = (2 * 1 - 1 * 1) / math.sqrt((2 + 1) * (2 + 1) * (1 + 1) * (1 + 1))
    assert METRICS["matthews"](preds, labels) == pytest.approx(mcc)
    assert METRICS["matthews"]([0, 0, 0], [0, 1, 1]) == 0.0  # constant prediction

    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    r = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert METRICS["pearson"](x, y) == pytest.approx(r) and r < 0.99
    assert METRICS["spearman"](x, y) == pytest.approx(1.0)  # same ranks
    assert METRICS["spearman"](x[::-1], y) == pytest.approx(-1.0)
    assert math.isnan(METRICS["pearson"]([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    for name in ("matthews", "f1", "pearson", "spearman"):
        assert math.isnan(METRICS[name]([], []))
        with pytest.raises(ValueError, match="2 predictions for 3 labels"):
            METRICS[name]([0, 1], [0, 1, 1])


# -- the training loop -----------------------------------------------------------------


def test_pairs_are_tokenized_as_pairs(tiny_model):
    _, tok, _ = load_model_and_tokenizer(str(tiny_model), 2)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    ids = tok.convert_tokens_to_ids
    (f,) = tokenize(tok, [("the cat sat", "a dog")], 64)
    assert f["input_ids"] == [cls, *ids(["the", "cat", "sat"]), sep, *ids(["a", "dog"]), sep]
    assert f["token_type_ids"] == [0] * 5 + [1] * 3
    # truncation keeps both sides and cuts the longer one first
    (g,) = tokenize(tok, [("the cat sat on the mat", "a dog")], 7)
    assert g["input_ids"] == [cls, *ids(["the", "cat"]), sep, *ids(["a", "dog"]), sep]
    # single texts as before: one segment
    (h,) = tokenize(tok, ["the cat sat"], 64)
    assert h["token_type_ids"] == [0] * 5 and h["input_ids"].count(sep) == 1


def test_collate_keeps_float_labels_float(tiny_model):
    _, tok, _ = load_model_and_tokenizer(str(tiny_model), 2)
    feats = tokenize(tok, [("the cat", "a dog"), ("red", "blue big")], 16)
    assert collate(tok, feats, [3.5, 1.0], torch.device("cpu"))["labels"].dtype == torch.float32
    assert collate(tok, feats, [1, 0], torch.device("cpu"))["labels"].dtype == torch.long


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_collate_drops_an_all_ones_mask_and_the_model_gives_the_same_output(tiny_model, attn):
    """An unpadded batch goes without its attention mask (checked on the host: on the
    device transformers' own check synchronizes every forward); the logits and gradients
    are bitwise those with the all-ones mask. A padded batch keeps its mask."""
    model, tok, _ = load_model_and_tokenizer(str(tiny_model), 2)
    model.config._attn_implementation = attn
    model.train(False)
    same = tokenize(tok, [("the cat", "a dog"), ("the dog", "a cat")], 16)
    assert len({len(f["input_ids"]) for f in same}) == 1
    batch = collate(tok, same, [1, 0], torch.device("cpu"))
    assert "attention_mask" not in batch
    with_mask = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    outs = []
    for inputs in (batch, with_mask):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        outs.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    padded = tokenize(tok, [("the cat", "a dog"), ("red", "blue big dog cat")], 16)
    batch = collate(tok, padded, [1, 0], torch.device("cpu"))
    assert not bool(batch["attention_mask"].all())
    # what a custom collator may hand over is passed through untouched
    from slimfit.train import without_full_mask

    listed = {"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}
    assert without_full_mask(listed) is listed
    pair = (torch.ones(2, 3), torch.ones(2, 3))
    assert without_full_mask(pair) is pair


def test_regression_evaluate_uses_the_raw_output_and_mse(tiny_model, stsb_dir):
    from slimfit.train import TrainConfig, build_model

    cfg = TrainConfig(model=str(tiny_model), task="glue-stsb", device="cpu")
    model, tok, _ = build_model(cfg, 1, torch.device("cpu"))
    model.eval()
    data = load_task("glue-stsb", stsb_dir)
    feats = tokenize(tok, data.test.inputs, 64)
    res = evaluate(model, tok, feats, data.test.labels, torch.device("cpu"), "fp32", 5,
                   "pearson", ("spearman",))  # fmt: skip
    with torch.no_grad():  # one example at a time: no padding at all
        raw = [float(model(**{k: torch.tensor([v]) for k, v in f.items()}).logits[0, 0])
               for f in feats]  # fmt: skip
    # The tiny random model's outputs are nearly constant (spread ~1e-4 around -6.5e-3), so
    # the fp32 rounding that padding to the batch's length changes moves the correlations
    # in their 5th digit (seen with transformers 5.25); a wrong output (argmax, softmax)
    # would move them by far more than 1e-3.
    assert res["pearson"] == pytest.approx(METRICS["pearson"](raw, data.test.labels), abs=1e-3)
    assert res["spearman"] == pytest.approx(METRICS["spearman"](raw, data.test.labels), abs=1e-3)
    mse = sum((p - y) ** 2 for p, y in zip(raw, data.test.labels)) / len(raw)
    assert res["loss"] == pytest.approx(mse, rel=1e-4)
    assert res["examples"] == 12


def test_finetune_cli_on_mrpc_pairs(tmp_path, tiny_model, mrpc_dir):
    out = tmp_path / "run"
    assert main(finetune_args(tiny_model, mrpc_dir, out, "--task", "glue-mrpc")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "glue-mrpc" and m["metric"] == "f1" and m["steps"] == 2
    assert m["data"] == {"train": 36, "dev": 4, "test": 8}
    for split in ("dev", "test"):
        assert 0.0 <= m[split]["f1"] <= 1.0 and 0.0 <= m[split]["accuracy"] <= 1.0
    assert m["test_f1"] == m["test"]["f1"] and math.isfinite(m["train_loss_last50"])


def test_finetune_cli_on_stsb_regression(tmp_path, tiny_model, stsb_dir):
    out = tmp_path / "run"
    args = finetune_args(tiny_model, stsb_dir, out, "--task", "glue-stsb", "--policy", "none",
                         "--lr", "1e-2", max_steps=10)  # fmt: skip
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "pearson" and m["steps"] == 10
    assert set(m["test"]) == {"pearson", "spearman", "loss", "examples"}
    assert -1.0 <= m["test_pearson"] <= 1.0 and -1.0 <= m["test"]["spearman"] <= 1.0
    # MSE on scores of 0-5 from a random head: the loss drops as the head learns the mean
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    ckpt = json.loads(next(out.glob("checkpoint-*/config.json")).read_text())
    assert len(ckpt["id2label"]) == 1
    assert ckpt["problem_type"] == "regression"
    # the summary shows the correlations as coefficients, spearman next to pearson
    from rich.console import Console

    from slimfit.train import print_summary

    console = Console(record=True, width=200)
    print_summary(m, console)
    row = next(x for x in console.export_text().splitlines() if "test pearson" in x)
    t = m["test"]
    assert f"{t['pearson']:.4f} (spearman {t['spearman']:.4f})" in row and "%" not in row


def test_an_stsb_checkpoint_gets_a_classification_loss_on_mrpc(tmp_path, tiny_model):
    """A checkpoint fine-tuned on STS-B keeps problem_type "regression" in its config; on
    a classification task its new two-output head must train with cross-entropy."""
    from transformers import AutoModelForSequenceClassification

    from slimfit.train import TrainConfig, build_model

    reg = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=1,
                                                             ignore_mismatched_sizes=True)  # fmt: skip
    reg.config.problem_type = "regression"
    reg.save_pretrained(tmp_path / "stsb-model")
    load_model_and_tokenizer(str(tiny_model), 2)[1].save_pretrained(tmp_path / "stsb-model")
    cfg = TrainConfig(model=str(tmp_path / "stsb-model"), task="glue-mrpc", device="cpu")
    model, tok, _ = build_model(cfg, 2, torch.device("cpu"))
    batch = collate(tok, tokenize(tok, [("the cat", "a dog")], 16), [1], torch.device("cpu"))
    out = model(**batch)
    expected = torch.nn.functional.cross_entropy(out.logits, torch.tensor([1]))
    assert out.logits.shape == (1, 2) and float(out.loss) == pytest.approx(
        float(expected), rel=1e-5
    )


@pytest.fixture
def classifier_checkpoint(tmp_path, tiny_model):
    """A tiny BERT saved as a fine-tuned two-class classifier (SST-2 style): its config
    names its labels and keeps problem_type "single_label_classification"."""
    from transformers import AutoModelForSequenceClassification

    clf = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    clf.config.problem_type = "single_label_classification"
    clf.config.id2label = {0: "negative", 1: "positive"}
    clf.config.label2id = {"negative": 0, "positive": 1}
    clf.save_pretrained(tmp_path / "sst2-model")
    load_model_and_tokenizer(str(tiny_model), 2)[1].save_pretrained(tmp_path / "sst2-model")
    saved = json.loads((tmp_path / "sst2-model" / "config.json").read_text())
    assert saved["problem_type"] == "single_label_classification" and len(saved["id2label"]) == 2
    return tmp_path / "sst2-model"


def test_a_classifier_checkpoint_loads_for_stsb_as_regression_with_the_mse_loss(
    tmp_path, classifier_checkpoint, stsb_dir
):
    """transformers refuses a config with problem_type "single_label_classification" and
    one label; loading a classifier for STS-B must replace the problem type and the head."""
    num_labels = get_task("glue-stsb").num_labels
    model, tok, _ = load_model_and_tokenizer(str(classifier_checkpoint), num_labels)
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    assert model.classifier.out_features == 1 and len(model.config.id2label) == 1
    model = model.double().eval()
    data = load_task("glue-stsb", stsb_dir)
    feats = tokenize(tok, data.test.inputs[:6], 32)
    batch = collate(tok, feats, data.test.labels[:6], torch.device("cpu"))
    batch["labels"] = batch["labels"].double()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (6, 1)
    target = torch.tensor(data.test.labels[:6], dtype=torch.float64)
    mse = float(((out.logits[:, 0] - target) ** 2).mean())
    assert float(out.loss) == pytest.approx(mse, rel=1e-12)

    # the whole command: fine-tuning STS-B from the classifier runs and saves a regressor
    out_dir = tmp_path / "run"
    assert main(finetune_args(classifier_checkpoint, stsb_dir, out_dir, "--task", "glue-stsb")) == 0
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["metric"] == "pearson"
    assert set(m["test"]) == {"pearson", "spearman", "loss", "examples"}
    ckpt = json.loads(next(out_dir.glob("checkpoint-*/config.json")).read_text())
    assert ckpt["problem_type"] == "regression" and len(ckpt["id2label"]) == 1
