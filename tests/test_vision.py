"""Fashion-MNIST (IDX parsing, npz, class subsets, splits, missing-data error) and the
vision benchmark's pretrain / fine-tune functions on a tiny ViT for a few steps."""

from __future__ import annotations

import gzip
import importlib
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimfit.data import FetchError, registry

ROOT = Path(__file__).resolve().parents[1]
REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def vision():
    """The module, with its tasks registered only while this file's tests run (other test
    files check the exact list of known tasks)."""
    before = dict(registry.TASKS)
    mod = importlib.import_module("slimfit.data.vision")
    for spec in mod.SPECS:
        registry.TASKS.setdefault(spec.name, spec)
    yield mod
    registry.TASKS.clear()
    registry.TASKS.update(before)


@pytest.fixture(scope="module")
def scripts(vision):
    sys.path.insert(0, str(ROOT / "benchmarks" / "vision"))
    pretrain_vit = importlib.import_module("pretrain_vit")
    finetune_vit = importlib.import_module("finetune_vit")
    return pretrain_vit, finetune_vit


def _idx_bytes(code: int, array: np.ndarray, fmt: str) -> bytes:
    """IDX written by hand from the format spec (independent of the code under test)."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(fmt).tobytes()


def _synthetic(n_train=200, n_test=50):
    """Labels cycle 0-9; every image holds its label in pixel (0, 0) and its index in (0, 1)."""
    arrays = {}
    for part, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) * 7 % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels
        images[:, 0, 1] = np.arange(n) % 256
        images[:, 5:9, 5:9] = 200
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = images, labels
    return arrays


@pytest.fixture
def idx_dir(tmp_path, vision):
    folder = tmp_path / "fmnist"
    folder.mkdir()
    arrays = _synthetic()
    for key, stem in vision.IDX_FILES.items():
        raw = _idx_bytes(8, arrays[key], ">u1")
        (folder / (stem + ".gz")).write_bytes(gzip.compress(raw))
    return folder


# -- IDX -----------------------------------------------------------------------------------


def test_parse_idx_uint8_gzip_and_plain(vision):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    raw = _idx_bytes(0x08, images, ">u1")
    for data in (raw, gzip.compress(raw)):
        out = vision.parse_idx(data)
        assert out.dtype == np.uint8 and out.shape == (3, 28, 28)
        np.testing.assert_array_equal(out, images)


def test_parse_idx_big_endian_types(vision):
    ints = np.array([[1, -2, 70000], [2**31 - 1, 0, -(2**31)]], dtype=np.int64)
    out = vision.parse_idx(_idx_bytes(0x0C, ints, ">i4"))
    assert out.dtype == np.int32 and out.dtype.byteorder in ("=", "<", "|")
    np.testing.assert_array_equal(out, ints)
    floats = np.array([0.5, -1.25, 3e8])
    np.testing.assert_array_equal(vision.parse_idx(_idx_bytes(0x0E, floats, ">f8")), floats)


def test_write_idx_round_trip(vision, tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = vision.write_idx(tmp_path / "labels-idx1-ubyte.gz", labels)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(path.read_bytes()) == _idx_bytes(8, labels, ">u1")
    np.testing.assert_array_equal(vision.parse_idx(path.read_bytes()), labels)


def test_parse_idx_rejects_bad_files(vision):
    with pytest.raises(ValueError, match="not an IDX file"):
        vision.parse_idx(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        vision.parse_idx(b"")
    raw = _idx_bytes(8, np.zeros((2, 3), np.uint8), ">u1")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        vision.parse_idx(raw[:-1])
    with pytest.raises(ValueError, match="truncated inside its IDX header"):
        vision.parse_idx(raw[:6])


@pytest.mark.skipif(not REAL.is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_real_files_parse(vision):
    labels = vision.parse_idx((REAL / "t10k-labels-idx1-ubyte.gz").read_bytes())
    images = vision.parse_idx((REAL / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    train_labels = vision.parse_idx((REAL / "train-labels-idx1-ubyte.gz").read_bytes())
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert 0.27 < images.mean() / 255 < 0.30  # close to PIXEL_MEAN (train: 0.2860)


# -- loading, subsets, splits --------------------------------------------------------------


def test_load_task_relabels_classes_5_to_9(vision, idx_dir):
    data = registry.load_task("fashion-mnist", idx_dir)
    assert data.label_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    # 20 train images per class, 10% of each class to dev; 5 test images per class
    assert data.sizes() == {"train": 90, "dev": 10, "test": 25}
    for split in (data.train, data.dev, data.test):
        assert split.inputs.shape[1:] == (28, 28) and split.inputs.dtype == np.uint8
        assert isinstance(split.labels, list) and set(split.labels) == set(range(5))
        np.testing.assert_array_equal(split.inputs[:, 0, 0], np.array(split.labels) + 5)
    pre = registry.load_task("fashion-mnist-pretrain", idx_dir)
    assert pre.sizes() == {"train": 90, "dev": 10, "test": 25}
    np.testing.assert_array_equal(pre.train.inputs[:, 0, 0], pre.train.labels)
    # train and dev are disjoint, and together the whole official train set of the classes
    ids = lambda s: set(s.inputs[:, 0, 1].tolist())  # noqa: E731
    assert not ids(data.train) & ids(data.dev) and not ids(pre.train) & ids(pre.dev)
    assert len(ids(data.train) | ids(data.dev) | ids(pre.train) | ids(pre.dev)) == 200
    assert registry.get_task("fashion-mnist").modality == "image"
    assert registry.get_task("fashion-mnist").num_labels == 5


def test_class_subset(vision):
    images = np.arange(6)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    labels = np.array([5, 0, 9, 7, 5, 4])
    x, y, idx = vision.class_subset(images, labels, (5, 6, 7, 8, 9))
    assert y.tolist() == [0, 4, 2, 0] and idx.tolist() == [0, 2, 3, 4]
    np.testing.assert_array_equal(x[:, 0, 0], [0, 2, 3, 4])
    _, y, _ = vision.class_subset(images, labels, (9, 5))
    assert y.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="repeats a class"):
        vision.class_subset(images, labels, (5, 5))


def test_split_is_deterministic_stratified_and_pinned(vision):
    labels = np.arange(100) % 10
    train, dev = vision.train_dev_indices(labels)
    # pinned: sha256 ordering, the same on every machine and version
    assert dev.tolist() == [2, 15, 18, 50, 54, 71, 83, 86, 97, 99]
    assert sorted(np.concatenate([train, dev]).tolist()) == list(range(100))
    assert np.bincount(labels[dev]).tolist() == [1] * 10
    again = vision.train_dev_indices(labels)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], dev)
    _, dev2 = vision.train_dev_indices(labels, dev_fraction=0.2, seed=1)
    assert len(dev2) == 20 and np.bincount(labels[dev2]).tolist() == [2] * 10
    assert dev2.tolist() != dev.tolist()
    with pytest.raises(ValueError, match="dev_fraction"):
        vision.train_dev_indices(labels, dev_fraction=1.0)


def test_npz_round_trip_and_env_dir(vision, idx_dir, tmp_path, monkeypatch):
    target = vision.write_npz(tmp_path / "carry", idx_dir)
    assert target.name == "fashion-mnist.npz"
    a, b = vision.load_arrays(idx_dir), vision.load_arrays(tmp_path / "carry")
    c = vision.load_arrays(target)
    for key in vision.IDX_FILES:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])
    assert a["train_images"].dtype == np.uint8 and a["train_labels"].dtype == np.int64
    monkeypatch.setenv("SLIMFIT_DATA_DIR", str(tmp_path / "carry"))
    assert vision.find_data() == ("npz", target)


def test_missing_data_error_names_package_and_option(vision, tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.delenv("SLIMFIT_DATA_DIR", raising=False)
    with pytest.raises(FetchError) as info:
        vision.load_finetune()
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert str(tmp_path / "absent") in msg and "\n" not in msg and msg.endswith(".")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FetchError, match="dataset-fashion-mnist"):
        vision.load_arrays(tmp_path / "empty")


def test_collate_normalizes_to_one_channel(vision):
    images = np.full((2, 28, 28), 255, np.uint8)
    batch = vision.collate(images, [3, 1])
    assert batch["pixel_values"].shape == (2, 1, 28, 28)
    expected = (1.0 - vision.PIXEL_MEAN) / vision.PIXEL_STD
    assert torch.allclose(batch["pixel_values"], torch.full((2, 1, 28, 28), expected))
    assert batch["labels"].tolist() == [3, 1] and batch["labels"].dtype == torch.long


# -- the benchmark scripts on a tiny ViT ---------------------------------------------------


def test_augment_is_a_shift_or_flip(scripts):
    pretrain_vit, _ = scripts
    x = torch.randint(1, 256, (6, 28, 28), dtype=torch.uint8)
    out = pretrain_vit.augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        candidates = [
            view.flip(-1) if flip else view
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            for view in [padded[i, dy : dy + 28, dx : dx + 28]]
        ]
        assert any(torch.equal(out[i], c) for c in candidates)


@pytest.fixture(scope="module")
def tiny_pretrained(scripts, vision, tmp_path_factory):
    pretrain_vit, _ = scripts
    data = vision.load_subset((0, 1, 2, 3, 4), arrays=_synthetic(120, 30))
    cfg = pretrain_vit.PretrainConfig(size="test", max_steps=3, batch_size=16, precision="fp32")
    model, metrics = pretrain_vit.pretrain(cfg, data, torch.device("cpu"), log=lambda s: None)
    folder = pretrain_vit.save(model, metrics, tmp_path_factory.mktemp("vit"))
    return folder, model, metrics


@pytest.fixture(scope="module")
def finetune_data(vision):
    """Synthetic images of the fine-tuning classes 5-9."""
    return vision.load_subset((5, 6, 7, 8, 9), arrays=_synthetic(120, 30))


def test_pretrain_runs_and_saves_hf_folder(tiny_pretrained):
    from transformers import ViTForImageClassification

    folder, model, metrics = tiny_pretrained
    assert metrics["steps"] == 3 and not metrics["stopped_early"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["data"]["train"] == 55
    assert {"config.json", "model.safetensors", "pretrain.json"} <= {
        p.name for p in folder.iterdir()
    }
    loaded = ViTForImageClassification.from_pretrained(folder)
    assert loaded.config.num_channels == 1 and loaded.config.image_size == 28
    assert loaded.config.id2label[0] == "T-shirt/top"
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n


def test_finetune_step_keeps_frozen_counts_exact(scripts, tiny_pretrained, finetune_data):
    _, finetune_vit = scripts
    folder, pretrained, _ = tiny_pretrained
    data = finetune_data
    cfg = finetune_vit.FinetuneConfig(
        pretrained=str(folder), policy="ils", freeze_ratio=0.9, lr=1e-3, max_steps=3,
        precision="fp32", batch_size=16,
    )  # fmt: skip
    job = finetune_vit.setup(cfg, data, torch.device("cpu"))
    sf = job.slimfit
    # a fresh head, the pretrained backbone
    assert not torch.equal(job.model.classifier.weight, pretrained.classifier.weight)
    assert torch.equal(job.model.vit.embeddings.cls_token, pretrained.vit.embeddings.cls_token)
    assert job.model.config.id2label[0] == "Sandal"
    n_frozen = int(0.9 * len(sf.units))
    assert sf.scheduler.n_frozen == n_frozen and n_frozen > 0
    x, y = np.asarray(data.train.inputs), np.asarray(data.train.labels)
    for step, idx in enumerate(finetune_vit.batches(len(y), 16, 0, 3)):
        frozen = [u for u in sf.units if not u.param.requires_grad]
        assert len(frozen) == n_frozen
        before = {u.name: u.param.detach().clone() for u in sf.units}
        head = job.model.classifier.weight.detach().clone()
        finetune_vit.train_step(job, x[idx], y[idx])
        for u in frozen:
            assert torch.equal(u.param, before[u.name]), (step, u.name)
        trained = [u for u in sf.units if u.name not in {f.name for f in frozen}]
        assert any(not torch.equal(u.param, before[u.name]) for u in trained)
        assert not torch.equal(job.model.classifier.weight, head)  # the head always trains
    assert sf.step == 3 and len(sf.history) == 3
    assert all(int(m.sum()) == n_frozen for m in sf.history)


@pytest.mark.parametrize("policy", ["random", "none", "lora", "head"])
def test_finetune_policies_end_to_end(scripts, tiny_pretrained, finetune_data, policy):
    _, finetune_vit = scripts
    folder, _, _ = tiny_pretrained
    data = finetune_data
    cfg = finetune_vit.FinetuneConfig(
        pretrained=str(folder), policy=policy, freeze_ratio=0.9 if policy == "random" else 0.0,
        lr=1e-3, max_steps=2, precision="fp32", batch_size=16,
    )  # fmt: skip
    m = finetune_vit.finetune(cfg, data, torch.device("cpu"))
    assert m["steps"] == 2 and 0.0 <= m["test"] <= 1.0 and 0.0 <= m["dev"] <= 1.0
    frac = m["mean_trainable_param_fraction"]
    if policy == "none":
        assert frac == 1.0 and m["frozen_per_step"] == 0
    elif policy == "random":
        assert m["frozen_per_step"] == int(0.9 * m["units"]) and frac < 0.5
    else:  # lora / head: only adapters (and the head) train
        assert m["units"] is None and 0.0 < frac < 0.5


def test_batches_cover_each_image_once_per_epoch(scripts):
    _, finetune_vit = scripts
    out = list(finetune_vit.batches(10, 4, seed=3, total_steps=6))
    assert [len(b) for b in out] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate(out[:3]).tolist()) == list(range(10))
    assert sorted(np.concatenate(out[3:]).tolist()) == list(range(10))
    again = list(finetune_vit.batches(10, 4, seed=3, total_steps=6))
    assert all(np.array_equal(a, b) for a, b in zip(out, again))
    limited = list(finetune_vit.batches(10, 4, seed=3, total_steps=2, limit=5))
    assert [len(b) for b in limited] == [4, 1]


def test_report_states_provenance(scripts, tmp_path):
    _, finetune_vit = scripts
    runs = [
        {"variant": v, "overrides": {"policy": p, "lr": 1e-4}, "seed": s, "dev": d, "test": t,
         "wall_time_s": 10.0, "train_time_s": 8.0, "peak_memory_bytes": 2**20,
         "mean_trainable_param_fraction": 1.0, "frozen_per_step": 0, "units": 52}
        for v, p, s, d, t in [("full-lr1e-4", "none", 0, 0.9, 0.91),
                              ("full-lr1e-4", "none", 1, 0.92, 0.93)]
    ] + [{"variant": "lora-r8-lr1e-3", "overrides": {"policy": "lora"}, "seed": 0,
          "error": "ImportError: no peft"}]  # fmt: skip
    meta = {"command": "x", "date": "d", "device": "cpu", "versions": {}, "settings": {}}
    finetune_vit.write_report(str(tmp_path), runs, meta, None, ["full-lr1e-4", "lora-r8-lr1e-3"])
    md = (tmp_path / "accuracy-fashion-mnist.md").read_text()
    assert "pretrained here" in md and "classes 0-4" in md and "no pretrained vit" in md.lower()
    assert "| full-lr1e-4 |" in md and "| 92.00 |" in md and "error" in md
    import json

    summary = json.loads((tmp_path / "accuracy-fashion-mnist.json").read_text())["summary"]
    assert [s["variant"] for s in summary] == ["full-lr1e-4", "lora-r8-lr1e-3"]


def test_unit_options_give_only_the_units_their_lr(scripts, tiny_pretrained, finetune_data):
    _, finetune_vit = scripts
    folder, _, _ = tiny_pretrained
    data = finetune_data
    cfg = finetune_vit.FinetuneConfig(
        pretrained=str(folder), policy="ils", freeze_ratio=0.9, lr=1e-3, max_steps=1,
        precision="fp32", batch_size=16, unit_options={"lr": 5e-3},
    )  # fmt: skip
    job = finetune_vit.setup(cfg, data, torch.device("cpu"))
    unit_ids = {id(u.param) for u in job.slimfit.units}
    lr_of = {id(p): g["lr"] for g in job.optimizer.param_groups for p in g["params"]}
    assert {lr_of[i] for i in unit_ids} == {5e-3}
    others = {i for i in lr_of if i not in unit_ids}
    assert others and {lr_of[i] for i in others} == {1e-3}  # head and biases
    assert id(job.model.classifier.weight) in others
    with pytest.raises(ValueError, match="unit_options needs a freezing policy"):
        finetune_vit.setup(
            finetune_vit.FinetuneConfig(pretrained=str(folder), policy="lora", unit_options={"lr": 1.0}),
            data, torch.device("cpu"),
        )  # fmt: skip


def test_vision_grids_before_the_taylor_default_stay_on_the_normalized_score(scripts):
    _, finetune_vit = scripts
    g = finetune_vit.GRIDS
    assert g["lr"]["ils90-lr1.6e-3"]["slimfit"]["score"] == "normalized"
    assert g["epochs"]["ils90-lr1.6e-3-9ep"]["slimfit"]["score"] == "normalized"
    for grid in ("taylor-epochs", "taylor-epochs12"):
        for name, v in g[grid].items():
            if v["policy"] == "ils":
                assert v["slimfit"]["score"] == "taylor", (grid, name)


def test_merge_pools_two_calls_into_one_report(scripts, tmp_path):
    """--merge: the seeds of two calls in one report, the first call's pretraining and
    variant order kept; the same variant and seed twice is refused."""
    import json

    import pytest

    _, finetune_vit = scripts
    meta = {"command": "x", "date": "d", "device": "cuda (test)", "versions": {},
            "settings": {"epochs": 3.0, "batch_size": 128, "precision": "bf16", "seeds": "0"}}  # fmt: skip

    def call(name, seed, tests):
        runs = [
            {"variant": v, "overrides": {"policy": p}, "seed": seed, "dev": t, "test": t,
             "wall_time_s": 1.0, "train_time_s": 1.0, "peak_memory_bytes": 2**20,
             "mean_trainable_param_fraction": 1.0, "frozen_per_step": 0, "units": 52}
            for (v, p), t in tests.items()
        ]  # fmt: skip
        out = tmp_path / name
        finetune_vit.write_report(str(out), runs, meta, {"steps": 7}, list(tests))
        return str(out / "accuracy-fashion-mnist.json")

    a = call("a", 0, {("ils90", "ils"): 0.95, ("full", "none"): 0.96})
    b = call("b", 1, {("ils90", "ils"): 0.97, ("full", "none"): 0.98})
    finetune_vit.main(["--merge", a, b, "--out", str(tmp_path / "m")])
    merged = json.loads((tmp_path / "m" / "accuracy-fashion-mnist.json").read_text())
    assert [s["variant"] for s in merged["summary"]] == ["ils90", "full"]
    assert [s["runs"] for s in merged["summary"]] == [2, 2]
    assert abs(merged["summary"][1]["test_mean"] - 97.0) < 1e-9
    assert merged["meta"]["settings"]["seeds"] == "0,1" and merged["pretrain"] == {"steps": 7}
    with pytest.raises(SystemExit, match="repeats variant"):
        finetune_vit.main(["--merge", a, a, "--out", str(tmp_path / "x")])
