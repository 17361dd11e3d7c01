"""The Trainer integration on a CUDA device (skipped without one): bf16 with memory
logging and optimizer-state paging, fp16 with grad-scaler skipped steps, and bit-identical
resume under ``full_determinism``."""

import pytest
import torch

pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_trainer import (  # noqa: E402
    MAX_STEPS,
    WITH_EVAL,
    StepWatch,
    StopAt,
    Toy,
    make_args,
    new_model,
    same_weights,
    weights,
)
from transformers import Trainer  # noqa: E402

from slimfit import SlimFitConfig  # noqa: E402
from slimfit.checkpoint import SLIMFIT_STATE_FILE  # noqa: E402
from slimfit.integrations.transformers import SlimFitCallback, SlimFitTrainer  # noqa: E402


def cuda_args(out, **over):
    kw = dict(use_cpu=False, full_determinism=True, **WITH_EVAL)
    kw.update(over)
    return make_args(out, **kw)


def run(out, precision, extra_callbacks=(), resume=None, trainer_cls=Trainer):
    model = new_model()
    cb = SlimFitCallback(SlimFitConfig(freeze_ratio=0.5, seed=3))
    watch = StepWatch(cb)
    trainer = trainer_cls(
        model=model,
        args=cuda_args(out, **{precision: True}),
        train_dataset=Toy(),
        eval_dataset=Toy(8, seed=9),
        callbacks=[cb, watch, *extra_callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, cb, watch, trainer


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_counts_memory_logs_and_resume(tmp_path, precision):
    model, cb, watch, trainer = run(tmp_path / "ref", precision)
    sf = cb.slimfit
    assert next(model.parameters()).is_cuda
    steps = trainer.state.global_step
    assert steps == MAX_STEPS
    # fp16: the grad scaler may skip steps (inf grads); those never reach the optimizer,
    # so the schedule does not move: one history entry per step actually taken.
    assert 1 <= len(sf.history) <= steps
    if precision == "bf16":
        assert len(sf.history) == steps
    assert all(int(m.sum()) == 10 for m in sf.history)
    for frozen, moved in watch.moved:
        assert not (frozen & moved).any()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all(e["slimfit/cuda_mem_gib"] > 0 for e in logs)
    assert all(e["slimfit/cuda_peak_mem_gib"] >= e["slimfit/cuda_mem_gib"] for e in logs)
    saved = torch.load(tmp_path / "ref" / "checkpoint-2" / SLIMFIT_STATE_FILE, weights_only=True)
    assert saved["step"] == 2 and saved["slimfit_step"] <= 2
    reference = weights(model)

    # Resume after a death at step 3 (last checkpoint: step 2), through the subclass.
    out = tmp_path / "resumed"
    run(out, precision, extra_callbacks=[StopAt(3)])
    model2, cb2, _, trainer2 = run(out, precision, resume=True, trainer_cls=SlimFitTrainer)
    assert trainer2.state.global_step == MAX_STEPS
    assert same_weights(weights(model2), reference)
    assert all(torch.equal(a, b) for a, b in zip(cb2.slimfit.history, sf.history))
