"""`slimfit finetune` checkpoints, --resume, non-finite losses, train log, report, OOM."""

from __future__ import annotations

import json

import pytest
import torch
from cli_args import finetune_args

from slimfit.checkpoint import latest_checkpoint, list_checkpoints
from slimfit.cli.main import main
from slimfit.data.samples import NEGATIVE, POSITIVE, TREC_SAMPLES, write_sample_data
from slimfit.models import save_tiny_model
from slimfit.train import TrainConfig, finetune

WORDS = " ".join(POSITIVE + NEGATIVE + sum(TREC_SAMPLES.values(), [])).lower().split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), WORDS, num_labels=2)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("data"), n_sentiment=40)


def _cfg(tiny_model, sample_dir, out, **kw) -> TrainConfig:
    base = dict(
        model=str(tiny_model),
        data_dir=str(sample_dir),
        task="sentiment",
        device="cpu",
        precision="fp32",
        batch_size=4,
        max_steps=6,
        freeze_ratio=0.5,
        checkpoint_every=1,
        output_dir=str(out),
        report=False,
    )
    return TrainConfig(**(base | kw))


def _args(tiny_model, sample_dir, out, *extra):
    return finetune_args(tiny_model, sample_dir, out, *extra, max_steps=4)


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


class Stop(Exception):
    pass


def test_resume_in_process_is_bit_identical(tmp_path, tiny_model, sample_dir, capsys):
    ref = tmp_path / "ref"
    finetune(_cfg(tiny_model, sample_dir, ref), progress=False)

    run = tmp_path / "run"

    def stop_at_3(step, loss):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        finetune(_cfg(tiny_model, sample_dir, run), progress=False, on_step=stop_at_3)
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]  # keep_last=2
    finetune(_cfg(tiny_model, sample_dir, run, resume=True), progress=True)
    assert capsys.readouterr().out.startswith(f"resume 3 from {run / 'checkpoint-3'}")
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "schedule.jsonl").read_text() == (ref / "schedule.jsonl").read_text()
    assert [r["step"] for r in _lines(run / "schedule.jsonl")] == list(range(6))
    assert _lines(run / "train_log.jsonl") == _lines(ref / "train_log.jsonl")
    m_ref = json.loads((ref / "metrics.json").read_text())
    m_run = json.loads((run / "metrics.json").read_text())
    assert m_run["steps"] == 6 and m_run["dev_accuracy"] == m_ref["dev_accuracy"]
    assert m_run["train_loss_last50"] == m_ref["train_loss_last50"]


def test_default_checkpoints_once_per_epoch_and_at_end(tmp_path, tiny_model, sample_dir):
    out = tmp_path / "run"
    m = finetune(
        _cfg(tiny_model, sample_dir, out, checkpoint_every=None, max_steps=None, epochs=1.5),
        progress=False,
    )
    spe = m["steps_per_epoch"]
    assert [s for s, _ in list_checkpoints(out)] == [spe, m["steps"]]


def test_train_log_has_loss_lr_and_dev_metric(tmp_path, tiny_model, sample_dir):
    out = tmp_path / "run"
    finetune(_cfg(tiny_model, sample_dir, out), progress=False)
    log = _lines(out / "train_log.jsonl")
    assert [r["step"] for r in log[:-1]] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) == {"step", "loss", "lr"} for r in log[:-1])
    assert log[0]["lr"] > log[-2]["lr"] == 0.0
    assert set(log[-1]) == {"step", "dev_accuracy"} and log[-1]["step"] == 6


def test_resume_cli_errors(tmp_path, tiny_model, sample_dir, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model, sample_dir, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no complete slimfit checkpoint" in err
    assert main(_args(tiny_model, sample_dir, out)) == 0
    capsys.readouterr()
    # a fresh run over an earlier one's checkpoints is refused, nothing is touched
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(_args(tiny_model, sample_dir, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --resume" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # other options than the checkpoint's run
    assert main(_args(tiny_model, sample_dir, out, "--resume", "--max-steps", "9")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run of 4 steps" in err


def _nan_after(monkeypatch, n):
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0}

    def fake(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > n else loss

    monkeypatch.setattr(F, "cross_entropy", fake)


def test_nonfinite_raise_names_step_and_checkpoint(tmp_path, tiny_model, sample_dir, capsys):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        _nan_after(mp, 2)
        rc = main(_args(tiny_model, sample_dir, out, "--checkpoint-every", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "at step 3" in err and str(out / "checkpoint-2") in err


def test_nonfinite_skip_finishes(tmp_path, tiny_model, sample_dir, capsys):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        _nan_after(mp, 2)
        with pytest.warns(UserWarning, match="skipping step 3"):
            # evaluation losses are NaN too; the training run itself finishes
            rc = main(_args(tiny_model, sample_dir, out, "--on-nonfinite", "skip"))
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4
    assert [r["step"] for r in _lines(out / "train_log.jsonl")][:2] == [1, 2]


def test_oom_is_one_sentence(tmp_path, tiny_model, sample_dir, capsys, monkeypatch):
    import slimfit.train as train

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(train, "train_step", oom)
    rc = main(_args(tiny_model, sample_dir, tmp_path / "run"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "batch size 4" in err and "slimfit plan" in err and "--freeze-ratio" in err


def test_report_written_and_failure_is_a_warning(tmp_path, tiny_model, sample_dir, capsys):
    import slimfit.report as report

    out = tmp_path / "run"
    args = [a for a in _args(tiny_model, sample_dir, out) if a != "--no-report"]
    assert main(args) == 0
    assert (out / "report.md").is_file() and (out / "training_curves.png").is_file()

    def broken(run_dir, predict=True):
        raise RuntimeError("no figures today")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "make_report", broken)
        assert (
            main([a for a in _args(tiny_model, sample_dir, tmp_path / "b") if a != "--no-report"])
            == 0
        )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: the report was not written (no figures today)" in err


def test_compression_auto_and_conversion_printed(tmp_path, tiny_model, sample_dir, capsys):
    m = finetune(_cfg(tiny_model, sample_dir, tmp_path / "a", max_steps=2), progress=False)
    assert m["slimfit"]["compression"] == "none"  # auto on CPU
    finetune(
        _cfg(tiny_model, sample_dir, tmp_path / "b", max_steps=2, compression="default"),
        progress=True,
    )
    printed = capsys.readouterr().out
    assert "convert" in printed.lower(), printed
