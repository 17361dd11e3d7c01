"""The training loop: batching, validation, model loading errors, a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from slimfit.data.samples import NEGATIVE, POSITIVE, TREC_SAMPLES, write_sample_data
from slimfit.models import load_model_and_tokenizer, resolve_model, save_tiny_model
from slimfit.train import (
    TrainConfig,
    build_optimizer,
    epoch_batches,
    finetune,
    plan_steps,
    resolve_precision,
)

WORDS = " ".join(POSITIVE + NEGATIVE + sum(TREC_SAMPLES.values(), [])).lower().split() + [
    "number",
    "with",
    "quotes",
    "and",
    "double",
    "ones",
    '"',
]
TINY_UNITS = 21  # 3 embeddings + LN gain, 2 layers x (Q K V O in out + 2 LN gains), pooler


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture
def sample_dir(tmp_path):
    return write_sample_data(tmp_path / "data")


def test_epoch_batches_partition_grouping_and_determinism():
    lengths = [(i * 37) % 61 + 1 for i in range(1000)]
    b = epoch_batches(lengths, 32, seed=0, epoch=0)
    assert len(b) == 32 and all(len(x) == 32 for x in b[:-1] if len(x) != 8)
    assert sorted(i for x in b for i in x) == list(range(1000))
    assert b == epoch_batches(lengths, 32, seed=0, epoch=0)
    assert b != epoch_batches(lengths, 32, seed=0, epoch=1)
    assert b != epoch_batches(lengths, 32, seed=1, epoch=0)
    spread = sum(max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in b) / len(b)
    plain = epoch_batches(lengths, 32, seed=0, epoch=0, group_by_length=False)
    plain_spread = sum(
        max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in plain
    ) / len(plain)
    assert spread < plain_spread / 4  # grouped batches hold similar lengths
    assert sorted(i for x in plain for i in x) == list(range(1000))


def test_plan_steps():
    assert plan_steps(TrainConfig(epochs=2, batch_size=32), 100) == (4, 8)
    assert plan_steps(TrainConfig(epochs=0.5, batch_size=32), 100) == (4, 2)
    assert plan_steps(TrainConfig(epochs=3, max_steps=5, batch_size=32), 100) == (4, 5)
    assert plan_steps(TrainConfig(epochs=1, max_steps=9, batch_size=32), 100) == (4, 9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"freeze_ratio": 1.0}, r"--freeze-ratio must be in \[0, 1\)"),
        ({"freeze_ratio": -0.1}, r"--freeze-ratio must be in \[0, 1\)"),
        ({"epochs": 0}, "--epochs must be a positive number"),
        ({"max_steps": 0}, "--max-steps must be at least 1"),
        ({"lr": -1.0}, "--lr must be a positive number"),
        ({"lr": float("nan")}, "--lr must be a positive number"),
        ({"max_length": 1}, "--max-length must be at least 2"),
        ({"policy": "magic"}, "unknown policy 'magic'"),
        ({"precision": "fp16"}, "unknown precision 'fp16'"),
        ({"task": "glue"}, "unknown task 'glue'; known tasks: .*sentiment, trec"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    """On a CPU without AVX512-BF16 or AMX, bf16 matmuls are emulated (~46x slower than
    fp32 on an AVX2 machine): "auto" takes fp32 there, bf16 where the CPU or GPU has it;
    an explicit choice is kept."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for avx512_bf16, amx, expect in (
        (False, False, "fp32"),
        (True, False, "bf16"),
        (False, True, "bf16"),
    ):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", cpu) == expect
        assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    for supported, expect in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda v=supported: v)
        assert resolve_precision("auto", cuda) == expect
    assert TrainConfig().precision == "auto"


def test_default_lr_depends_on_policy():
    assert TrainConfig(policy="none").learning_rate == 5e-5
    assert TrainConfig(policy="ils").learning_rate > 5e-5
    assert TrainConfig(policy="ils", lr=1e-3).learning_rate == 1e-3


def test_model_errors(tmp_path):
    with pytest.raises(
        ValueError, match="unknown model alias 'MiniLM-L6'; did you mean 'minilm-l6'"
    ):
        resolve_model("MiniLM-L6")
    assert resolve_model("org/some-model") == "org/some-model"  # a hub id, left to transformers
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"  # a legacy hub id
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        resolve_model(" ")


def test_optimizer_groups_skip_decay_on_biases_and_norms(tiny_model):
    model, _, _ = load_model_and_tokenizer(str(tiny_model), 2)
    opt = build_optimizer(model, 1e-4, 0.01)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(
        names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_unit_options_give_the_units_their_own_adamw_options(tiny_model, sample_dir, tmp_path):
    from slimfit.train import setup

    def groups(unit_options):
        cfg = TrainConfig(model=str(tiny_model), data_dir=str(sample_dir), device="cpu",
                          lr=1e-4, output_dir=str(tmp_path), extra={"unit_options": unit_options})  # fmt: skip
        ctx = setup(cfg)
        names = {id(p): n for n, p in ctx.model.named_parameters()}
        return ctx, [(g["lr"], g["betas"], [names[id(p)] for p in g["params"]])
                     for g in ctx.optimizer.param_groups]  # fmt: skip

    ctx, got = groups({"lr": 4e-4, "betas": (0.5, 0.999)})
    units = {u.name for u in ctx.slimfit.units}
    assert len(units) == TINY_UNITS
    special = [n for lr, betas, ns in got if (lr, betas) == (4e-4, (0.5, 0.999)) for n in ns]
    plain = [n for lr, betas, ns in got if (lr, betas) == (1e-4, (0.9, 0.999)) for n in ns]
    assert sorted(special) == sorted(units)  # exactly the units; head and biases keep --lr
    assert len(special) + len(plain) == len(list(ctx.model.parameters()))
    assert any(n.startswith("classifier") for n in plain)

    _, got = groups({"match": r"word_embeddings", "lr": 1e-4 / 2})
    assert [ns for lr, _, ns in got if lr == 1e-4 / 2] == [
        ["bert.embeddings.word_embeddings.weight"]
    ]


def _run(tmp_path, tiny_model, sample_dir, **kw):
    cfg = TrainConfig(
        model=str(tiny_model),
        data_dir=str(sample_dir),
        output_dir=str(tmp_path / "out"),
        batch_size=8,
        device="cpu",
        **kw,
    )
    return finetune(cfg, progress=False), tmp_path / "out"


def test_finetune_writes_metrics_and_schedule(tmp_path, tiny_model, sample_dir):
    m, out = _run(tmp_path, tiny_model, sample_dir, max_steps=3, freeze_ratio=0.5, policy="ils")
    assert m["steps"] == 3 and m["units"] == TINY_UNITS and m["frozen_per_step"] == 10
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["dev_accuracy"] == m["dev_accuracy"] and 0.0 <= saved["test_accuracy"] <= 1.0
    assert saved["data"] == {"train": 43, "dev": 5, "test": 6}
    assert saved["peak_memory_bytes"] is None  # CPU: not measurable
    assert saved["config"]["lr"] == TrainConfig().learning_rate
    # precision "auto" (the default) is recorded as what it resolved to on this CPU
    assert saved["config"]["precision"] == resolve_precision("auto", torch.device("cpu"))
    lines = [json.loads(x) for x in (out / "schedule.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    for r in lines:
        assert len(r["frozen"]) == 10 and len(r["trained"]) == 11
        assert not set(r["frozen"]) & set(r["trained"])
        assert not any("classifier" in n or n.endswith("bias") for n in r["frozen"] + r["trained"])


def test_finetune_is_deterministic_for_a_seed(tmp_path, tiny_model, sample_dir):
    a, out_a = _run(tmp_path / "a", tiny_model, sample_dir, max_steps=4, policy="random", seed=3)
    b, out_b = _run(tmp_path / "b", tiny_model, sample_dir, max_steps=4, policy="random", seed=3)
    assert a["dev"]["loss"] == b["dev"]["loss"] and a["train_loss_last50"] == b["train_loss_last50"]
    assert (out_a / "schedule.jsonl").read_text() == (out_b / "schedule.jsonl").read_text()
    c, _ = _run(tmp_path / "c", tiny_model, sample_dir, max_steps=4, policy="random", seed=4)
    assert c["train_loss_last50"] != a["train_loss_last50"]


def test_full_finetuning_learns_and_freezes_nothing(tmp_path, tiny_model, sample_dir):
    losses = []
    cfg = TrainConfig(
        model=str(tiny_model),
        data_dir=str(sample_dir),
        output_dir=str(tmp_path / "out"),
        batch_size=8,
        device="cpu",
        epochs=8,
        policy="none",
        lr=3e-3,
        precision="bf16",
    )
    m = finetune(cfg, progress=False, on_step=lambda step, loss: losses.append(loss))
    assert m["frozen_per_step"] == 0 and m["steps"] == len(losses) == 48
    assert sum(losses[-12:]) < 0.6 * sum(losses[:12])  # the sample task is separable
    lines = (tmp_path / "out" / "schedule.jsonl").read_text().splitlines()
    assert len(lines) == 48 and all(json.loads(x)["frozen"] == [] for x in lines)


# -- image tasks -----------------------------------------------------------------------------------
def _fashion_npz(folder, n_train=300, n_test=60):
    """A Fashion-MNIST-shaped npz: class c is a bright block in row band c (learnable)."""
    import numpy as np

    rng = np.random.default_rng(0)

    def part(n):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 4] = 250
        return images, labels

    (tr_x, tr_y), (te_x, te_y) = part(n_train), part(n_test)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "fashion-mnist.npz", train_images=tr_x, train_labels=tr_y,
             test_images=te_x, test_labels=te_y)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    import transformers as T

    folder = tmp_path_factory.mktemp("tiny-vit")
    cfg = T.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      num_labels=5)  # fmt: skip
    T.ViTForImageClassification(cfg).save_pretrained(folder)
    return str(folder)


def test_finetune_image_task_end_to_end(tmp_path, tiny_vit):
    data = _fashion_npz(tmp_path / "fmnist")
    cfg = TrainConfig(task="fashion-mnist", model=tiny_vit, data_dir=str(data),
                      output_dir=str(tmp_path / "out"), device="cpu", batch_size=16,
                      epochs=3, lr=2e-3, freeze_ratio=0.5, policy="ils", report=False)  # fmt: skip
    losses = []
    m = finetune(cfg, progress=False, on_step=lambda step, loss: losses.append(loss))
    # classes 5-9 only: 150 of 300 train images, 10% of them to dev; 30 of 60 test images
    assert m["data"] == {"train": 135, "dev": 15, "test": 30}
    assert m["modality"] == "image" and m["steps"] == len(losses) == 27
    assert m["frozen_per_step"] == m["units"] // 2
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])  # it learns the bands
    assert 0.0 <= m["test_accuracy"] <= 1.0
    lines = (tmp_path / "out" / "schedule.jsonl").read_text().splitlines()
    assert len(lines) == 27


def test_finetune_image_task_needs_an_image_model(tmp_path):
    data = _fashion_npz(tmp_path / "fmnist", n_train=40, n_test=10)
    cfg = TrainConfig(task="fashion-mnist", data_dir=str(data), output_dir=str(tmp_path / "o"),
                      device="cpu", max_steps=1)  # fmt: skip
    with pytest.raises(ValueError, match="not a local image-classification model folder"):
        finetune(cfg, progress=False)


def test_lora_baseline_trains_adapters_and_head_only(tmp_path, tiny_model, sample_dir):
    """The accuracy sweeps' LoRA baseline (``extra={"lora": {}}``): after training, every
    backbone weight is bit-identical to the pretrained one; the adapters and the head moved."""
    from safetensors.torch import load_file

    from slimfit.checkpoint import latest_checkpoint

    m, out = _run(
        tmp_path, tiny_model, sample_dir, max_steps=3, policy="none", lr=1e-2, extra={"lora": {}}
    )
    assert m["steps"] == 3
    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(latest_checkpoint(out) / "model.safetensors"))
    adapters = [k for k in after if "lora_B" in k]
    assert adapters and all(after[k].abs().sum() > 0 for k in adapters)  # B starts at zero
    compared = 0
    for key, t in after.items():
        name = key.removeprefix("base_model.model.").replace(".base_layer", "")
        if "lora_" in key or "classifier" in key or name not in before:
            continue
        assert torch.equal(t, before[name]), name
        compared += 1
    assert compared >= 30  # embeddings, every encoder weight and bias, the pooler
    heads = [k for k in after if "classifier.modules_to_save" in k and k.endswith("weight")]
    assert heads and not torch.equal(after[heads[0]], before["classifier.weight"])


def test_lora_baseline_needs_policy_none():
    with pytest.raises(ValueError, match="run it with policy 'none'"):
        TrainConfig(policy="ils", extra={"lora": {}})
