"""A small deterministic training run for the crash test (tests/test_checkpoint_crash.py).

    python tests/crash_train.py RUN_DIR [--steps 24] [--save-every 1] [--resume]

Tiny random-init BERT (dropout on, so the RNG state matters), AdamW with linear decay,
``slimfit.attach`` (ILS, half the units frozen), a seeded per-epoch data order derived
from the step (as in ``slimfit.train``), and ``slimfit.checkpoint`` after every
``--save-every`` optimizer steps and at the last step. With ``--resume`` it continues from
``latest_checkpoint(RUN_DIR)`` (a fresh start when there is none yet); without it, it
refuses a run directory that already holds checkpoints. Prints ``resume <step>`` once and
``step <n>`` after every optimizer step, flushed, so the test can kill it mid-run.
"""

from __future__ import annotations

import argparse
import sys

import torch

torch.set_num_threads(1)  # bit-identical results need the same reduction order every run

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import slimfit  # noqa: E402
from slimfit.checkpoint import (  # noqa: E402
    NonFiniteGuard,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

N_EXAMPLES, SEQ, BATCH = 48, 12, 8
STEPS_PER_EPOCH = N_EXAMPLES // BATCH


def data():
    g = torch.Generator().manual_seed(11)
    x = torch.randint(1, 96, (N_EXAMPLES, SEQ), generator=g)
    y = (x[:, 0] > 48).long()  # learnable
    return x, y


def batch_indices(step: int) -> torch.Tensor:
    epoch, k = divmod(step, STEPS_PER_EPOCH)
    order = torch.randperm(N_EXAMPLES, generator=torch.Generator().manual_seed(1000 + epoch))
    return order[k * BATCH : (k + 1) * BATCH]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--save-every", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="required when RUN_DIR has checkpoints")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / args.steps)
    )
    sf = slimfit.attach(model, optimizer, slimfit.SlimFitConfig(freeze_ratio=0.5, seed=1))
    guard = NonFiniteGuard(args.run_dir, policy="raise")

    step = 0
    ckpt = latest_checkpoint(args.run_dir)
    if ckpt is not None and not args.resume:
        print(f"{args.run_dir} already holds {ckpt.name}; pass --resume.", file=sys.stderr)
        return 2
    if ckpt is not None:
        extra = load_checkpoint(ckpt, model, optimizer, lr_scheduler, sf)
        step = int(extra["step"])
    else:
        torch.manual_seed(1234)  # the dropout stream of a fresh run
    print(f"resume {step}", flush=True)

    x, y = data()
    while step < args.steps:
        idx = batch_indices(step)
        loss = model(input_ids=x[idx], labels=y[idx]).loss
        if not guard.check(loss, step + 1):
            optimizer.zero_grad(set_to_none=True)
            continue
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(
                args.run_dir,
                step,
                model=model,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                slimfit=sf,
                extra={"step": step},
                keep_last=2,
            )
        print(f"step {step}", flush=True)

    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
