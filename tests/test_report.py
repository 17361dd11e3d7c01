"""`slimfit report`: figures and report.md from a run directory (synthetic runs)."""

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from slimfit import report
from slimfit.cli.main import main
from slimfit.config import SlimFitConfig
from slimfit.scheduler import InterLayerScheduler
from slimfit.units import find_units


def _unit_names(layers: int) -> list[str]:
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=layers))
    return [u.name for u in find_units(model, SlimFitConfig())]


def write_run(path, layers=3, steps=120, ratio=0.8, log=True, metrics=None):
    """A run directory as `slimfit finetune` writes it, with a real ILS schedule."""
    path.mkdir(parents=True, exist_ok=True)
    units = _unit_names(layers)
    sched = InterLayerScheduler(len(units), ratio, "ils", 0)
    g = torch.Generator().manual_seed(0)
    with open(path / "schedule.jsonl", "w") as f:
        for t in range(steps):
            flags = sched.frozen.tolist()
            rec = {
                "step": t,
                "frozen": [n for n, x in zip(units, flags) if x],
                "trained": [n for n, x in zip(units, flags) if not x],
            }
            f.write(json.dumps(rec) + "\n")
            trained = (~sched.frozen).nonzero().flatten()
            sched.advance(trained, torch.rand(len(trained), generator=g, dtype=torch.float64))
    if log:
        with open(path / "train_log.jsonl", "w") as f:
            for t in range(0, steps, 5):
                rec = {"step": t, "loss": 0.7 * math.exp(-t / 50) + 0.2}
                if t % 40 == 0:
                    rec["eval_accuracy"] = 0.5 + 0.003 * t
                f.write(json.dumps(rec) + "\n")
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    return units


MEASURED = {
    "model": "tiny-bert",
    "task": "sentiment",
    "policy": "ils",
    "metric": "accuracy",
    "dev": {"accuracy": 0.81},
    "test": {"accuracy": 0.8},
    "config": {"batch_size": 8, "freeze_ratio": 0.8, "compression": "none"},
    "peak_memory_bytes": 3 * 2**30,
    "memory": {
        "weights_bytes": 2**30,
        "gradients_bytes": 2**28,
        "optimizer_bytes": 2**31,
        "static_activations_bytes": 2**29,
        "dynamic_activations_bytes": 2**27,
    },
}


def test_report_writes_readable_figures_and_summary(tmp_path):
    run = tmp_path / "run"
    units = write_run(run, metrics=MEASURED)
    files = report.make_report(run)
    names = [p.name for p in files]
    assert names == [
        "schedule_heatmap.png",
        "trained_per_block.png",
        "memory_breakdown.png",
        "training_curves.png",
        "report.md",
    ]
    for p in files[:-1]:
        h, w = imread(p).shape[:2]
        assert w >= 900 and h >= 300, (p.name, w, h)
    # the heatmap is tall enough for one row per unit
    assert imread(files[0]).shape[0] >= 3 * len(units)
    md = (run / "report.md").read_text()
    for fig in names[:-1]:
        assert f"({fig})" in md
    assert "Source: measured (metrics.json)." in md
    assert "| block 2 | 8 |" in md and "| embeddings | 4 |" in md
    assert "| test accuracy | 80.00% |" in md


def test_schedule_is_read_back_in_model_order_and_exactly(tmp_path):
    run = tmp_path / "run"
    units = write_run(run, layers=2, steps=30, log=False)
    names, steps, trained = report.read_schedule(run / "schedule.jsonl")
    assert names == units  # BERT's parameter order: embeddings, blocks, pooler
    assert steps.tolist() == list(range(30))
    n_trained = len(units) - int(0.8 * len(units))
    assert (trained.sum(axis=0) == n_trained).all()
    first = json.loads((run / "schedule.jsonl").read_text().splitlines()[0])
    assert [n for n, t in zip(names, trained[:, 0]) if t] == first["trained"]


def test_binning_and_block_fractions_are_exact():
    m = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=bool)
    np.testing.assert_allclose(report.binned(m, 2), [[0.5, 1.0, 0.0], [0.0, 0.5, 1.0]])
    units = [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.output.dense.weight",
        "bert.encoder.layer.1.output.dense.weight",
        "bert.pooler.dense.weight",
    ]
    trained = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 1]], dtype=bool)
    labels, frac = report.block_fractions(units, trained)
    assert labels == ["embeddings", "block 0", "block 1", "head / other"]
    np.testing.assert_allclose(frac, [[1, 0], [0.5, 1], [0, 0], [1, 1]])


def test_long_runs_are_binned(tmp_path):
    run = tmp_path / "run"
    write_run(run, layers=12, steps=2000, ratio=0.95, log=False)
    files = report.make_report(run, predict=False)
    assert [p.name for p in files] == ["schedule_heatmap.png", "trained_per_block.png", "report.md"]
    h, w = imread(files[0]).shape[:2]
    assert w < 2000 and 1000 <= h <= 2000  # ~100 units: tall, but one screen
    md = (run / "report.md").read_text()
    assert "no curves" in md and "No memory breakdown" in md


def test_memory_is_predicted_when_not_measured(tmp_path):
    from transformers import BertConfig

    model_dir = tmp_path / "tiny-bert"
    BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    ).save_pretrained(model_dir)
    metrics = dict(MEASURED, model_path=str(model_dir))
    del metrics["memory"]
    metrics["config"] = dict(metrics["config"], max_length=64)
    run = tmp_path / "run"
    write_run(run, metrics=metrics)
    files = report.make_report(run)
    assert (run / "memory_breakdown.png") in files
    md = (run / "report.md").read_text()
    assert "predicted by slimfit plan (mode freeze-only, batch 8" in md
    assert "| static activations |" in md


def test_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        report.make_report(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no schedule.jsonl"):
        report.make_report(tmp_path)
    (tmp_path / "schedule.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no steps"):
        report.make_report(tmp_path)
    (tmp_path / "schedule.jsonl").write_text(
        '{"step": 0, "frozen": [], "trained": ["a"]}\nnot json\n'
    )
    with pytest.raises(ValueError, match=r"schedule.jsonl:2 is not a schedule record"):
        report.make_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("slimfit report: error:") for line in err)


def test_cli_lists_the_files(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, steps=20, log=False)
    assert main(["report", str(run), "--no-predict"]) == 0
    out = capsys.readouterr().out
    assert "schedule_heatmap.png" in out and "report.md" in out


def test_correlations_are_shown_as_coefficients_and_fractions_as_percent(tmp_path):
    """Pearson, Spearman and Matthews are coefficients in [-1, 1], not percentages; accuracy
    and F1 are. A split's other metrics follow the primary one."""
    assert report.format_metric("pearson", 0.85123) == "0.8512"
    assert report.format_metric("matthews", -0.05) == "-0.0500"
    assert report.format_metric("f1", 0.85) == "85.00%"
    assert report.format_metric("accuracy", 1.0) == "100.00%"
    assert report.format_metric("spearman", float("nan")) == "n/a"  # constant predictions
    stsb = {**MEASURED, "task": "glue-stsb", "metric": "pearson"}
    stsb["dev"] = {"pearson": 0.9, "spearman": 0.88, "loss": 0.6, "examples": 4}
    stsb["test"] = {"pearson": 0.85123, "spearman": 0.84333, "loss": 0.7, "examples": 12}
    write_run(tmp_path / "stsb", metrics=stsb)
    report.make_report(tmp_path / "stsb")
    md = (tmp_path / "stsb" / "report.md").read_text()
    assert "| test pearson | 0.8512 (spearman 0.8433) |" in md
    assert "| dev pearson | 0.9000 (spearman 0.8800) |" in md
    mrpc = {**MEASURED, "task": "glue-mrpc", "metric": "f1"}
    mrpc["test"] = {"f1": 0.85, "accuracy": 0.8, "loss": 0.4, "examples": 8}
    write_run(tmp_path / "mrpc", metrics=mrpc)
    report.make_report(tmp_path / "mrpc")
    assert "| test f1 | 85.00% (accuracy 80.00%) |" in (tmp_path / "mrpc" / "report.md").read_text()
