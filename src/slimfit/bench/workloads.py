"""Benchmark workloads: a task, a model configuration and synthetic inputs.

Models are random-init from ``transformers`` config classes (no weights needed); inputs
are random token ids / pixel values and random labels (QA: start/end positions). Each
workload has a ``base`` size (the paper's models) and a ``tiny`` size for CPU runs/CI.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workload:
    name: str
    task: str  # "seqcls" | "qa" | "image"
    config: Callable[[str], object]  # size ("base" | "tiny") -> transformers config
    seq_len: int | None  # base sequence length (None: image workload)
    tiny_seq_len: int | None
    head: tuple[str, ...]  # module names of the task head (always trained; LoRA saves them)
    description: str


def _bert_config(size: str, num_labels: int = 2):
    from transformers import BertConfig

    if size == "tiny":
        return BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            num_labels=num_labels,
        )
    return BertConfig(num_labels=num_labels)  # bert-base-uncased shapes


def _vit_config(size: str):
    from transformers import ViTConfig

    if size == "tiny":
        return ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
        )
    return ViTConfig(image_size=224, patch_size=16, num_labels=1000)  # ViT-B/16, ImageNet head


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "bert-base-seqcls",
            "seqcls",
            _bert_config,
            128,
            32,
            ("classifier",),
            "bert-base sequence classification (2 labels), seq 128",
        ),
        Workload(
            "bert-base-qa",
            "qa",
            _bert_config,
            384,
            64,
            ("qa_outputs",),
            "bert-base extractive QA (start/end positions), seq 384",
        ),
        Workload(
            "vit-base",
            "image",
            _vit_config,
            None,
            None,
            ("classifier",),
            "ViT-B/16 image classification (1000 labels), 224 px",
        ),
    )
}

_AUTO_CLASSES = {
    "seqcls": "AutoModelForSequenceClassification",
    "qa": "AutoModelForQuestionAnswering",
    "image": "AutoModelForImageClassification",
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}.")
    return WORKLOADS[name]


def load_config(workload: Workload, size: str, model: str | None = None):
    """The model configuration: the workload's own, or ``model``'s (HF id or local path)."""
    if model is None:
        return workload.config(size)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot load a model configuration from {model!r} ({first.rstrip('.')}); "
            "pass a local folder with config.json or a cached model id."
        ) from None


def build_model(workload: Workload, config, attention: str) -> torch.nn.Module:
    """A random-init model of the workload's task (fp32, on CPU, train mode), with its own
    copy of ``config``: transformers' models keep the config object they are given and set
    their attention on it, so a later model built from the same object (another mode of
    the same run) would switch this one's attention too."""
    import transformers

    cls = getattr(transformers, _AUTO_CLASSES[workload.task])
    model = cls.from_config(copy.deepcopy(config), attn_implementation=attention)
    model.train()
    return model


ATTENTION_MASKS = ("none", "ones", "padded")


def default_seq_len(workload: Workload, size: str) -> int | None:
    return workload.tiny_seq_len if size == "tiny" else workload.seq_len


def make_batch(
    workload: Workload,
    config,
    model: torch.nn.Module,
    batch_size: int,
    seq_len: int | None,
    device: torch.device,
    seed: int = 0,
    attention_mask: str = "none",
) -> dict[str, torch.Tensor]:
    """Synthetic inputs and labels for one step, on ``device``.

    Text batches: ``attention_mask="none"`` is unpadded and passes no mask (the same
    attention as an all-ones mask, which transformers reads on the host and drops under
    ``"sdpa"``: a device synchronization in every forward); ``"ones"`` passes the all-ones
    mask; ``"padded"`` is a dynamically padded batch as a fine-tune sees one: each row's
    length drawn between half and all of ``seq_len`` (the first row full), pad tokens and
    a zero mask past it."""
    if attention_mask not in ATTENTION_MASKS:
        raise ValueError(
            f"unknown attention mask {attention_mask!r}; use {' or '.join(ATTENTION_MASKS)}."
        )
    # generated on the device itself: a ViT batch of a few thousand images is gigabytes
    g = torch.Generator(device=device).manual_seed(seed)
    dev = {"generator": g, "device": device}
    accepts = set(inspect.signature(model.forward).parameters)
    batch: dict[str, torch.Tensor] = {}
    if workload.task == "image":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        batch["pixel_values"] = torch.randn(batch_size, channels, size, size, **dev)
        batch["labels"] = torch.randint(0, max(config.num_labels, 1), (batch_size,), **dev)
    else:
        vocab = config.vocab_size
        batch["input_ids"] = torch.randint(0, vocab, (batch_size, seq_len), **dev)
        if attention_mask == "ones":
            batch["attention_mask"] = torch.ones(
                batch_size, seq_len, dtype=torch.long, device=device
            )
        elif attention_mask == "padded":
            lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), **dev)
            lengths[0] = seq_len
            mask = torch.arange(seq_len, device=device) < lengths[:, None]
            pad = getattr(config, "pad_token_id", None) or 0
            batch["input_ids"].masked_fill_(~mask, pad)
            batch["attention_mask"] = mask.long()
        if "token_type_ids" in accepts and getattr(config, "type_vocab_size", 0):
            batch["token_type_ids"] = torch.zeros(
                batch_size, seq_len, dtype=torch.long, device=device
            )
        if workload.task == "qa":
            batch["start_positions"] = torch.randint(0, seq_len, (batch_size,), **dev)
            batch["end_positions"] = torch.randint(0, seq_len, (batch_size,), **dev)
        else:
            batch["labels"] = torch.randint(0, max(config.num_labels, 1), (batch_size,), **dev)
    return batch


def describe_config(config) -> dict:
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "image_size",
        "patch_size",
        "num_labels",
    )
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}
