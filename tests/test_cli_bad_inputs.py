"""`slimfit finetune` on bad inputs (issue 7 item 4): exit code 2, one line on stderr, no
traceback, and nothing already in the output directory is lost."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_args import finetune_args

from slimfit.cli.main import main
from slimfit.data.samples import NEGATIVE, POSITIVE, write_sample_data
from slimfit.models import save_tiny_model

WORDS = " ".join(POSITIVE + NEGATIVE).lower().split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    model = save_tiny_model(base / "model", WORDS, num_labels=2)
    data = write_sample_data(base / "data", n_sentiment=40)
    bad_type = base / "bad-type"
    bad_type.mkdir()
    (bad_type / "config.json").write_text(json.dumps({"model_type": "nosuchmodel"}))
    bad_data = base / "bad-data"
    bad_data.mkdir()
    (bad_data / "movieReviewSnippets_GroundTruth.csv.gz").write_bytes(
        gzip.compress(b"id,text\n1,a fine film\n")
    )
    a_file = base / "a-file"
    a_file.write_text("not a folder\n")
    return {
        "model": model,
        "data": data,
        "bad-type": bad_type,
        "bad-data": bad_data,
        "file": a_file,
    }


def _args(inputs, out, *extra):
    return finetune_args(inputs["model"], inputs["data"], out, *extra)


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def _expect_error(capsys, argv, message, out: Path | None = None):
    before = _snapshot(out) if out is not None and out.is_dir() else None
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("slimfit finetune: error: "), err
    assert message in err, err
    if before is not None:
        assert _snapshot(out) == before  # nothing already written is lost or changed
    return err


@pytest.fixture
def out(tmp_path):
    """An output directory that already holds a file of the user's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    return out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "./no-such-model-folder"], "does not exist"),
        (["--task", "imagenet"], "unknown task 'imagenet'"),
        (["--freeze-ratio", "1.0"], "--freeze-ratio must be in [0, 1), got 1.0"),
        (["--freeze-ratio", "-0.1"], "--freeze-ratio must be in [0, 1), got -0.1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
        (["--model", "{bad-type}"], "model_type 'nosuchmodel'"),
        (["--data-dir", "{bad-data}"], "does not start with the header id,sentiment,text"),
        (["--resume"], "holds no complete slimfit checkpoint"),
    ],
)
def test_bad_input(extra, message, inputs, out, capsys):
    extra = [inputs.get(a[1:-1], a) if a.startswith("{") else a for a in extra]
    _expect_error(capsys, _args(inputs, out, *map(str, extra)), message, out)


def test_model_without_freezable_units(inputs, out, capsys, monkeypatch):
    import importlib

    attach_module = importlib.import_module("slimfit.attach")  # the package re-exports attach()
    monkeypatch.setattr(attach_module, "find_units", lambda *a, **k: [])
    _expect_error(capsys, _args(inputs, out), "the model has no freezable units", out)


def test_output_dir_not_writable(inputs, capsys):
    target = inputs["file"] / "run"  # under a regular file: fails even as root
    _expect_error(capsys, _args(inputs, target), "cannot create the output directory")
    assert inputs["file"].read_text() == "not a folder\n"


@pytest.fixture
def finished_run(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(inputs, out)) == 0  # one checkpoint: the final one (step 2)
    capsys.readouterr()
    return out


def test_corrupted_checkpoint_truncated(inputs, finished_run, capsys):
    weights = finished_run / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _expect_error(
        capsys,
        _args(inputs, finished_run, "--resume"),
        "model.safetensors is missing or has the wrong size",
        finished_run,
    )


def test_corrupted_checkpoint_same_size(inputs, finished_run, capsys):
    weights = finished_run / "checkpoint-2" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    _expect_error(
        capsys, _args(inputs, finished_run, "--resume"), "does not match its checksum", finished_run
    )


def test_foreign_checkpoint_folder(inputs, out, capsys):
    foreign = out / "checkpoint-3"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"\0" * 64)
    (foreign / "config.json").write_text("{}")
    _expect_error(capsys, _args(inputs, out, "--resume"), "is not a slimfit checkpoint", out)


def test_fresh_run_over_checkpoints_refused(inputs, finished_run, capsys):
    _expect_error(capsys, _args(inputs, finished_run), "pass --resume", finished_run)


def test_debug_shows_the_traceback(inputs, out):
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        main(
            [
                *_args(inputs, out, "--batch-size", "0")[:1],
                "--debug",
                *_args(inputs, out, "--batch-size", "0")[1:],
            ]
        )
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        main(["--debug", *_args(inputs, out, "--batch-size", "0")])


def test_process_one_line_for_unknown_model_type(inputs, out):
    proc = subprocess.run(
        [sys.executable, "-m", "slimfit", *_args(inputs, out, "--model", str(inputs["bad-type"]))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "model_type 'nosuchmodel'" in proc.stderr
    assert (out / "notes.txt").read_text() == "keep me\n"
