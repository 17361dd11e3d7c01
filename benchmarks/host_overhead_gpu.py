"""Host (Python + dispatch + launch) cost of each lean op against the op it replaces (issue 4).

On tiny tensors the device finishes each kernel long before the next is issued, so the wall
time of a chain of ops is the host's cost of issuing them: what a launch-bound training step
pays per converted module. Each case runs a chain of ``--chain`` ops forward and backward
under bf16 autocast and reports microseconds per op (forward + backward).

    PYTHONPATH=src python benchmarks/host_overhead_gpu.py --out runs/host-overhead
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from slimfit.bench.env import collect
from slimfit.ops.activation import lean_activation
from slimfit.ops.attention import ATTENTION_CONFIG, slimfit_sdpa_attention
from slimfit.ops.config import CompressionConfig
from slimfit.ops.dropout import lean_dropout
from slimfit.ops.linear import lean_linear
from slimfit.ops.norm import lean_layer_norm
from slimfit.ops.quant import quantize


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(step, chain: int, reps: int, dev: torch.device) -> float:
    for _ in range(3):
        step()
    _sync(dev)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        out.append((time.perf_counter() - t0) * 1e6 / chain)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", type=int, default=50)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/host-overhead"))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a host-only proxy")
    args = ap.parse_args()
    dev = torch.device(args.device)
    h = 64
    cfg = CompressionConfig()
    x0 = torch.randn(4, 8, h, device=dev, requires_grad=True)
    w_frozen = torch.randn(h, h, device=dev) / h**0.5
    w_train = torch.nn.Parameter(torch.randn(h, h, device=dev) / h**0.5)
    b = torch.zeros(h, device=dev)
    ln = torch.nn.LayerNorm(h).to(dev)
    ln.weight.requires_grad_(False)
    gelu = torch.nn.GELU()
    drop = torch.nn.Dropout(0.1)

    def chain(op):
        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                y = x0
                for _ in range(args.chain):
                    y = op(y)
            y.float().sum().backward()

        return step

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 1, False

    attn = Attn()
    ATTENTION_CONFIG[attn] = cfg

    def attention(fn):
        # y as Q = K = V over 4 heads, attention dropout 0.1 (BERT's), back to y's shape
        def op(y):
            q = y.view(4, 8, 4, h // 4).transpose(1, 2)
            out, _ = fn(attn, q, q, q, None, dropout=0.1, scaling=0.25)
            return out.reshape(4, 8, h)

        return op

    cases = {
        "empty: y = y + 0 (one kernel each way)": lambda y: y + 0,
        "linear frozen: F.linear": lambda y: F.linear(y, w_frozen, b),
        "linear frozen: lean_linear": lambda y: lean_linear(y, w_frozen, b, cfg, True),
        "linear trained: F.linear": lambda y: F.linear(y, w_train, b),
        "linear trained int8: lean_linear": lambda y: lean_linear(y, w_train, b, cfg, True),
        "gelu: nn.GELU": gelu,
        "gelu: lean 4-bit": lambda y: lean_activation(y, gelu, "gelu", cfg),
        "layernorm frozen gain: F.layer_norm": lambda y: F.layer_norm(
            y, (h,), ln.weight, ln.bias, 1e-5
        ),
        "layernorm frozen gain: lean int8": lambda y: lean_layer_norm(ln, y, cfg),
        "dropout: nn.Dropout": drop,
        "dropout: lean regenerate": lambda y: lean_dropout(y, 0.1, True, "regenerate", drop),
        "attention p=0.1: transformers sdpa": attention(sdpa_attention_forward),
        "attention p=0.1: slimfit_sdpa int8": attention(slimfit_sdpa_attention),
    }
    rows = {}
    for name, op in cases.items():
        try:
            rows[name] = round(_time(chain(op), args.chain, args.reps, dev), 1)
        except Exception as err:  # noqa: BLE001 - report and go on
            rows[name] = f"{type(err).__name__}: {err}"[:200]
        print(f"{rows[name]!s:>8} us/op  {name}", flush=True)

    # one Triton launch through slimfit's quantize wrapper
    xq = torch.randn(4096, device=dev)

    def q_chain():
        for _ in range(args.chain):
            quantize(xq, 8, "block", 1.0, 64)

    name = "quantize int8 block, 4096 elements (forward only)"
    rows[name] = round(_time(q_chain, args.chain, args.reps, dev), 1)
    print(f"{rows[name]!s:>8} us/op  {name}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump({"env": collect(dev), "chain": args.chain, "us_per_op": rows}, f, indent=1)


if __name__ == "__main__":
    main()
