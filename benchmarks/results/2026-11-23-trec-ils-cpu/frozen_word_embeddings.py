"""Exploration (not a library feature): ILS with the word embeddings frozen for the whole run.

With the normalized score the word embeddings hold one of the few trained slots in 96% of
the steps (NOTES.md, 1.); giving them their own always-trained slot did not help (2.).
This takes them out of training altogether (a common choice for small fine-tuning sets),
so every slot goes to a dense unit. Run from the repository root on CPU, after writing the
fp32 model folder the way ``benchmarks/text_accuracy_gpu.sh`` does:

    MODEL=/tmp/minilm32 python benchmarks/results/2026-11-23-trec-ils-cpu/frozen_word_embeddings.py
"""

import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def job(args):
    policy, seed = args
    import slimfit.train as train

    build = train.build_optimizer

    def build_without_word_embeddings(model, lr, weight_decay):
        for name, param in model.named_parameters():
            if "word_embeddings" in name:
                param.requires_grad_(False)  # then neither the optimizer nor ILS sees it
        return build(model, lr, weight_decay)

    train.build_optimizer = build_without_word_embeddings
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train.TrainConfig(
            model=os.environ.get("MODEL", "/tmp/minilm32"), task="trec", seed=seed, epochs=3,
            batch_size=32, max_length=128, precision="bf16", device="cpu",
            data_dir=".carry/data", output_dir=tmp, policy=policy, freeze_ratio=0.9, lr=4e-4,
            report=False,
        )  # fmt: skip
        m = train.finetune(cfg, progress=False)
    return policy, seed, m["test_accuracy"]


if __name__ == "__main__":
    jobs = [(p, s) for p in ("ils", "random") for s in (0, 1)]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        for policy, seed, acc in pool.map(job, jobs):
            print(
                f"{policy} 0.90, word embeddings frozen, seed {seed}: test {100 * acc:.2f}",
                flush=True,
            )
