"""CIFAR-10, CIFAR-100 and ImageNet-style image folders as image tasks (RGB, any size).

- ``cifar10``, ``cifar100`` (the 100 fine labels): 50,000 train and 10,000 test images,
  32x32 RGB. Without ``--data-dir`` they come from the Hugging Face hub through
  ``datasets.load_dataset("uoft-cs/cifar10")`` (``"uoft-cs/cifar100"``); offline,
  ``--data-dir`` (or ``$SLIMFIT_DATA_DIR``) is a folder holding the hub dataset's parquet
  files (columns ``img`` and ``label`` / ``fine_label``), e.g. as written by
  ``hf download uoft-cs/cifar10 --repo-type dataset --local-dir FOLDER``; a file belongs
  to the split its path names (``train-00000-of-00001.parquet``, ``train/0000.parquet``).
- ``image-folder``: an ImageNet-style folder, ``--data-dir`` holding
  ``train/<class>/*.jpg|png``, ``val/<class>/...`` and optionally ``test/<class>/...``;
  the class names are the sorted subfolder names of ``train/``, and every split must have
  the same ones. Images are decoded when a batch needs them (ImageNet does not fit in
  memory), as RGB, shorter side resized and centre-cropped to the model's ``image_size``
  (:func:`decode_at`, which ``slimfit finetune`` applies once the model is loaded: 384x384
  for ``google/vit-base-patch16-384``), or to 224x224 (ViT-B/16's size) where no model
  size is known.

Splits: dev is a fixed 10% of each class of the official train split, chosen by sha256 of
the image's index (:func:`slimfit.data.vision.train_dev_indices`; for a folder, the index
in sorted file order); train is the rest; test is the official test split (CIFAR's test
set; the folder's ``val/``). A folder with both ``val/`` and ``test/`` uses them as dev
and test and trains on all of ``train/``.

A split's ``inputs`` yields uint8 RGB arrays ``(N, H, W, 3)`` when indexed with a list of
indices. :func:`collate` turns a batch into ``pixel_values`` ``(B, 3, H, W)`` normalized
with mean = std = 0.5 (the ViT image processors' values) at the images' own size; the
model resizes them on its device to its ``image_size`` / ``num_channels``
(:func:`fit_pixels`, hooked in by :func:`slimfit.models.load_image_model`), so CIFAR is
upscaled to a 224-pixel ViT as in the paper without storing upscaled copies. Image folders
already come at the model's size, so the model leaves them as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .fetch import DATA_DIR_ENV
from .registry import Split, TaskData, TaskSpec, register_task
from .vision import train_dev_indices

PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
FOLDER_SIZE = 224
FOLDER_LAYOUT = "train/<class>/*.jpg|png and val/<class>/... (optionally test/<class>/...)"


@dataclass(frozen=True)
class Cifar:
    task: str
    title: str
    repo: str
    config: str  # the hub dataset's config, also its folder of parquet files
    label: str  # the label column
    classes: int


CIFAR10 = Cifar("cifar10", "CIFAR-10", "uoft-cs/cifar10", "plain_text", "label", 10)
CIFAR100 = Cifar("cifar100", "CIFAR-100", "uoft-cs/cifar100", "cifar100", "fine_label", 100)


# -- CIFAR -------------------------------------------------------------------------------


def _parquet_files(folder: Path, c: Cifar) -> dict[str, list[str]] | None:
    """The train and test parquet files under ``folder`` (its config subfolder first, so
    one folder can hold both CIFARs), or None."""
    for root in (folder / c.config, folder / c.task, folder):
        if not root.is_dir():
            continue
        files = {"train": [], "test": []}
        for path in sorted(root.rglob("*.parquet")):
            rel = path.relative_to(root).as_posix()
            for split in files:
                if split in rel:
                    files[split].append(str(path))
        if files["train"] and files["test"]:
            return files
    return None


def _missing(c: Cifar, where: str) -> str:
    return (
        f"{c.title} parquet files were not found in {where}; pass --data-dir with a folder "
        f"holding its train and test parquet files (the hub dataset {c.repo}, e.g. from "
        f"`hf download {c.repo} --repo-type dataset --local-dir FOLDER`)."
    )


def _load_dataset(c: Cifar, data_dir):
    import datasets

    datasets.disable_progress_bars()  # a training run's output is its own progress bar
    if data_dir not in (None, ""):
        files = _parquet_files(Path(data_dir).expanduser(), c)
        if files is None:
            raise ValueError(_missing(c, str(data_dir)))
        return datasets.load_dataset("parquet", data_files=files), str(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    files = _parquet_files(Path(env).expanduser(), c) if env else None
    if files is not None:
        return datasets.load_dataset("parquet", data_files=files), env
    try:
        return datasets.load_dataset(c.repo), c.repo
    except Exception as err:  # offline, no such repo, hub errors: all mean "pass the files"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{c.title} could not be loaded from the Hugging Face hub ({reason.rstrip('.')}); "
            f"without hub access pass --data-dir with a folder holding its parquet files "
            f"(the hub dataset {c.repo})."
        ) from None


def _arrays(ds, c: Cifar, where: str) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    if not {"img", c.label} <= set(ds.column_names):
        raise ValueError(
            f"{where} has columns {', '.join(ds.column_names)}, not img and {c.label}; pass "
            f"the parquet files of {c.repo}."
        )
    ds = ds.select_columns(["img", c.label]).cast_column("img", datasets.Image(mode="RGB"))
    cols = ds.with_format("numpy")[:]
    images, labels = cols["img"], np.asarray(cols[c.label], dtype=np.int64)
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"{where} holds images that are not all 32x32 RGB; pass the parquet files of {c.repo}."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= c.classes):
        raise ValueError(f"{where} has {c.label} values outside 0-{c.classes - 1}.")
    return images, labels


def load_cifar(c: Cifar, data_dir=None) -> TaskData:
    """Train/dev/test of CIFAR-10 or CIFAR-100 (see the module docstring for the source)."""
    dd, where = _load_dataset(c, data_dir)
    x, y = _arrays(dd["train"], c, where)
    test_x, test_y = _arrays(dd["test"], c, where)
    feature = dd["train"].features[c.label]
    names = list(getattr(feature, "names", None) or (str(i) for i in range(c.classes)))
    if len(names) != c.classes:
        raise ValueError(
            f"{where} names {len(names)} classes in {c.label}, not {c.classes}; pass the "
            f"parquet files of {c.repo}."
        )
    train_idx, dev_idx = train_dev_indices(y, name=c.task)
    return TaskData(
        c.task,
        Split(x[train_idx], y[train_idx].tolist()),
        Split(x[dev_idx], y[dev_idx].tolist()),
        Split(test_x, test_y.tolist()),
        names,
    )


# -- image folders -----------------------------------------------------------------------


def decode_size(image_size) -> tuple[int, int]:
    """``(height, width)`` of a model's ``image_size`` (an int or ``(height, width)``);
    ``None``: :data:`FOLDER_SIZE` square."""
    if image_size is None:
        return FOLDER_SIZE, FOLDER_SIZE
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        isinstance(image_size, (list, tuple))
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
        and min(image_size) >= 1
    ):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(
        f"the image size {image_size!r} is neither a positive int nor (height, width); give the "
        "model config an image_size such as 224."
    )


class FolderImages:
    """Image files decoded when indexed: ``images[[i, j]]`` is a uint8 array
    ``(2, height, width, 3)`` (RGB, shorter side resized, centre-cropped) for ``size``, an
    int (square) or ``(height, width)`` such as a model config's ``image_size``."""

    def __init__(self, paths: list[Path], size=FOLDER_SIZE):
        self.paths = list(paths)
        self.height, self.width = decode_size(size)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = ImageOps.fit(im.convert("RGB"), (self.width, self.height), Image.BILINEAR)
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(
                f"could not read the image {path} ({err}); remove or replace it."
            ) from None
        return np.asarray(im)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._load(self.paths[idx])
        if isinstance(idx, slice):
            idx = range(len(self))[idx]
        out = np.empty((len(idx), self.height, self.width, 3), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = self._load(self.paths[i])
        return out


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _classes(split_dir: Path, extensions: set[str]) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted), for each subfolder of ``split_dir``."""
    return {
        d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        for d in sorted(split_dir.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def _flatten(classes: dict[str, list[Path]], names: list[str]) -> tuple[list[Path], np.ndarray]:
    paths = [p for name in names for p in classes[name]]
    labels = np.array([i for i, name in enumerate(names) for _ in classes[name]], np.int64)
    return paths, labels


def load_image_folder(data_dir=None, size=FOLDER_SIZE) -> TaskData:
    """Train/dev/test of an ImageNet-style folder (see the module docstring), decoded at
    ``size`` (an int or ``(height, width)``)."""
    if data_dir in (None, ""):
        data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir in (None, ""):
        raise ValueError(f"the image-folder task needs --data-dir FOLDER holding {FOLDER_LAYOUT}.")
    root = Path(data_dir).expanduser()
    if not (root / "train").is_dir():
        raise ValueError(
            f"{root} has no train/ folder; pass --data-dir FOLDER holding {FOLDER_LAYOUT}."
        )
    extensions = _image_extensions()
    splits = {
        s: _classes(root / s, extensions) for s in ("train", "val", "test") if (root / s).is_dir()
    }
    names = sorted(splits["train"])
    if not names:
        raise ValueError(
            f"{root / 'train'} has no class subfolders; put each class's images in "
            "train/<class>/ (and the same classes in val/)."
        )
    if len(splits) == 1:
        raise ValueError(
            f"{root} has no val/ or test/ folder; pass --data-dir FOLDER holding {FOLDER_LAYOUT}."
        )
    for split, classes in splits.items():
        if sorted(classes) != names:
            missing, extra = sorted(set(names) - set(classes)), sorted(set(classes) - set(names))
            raise ValueError(
                f"{root / split} has different classes than train/ (missing: "
                f"{', '.join(missing[:5]) or 'none'}; extra: {', '.join(extra[:5]) or 'none'}); "
                "give every split the same class subfolders."
            )
        if not any(classes.values()):
            raise ValueError(
                f"{root / split} holds no image files ({', '.join(sorted(extensions)[:6])}, ...)."
            )
    parts = {s: _flatten(c, names) for s, c in splits.items()}

    def split(paths, labels):
        return Split(FolderImages(paths, size), labels.tolist())

    paths, labels = parts["train"]
    if "val" in parts and "test" in parts:
        train, dev, test = split(*parts["train"]), split(*parts["val"]), split(*parts["test"])
    else:
        train_idx, dev_idx = train_dev_indices(labels, name="image-folder")
        train = split([paths[i] for i in train_idx], labels[train_idx])
        dev = split([paths[i] for i in dev_idx], labels[dev_idx])
        test = split(*parts.get("val", parts.get("test")))
    return TaskData("image-folder", train, dev, test, names)


def decode_at(data: TaskData, image_size) -> TaskData:
    """``data`` with its image-folder splits decoded at ``image_size`` (a model config's:
    an int or ``(height, width)``; ``None`` keeps them as they are) rather than at the
    default 224x224, so a 384-pixel ViT gets 384-pixel crops, not upsampled 224-pixel ones.
    Splits of other tasks (CIFAR's arrays) are returned unchanged: the model resizes them."""
    splits = (data.train, data.dev, data.test)
    if image_size is None or not any(isinstance(s.inputs, FolderImages) for s in splits):
        return data
    size = decode_size(image_size)

    def at(split: Split) -> Split:
        if not isinstance(split.inputs, FolderImages):
            return split
        return Split(FolderImages(split.inputs.paths, size), split.labels)

    return replace(data, train=at(data.train), dev=at(data.dev), test=at(data.test))


# -- batches -----------------------------------------------------------------------------


def pixel_values(images, device=None):
    """uint8 RGB images ``(B, H, W, 3)`` -> normalized float ``(B, 3, H, W)``."""
    import torch

    x = torch.as_tensor(np.asarray(images))
    if device is not None:
        x = x.to(device, non_blocking=True)  # uint8 is a quarter of the float32 transfer
    return ((x.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD).permute(0, 3, 1, 2).contiguous()


def collate(images, labels, device=None) -> dict:
    """A batch of RGB images at their own size (the model resizes, :func:`fit_pixels`)."""
    import torch

    out = {"pixel_values": pixel_values(images, device)}
    if labels is not None:
        out["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    return out


def fit_pixels(pixel_values, num_channels: int | None = None, image_size=None):
    """``pixel_values`` ``(B, C, H, W)`` as a model of ``num_channels`` and ``image_size``
    (an int or ``(height, width)``) takes them: gray repeated to RGB or RGB averaged to
    gray, and resized bilinearly (antialiased when shrinking); the same tensor when it fits."""
    import torch.nn.functional as F

    x = pixel_values
    channels = x.shape[1]
    if num_channels and channels != num_channels:
        if channels == 1:
            x = x.repeat(1, num_channels, 1, 1)
        elif num_channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(
                f"the images have {channels} channels but the model takes {num_channels}; "
                "use a model made for 1- or 3-channel images."
            )
    if image_size:
        size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size,) * 2
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


SPECS = (
    TaskSpec(
        "cifar10",
        lambda data_dir=None: load_cifar(CIFAR10, data_dir),
        num_labels=10,
        metric="accuracy",
        modality="image",
        description="CIFAR-10: 32x32 RGB images of 10 classes",
        source=f"hub {CIFAR10.repo} (or --data-dir with its parquet files)",
    ),
    TaskSpec(
        "cifar100",
        lambda data_dir=None: load_cifar(CIFAR100, data_dir),
        num_labels=100,
        metric="accuracy",
        modality="image",
        description="CIFAR-100: 32x32 RGB images of 100 fine classes",
        source=f"hub {CIFAR100.repo} (or --data-dir with its parquet files)",
    ),
    TaskSpec(
        "image-folder",
        load_image_folder,
        num_labels=0,  # as many as the folder's classes
        metric="accuracy",
        modality="image",
        description="an ImageNet-style folder of class subfolders",
        source=f"--data-dir with {FOLDER_LAYOUT}",
    ),
)
for _spec in SPECS:
    register_task(_spec)
