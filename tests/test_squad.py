"""SQuAD 2.0: loading, windows with stride, post-processing, the official metric, and a
tiny `slimfit finetune-qa` run, all offline on fixtures written into tmp_path."""

from __future__ import annotations

import json
import re

import pytest

from slimfit.cli.main import main
from slimfit.data.squad import (
    eval_features,
    exact_match,
    f1_score,
    gold_answers,
    load_squad,
    normalize_answer,
    postprocess_predictions,
    squad_v2_metrics,
    train_features,
)
from slimfit.models import save_tiny_model

MAX_LENGTH, STRIDE = 32, 8
FILLER = [f"w{i}" for i in range(70)]
LONG = " ".join([*FILLER[:29], "the golden key lies under the old stone .", *FILLER[29:]])
SHORT = "The cat sat on the mat. The dog ran in the park."


def _example(qid, context, question, answers=()):
    return {
        "id": qid,
        "title": "fixture",
        "context": context,
        "question": question,
        "answers": {"text": list(answers), "answer_start": [context.index(a) for a in answers]},
    }


EXAMPLES = [
    _example("q1", SHORT, "Where did the cat sit?", ["on the mat"]),
    _example("q2", SHORT, "   What did the dog do?", ["ran in the park", "ran"]),
    _example("q3", SHORT, "What did the bird eat?"),
    _example("q4", LONG, "What lies under the old stone?", ["the golden key"]),
    _example("q5", LONG, "Where is the silver coin?"),
]
WORDS = sorted(
    {
        w
        for e in EXAMPLES
        for w in re.findall(r"\w+|[^\w\s]", f"{e['context']} {e['question']}".lower())
    }
)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def squad_dir(tmp_path):
    folder = tmp_path / "squad"
    folder.mkdir()
    for split in ("train", "validation"):
        lines = [json.dumps(e) for e in EXAMPLES]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def squad(squad_dir):
    return load_squad(squad_dir)


# -- loading ---------------------------------------------------------------------------------


def test_load_squad_from_jsonl_and_from_the_hubs_parquet_layout(squad, tmp_path):
    assert list(squad) == ["train", "validation"]
    assert squad["validation"]["id"] == ["q1", "q2", "q3", "q4", "q5"]
    assert squad["train"][3]["answers"] == {
        "text": ["the golden key"],
        "answer_start": [LONG.index("the golden key")],
    }
    assert gold_answers(squad["validation"])["q3"] == []
    hub = tmp_path / "hub" / "squad_v2"  # the layout of the hub repository's files
    hub.mkdir(parents=True)
    squad["validation"].to_parquet(str(hub / "validation-00000-of-00001.parquet"))
    loaded = load_squad(hub.parent, splits=("validation",))
    assert loaded["validation"].to_list() == squad["validation"].to_list()


def test_missing_or_wrong_files_are_one_clear_sentence(tmp_path, squad_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no SQuAD 2.0 train split .*; pass --data-dir"):
        load_squad(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist; pass --data-dir"):
        load_squad(tmp_path / "nowhere")
    (squad_dir / "validation.jsonl").write_text(json.dumps({"id": "x", "question": "?"}) + "\n")
    with pytest.raises(ValueError, match="lacks the column.s. title, context, answers"):
        load_squad(squad_dir)


# -- features --------------------------------------------------------------------------------


def test_train_labels_decode_to_the_answer(squad, tokenizer):
    feats = train_features(squad["train"], tokenizer, MAX_LENGTH, STRIDE)
    answers = [
        tokenizer.decode(f["input_ids"][f["start_positions"] : f["end_positions"] + 1])
        for f in feats
        if f["start_positions"] != 0
    ]
    # q1 and q2 fit one window each; the long q4 has its answer in several
    assert answers[:2] == ["on the mat", "ran in the park"]
    assert len(answers) > 3 and set(answers[2:]) == {"the golden key"}
    assert "question" not in feats.column_names and "length" in feats.column_names


def test_windows_with_stride_find_the_answer_exactly_where_it_is(squad, tokenizer):
    train = train_features(squad["train"], tokenizer, MAX_LENGTH, STRIDE)
    valid = eval_features(squad["validation"], tokenizer, MAX_LENGTH, STRIDE)
    assert len(train) == len(valid)  # the same windows, labelled or with offsets
    q4 = [i for i, e in enumerate(valid["example_id"]) if e == "q4"]
    assert len(q4) >= 4  # the long context needs several windows
    start_char = LONG.index("the golden key")
    end_char = start_char + len("the golden key")
    holding = set()
    for i in q4:
        offsets = [o for o in valid[i]["offset_mapping"] if o is not None]
        if offsets[0][0] <= start_char and offsets[-1][1] >= end_char:
            holding.add(i)
    labelled = {i for i in q4 if train[i]["start_positions"] != 0}
    assert holding and labelled == holding and len(holding) < len(q4)
    for i in set(q4) - holding:  # the other windows point at CLS
        assert train[i]["start_positions"] == train[i]["end_positions"] == 0
        assert train[i]["input_ids"][0] == tokenizer.cls_token_id
    # consecutive windows share exactly `STRIDE` context tokens
    context = [
        [t for t, o in zip(valid[i]["input_ids"], valid[i]["offset_mapping"]) if o is not None]
        for i in q4
    ]
    for a, b in zip(context, context[1:]):
        assert a[-STRIDE:] == b[:STRIDE]
    assert all(len(f["input_ids"]) <= MAX_LENGTH for f in train)


def test_unanswerable_questions_point_at_cls_in_every_window(squad, tokenizer):
    train = train_features(squad["train"], tokenizer, MAX_LENGTH, STRIDE)
    valid = eval_features(squad["validation"], tokenizer, MAX_LENGTH, STRIDE)
    for qid in ("q3", "q5"):
        windows = [i for i, e in enumerate(valid["example_id"]) if e == qid]
        assert windows
        assert all(train[i]["start_positions"] == train[i]["end_positions"] == 0 for i in windows)


def test_leading_spaces_of_a_question_are_dropped(squad, tokenizer):
    valid = eval_features(squad["validation"], tokenizer, MAX_LENGTH, STRIDE)
    q2 = valid["example_id"].index("q2")
    assert tokenizer.decode(valid[q2]["input_ids"]).startswith("[CLS] what did the dog do?")


def test_a_stride_that_leaves_no_room_is_a_sentence_not_a_rust_panic(squad, tokenizer):
    with pytest.raises(ValueError, match="question q1 has 6 tokens.*lower --doc-stride"):
        train_features(squad["train"], tokenizer, max_length=16, doc_stride=8)
    with pytest.raises(ValueError, match=r"--doc-stride must be in \[0, --max-length\)"):
        eval_features(squad["validation"], tokenizer, max_length=32, doc_stride=32)


# -- post-processing -------------------------------------------------------------------------

CONTEXT = "alpha beta gamma delta"
# two windows of [CLS] question [SEP] context [SEP]: tokens 0-2 are CLS, question, SEP
OFFSETS = [None, None, None, (0, 5), (6, 10), (11, 16), None]
OFFSETS_2 = [None, None, None, (6, 10), (11, 16), (17, 22), None]


def _features(*offsets):
    return {
        "example_id": ["e"] * len(offsets),
        "cls_index": [0] * len(offsets),
        "offset_mapping": list(offsets),
    }


def _post(features, starts, ends, **kw):
    return postprocess_predictions(
        {"id": ["e"], "context": [CONTEXT]}, features, starts, ends, **kw
    )


def test_postprocessing_picks_the_best_start_plus_end_over_all_windows():
    feats = _features(OFFSETS, OFFSETS_2)
    #            CLS  q    SEP  tok3 tok4 tok5 SEP
    s1 = [0.0, 9.0, 0.0, 2.0, 1.0, 0.0, 0.0]  # a question token has the top logit: never picked
    e1 = [0.0, 9.0, 0.0, 0.0, 3.0, 0.0, 0.0]
    s2 = [0.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0]
    e2 = [0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0]
    assert _post(feats, [s1, s2], [e1, e2]) == {"e": "gamma delta"}  # 8 beats 2 + 3
    only_first = _features(OFFSETS)
    assert _post(only_first, [s1], [e1]) == {"e": "alpha beta"}
    # an end before the start, or a span over max_answer_length tokens, is no candidate
    backwards = [[0, 0, 0, 0, 0, 5, 0]], [[0, 0, 0, 5, 0, 0, 0]]
    assert _post(only_first, *backwards, n_best=1) == {"e": ""}
    assert _post(only_first, *backwards) == {"e": "gamma"}  # 20-best: 5 + 0 from (5, 5)
    assert _post(only_first, [s1], [e1], max_answer_length=1) == {"e": "beta"}  # 1 + 3


def test_postprocessing_predicts_no_answer_when_cls_wins():
    feats = _features(OFFSETS)
    start, end = [3.0, 0, 0, 2.0, 0, 0, 0], [3.0, 0, 0, 0, 0, 2.0, 0]
    assert _post(feats, [start], [end]) == {"e": ""}  # null 6 > span 4
    assert _post(feats, [start], [end], null_threshold=2.0) == {"e": "alpha beta gamma"}
    start[0] = end[0] = 2.0
    assert _post(feats, [start], [end]) == {"e": "alpha beta gamma"}  # a tie keeps the span
    # the null score is the smallest CLS score over the windows
    two = _features(OFFSETS, OFFSETS_2)
    low_cls = [-5.0, 0, 0, 0, 0, 0, 0]
    assert _post(
        two, [[9.0, 0, 0, 2.0, 0, 0, 0], low_cls], [[9.0, 0, 0, 2.0, 0, 0, 0], low_cls]
    ) == {"e": "alpha"}


def test_labels_and_postprocessing_agree_with_oracle_logits(squad, tokenizer):
    """Logits that put all their mass on the training labels give back the gold answers:
    the labelled tokens, the windows' offsets and the span extraction agree."""
    train = train_features(squad["train"], tokenizer, MAX_LENGTH, STRIDE)
    valid = eval_features(squad["validation"], tokenizer, MAX_LENGTH, STRIDE)

    def one_hot(column):
        return [
            [10.0 * (k == pos) for k in range(n)] for pos, n in zip(train[column], train["length"])
        ]

    predictions = postprocess_predictions(
        squad["validation"], valid, one_hot("start_positions"), one_hot("end_positions")
    )
    assert predictions == {
        "q1": "on the mat", "q2": "ran in the park", "q3": "", "q4": "the golden key", "q5": "",
    }  # fmt: skip
    scores = squad_v2_metrics(predictions, gold_answers(squad["validation"]))
    assert scores["exact"] == scores["f1"] == 100.0


# -- the official metric ---------------------------------------------------------------------


def test_normalisation_follows_the_official_script():
    assert normalize_answer("The  Cat's, hat!") == "cats hat"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles are whole words only
    assert normalize_answer("  A  ") == ""
    assert exact_match("The cat.", "cat") == 1 and exact_match("cat", "cats") == 0


def test_f1_on_hand_checked_cases():
    # gold tokens cat sat on mat, prediction cat on mat: precision 1, recall 3/4
    assert f1_score("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # repeated tokens count once per occurrence: gold a b b, pred b b b -> common 2
    assert f1_score("x y y", "y y y") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert f1_score("cat", "dog") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("", "cat") == 0.0 and f1_score("cat", "") == 0.0


def test_squad_v2_metrics_max_over_golds_no_answers_and_the_split():
    references = {
        "a": ["the cat sat on the mat", "on the mat"],  # pred "on the mat": EM 1 by the second
        "b": ["New York City"],  # pred "york": EM 0, F1 2 * 1 * 1/3 / (4/3) = 0.5
        "c": [],  # no answer, predicted none: EM 1, F1 1
        "d": [],  # no answer, predicted one: EM 0, F1 0
        "e": ["The"],  # normalises to nothing: counts as a no-answer gold, but HasAns
    }
    predictions = {"a": "on the mat", "b": "york", "c": "", "d": "a cat", "e": ""}
    m = squad_v2_metrics(predictions, references)
    assert m["total"] == 5 and m["HasAns_total"] == 3 and m["NoAns_total"] == 2
    assert m["exact"] == pytest.approx(100 * 3 / 5)
    assert m["f1"] == pytest.approx(100 * (1 + 0.5 + 1 + 0 + 1) / 5)
    assert m["HasAns_exact"] == pytest.approx(100 * 2 / 3)
    assert m["HasAns_f1"] == pytest.approx(100 * 2.5 / 3)
    assert m["NoAns_exact"] == m["NoAns_f1"] == pytest.approx(50.0)
    only_answers = squad_v2_metrics({"b": "new york city"}, {"b": ["New York City"]})
    assert only_answers == {
        "exact": 100.0, "f1": 100.0, "total": 1,
        "HasAns_exact": 100.0, "HasAns_f1": 100.0, "HasAns_total": 1,
    }  # fmt: skip
    with pytest.raises(ValueError, match="1 of 2 questions have no prediction .e.g. d."):
        squad_v2_metrics({"c": ""}, {"c": [], "d": []})


# -- the command -----------------------------------------------------------------------------


def _qa_args(model, data_dir, out, *extra):
    return [
        "finetune-qa", "--model", str(model), "--data-dir", str(data_dir), "--out", str(out),
        "--device", "cpu", "--precision", "fp32", "--batch-size", "4",
        "--max-length", str(MAX_LENGTH), "--doc-stride", str(STRIDE), "--quiet", *extra,
    ]  # fmt: skip


def test_finetune_qa_end_to_end_writes_metrics(tmp_path, tiny_model, squad_dir, squad, tokenizer):
    out = tmp_path / "run"
    rc = main(_qa_args(tiny_model, squad_dir, out, "--max-steps", "2", "--freeze-ratio", "0.5"))
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert m["task"] == "squad_v2" and m["steps"] == 2 and m["policy"] == "ils"
    n_feats = len(eval_features(squad["validation"], tokenizer, MAX_LENGTH, STRIDE))
    assert m["data"] == {
        "train_examples": 5, "train_features": n_feats,
        "validation_examples": 5, "validation_features": n_feats,
    }  # fmt: skip
    assert m["units"] == 20 and m["frozen_per_step"] == 10  # the QA BERT has no pooler
    assert sum(m["trained_steps_per_unit"].values()) == 2 * (20 - 10)
    assert sorted(predictions) == ["q1", "q2", "q3", "q4", "q5"]
    assert m["eval"] == squad_v2_metrics(predictions, gold_answers(squad["validation"]))
    assert m["eval"]["total"] == 5 and m["eval"]["HasAns_total"] == 3
    assert m["exact"] == m["eval"]["exact"] and 0.0 <= m["f1"] <= 100.0
    assert m["config"]["doc_stride"] == STRIDE and m["config"]["max_length"] == MAX_LENGTH


def test_finetune_qa_parses_finetunes_slimfit_flags():
    from slimfit.cli import finetune_qa
    from slimfit.cli.main import build_parser

    def cfg(*extra):
        args = build_parser().parse_args(["finetune-qa", "--model", "m", *extra])
        return finetune_qa.config_from_args(args)

    default = cfg()
    assert (default.policy, default.freeze_ratio, default.score) == ("ils", 0.8, None)
    assert (default.freeze_warmup_steps, default.compression, default.seed) == (0, "auto", 0)
    flags = ("--score", "relative", "--freeze-warmup-steps", "3", "--compression", "paper",
             "--seed", "7", "--policy", "random", "--freeze-ratio", "0.5",
             "--max-stale-steps", "5")  # fmt: skip
    c = cfg(*flags)
    assert (c.score, c.freeze_warmup_steps, c.compression, c.seed) == ("relative", 3, "paper", 7)
    assert (c.policy, c.freeze_ratio) == ("random", 0.5)
    # the same flags give the same SlimFit fields as `slimfit finetune`
    from slimfit.cli import finetune

    ft = finetune.config_from_args(build_parser().parse_args(["finetune", *flags]))
    assert (default.max_stale_steps, c.max_stale_steps) == (None, 5)
    fields = ("policy", "freeze_ratio", "score", "freeze_warmup_steps", "compression", "seed",
              "max_stale_steps")  # fmt: skip
    assert [getattr(ft, f) for f in fields] == [getattr(c, f) for f in fields]


@pytest.mark.parametrize("score", ["taylor", "relative"])
def test_finetune_qa_score_and_freeze_warmup_reach_slimfit(tmp_path, tiny_model, squad_dir, score):
    out = tmp_path / score
    extra = ("--max-steps", "2", "--freeze-ratio", "0.5", "--score", score,
             "--freeze-warmup-steps", "1", "--seed", "3")  # fmt: skip
    assert main(_qa_args(tiny_model, squad_dir, out, *extra)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["slimfit"]["score"] == score and m["config"]["score"] == score
    assert m["slimfit"]["warmup_steps"] == 1 and m["config"]["freeze_warmup_steps"] == 1
    assert m["slimfit"]["seed"] == 3 and m["config"]["seed"] == 3
    # step 1 is warm-up (all 20 units train), step 2 freezes 10 of them
    assert sum(m["trained_steps_per_unit"].values()) == 20 + (20 - 10)


def test_finetune_qa_unknown_score_exits_2(tmp_path, tiny_model, squad_dir, capsys):
    try:
        rc = main(_qa_args(tiny_model, squad_dir, tmp_path / "run", "--score", "gradnorm"))
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "argument --score: invalid choice: 'gradnorm'" in errors[0], err
    assert "relative" in errors[0] and "taylor" in errors[0]  # it names the choices
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--doc-stride", "40"], r"--doc-stride must be in \[0, --max-length\)"),
        (["--freeze-ratio", "1.5"], r"--freeze-ratio must be in \[0, 1\)"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--freeze-warmup-steps", "-1"], "--freeze-warmup-steps must be non-negative, got -1"),
        (["--compression", " "], "--compression must be a preset name"),
    ],
)
def test_finetune_qa_bad_arguments_exit_2(tmp_path, tiny_model, squad_dir, capsys, extra, message):
    assert main(_qa_args(tiny_model, squad_dir, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err)


def test_finetune_qa_missing_data_exit_2(tmp_path, tiny_model, capsys):
    (tmp_path / "empty").mkdir()
    assert main(_qa_args(tiny_model, tmp_path / "empty", tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("slimfit finetune-qa: error:") and "pass --data-dir" in err
