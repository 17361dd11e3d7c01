"""Exploration (not a library feature): ILS with each fresh score divided by the learning
rate of its step, so stale and fresh scores compare fairly under linear decay.

Run from the repository root on CPU, after writing the fp32 model folder the way
``benchmarks/text_accuracy_gpu.sh`` does (all-MiniLM-L6-v2 upcast to fp32 in MODEL):

    MODEL=/tmp/minilm32 python benchmarks/results/2026-11-23-trec-ils-cpu/lr_normalized_score.py
"""

import importlib
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def job(seed: int):
    attach_module = importlib.import_module("slimfit.attach")  # the module, not the function
    original = attach_module.SlimFit._post_step

    def post_step(self, optimizer, args, kwargs):
        lr = optimizer.param_groups[0]["lr"]  # the lr this step used (scheduler steps later)
        advance = self.scheduler.advance

        def advance_per_lr(trained=None, scores=None):
            return advance(trained, None if scores is None else scores / max(lr, 1e-12))

        self.scheduler.advance = advance_per_lr
        try:
            return original(self, optimizer, args, kwargs)
        finally:
            del self.scheduler.advance

    attach_module.SlimFit._post_step = post_step
    from slimfit.train import TrainConfig, finetune

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            model=os.environ.get("MODEL", "/tmp/minilm32"), task="trec", seed=seed, epochs=3,
            batch_size=32, max_length=128, precision="bf16", device="cpu",
            data_dir=".carry/data", output_dir=tmp, policy="ils", freeze_ratio=0.9, lr=4e-4,
            report=False,
        )  # fmt: skip
        m = finetune(cfg, progress=False)
    return seed, m["test_accuracy"]


if __name__ == "__main__":
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        for seed, acc in pool.map(job, [0, 1]):
            print("lr-normalized ILS seed", seed, acc, flush=True)
