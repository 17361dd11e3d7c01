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
    run = "benchmarks/results/2026-12-04-bench-taylor-default-h200"
    cmd = [sys.executable, "-m", "slimfit.bench.readme_table", run, "--check", "README.md"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_accuracy_table_matches_committed_results():
    results = [
        "benchmarks/results/2026-12-03-taylor-tune-h200/seeds-0-11/accuracy-trec.json",
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
