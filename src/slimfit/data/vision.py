"""Fashion-MNIST (offline) for the vision accuracy benchmark: IDX parsing, class subsets, splits.

The Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``)
installs the original IDX files (gzip) under ``/usr/share/datasets/fashion-mnist/``: 60,000
train and 10,000 test images, 28x28 grayscale, 10 classes. They are parsed here with numpy
(no torchvision). Machines without apt (the GPU machine) use a local folder instead,
``--data-dir`` / ``$SLIMFIT_DATA_DIR``, holding either the IDX files (gzip or not) or the
compact ``fashion-mnist.npz`` written by :func:`write_npz` (about 30 MB)::

    python -m slimfit.data --write-npz .carry/fmnist

No pretrained ViT can be had offline, so the benchmark pretrains one on classes 0-4 and
fine-tunes it on classes 5-9 (relabelled 0-4):

- ``fashion-mnist``: classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) as labels 0-4,
  the fine-tuning task;
- ``fashion-mnist-pretrain``: classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat).

Splits: dev is a fixed 10% of each class of the official train set, chosen by sha256 of the
image's index (:func:`train_dev_indices`, independent of any library's RNG, the same for
both class subsets); train is the rest; test is the official test set. A split's
``inputs`` is a uint8 array of shape ``(N, 28, 28)`` (indexable like a list) and its
``labels`` a list of ints; :func:`collate` turns a batch into ``pixel_values`` of shape
``(B, 1, 28, 28)`` for a one-channel ``ViTForImageClassification``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .fetch import DATA_DIR_ENV, FetchError
from .registry import Split, TaskData, TaskSpec, register_task

APT_PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
NPZ_NAME = "fashion-mnist.npz"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
IMAGE_SIZE = 28
# Per-pixel mean and std of the Fashion-MNIST train images (pixels scaled to [0, 1]).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
SPLIT_SEED = 0
DEV_FRACTION = 0.1

# IDX type byte -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# -- IDX ---------------------------------------------------------------------------------


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """The array stored in IDX bytes (gzip-compressed or not), in native byte order.

    Layout: two zero bytes, a type byte, the number of dimensions, one big-endian uint32
    per dimension, then the values in row-major order, big-endian.
    """
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{name} is not an IDX file (bad magic {raw[:4].hex() or 'empty'}); "
            "pass the original Fashion-MNIST files."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name} is truncated inside its IDX header.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(
            f"{name} holds {len(raw) - header} data bytes but its header {shape} needs "
            f"{count * dtype.itemsize}; the file is truncated or corrupt."
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip when ``compress`` or the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise ValueError(
            f"IDX cannot store dtype {array.dtype}; use uint8, int8/16/32, float32/64."
        )
    code = codes[dtype]
    body = (
        bytes([0, 0, code, array.ndim])
        + np.asarray(array.shape, dtype=">u4").tobytes()
        + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    )
    if compress if compress is not None else path.suffix == ".gz":
        body = gzip.compress(body, mtime=0)
    path.write_bytes(body)
    return path


# -- finding and loading the files -------------------------------------------------------


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _source(path: Path) -> tuple[str, Path] | None:
    """``("npz", file)`` or ``("idx", folder)`` when ``path`` holds the data, else None."""
    if path.is_file() and path.suffix == ".npz":
        return "npz", path
    if path.is_dir():
        if (path / NPZ_NAME).is_file():
            return "npz", path / NPZ_NAME
        if all(_idx_path(path, stem) for stem in IDX_FILES.values()):
            return "idx", path
        if (path / "fashion-mnist").is_dir():
            return _source(path / "fashion-mnist")
    return None


def find_data(data_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Where the Fashion-MNIST files are: ``data_dir`` if given, else ``$SLIMFIT_DATA_DIR``
    (when it holds them), else the Debian package's folder."""
    if data_dir not in (None, ""):
        candidates = [Path(data_dir).expanduser()]
    else:
        candidates = (
            [Path(os.environ[DATA_DIR_ENV]).expanduser()] if os.environ.get(DATA_DIR_ENV) else []
        )
        candidates.append(SYSTEM_DIR)
    for path in candidates:
        found = _source(path)
        if found is not None:
            return found
    looked = ", ".join(str(p) for p in candidates)
    raise FetchError(
        f"Fashion-MNIST was not found in {looked}; install it with `apt-get install "
        f"{APT_PACKAGE}` or pass --data-dir (or set {DATA_DIR_ENV}) to a folder holding its "
        f"four IDX files or the {NPZ_NAME} written by `python -m slimfit.data --write-npz`."
    )


def _check(arrays: dict[str, np.ndarray], where: Path) -> dict[str, np.ndarray]:
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{where}: {part} images have shape {images.shape}, not (N, 28, 28).")
        if labels.shape != (len(images),):
            raise ValueError(
                f"{where}: {len(images)} {part} images but labels of shape {labels.shape}."
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise ValueError(f"{where}: {part} labels fall outside 0-9.")
    return {
        k: v.astype(np.uint8) if k.endswith("images") else v.astype(np.int64)
        for k, v in arrays.items()
    }


def load_arrays(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """``train_images`` (uint8, N x 28 x 28), ``train_labels`` (int64), ``test_images``,
    ``test_labels`` of the official files (see :func:`find_data` for where)."""
    kind, path = find_data(data_dir)
    if kind == "npz":
        with np.load(path) as z:
            missing = [k for k in IDX_FILES if k not in z.files]
            if missing:
                raise ValueError(
                    f"{path} lacks {', '.join(missing)}; write it with "
                    "`python -m slimfit.data --write-npz FOLDER`."
                )
            arrays = {k: z[k] for k in IDX_FILES}
    else:
        arrays = {}
        for key, stem in IDX_FILES.items():
            file = _idx_path(path, stem)
            arrays[key] = parse_idx(file.read_bytes(), str(file))
    return _check(arrays, path)


def write_npz(folder: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """Write the four arrays into ``folder/fashion-mnist.npz`` (compressed, about 30 MB):
    what a machine without apt needs (``--data-dir folder``)."""
    arrays = load_arrays(data_dir)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / NPZ_NAME
    tmp = folder / (NPZ_NAME + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, target)
    return target


# -- subsets and splits ------------------------------------------------------------------


def class_subset(
    images: np.ndarray, labels: np.ndarray, classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, new_labels, indices)`` of the examples whose label is in ``classes``;
    ``new_labels[i]`` is the position of the old label in ``classes`` (so 5-9 become 0-4).
    Order is kept."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"the class list {classes} repeats a class; list each class once.")
    lookup = np.full(max(max(classes), int(labels.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    new = lookup[labels]
    idx = np.nonzero(new >= 0)[0]
    return images[idx], new[idx], idx


def train_dev_indices(
    labels: np.ndarray,
    dev_fraction: float = DEV_FRACTION,
    seed: int = SPLIT_SEED,
    name: str = "fashion-mnist",
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/dev split of the official train set, as sorted index arrays.

    Within each class the examples are ordered by sha256 of ``"{name}:{seed}:{index}"``
    and the first ``round(dev_fraction * n_class)`` go to dev: the same split on every
    machine and version, and the same for any class subset.
    """
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}.")
    dev = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0].tolist()
        members.sort(key=lambda i: hashlib.sha256(f"{name}:{seed}:{i}".encode()).digest())
        dev += members[: round(dev_fraction * len(members))]
    dev_idx = np.array(sorted(dev), dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[dev_idx] = False
    return np.nonzero(mask)[0], dev_idx


def load_subset(
    classes: Sequence[int],
    data_dir: str | os.PathLike | None = None,
    name: str = "fashion-mnist",
    arrays: dict[str, np.ndarray] | None = None,
) -> TaskData:
    """Train/dev/test of the given classes, relabelled 0..len(classes)-1."""
    a = arrays if arrays is not None else load_arrays(data_dir)
    train_idx, dev_idx = train_dev_indices(a["train_labels"])

    def part(images, labels):
        x, y, _ = class_subset(images, labels, classes)
        return Split(x, y.tolist())

    return TaskData(
        name,
        part(a["train_images"][train_idx], a["train_labels"][train_idx]),
        part(a["train_images"][dev_idx], a["train_labels"][dev_idx]),
        part(a["test_images"], a["test_labels"]),
        [CLASSES[c] for c in classes],
    )


def load_finetune(data_dir=None) -> TaskData:
    """Classes 5-9 relabelled 0-4: the fine-tuning task ``fashion-mnist``."""
    return load_subset(FINETUNE_CLASSES, data_dir, "fashion-mnist")


def load_pretrain(data_dir=None) -> TaskData:
    """Classes 0-4: the pretraining task ``fashion-mnist-pretrain``."""
    return load_subset(PRETRAIN_CLASSES, data_dir, "fashion-mnist-pretrain")


# -- batches -----------------------------------------------------------------------------


def pixel_values(images, device=None):
    """uint8 images ``(B, 28, 28)`` (numpy or torch) -> normalized float ``(B, 1, 28, 28)``."""
    import torch

    x = torch.as_tensor(images)
    if device is not None:
        x = x.to(device, non_blocking=True)
    return ((x.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)


def collate(images, labels, device=None) -> dict:
    """A batch for ``ViTForImageClassification(num_channels=1, image_size=28)``; RGB
    images ``(B, H, W, 3)`` (CIFAR, image folders) go to :func:`slimfit.data.images.collate`."""
    import torch

    if np.ndim(images) == 4:
        from .images import collate as collate_rgb

        return collate_rgb(images, labels, device)
    out = {"pixel_values": pixel_values(images, device)}
    if labels is not None:
        out["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    return out


SOURCE = f"Debian {APT_PACKAGE}: {SYSTEM_DIR}/*-idx?-ubyte.gz (or --data-dir with {NPZ_NAME})"

SPECS = (
    TaskSpec(
        "fashion-mnist",
        load_finetune,
        num_labels=len(FINETUNE_CLASSES),
        metric="accuracy",
        modality="image",
        description="Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) as 0-4",
        source=SOURCE,
    ),
    TaskSpec(
        "fashion-mnist-pretrain",
        load_pretrain,
        num_labels=len(PRETRAIN_CLASSES),
        metric="accuracy",
        modality="image",
        description="Fashion-MNIST classes 0-4 (t-shirt, trouser, pullover, dress, coat)",
        source=SOURCE,
    ),
)
if __name__ != "__main__":  # `python -m slimfit.data` must not register twice
    for _spec in SPECS:
        register_task(_spec)


def main(argv: list[str] | None = None, prog: str = "python -m slimfit.data") -> None:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Fashion-MNIST: check the files, or write the compact .npz to carry.",
    )
    ap.add_argument("--data-dir", default=None, help="IDX folder or .npz (default: apt's)")
    ap.add_argument("--write-npz", metavar="FOLDER", help=f"write FOLDER/{NPZ_NAME}")
    args = ap.parse_args(argv)
    try:
        if args.write_npz:
            target = write_npz(args.write_npz, args.data_dir)
            print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")
        a = load_arrays(args.write_npz or args.data_dir)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    for part in ("train", "test"):
        counts = np.bincount(a[f"{part}_labels"], minlength=len(CLASSES)).tolist()
        print(f"{part}: {len(a[f'{part}_labels'])} images, per class {counts}")


if __name__ == "__main__":
    main()
