"""benchmarks/accuracy.py's bookkeeping: which run is the reference of a sweep."""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
accuracy = importlib.import_module("accuracy")


def _row(name, overrides, mean):
    return {"variant": name, "overrides": overrides, "test_mean": mean}


def test_best_full_is_the_best_plain_full_finetuning():
    summary = [
        _row("lora", {"policy": "none", "lr": 1e-3, "lora": {}}, 99.0),
        _row("full-compressed", {"policy": "none"}, 98.0),
        _row("full-lr1e-4", {"policy": "none", "compression": "none"}, 90.0),
        _row("full-lr5e-5", {"policy": "none", "compression": "none"}, 89.0),
        _row("ils", {"policy": "ils"}, 97.0),
    ]
    assert accuracy.best_full(summary)["variant"] == "full-lr1e-4"
    # without a plain run, any full fine-tuning; LoRA is never the reference
    assert accuracy.best_full(summary[:2])["variant"] == "full-compressed"
    assert accuracy.best_full(summary[:1]) is None


def test_every_grid_variant_names_a_policy():
    for grid in accuracy.GRIDS.values():
        for name, overrides in grid.items():
            assert overrides["policy"] in ("ils", "random", "none"), name
            assert "lora" not in overrides or overrides["policy"] == "none", name


def _sweep(tmp_path, name, seeds, tests, epochs=3.0, overrides=None):
    import json

    meta = {
        "command": f"accuracy.py --seeds {seeds}",
        "date": "2026-12-03T00:00:00+00:00",
        "device": "cuda (test)",
        "versions": {"torch": "x"},
        "settings": {"task": "trec", "model": "m", "epochs": epochs, "batch_size": 32,
                     "max_length": 128, "precision": "bf16", "seeds": seeds},
    }  # fmt: skip
    runs = [
        {"variant": v, "overrides": overrides or {"policy": "none"}, "seed": s, "test": t,
         "dev": t, "wall_time_s": 1.0, "peak_memory_bytes": 1}
        for (v, s), t in tests.items()
    ]  # fmt: skip
    path = tmp_path / name
    path.write_text(json.dumps({"meta": meta, "summary": [], "runs": runs}))
    return str(path)


def test_merge_pools_the_seeds_of_sweeps_of_one_setting(tmp_path):
    import pytest

    a = _sweep(tmp_path, "a.json", "0,1", {("full", 0): 0.90, ("full", 1): 0.92, ("x", 0): 0.5})
    b = _sweep(tmp_path, "b.json", "2", {("full", 2): 0.94})
    meta, runs = accuracy.merge([a, b], ["full"])
    assert meta["settings"]["seeds"] == "0,1,2"
    assert len(meta["merged_commands"]) == 2
    (row,) = accuracy.summarize(runs)
    assert row["runs"] == 3 and abs(row["test_mean"] - 92.0) < 1e-9
    assert abs(row["test_std"] - 2.0) < 1e-9
    accuracy.write_report(str(tmp_path / "out"), meta, runs)
    assert (tmp_path / "out" / "accuracy-trec.md").read_text().count("merged from") == 2
    # the same seed twice, another setting, or one variant name for two settings: refused
    with pytest.raises(SystemExit, match="repeats variant 'full' seed 0"):
        accuracy.merge([a, a], None)
    c = _sweep(tmp_path, "c.json", "3", {("full", 3): 0.9}, epochs=4.0)
    with pytest.raises(SystemExit, match="epochs"):
        accuracy.merge([a, c], None)
    d = _sweep(tmp_path, "d.json", "4", {("full", 4): 0.9}, overrides={"policy": "ils"})
    with pytest.raises(SystemExit, match="different settings"):
        accuracy.merge([a, d], None)


def test_grids_before_the_taylor_default_stay_on_the_normalized_score():
    # re-running a committed grid must reproduce it: the ones written before the taylor
    # default ran the normalized score without naming it
    g = accuracy.GRIDS
    for old, name in [("parity", "ils90-lr4e-4"), ("warmup", "ils90-lr4e-4-warm40"),
                      ("unit-betas", "ils90-lr4e-4-units-beta1-0.5")]:  # fmt: skip
        assert g[old][name]["slimfit"]["score"] == "normalized", (old, name)
    assert g["taylor"]["ils90-lr4e-4-taylor"]["slimfit"]["score"] == "taylor"
    assert g["taylor-embed"]["ils90-lr4e-4-taylor-embtrained"]["slimfit"]["score"] == "taylor"


def test_report_shows_the_largest_peak_of_a_variants_runs(tmp_path):
    path = _sweep(tmp_path, "p.json", "0,1", {("full", 0): 0.9, ("full", 1): 0.9})
    data = json.loads(open(path).read())
    for r, mib in zip(data["runs"], (300, 512)):
        r["peak_memory_bytes"] = mib * 2**20
    accuracy.write_report(str(tmp_path / "out"), data["meta"], data["runs"])
    md = (tmp_path / "out" / "accuracy-trec.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| variant"))
    row = next(ln for ln in md.splitlines() if ln.startswith("| full "))
    cells = dict(zip(header.split("|")[1:-1], row.split("|")[1:-1]))
    assert cells[" peak alloc (MiB) "].strip() == "512"
    # a run without a measurement (CPU) shows none rather than 0
    for r in data["runs"]:
        r["peak_memory_bytes"] = None
    accuracy.write_report(str(tmp_path / "cpu"), data["meta"], data["runs"])
    row = next(
        ln
        for ln in (tmp_path / "cpu" / "accuracy-trec.md").read_text().splitlines()
        if ln.startswith("| full ")
    )
    assert row.rstrip().endswith("| - |")
