"""Weight-gradient error of a trained linear fed by a lean LayerNorm, against float64: from
the norm's int8 code (shared) and from the linear's own int8 copy of its input. CPU, the
test case of tests/test_ops.py (96 features with outliers, 4 x 12 tokens). Run from the
repository root:

    PYTHONPATH=src python benchmarks/results/plan/freeze-0.90-vs-0.95/norm_code_grad_error.py
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, "tests")
from test_ops import DEFAULT, _ln, rel  # noqa: E402

from slimfit.ops.linear import lean_linear  # noqa: E402
from slimfit.ops.norm import lean_layer_norm  # noqa: E402

print(f"torch {torch.__version__}")
for autocast in (False, True):
    ln, x = _ln()
    torch.manual_seed(1)
    lin = nn.Linear(96, 40)

    def run(share: bool, ln=ln, x=x, lin=lin, autocast=autocast):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            h = lean_layer_norm(ln, x, DEFAULT)
            return lean_linear(h if share else h.clone(), lin.weight, lin.bias, DEFAULT, True)

    g = torch.randn(4, 12, 40)
    shared = torch.autograd.grad(run(True), lin.weight, g)[0]
    own = torch.autograd.grad(run(False), lin.weight, g)[0]
    h64 = F.layer_norm(x.detach().double(), (96,), ln.weight.double(), ln.bias.double(), ln.eps)
    ref = g.double().reshape(-1, 40).t() @ h64.reshape(-1, 96)
    print(f"bf16 autocast {autocast}: rel. error from the norm's code {rel(shared, ref):.4f}, "
          f"from the linear's own int8 copy {rel(own, ref):.4f}")  # fmt: skip
