"""SlimFit inside the transformers Trainer: exact frozen counts per optimizer step, gradient
accumulation, bf16, evaluation, logging, and bit-identical resume from a checkpoint."""

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from slimfit import SlimFitConfig  # noqa: E402
from slimfit.checkpoint import SLIMFIT_STATE_FILE  # noqa: E402
from slimfit.integrations.transformers import (  # noqa: E402
    SlimFitCallback,
    SlimFitTrainer,
    _mask_is_optional,
    _WithoutFullMask,
    latest_trainer_checkpoint,
)

RATIO = 0.5
MAX_STEPS = 6
WITH_EVAL = dict(eval_strategy="steps", eval_steps=3)
TINY = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=2,
)


class Toy(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, 64, (n, 8), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {
            "input_ids": self.x[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.y[i],
        }


class StopAt(TrainerCallback):
    """Simulates a run that dies after `step` (the last checkpoint is older)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class LogRecorder(TrainerCallback):
    """Stands in for a report_to integration: sees `logs` before later callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class StepWatch(TrainerCallback):
    """Records, per micro-batch forward, which units require grad; per optimizer step,
    which units moved. Must come after the SlimFitCallback (attaches in on_train_begin)."""

    def __init__(self, slimfit_cb):
        self.cb = slimfit_cb
        self.forward_masks = []
        self.moved = []  # (frozen mask used at that step, moved mask)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        sf = self.cb.slimfit
        units = sf.units

        def pre_forward(module, args_, kwargs_):
            if module.training:
                self.forward_masks.append(torch.tensor([not u.param.requires_grad for u in units]))

        model.register_forward_pre_hook(pre_forward, with_kwargs=True)
        snap = {}

        def pre_step(opt, a, k):
            snap["w"] = [u.param.detach().clone() for u in units]

        def post_step(opt, a, k):  # runs after slimfit's post hook: history[-1] is this step's
            moved = torch.tensor([not torch.equal(w, u.param) for w, u in zip(snap["w"], units)])
            self.moved.append((sf.history[-1].clone(), moved))

        sf.optimizer.register_step_pre_hook(pre_step)
        sf.optimizer.register_step_post_hook(post_step)


def make_args(out, **over):
    kw = dict(
        output_dir=str(out),
        use_cpu=True,
        seed=0,
        data_seed=0,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=MAX_STEPS,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kw.update(over)
    return TrainingArguments(**kw)


def new_model():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**TINY))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: plain Trainer + SlimFitCallback, accumulation 2, evaluation."""
    out = tmp_path_factory.mktemp("ref")
    model = new_model()
    cb = SlimFitCallback(SlimFitConfig(freeze_ratio=RATIO, seed=3))
    watch = StepWatch(cb)
    trainer = Trainer(
        model=model,
        args=make_args(out, **WITH_EVAL),
        train_dataset=Toy(),
        eval_dataset=Toy(8, seed=9),
        callbacks=[cb, watch],
    )
    trainer.train()
    return {
        "out": out,
        "weights": weights(model),
        "history": [m.clone() for m in cb.slimfit.history],
        "scores": cb.slimfit.scheduler.scores.clone(),
        "cb": cb,
        "watch": watch,
        "trainer": trainer,
        "model": model,
    }


def test_frozen_counts_exact_per_optimizer_step(reference):
    sf = reference["cb"].slimfit
    n_units = len(sf.units)
    assert n_units == 21  # 3 embeddings + 1 LN + 2 x 8 per layer + pooler; head excluded
    assert not any("classifier" in n for n in sf.unit_names)
    history = reference["history"]
    assert len(history) == MAX_STEPS == reference["trainer"].state.global_step
    assert all(int(m.sum()) == int(RATIO * n_units) for m in history)
    # Frozen units are bit-identical across their step; every trained unit moved.
    for frozen, moved in reference["watch"].moved:
        assert not (frozen & moved).any()
        assert moved[~frozen].all()
    # Detached at the end of training: everything trainable again.
    assert all(p.requires_grad for p in reference["model"].parameters())


def test_gradient_accumulation_keeps_the_frozen_set_within_a_step(reference):
    masks = reference["watch"].forward_masks
    history = reference["history"]
    assert len(masks) == 2 * MAX_STEPS  # two micro-batches per optimizer step
    for step, mask in enumerate(history):
        assert torch.equal(masks[2 * step], mask)
        assert torch.equal(masks[2 * step + 1], mask)


def test_logging_and_evaluation(reference):
    trainer = reference["trainer"]
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    eval_logs = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(train_logs) == MAX_STEPS and len(eval_logs) == 2
    for e in train_logs:
        assert e["slimfit/frozen_units"] == 10
        assert e["slimfit/frozen_fraction"] == 10 / 21
        assert 0.0 < e["slimfit/frozen_param_fraction"] < 1.0
    assert not any(k.startswith("slimfit/") for e in eval_logs for k in e)
    # Evaluation does not move the schedule: one history entry per optimizer step.
    assert len(reference["history"]) == trainer.state.global_step


def test_checkpoints_carry_the_slimfit_state(reference):
    out = reference["out"]
    for step in (2, 4, 6):
        payload = torch.load(out / f"checkpoint-{step}" / SLIMFIT_STATE_FILE, weights_only=True)
        assert payload["step"] == step
        assert torch.equal(payload["state"]["history"], torch.stack(reference["history"][:step]))
    assert not list(out.glob("**/.tmp-*"))
    assert latest_trainer_checkpoint(out).endswith("checkpoint-6")


def test_bf16_with_accumulation(tmp_path):
    model = new_model()
    cb = SlimFitCallback(SlimFitConfig(freeze_ratio=RATIO))
    watch = StepWatch(cb)
    args = make_args(tmp_path, bf16=True, max_steps=3, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=Toy(), callbacks=[cb, watch]).train()
    assert len(cb.slimfit.history) == 3
    assert all(int(m.sum()) == 10 for m in cb.slimfit.history)
    assert len(watch.forward_masks) == 6
    for frozen, moved in watch.moved:
        assert not (frozen & moved).any() and moved[~frozen].all()
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("kind", ["callback", "trainer"])
def test_resume_is_bit_identical(reference, tmp_path, kind):
    """A run that dies after step 3 (last checkpoint: step 2) and resumes in the same output
    directory ends with the very same weights and schedule as the uninterrupted run."""
    cfg = SlimFitConfig(freeze_ratio=RATIO, seed=3)
    recorder = LogRecorder()

    def build(*extra):
        model = new_model()
        if kind == "callback":
            cb = SlimFitCallback(cfg)
            trainer = Trainer(
                model=model,
                args=make_args(tmp_path, **WITH_EVAL),
                train_dataset=Toy(),
                eval_dataset=Toy(8, seed=9),
                callbacks=[cb, *extra],
            )
        else:  # LogRecorder comes first, as report_to callbacks do
            trainer = SlimFitTrainer(
                model=model,
                args=make_args(tmp_path, **WITH_EVAL),
                train_dataset=Toy(),
                eval_dataset=Toy(8, seed=9),
                callbacks=[recorder, *extra],
                slimfit_config=cfg,
            )
            cb = trainer.slimfit_callback
        return model, cb, trainer

    _, _, dying = build(StopAt(3))
    dying.train()
    assert dying.state.global_step == 3
    if kind == "trainer":  # the newest folder is incomplete (died before slimfit_state.pt)
        shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-3")
        (tmp_path / "checkpoint-3" / SLIMFIT_STATE_FILE).unlink()

    model, cb, trainer = build()
    trainer.train(
        resume_from_checkpoint=True if kind == "trainer" else str(tmp_path / "checkpoint-2")
    )
    assert trainer.state.global_step == MAX_STEPS
    assert same_weights(weights(model), reference["weights"])
    assert len(cb.slimfit.history) == MAX_STEPS
    assert all(torch.equal(a, b) for a, b in zip(cb.slimfit.history, reference["history"]))
    assert torch.equal(cb.slimfit.scheduler.scores, reference["scores"])
    if kind == "trainer":  # metrics were in the logs before the reporting callback saw them
        train_logs = [log for log in recorder.logs if "loss" in log]
        assert train_logs and all(log["slimfit/frozen_units"] == 10 for log in train_logs)


def test_resume_without_slimfit_state(reference, tmp_path):
    shutil.copytree(reference["out"] / "checkpoint-2", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / SLIMFIT_STATE_FILE).unlink()
    cfg = SlimFitConfig(freeze_ratio=RATIO, seed=3)

    def resume(**cb_kwargs):
        model = new_model()
        cb = SlimFitCallback(cfg, **cb_kwargs)
        trainer = Trainer(
            model=model,
            args=make_args(tmp_path, **WITH_EVAL),
            train_dataset=Toy(),
            eval_dataset=Toy(8, seed=9),
            callbacks=[cb],
        )
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
        return model

    with pytest.raises(ValueError, match="slimfit_state.pt"):
        resume()
    # Allowed explicitly: a fresh schedule from step 2 on, so the run differs from the
    # reference (which shows that the restored state is what makes resume identical).
    with pytest.warns(UserWarning, match="fresh schedule"):
        model = resume(allow_missing_state=True)
    assert not same_weights(weights(model), reference["weights"])


def test_latest_trainer_checkpoint_skips_incomplete(reference, tmp_path):
    for step in (2, 4):
        shutil.copytree(reference["out"] / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-4" / SLIMFIT_STATE_FILE).unlink()
    (tmp_path / "checkpoint-9").mkdir()  # created, nothing written yet
    assert latest_trainer_checkpoint(tmp_path).endswith("checkpoint-2")
    assert latest_trainer_checkpoint(tmp_path / "nowhere") is None


def test_trainer_drops_all_ones_masks_on_the_host_only_where_the_model_allows(tmp_path):
    """SlimFitTrainer's batches without padding reach the model without an attention mask
    (its collator's output is checked on the host); a padded batch keeps its mask; a model
    whose forward requires the mask gets it whatever it holds."""
    seen = []

    def record(module, args_, kwargs_):
        seen.append(kwargs_.get("attention_mask"))

    class Padded(Toy):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["attention_mask"] = (
                torch.tensor([1] * 6 + [0] * 2) if i % 2 else item["attention_mask"]
            )
            return item

    for dataset, masked in ((Toy(), False), (Padded(), True)):
        seen.clear()
        model = new_model()
        model.register_forward_pre_hook(record, with_kwargs=True)
        args = make_args(tmp_path / str(masked), max_steps=2, save_strategy="no")
        SlimFitTrainer(model=model, args=args, train_dataset=dataset,
                       slimfit_config=SlimFitConfig(freeze_ratio=RATIO)).train()  # fmt: skip
        assert len(seen) == 4
        assert all((m is not None) == masked for m in seen)

    class NeedsMask(BertForSequenceClassification):
        def forward(self, input_ids, attention_mask, labels=None):
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels
            )

    torch.manual_seed(0)
    model = NeedsMask(BertConfig(**TINY))
    trainer = SlimFitTrainer(model=model, args=make_args(tmp_path / "needs", max_steps=1,
                             save_strategy="no"), train_dataset=Toy())  # fmt: skip
    trainer.train()  # the mask is kept: forward would raise without it
    assert not isinstance(trainer.data_collator, _WithoutFullMask)
    assert not _mask_is_optional(None)  # a model_init Trainer has no model at __init__


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="SlimFitConfig"):
        SlimFitCallback({"freeze_ratio": 0.5})
    with pytest.raises(ValueError, match="not both"):
        SlimFitTrainer(
            model=new_model(),
            args=make_args(tmp_path, save_strategy="no"),
            callbacks=[SlimFitCallback()],
            slimfit_config=SlimFitConfig(),
        )
