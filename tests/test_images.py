"""CIFAR-10/100 (offline parquet in the hub's layout) and ImageNet-style image folders:
loading, labels, splits, RGB batches resized by the model, the clear errors, and
`slimfit finetune` end to end on a tiny random ViT."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from cli_args import finetune_args
from PIL import Image

from slimfit.cli.main import main
from slimfit.data import images, registry, vision
from slimfit.models import load_image_model

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer"] + [
    "dog", "frog", "horse", "ship", "truck"
]  # fmt: skip


def _cifar_image(label: int, index: int) -> Image.Image:
    """32x32 RGB whose pixel (0, 0) holds (label, index, 7): label and channel order can
    be read back; a bright band in row-block ``label`` makes the classes learnable."""
    a = np.full((32, 32, 3), 20, np.uint8)
    a[3 * (label % 10) : 3 * (label % 10) + 3] = 240
    a[0, 0] = (label, index % 256, 7)
    return Image.fromarray(a)


def _write_cifar_parquet(folder, labels_by_split, label_col="label", names=CIFAR10_NAMES):
    folder.mkdir(parents=True, exist_ok=True)
    features = {"img": datasets.Image(), label_col: datasets.ClassLabel(names=names)}
    if label_col == "fine_label":
        features["coarse_label"] = datasets.ClassLabel(names=[f"c{i}" for i in range(20)])
    for split, labels in labels_by_split.items():
        cols = {"img": [_cifar_image(y, i) for i, y in enumerate(labels)], label_col: labels}
        if label_col == "fine_label":
            cols["coarse_label"] = [y % 20 for y in labels]
        ds = datasets.Dataset.from_dict(cols, features=datasets.Features(features))
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """Both CIFARs in one folder, as `hf download` lays them out (config subfolders)."""
    root = tmp_path_factory.mktemp("cifar")
    train = [i % 10 for i in range(100)]  # 10 per class
    _write_cifar_parquet(root / "plain_text", {"train": train, "test": [i % 10 for i in range(30)]})
    fine = [f"fine{i}" for i in range(100)]
    _write_cifar_parquet(
        root / "cifar100",
        {"train": [0, 99] * 10, "test": [5, 99, 42]},
        label_col="fine_label",
        names=fine,
    )
    return root


def _png(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


COLOURS = {"bird": (10, 128, 250), "cat": (250, 0, 0), "dog": (0, 200, 30)}


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory):
    """train/ with 10 images per class (non-square, a constant colour per class), val/
    with 2; one grayscale PNG to check it comes back RGB."""
    root = tmp_path_factory.mktemp("folder")
    for name, colour in COLOURS.items():
        for i in range(10):
            _png(root / "train" / name / f"{i:02d}.png", (12, 8), colour)
        for i in range(2):
            _png(root / "val" / name / f"v{i}.png", (9, 9), colour)
    Image.new("L", (8, 8), 77).save(root / "train" / "cat" / "gray.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image\n")
    return root


def _tiny_vit(folder, num_labels, image_size=16, channels=3):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=image_size, patch_size=8, num_channels=channels,
                      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, num_labels=num_labels)  # fmt: skip
    T.ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


# -- CIFAR -----------------------------------------------------------------------------------


def test_cifar10_from_parquet(cifar_dir):
    data = registry.load_task("cifar10", cifar_dir)
    assert data.label_names == CIFAR10_NAMES
    assert data.sizes() == {"train": 90, "dev": 10, "test": 30}  # 10% of each class to dev
    assert np.bincount(data.dev.labels).tolist() == [1] * 10
    for split in (data.train, data.dev, data.test):
        assert split.inputs.shape[1:] == (32, 32, 3) and split.inputs.dtype == np.uint8
        # pixel (0, 0) holds (label, index, 7): labels match, channels in RGB order
        np.testing.assert_array_equal(split.inputs[:, 0, 0, 0], split.labels)
        assert (split.inputs[:, 0, 0, 2] == 7).all()
    ids = lambda s: set(s.inputs[:, 0, 0, 1].tolist())  # noqa: E731
    assert not ids(data.train) & ids(data.dev) and len(ids(data.train) | ids(data.dev)) == 100
    # the split is vision's sha256 split of the train labels: the same on every run
    _, dev_idx = vision.train_dev_indices(np.arange(100) % 10, name="cifar10")
    assert sorted(ids(data.dev)) == dev_idx.tolist()
    again = registry.load_task("cifar10", cifar_dir)
    np.testing.assert_array_equal(again.train.inputs, data.train.inputs)
    spec = registry.get_task("cifar10")
    assert spec.modality == "image" and spec.num_labels == 10


def test_cifar100_uses_fine_labels_from_its_own_subfolder(cifar_dir, monkeypatch):
    data = registry.load_task("cifar100", cifar_dir)
    assert data.label_names == [f"fine{i}" for i in range(100)]
    assert data.sizes() == {"train": 18, "dev": 2, "test": 3}
    assert sorted(data.dev.labels) == [0, 99] and data.test.labels == [5, 99, 42]
    np.testing.assert_array_equal(data.test.inputs[:, 0, 0, 0], [5, 99, 42])
    assert registry.get_task("cifar100").num_labels == 100
    # $SLIMFIT_DATA_DIR stands in for --data-dir, and the hub is not asked
    monkeypatch.setenv("SLIMFIT_DATA_DIR", str(cifar_dir))
    monkeypatch.setattr(datasets, "load_dataset", _no_hub(datasets.load_dataset))
    assert registry.load_task("cifar100").sizes() == data.sizes()


def _no_hub(real):
    def load(path, *args, **kwargs):
        if path != "parquet":
            raise ConnectionError(
                "Couldn't reach 'uoft-cs/cifar10' on the Hub (LocalEntryNotFoundError)"
            )
        return real(path, *args, **kwargs)

    return load


def _one_sentence(msg: str):
    assert "\n" not in msg and msg.endswith(".") and msg.count("; ") <= 2, msg


def test_cifar_missing_files_say_what_to_pass(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as info:
        registry.load_task("cifar10", tmp_path / "empty")
    msg = str(info.value)
    assert "CIFAR-10 parquet files were not found in" in msg and "--data-dir" in msg
    assert "uoft-cs/cifar10" in msg
    _one_sentence(msg)
    monkeypatch.delenv("SLIMFIT_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", _no_hub(datasets.load_dataset))
    with pytest.raises(ValueError) as info:
        registry.load_task("cifar100")
    msg = str(info.value)
    assert msg.startswith("CIFAR-100 could not be loaded from the Hugging Face hub (Couldn't")
    assert "--data-dir" in msg and "uoft-cs/cifar100" in msg
    _one_sentence(msg)


def test_cifar_wrong_columns(tmp_path):
    _write_cifar_parquet(tmp_path / "c", {"train": [0, 1], "test": [1]}, label_col="category")
    with pytest.raises(ValueError, match="not img and label; pass the parquet files of uoft-cs"):
        registry.load_task("cifar10", tmp_path / "c")


# -- image folders ---------------------------------------------------------------------------


def test_image_folder_classes_splits_and_pixels(folder_dir):
    data = registry.load_task("image-folder", folder_dir)
    assert data.label_names == ["bird", "cat", "dog"]  # sorted subfolder names
    # 31 train images (cat has the extra gray one; the .txt is skipped), 10% of each class
    # to dev; val/ is the test split
    assert data.sizes() == {"train": 28, "dev": 3, "test": 6}
    assert sorted(data.dev.labels) == [0, 1, 2] and sorted(data.test.labels) == [0, 0, 1, 1, 2, 2]
    assert isinstance(data.train.inputs, images.FolderImages)
    batch = data.test.inputs[list(range(len(data.test)))]
    assert batch.shape == (6, 224, 224, 3) and batch.dtype == np.uint8
    names = data.label_names
    for img, y in zip(batch, data.test.labels):
        assert (img == np.array(COLOURS[names[y]], np.uint8)).all()
    gray = [i for i, p in enumerate(data.train.inputs.paths) if p.name == "gray.png"]
    assert len(gray) == 1 and (data.train.inputs[gray[0]] == 77).all()  # L -> RGB
    again = registry.load_task("image-folder", folder_dir)
    assert again.train.inputs.paths == data.train.inputs.paths
    assert again.dev.labels == data.dev.labels and again.train.labels == data.train.labels
    assert registry.get_task("image-folder").num_labels == 0  # the data decides


def test_image_folder_with_test_uses_val_as_dev(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for name in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / name / f"{i}.jpg", (5, 5), (1, 2, 3))
    data = registry.load_task("image-folder", tmp_path)
    assert data.sizes() == {"train": 8, "dev": 4, "test": 6}
    assert data.test.labels == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "has no train/ folder; pass --data-dir FOLDER holding train/<class>/"),
        ({"train/x.png": "a"}, "train has no class subfolders; put each class's images"),
        ({"train/a/0.png": "a"}, "has no val/ or test/ folder; pass --data-dir"),
        ({"train/a/0.png": "a", "train/b/0.png": "b", "val/a/0.png": "a", "val/c/0.png": "c"},
         "val has different classes than train/ (missing: b; extra: c); give every split"),
        ({"train/a/0.txt": "a", "val/a/0.png": "a"}, "train holds no image files (."),
    ],
)  # fmt: skip
def test_image_folder_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    for rel in layout:
        if rel.endswith(".png"):
            _png(root / rel, (4, 4), (0, 0, 0))
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("x")
    with pytest.raises(ValueError) as info:
        registry.load_task("image-folder", root)
    assert message in str(info.value)
    _one_sentence(str(info.value))


def test_image_folder_needs_a_data_dir(monkeypatch):
    monkeypatch.delenv("SLIMFIT_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="the image-folder task needs --data-dir FOLDER holding"):
        registry.load_task("image-folder")


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"could not read the image .*bad.png .*remove or replace"):
        images.FolderImages([bad], size=8)[[0]]


# -- decoding at the model's image size ------------------------------------------------------

# ImageOps.fit resizes from the full image with a crop box, the reference crops first: on
# these smooth images the two differ by at most 2 of 255 grey levels, at the crop's edges.
GREY_LEVELS = 2


def _smooth_rgb(width, height, phase=0.0):
    """Non-constant but smooth RGB (ramps in R and G, a slow wave in B)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r, g = 255 * x / (width - 1), 255 * y / (height - 1)
    b = 127.5 + 100 * np.sin(2 * np.pi * x / width + phase) * np.cos(2 * np.pi * y / height)
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """train/ and val/ of two classes, 96x72 and 72x96 images that a resize changes."""
    root = tmp_path_factory.mktemp("photos")
    for split, n in (("train", 10), ("val", 2)):
        for c, name in enumerate(("a", "b")):
            for i in range(n):
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                size = (96, 72) if (i + c) % 2 == 0 else (72, 96)
                _smooth_rgb(*size, phase=0.3 * i + c).save(path)
    return root


def _reference(path, height, width):
    """PIL: the centred crop of the target's aspect (the shorter side whole), resized
    bilinearly to ``(height, width)``."""
    im = Image.open(path).convert("RGB")
    w0, h0 = im.size
    cw, ch = (h0 * width / height, h0) if w0 * height > h0 * width else (w0, w0 * height / width)
    left, top = (w0 - cw) / 2, (h0 - ch) / 2
    box = tuple(round(v) for v in (left, top, left + cw, top + ch))
    return np.asarray(im.crop(box).resize((width, height), Image.BILINEAR))


def _assert_pixels_match_reference(pixel_values, paths, height, width):
    assert pixel_values.shape == (len(paths), 3, height, width)
    ref = np.stack([_reference(p, height, width) for p in paths])
    ref = (torch.as_tensor(ref).float() / 255 - 0.5) / 0.5
    diff = (pixel_values - ref.permute(0, 3, 1, 2)).abs().max().item()
    assert diff <= GREY_LEVELS * (2 / 255) + 1e-6, diff  # 2/255: one grey level, normalized


@pytest.mark.parametrize("size, hw", [(64, (64, 64)), ((48, 64), (48, 64)), (None, (224, 224))])
def test_image_folder_decodes_at_the_model_image_size(photo_dir, size, hw):
    data = images.decode_at(registry.load_task("image-folder", photo_dir), size)
    for split in (data.train, data.dev, data.test):
        idx = list(range(len(split)))
        batch = vision.collate(split.inputs[idx], [split.labels[i] for i in idx])
        _assert_pixels_match_reference(batch["pixel_values"], split.inputs.paths, *hw)
    default = registry.load_task("image-folder", photo_dir)  # no model size known: 224
    assert default.test.inputs[[0, 1]].shape == (2, 224, 224, 3)
    assert data.label_names == default.label_names and data.test.labels == default.test.labels
    assert data.train.inputs.paths == default.train.inputs.paths


def test_decode_at_leaves_arrays_alone_and_refuses_a_bad_size(photo_dir):
    cifar_like = registry.TaskData(
        "c", *(registry.Split(np.zeros((2, 32, 32, 3), np.uint8), [0, 1]) for _ in range(3)), ["x"]
    )
    assert images.decode_at(cifar_like, 64) is cifar_like  # CIFAR: the model resizes
    folder = registry.load_task("image-folder", photo_dir)
    assert images.decode_at(folder, None) is folder
    for bad in (0, (64,), "64", (64.0, 64.0)):
        with pytest.raises(ValueError, match="is neither a positive int nor .height, width."):
            images.decode_at(folder, bad)


def test_finetune_setup_decodes_folders_at_the_models_size(tmp_path, photo_dir):
    """`slimfit finetune`'s setup: a 64-pixel ViT gets 64-pixel crops of the files, and its
    input hook passes them on unchanged (no decode at 224 and resize on the device)."""
    from slimfit.train import TrainConfig, make_batch, setup

    model = _tiny_vit(tmp_path / "vit64", num_labels=2, image_size=64)
    cfg = TrainConfig(model=str(model), task="image-folder", data_dir=str(photo_dir),
                      device="cpu", precision="fp32", batch_size=4, max_steps=1,
                      report=False)  # fmt: skip
    ctx = setup(cfg)
    try:
        seen = []
        embed = ctx.model.vit.embeddings.patch_embeddings
        handle = embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        idx = list(range(len(ctx.data.test)))
        batch = make_batch(None, ctx.data.test.inputs, idx, ctx.data.test.labels, ctx.device)
        _assert_pixels_match_reference(batch["pixel_values"], ctx.data.test.inputs.paths, 64, 64)
        with torch.no_grad():
            ctx.model(**batch)
        handle.remove()
        assert len(seen) == 1 and torch.equal(seen[0], batch["pixel_values"])
        assert ctx.data.train.inputs[[0]].shape == (1, 64, 64, 3)
    finally:
        ctx.slimfit.detach()


# -- batches and the model's resize ------------------------------------------------------


def test_rgb_collate_keeps_size_and_channel_order():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 255, 0, 51  # the vision collate dispatches on RGB
    batch = vision.collate(x, [4, 2])
    pv = batch["pixel_values"]
    assert pv.shape == (2, 3, 32, 32) and pv.dtype == torch.float32 and pv.is_contiguous()
    for c, v in enumerate((255, 0, 51)):
        assert torch.allclose(pv[:, c], torch.full((2, 32, 32), (v / 255 - 0.5) / 0.5))
    assert batch["labels"].tolist() == [4, 2] and batch["labels"].dtype == torch.long


def test_fit_pixels_resizes_and_converts_channels():
    x = torch.stack([torch.full((32, 32), v) for v in (0.9, -0.2, 0.4)]).expand(2, 3, 32, 32)
    up = images.fit_pixels(x, 3, 224)
    assert up.shape == (2, 3, 224, 224)
    for c, v in enumerate((0.9, -0.2, 0.4)):  # a constant image stays that constant
        assert torch.allclose(up[:, c], torch.full((2, 224, 224), v), atol=1e-6)
    down = images.fit_pixels(x, 3, (16, 8))
    assert down.shape == (2, 3, 16, 8) and torch.allclose(down[:, 1], torch.tensor(-0.2))
    assert images.fit_pixels(x, 3, 32) is x  # already fits: untouched
    gray = images.fit_pixels(x, 1, 32)
    assert gray.shape == (2, 1, 32, 32) and torch.allclose(gray, torch.tensor(1.1 / 3))
    rgb = images.fit_pixels(x[:, :1], 3, 32)
    assert rgb.shape == (2, 3, 32, 32) and torch.allclose(rgb, torch.tensor(0.9))
    with pytest.raises(ValueError, match="the images have 3 channels but the model takes 4"):
        images.fit_pixels(x, 4, 32)


def test_image_model_resizes_its_input(tmp_path):
    folder = _tiny_vit(tmp_path / "vit", num_labels=10, image_size=16)
    model, _ = load_image_model(str(folder), 10)
    model.eval()
    pv = images.collate(np.full((2, 32, 32, 3), 200, np.uint8), None)["pixel_values"]
    with torch.no_grad():
        out = model(**images.collate(np.full((2, 32, 32, 3), 200, np.uint8), [1, 2]))
        ref = model(pixel_values=torch.nn.functional.interpolate(pv, size=(16, 16)))
        positional = model(pv)
    assert out.logits.shape == (2, 10) and out.loss is not None
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)  # constant: any resize agrees
    assert torch.allclose(positional.logits, ref.logits, atol=1e-5)


# -- end to end ------------------------------------------------------------------------------


def test_finetune_image_folder_end_to_end(tmp_path, folder_dir):
    model = _tiny_vit(tmp_path / "vit", num_labels=5)  # the head is resized to 3 classes
    out = tmp_path / "out"
    argv = finetune_args(model, folder_dir, out, "--task", "image-folder", "--epochs", "1",
                         "--max-steps", "4", "--freeze-ratio", "0.5", "--lr", "1e-3")  # fmt: skip
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "image-folder" and m["modality"] == "image" and m["steps"] == 4
    assert m["data"] == {"train": 28, "dev": 3, "test": 6}
    assert m["frozen_per_step"] == m["units"] // 2 > 0
    assert 0.0 <= m["test_accuracy"] <= 1.0
    from transformers import AutoConfig

    saved = [p.parent for p in out.rglob("config.json")]
    assert saved and all(AutoConfig.from_pretrained(p).num_labels == 3 for p in saved)


def test_finetune_cifar10_learns(tmp_path, cifar_dir):
    model = _tiny_vit(tmp_path / "vit", num_labels=10, image_size=16)
    out = tmp_path / "out"
    argv = finetune_args(model, cifar_dir, out, "--task", "cifar10", "--batch-size", "16",
                         "--lr", "3e-3", "--policy", "none", "--freeze-ratio", "0",
                         max_steps=48)  # fmt: skip
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "cifar10" and m["data"] == {"train": 90, "dev": 10, "test": 30}
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses  # the bands are learnable at 16x16
    assert m["dev_accuracy"] > 0.3  # chance is 0.1
