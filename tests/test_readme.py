"""The README's numbers are generated from committed results, and its commands are there."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_fresh_machine_commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```")
    assert "slimfit finetune" in blocks[1] and "pip install" in blocks[1]
    assert "pytest" in blocks[3]


def test_performance_table_matches_committed_bench_results():
    run = "benchmarks/results/2026-12-06-bench-bias-casts-h100"
    cmd = [sys.executable, "-m", "slimfit.bench.readme_table", run, "--check", "README.md"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_accuracy_table_matches_committed_results():
    results = [
        "benchmarks/results/2026-12-04-text-stale400-h200/sentiment-seeds-0-5/accuracy-sentiment.json",
        "benchmarks/results/2026-12-03-taylor-tune-h200/seeds-0-11/accuracy-trec.json",
        "benchmarks/results/2026-12-04-vision-epochs24-seeds-h200/accuracy-fashion-mnist.json",
        "benchmarks/results/2026-12-04-vision-epochs12-seeds-h200/accuracy-fashion-mnist.json",
        "benchmarks/results/2026-12-03-taylor-score-h200/accuracy-trec.json",
        "benchmarks/results/2026-12-03-taylor-score-h200/accuracy-sentiment.json",
        "benchmarks/results/2026-12-03-taylor-score-h200/accuracy-fashion-mnist.json",
        "benchmarks/results/2026-11-23-accuracy-lr-sweep-h100/accuracy-sentiment.json",
        "benchmarks/results/2026-11-23-accuracy-lr-sweep-h100/accuracy-trec.json",
        "benchmarks/results/2026-11-23-accuracy-lr-sweep-h100/accuracy-fashion-mnist.json",
        "benchmarks/results/2026-11-23-accuracy-ratios-lora-h200/accuracy-sentiment.json",
        "benchmarks/results/2026-11-23-accuracy-ratios-lora-h200/accuracy-trec.json",
    ]
    cmd = [sys.executable, "benchmarks/readme_accuracy.py", *results, "--check", "README.md"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_ddp_block_matches_committed_results():
    result = "benchmarks/results/2026-11-23-ddp-h200x2/ddp_gpu.json"
    cmd = [sys.executable, "benchmarks/readme_ddp.py", result, "--check", "README.md"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _readme_slimfit_commands() -> list[list[str]]:
    """The argv (after ``slimfit``) of every ``slimfit`` command in the README's shell blocks
    (``&&`` chains split, ``# comments`` dropped)."""
    import shlex

    text = (ROOT / "README.md").read_text()
    commands = []
    for block in text.split("```")[1::2]:
        lang, _, body = block.partition("\n")
        if lang.strip() not in ("bash", "sh"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            for part in line.split(" #")[0].split("&&"):
                words = shlex.split(part)
                if words[:1] == ["slimfit"]:
                    commands.append(words[1:])
    return commands


def _strict_parser():
    """The CLI's own parser, with no abbreviated options (``--out`` must not pass for
    ``--output-dir``)."""
    import argparse

    from slimfit.cli.main import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    return parser


def test_readme_commands_parse_with_the_cli_and_name_registered_tasks():
    """Every documented `slimfit ...` line parses with the real argparse parser and, for
    finetune / finetune-qa, gives a valid TrainConfig (known task, values in range), so the
    README cannot drift from the CLI."""
    import importlib

    import pytest

    from slimfit.data import TASKS
    from slimfit.data.glue import GLUE

    parser = _strict_parser()
    commands = _readme_slimfit_commands()
    tasks = set()
    for argv in commands:
        if "--help" in argv:
            assert parser.parse_known_args(argv[:1])[0].command == argv[0]
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README: `slimfit {' '.join(argv)}` does not parse with the CLI")
        if args.command in ("finetune", "finetune-qa"):
            cfg = importlib.import_module(args._module).config_from_args(args)
            if args.command == "finetune":
                assert cfg.task in TASKS
                tasks.add(cfg.task)
    # the paper tasks all have a documented command (glue-wnli is not in the paper)
    assert tasks >= (set(GLUE) - {"glue-wnli"}) | {"cifar10", "cifar100", "image-folder"}
    assert any(argv[0] == "finetune-qa" and "--help" not in argv for argv in commands)


def test_the_strict_parser_refuses_an_unknown_or_abbreviated_flag(capsys):
    import pytest

    parser = _strict_parser()
    for argv in (["finetune", "--out", "x"], ["finetune-qa", "--output-dir", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert "unrecognized arguments" in capsys.readouterr().err
