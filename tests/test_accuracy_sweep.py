"""benchmarks/accuracy.py's bookkeeping: which run is the reference of a sweep."""

import importlib
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
