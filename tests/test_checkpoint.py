"""slimfit.checkpoint: exact round trip, plain-transformers loading, atomic layout,
retention, one-sentence errors for bad checkpoints (a table), the non-finite loss guard."""

import json
import random
import shutil
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification  # noqa: E402

import slimfit  # noqa: E402
from slimfit import SlimFitConfig  # noqa: E402
from slimfit.checkpoint import (  # noqa: E402
    MANIFEST_FILE,
    MODEL_FILE,
    SLIMFIT_STATE_FILE,
    TRAINING_STATE_FILE,
    NonFiniteGuard,
    NonFiniteLossError,
    check_loss,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    read_slimfit_state,
    save_checkpoint,
    save_slimfit_state,
)


def tiny_config(**over):
    kw = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    kw.update(over)
    return BertConfig(**kw)


def build(init_seed=0, **over):
    torch.manual_seed(init_seed)
    model = BertForSequenceClassification(tiny_config(**over))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + s))
    sf = slimfit.attach(model, optimizer, SlimFitConfig(freeze_ratio=0.5, seed=2))
    return model, optimizer, sched, sf


def batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(1, 64, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g)


def train(model, optimizer, sched, steps, start=0):
    model.train()
    for i in range(start, start + steps):
        x, y = batch(i)
        model(input_ids=x, labels=y).loss.backward()  # dropout draws from the torch RNG
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_continues_bit_identically(tmp_path):
    model, opt, sched, sf = build()
    torch.manual_seed(5)
    train(model, opt, sched, 3)
    random.seed(9)
    np.random.seed(9)
    path = save_checkpoint(
        tmp_path, 3, model=model, optimizer=opt, lr_scheduler=sched, slimfit=sf,
        extra={"step": 3, "epoch": 0, "batch": 3, "note": "x"},
    )  # fmt: skip
    draws = (random.random(), float(np.random.rand()))
    train(model, opt, sched, 3, start=3)
    expected, expected_history = weights(model), [m.clone() for m in sf.history]

    model2, opt2, sched2, sf2 = build(init_seed=1)  # different init: everything must load
    torch.manual_seed(777)
    extra = load_checkpoint(path, model2, opt2, sched2, sf2)
    assert extra == {"step": 3, "epoch": 0, "batch": 3, "note": "x"}
    assert checkpoint_step(path) == 3 and sf2.step == 3
    assert (random.random(), float(np.random.rand())) == draws
    train(model2, opt2, sched2, 3, start=3)
    assert same(weights(model2), expected)
    assert all(torch.equal(a, b) for a, b in zip(sf2.history, expected_history))
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_folder_layout_and_plain_transformers_loading(tmp_path):
    model, opt, sched, sf = build()
    train(model, opt, sched, 1)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, lr_scheduler=sched, slimfit=sf)
    assert path == tmp_path / "checkpoint-1"
    names = {p.name for p in path.iterdir()}
    assert names == {
        MANIFEST_FILE,
        MODEL_FILE,
        "config.json",
        TRAINING_STATE_FILE,
        SLIMFIT_STATE_FILE,
    }
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["format"] == "slimfit-checkpoint" and manifest["format_version"] == 1
    assert set(manifest["files"]) == names - {MANIFEST_FILE}
    from safetensors import safe_open

    with safe_open(str(path / MODEL_FILE), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # keys unchanged
    loaded = BertForSequenceClassification.from_pretrained(path)
    assert same(weights(loaded), weights(model))


def test_tied_weights_are_stored_once_and_load_everywhere(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config())
    path = save_checkpoint(tmp_path, 0, model=model)
    aliases = read_manifest(path)["model"]["aliases"]
    assert aliases["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"
    assert same(weights(BertForMaskedLM.from_pretrained(path)), weights(model))
    torch.manual_seed(1)
    other = BertForMaskedLM(tiny_config())
    load_checkpoint(path, other)
    assert same(weights(other), weights(model))
    assert other.cls.predictions.decoder.weight is other.bert.embeddings.word_embeddings.weight


def test_keep_last_and_resave(tmp_path):
    model, opt, sched, sf = build()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, slimfit=sf, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    save_checkpoint(tmp_path, 5, model=model, keep_last=None)  # same step again: replaced
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not read_manifest(tmp_path / "checkpoint-5")["has_slimfit_state"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert latest_checkpoint(tmp_path / "checkpoint-4") == tmp_path / "checkpoint-4"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_latest_ignores_partial_and_foreign_folders(tmp_path):
    model, *_ = build()
    save_checkpoint(tmp_path, 2, model=model)
    (tmp_path / ".tmp-checkpoint-3.999").mkdir()  # an interrupted save
    (tmp_path / "checkpoint-7").mkdir()  # no manifest
    (tmp_path / "checkpoint-7" / MODEL_FILE).write_bytes(b"junk")
    with pytest.warns(UserWarning, match="checkpoint-7"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


# -- bad checkpoints: each one ValueError, one sentence, says what to do; nothing deleted ----
def _corrupt_byte(path, offset=-20):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(folder, **changes):
    m = json.loads((folder / MANIFEST_FILE).read_text())
    m.update(changes)
    (folder / MANIFEST_FILE).write_text(json.dumps(m))


def _as_trainer_checkpoint(folder):
    (folder / MANIFEST_FILE).unlink()
    (folder / "trainer_state.json").write_text("{}")
    return folder


BAD = {
    "missing folder": (lambda ck: ck.parent / "checkpoint-99", "does not exist"),
    "no manifest (foreign folder)": (
        lambda ck: (ck / MANIFEST_FILE).unlink() or ck,
        "not a slimfit checkpoint",
    ),
    "a Trainer checkpoint": (_as_trainer_checkpoint, "Trainer checkpoint"),
    "manifest not JSON": (
        lambda ck: (ck / MANIFEST_FILE).write_text("{not json") and ck,
        "corrupted",
    ),
    "wrong format name": (lambda ck: _edit_manifest(ck, format="other-tool") or ck, "format"),
    "newer format version": (lambda ck: _edit_manifest(ck, format_version=99) or ck, "version 99"),
    "truncated weights": (
        lambda ck: (ck / MODEL_FILE).write_bytes((ck / MODEL_FILE).read_bytes()[:-100]) and ck,
        "wrong size",
    ),
    "bit-flipped weights": (lambda ck: _corrupt_byte(ck / MODEL_FILE) or ck, "checksum"),
    "bit-flipped training state": (
        lambda ck: _corrupt_byte(ck / TRAINING_STATE_FILE, 200) or ck,
        "checksum",
    ),
    "file deleted": (lambda ck: (ck / TRAINING_STATE_FILE).unlink() or ck, "missing"),
}


@pytest.fixture
def saved(tmp_path):
    model, opt, sched, sf = build()
    train(model, opt, sched, 1)
    return save_checkpoint(tmp_path, 1, model=model, optimizer=opt, lr_scheduler=sched, slimfit=sf)


def _assert_one_sentence(err, fragment):
    text = str(err)
    assert fragment in text, text
    assert "\n" not in text and text.endswith(".") and text.count(". ") <= 1, text
    assert any(w in text for w in ("resume", "delete", "start", "pass", "point", "choose")), text


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_table(saved, case):
    breaker, fragment = BAD[case]
    target = breaker(saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()} if saved.is_dir() else {}
    model, opt, sched, sf = build(init_seed=1)
    untouched = weights(model)
    with pytest.raises(ValueError) as info:
        load_checkpoint(target, model, opt, sched, sf)
    _assert_one_sentence(info.value, fragment)
    assert same(weights(model), untouched)  # nothing half-loaded into the model
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # nothing deleted


FOREIGN_MODELS = {
    "fewer layers (missing keys)": (dict(num_hidden_layers=1), "unexpected"),
    "more layers (unexpected keys)": (dict(num_hidden_layers=3), "missing"),
    "another width (shapes)": (dict(hidden_size=24, num_attention_heads=2), "another shape"),
}


@pytest.mark.parametrize("case", list(FOREIGN_MODELS))
def test_checkpoint_of_a_different_model(saved, case):
    over, fragment = FOREIGN_MODELS[case]
    torch.manual_seed(0)
    other = BertForSequenceClassification(tiny_config(**over))
    with pytest.raises(ValueError, match="different model") as info:
        load_checkpoint(saved, other)
    _assert_one_sentence(info.value, "different model")
    text = str(info.value)
    assert ("missing" in text) or ("not in the model" in text) or ("another shape" in text)


def test_optimizer_and_slimfit_mismatch(saved, tmp_path):
    model, *_ = build(init_seed=1)
    groups = torch.optim.AdamW(
        [{"params": list(model.parameters())[:3]}, {"params": list(model.parameters())[3:]}]
    )
    untouched = weights(model)
    with pytest.raises(ValueError, match="optimizer state") as info:
        load_checkpoint(saved, model, groups)
    _assert_one_sentence(info.value, "does not fit")
    assert same(weights(model), untouched)  # refused before the weights were loaded
    # Saved without slimfit, resumed with it.
    bare = save_checkpoint(tmp_path / "bare", 0, model=model)
    m2, o2, s2, sf2 = build()
    with pytest.raises(ValueError, match="without SlimFit state"):
        load_checkpoint(bare, m2, o2, None, sf2)
    # Different units (the head made freezable): the scheduler refuses the state.
    m3, o3, s3, _ = build()
    sf3 = slimfit.attach(
        m3, o3, SlimFitConfig(freeze_ratio=0.5, seed=2, train_head=False, compression="none")
    )
    with pytest.raises(ValueError, match="different units"):
        load_checkpoint(saved, m3, o3, s3, sf3)


def test_unwritable_run_dir(tmp_path):
    model, *_ = build()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create the run directory") as info:
        save_checkpoint(blocker / "run", 1, model=model)
    _assert_one_sentence(info.value, "writable")
    with pytest.raises(ValueError, match="non-negative"):
        save_checkpoint(tmp_path, -1, model=model)
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model=model, keep_last=0)
    with pytest.raises(ValueError, match=r"extra\['pos'\] is a ndarray"):
        save_checkpoint(tmp_path, 1, model=model, extra={"pos": np.zeros(2)})
    assert not list(tmp_path.glob("checkpoint-*"))


def test_non_finite_loss(tmp_path):
    model, *_ = build()
    assert check_loss(torch.tensor(0.5), 1, run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match="at step 4 and no checkpoint"):
        check_loss(torch.tensor(float("nan")), 4, run_dir=tmp_path)
    ckpt = save_checkpoint(tmp_path, 6, model=model)
    with pytest.raises(ValueError) as info:  # a ValueError: the CLI prints it, exit code 2
        check_loss(float("inf"), 7, run_dir=tmp_path)
    assert "at step 7" in str(info.value) and str(ckpt) in str(info.value)
    guard = NonFiniteGuard(tmp_path, policy="skip", max_consecutive_skips=2)
    with pytest.warns(UserWarning, match="skipping step 8"):
        assert guard.check(torch.tensor(float("nan")), 8) is False
    assert guard.check(torch.tensor(1.0), 9) is True  # resets the run of skips
    with pytest.warns(UserWarning):
        assert not guard.check(float("nan"), 10) and not guard.check(float("nan"), 11)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row up to step 12"):
        guard.check(float("nan"), 12)
    assert guard.skipped == [8, 10, 11]
    with pytest.raises(ValueError, match="non-finite loss policy"):
        NonFiniteGuard(tmp_path, policy="ignore")


def test_load_from_run_dir_picks_newest(saved):
    model, opt, sched, sf = build(init_seed=1)
    save_checkpoint(saved.parent, 2, model=model, extra={"step": 2})
    model2, *_ = build(init_seed=3)
    assert load_checkpoint(saved.parent, model2)["step"] == 2
    shutil.rmtree(saved.parent / "checkpoint-2")


def test_checkpoint_step_may_run_ahead_of_slimfit(tmp_path):
    """A loop that skipped a step (non-finite loss) saves at its own step counter; the
    SlimFit state is keyed by that step, its scheduler keeps its own count."""
    model, opt, sched, sf = build()
    train(model, opt, sched, 2)
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, lr_scheduler=sched, slimfit=sf)
    model2, opt2, sched2, sf2 = build(init_seed=1)
    load_checkpoint(path, model2, opt2, sched2, sf2)
    assert sf2.step == 2 and checkpoint_step(path) == 3


def test_resuming_from_an_older_checkpoint_moves_newer_ones_aside(tmp_path):
    model, *_ = build()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model=model, keep_last=None)
    load_checkpoint(tmp_path / "checkpoint-2", model)  # e.g. roll back after a divergence
    with pytest.warns(UserWarning, match="moved 2 checkpoint"):
        save_checkpoint(tmp_path, 3, model=model, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "abandoned").iterdir()) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"


def test_kill_between_the_renames_of_a_resave_is_repaired(tmp_path):
    model, *_ = build()
    save_checkpoint(tmp_path, 1, model=model)
    save_checkpoint(tmp_path, 2, model=model)
    # Killed while re-saving step 2: old folder renamed away, new one not yet in place.
    (tmp_path / "checkpoint-2").rename(tmp_path / ".tmp-old-checkpoint-2.4242")
    (tmp_path / ".tmp-checkpoint-2.4242").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"  # still a complete one
    save_checkpoint(tmp_path, 3, model=model, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    "changed", [{"freeze_ratio": 0.75}, {"score": "relative"}, {"explore": 0.5}, {}]
)
def test_resuming_with_another_schedule_setting_warns(tmp_path, changed):
    def attached(**cfg):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        opt = torch.optim.AdamW(model.parameters())
        return slimfit.attach(model, opt, SlimFitConfig(compression="none", **cfg))

    saved = {"freeze_ratio": 0.5}
    save_slimfit_state(tmp_path / "state.pt", attached(**saved))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_slimfit_state(tmp_path / "state.pt", attached(**{**saved, **changed}))
    messages = [str(w.message) for w in caught if "resuming SlimFit" in str(w.message)]
    if not changed:
        assert messages == []
        return
    ((key, value),) = changed.items()
    assert len(messages) == 1
    assert f"{key} (" in messages[0] and repr(value) in messages[0]
    others = ("freeze_ratio", "score", "explore")
    assert not [k for k in others if k != key and f"{k} (" in messages[0]]
