"""`torchrun --nproc-per-node 2 -m slimfit finetune` on CPU (gloo): rank 0 writes one
metrics.json, and the freezing schedule matches a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slimfit.data.samples import NEGATIVE, POSITIVE, write_sample_data
from slimfit.models import save_tiny_model

GLOO_TEARDOWN_ABORT = "terminate called without an active exception"
SRC = Path(__file__).resolve().parent.parent / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", TOKENIZERS_PARALLELISM="false")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _args(model, data, out) -> list[str]:
    return [
        "finetune",
        "--model",
        str(model),
        "--data-dir",
        str(data),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--freeze-ratio",
        "0.5",
        "--no-report",
        "--output-dir",
        str(out),
    ]


def _schedule(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "schedule.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_ranks_cpu_matches_one_process(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    model = save_tiny_model(tmp_path / "model", " ".join(POSITIVE + NEGATIVE).lower().split())
    data = write_sample_data(tmp_path / "data", n_sentiment=40)

    one = tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, "-m", "slimfit", *_args(model, data, one)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = tmp_path / "two"
    for _attempt in range(2):
        shutil.rmtree(two, ignore_errors=True)
        cmd = [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
        cmd += ["--master-port", str(_free_port()), "-m", "slimfit", *_args(model, data, two)]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        # CI once saw a rank abort in gloo's C++ teardown ("terminate called without an
        # active exception", SIGABRT) that 32 local runs, 20 of them under load, never
        # showed: one retry for that signature alone; any other failure fails at once.
        if proc.returncode == 0 or GLOO_TEARDOWN_ABORT not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("slimfit finetune:") == 1  # one summary: rank 0 prints alone

    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m2["steps"] == m1["steps"] == 3
    assert [r["step"] for r in _schedule(two)] == [0, 1, 2]
    assert _schedule(two) == _schedule(one)  # identical frozen sets at every step
    # close, not equal: each rank draws its own dropout masks for its half of the batch
    assert abs(m2["train_loss_last50"] - m1["train_loss_last50"]) < 0.05
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-3"
    ]
