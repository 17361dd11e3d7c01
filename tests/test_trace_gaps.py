"""benchmarks/trace_gaps.py: a compute-stream gap is charged to the host op that issued the
kernel after it, and stream busy time and copies are summed from the trace."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from trace_gaps import analyse  # noqa: E402


def _x(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_gaps_are_charged_to_the_op_that_issued_the_next_kernel(tmp_path):
    events = [
        # host: a linear (an addmm inside it), then a cast; each launches one kernel
        _x("cpu_op", "aten::linear", 0, 40),
        _x("cpu_op", "aten::addmm", 5, 30),
        _x("cuda_runtime", "cudaLaunchKernel", 10, 5, correlation=1),
        _x("cpu_op", "aten::copy_", 100, 20),
        _x("cuda_runtime", "cudaLaunchKernel", 105, 5, correlation=2),
        _x("cuda_runtime", "cudaMemcpyAsync", 130, 3, correlation=3),
        # device: the gemm 20-60, idle until the cast's kernel at 110-120; a side-stream copy
        _x("kernel", "gemm", 20, 40, correlation=1, stream=7),
        _x("kernel", "copy", 110, 10, correlation=2, stream=7),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 135, 8, correlation=3, stream=45),
        {"ph": "f", "name": "ac2g", "ts": 110},  # flow events are not durations: ignored
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = analyse(str(path), top=5, min_gap_us=2.0)
    assert r["compute_stream"] == 7
    assert r["compute_idle_ms"] == (110 - 60) / 1e3
    assert r["gaps"] == [("aten::copy_", [1, 50.0])]
    assert r["busy_ms"] == {7: 0.05, 45: 0.008}
    assert r["span_ms"] == 0.143
    assert dict(r["runtime"]) == {"cudaLaunchKernel": [2, 10.0], "cudaMemcpyAsync": [1, 3.0]}
    assert r["copies"] == [("Memcpy HtoD (Pinned -> Device) (stream 45)", [1, 8.0])]
