"""`slimfit plan`: predicted peaks against the H100 baselines, batch scaling, memory caps,
errors. Everything runs on the meta device (no data, no GPU)."""

import json

import pytest
import torch

from slimfit import plan
from slimfit.bench.reference import REFERENCE_PEAKS_GIB
from slimfit.cli.main import main

GiB = 2**30


REFERENCE_PEAKS = REFERENCE_PEAKS_GIB  # measured H100 baselines (REFERENCE.md)


@pytest.mark.parametrize("workload,mode", sorted(REFERENCE_PEAKS))
def test_prediction_within_10_percent_of_h100_baseline(workload, mode):
    work = plan.resolve_workload(workload)
    # freezing modes: the first 3 ILS steps keep the test fast (the CLI takes the max over
    # ILS's whole first pass, see the slow test below)
    pred = plan.simulate(work, mode, 128, freeze_steps=3)
    measured = REFERENCE_PEAKS[(workload, mode)]
    assert abs(pred.peak_gib - measured) / measured <= 0.10, (pred.peak_gib, measured)
    # the breakdown accounts for every byte of the peak
    assert sum(pred.breakdown.values()) == pred.peak_bytes
    assert all(v >= 0 for v in pred.breakdown.values())


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["bert-base-seqcls", "bert-base-qa", "vit-base"])
def test_freeze_only_full_first_pass_within_10_percent(workload):
    pred = plan.simulate(plan.resolve_workload(workload), "freeze-only", 128)
    measured = REFERENCE_PEAKS[(workload, "freeze-only")]
    assert abs(pred.peak_gib - measured) / measured <= 0.10


def test_static_memory_is_exact_for_bert_base():
    """fp32 weights and AdamW's two moments: 4 and 8 bytes per parameter."""
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        n = sum(p.numel() for p in BertForSequenceClassification(BertConfig()).parameters())
    pred = plan.simulate(plan.resolve_workload("bert-base-seqcls"), "full", 8)
    assert pred.breakdown["optimizer"] == pytest.approx(8 * n, rel=1e-3)
    assert pred.breakdown["weights"] == pytest.approx(4 * n, rel=1e-3)  # + a few buffers


@pytest.mark.parametrize("name", ["bert-base-seqcls", "bert-base-qa", "vit-base"])
def test_named_models_are_the_bench_workloads(name):
    """plan's named models come from the bench's registry (one definition of their shapes)."""
    import re

    from slimfit.bench.workloads import WORKLOADS, get_workload
    from slimfit.config import DEFAULT_HEAD_PATTERN

    assert plan.WORKLOADS is WORKLOADS
    bench = get_workload(name)
    work = plan.resolve_workload(name)
    expected = {
        "bert-base-seqcls": ("bert", "seqcls", 128, 2),
        "bert-base-qa": ("bert", "qa", 384, 2),
        "vit-base": ("vit", "image", 224, 1000),
    }[name]
    assert (work.family, work.task, work.seq_len, work.num_labels) == expected
    assert work.task == bench.task and work.head == bench.head
    assert work.seq_len == (bench.seq_len or bench.config("base").image_size)
    # LoRA trains the bench's head modules: the same parameters DEFAULT_HEAD_PATTERN names
    model = plan._build(work, "sdpa")
    pattern = r"(^|\.)(" + "|".join(map(re.escape, bench.head)) + r")(\.|$)"
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if re.search(pattern, n)]
    assert head and head == [n for n in names if re.search(DEFAULT_HEAD_PATTERN, n)]
    # another task than the bench's: another head, found by the default pattern
    if work.task != "image":
        other = "qa" if work.task == "seqcls" else "seqcls"
        assert plan.resolve_workload(name, task=other).head == ()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small BERT as a local model folder (config only), as `--model PATH` reads it."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("tiny-bert")
    BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    ).save_pretrained(path)
    return plan.resolve_workload(str(path), seq_len=64)


@pytest.mark.parametrize("mode", ["full-fp32-eager", "full", "ckpt", "lora", "freeze-only"])
def test_peak_grows_with_batch_and_is_affine(tiny, mode):
    peaks = [plan.simulate(tiny, mode, b, freeze_steps=2).peak_bytes for b in (4, 8, 16, 32)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    # activations scale linearly with the batch (up to the allocator's 512-byte rounding)
    assert abs((peaks[3] - peaks[2]) - 2 * (peaks[2] - peaks[1])) <= 0.01 * (peaks[3] - peaks[2])


def test_memory_cap_answer_is_the_largest_batch_that_fits(tiny):
    cap = 300 * 2**20
    for mode in ("full", "ckpt"):
        b = plan.max_batch(tiny, mode, cap)
        assert b >= 1
        assert plan.simulate(tiny, mode, b).peak_bytes <= cap
        assert plan.simulate(tiny, mode, b + 1).peak_bytes > cap
    # a cap below the static memory fits nothing
    assert plan.max_batch(tiny, "full", 2**20) == 0


def test_modes_order_as_expected(tiny):
    peak = {m: plan.simulate(tiny, m, 16, freeze_steps=2).peak_bytes for m in plan.MODES[:5]}
    assert peak["ckpt"] < peak["full"] < peak["full-fp32-eager"]
    assert peak["freeze-only"] < peak["full"]
    assert peak["lora"] < peak["full"]


def test_slimfit_modes_run_and_say_how_they_were_predicted(tiny):
    pred = plan.simulate(tiny, "slimfit", 8, freeze_steps=1)
    assert pred.peak_bytes > 0 and pred.notes
    assert sum(pred.breakdown.values()) == pred.peak_bytes


def test_errors_are_one_sentence_value_errors(tiny):
    with pytest.raises(ValueError, match="unknown mode"):
        plan.simulate(tiny, "fp8", 8)
    with pytest.raises(ValueError, match="batch size"):
        plan.simulate(tiny, "full", 0)
    with pytest.raises(ValueError, match="model folder|model config"):
        plan.resolve_workload("/no/such/model/folder")
    with pytest.raises(ValueError, match="memory size"):
        plan.parse_size("lots")
    assert plan.parse_size("24GiB") == 24 * GiB


def test_cli_json_and_errors(tiny, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(
        ["plan", "--model", tiny.name, "--seq-len", "64", "--batch-size", "8", "--mode",
         "full,ckpt", "--memory-cap", "1GiB", "--json", "--output", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert list(result["modes"]) == ["full", "ckpt"]
    for p in result["modes"].values():
        assert p["max_batch"] > 8 and p["peak_bytes"] < 2**30
    # the table
    assert main(["plan", "--model", tiny.name, "--seq-len", "64", "--mode", "full"]) == 0
    assert "Predicted peak GPU memory" in capsys.readouterr().out
    # every mode has its line under the table (the newer bench modes included)
    assert set(plan.MODE_HELP) == set(plan.MODES)
    args = ["plan", "--model", tiny.name, "--seq-len", "32", "--batch-size", "2"]
    assert main([*args, "--mode", "slimfit-resident,slimfit-projcopy"]) == 0
    text = capsys.readouterr().out
    assert "slimfit-resident: slimfit keeping the optimizer state" in " ".join(text.split())
    # bad input: one sentence, exit 2
    assert main(["plan", "--model", "/no/such/model"]) == 2
    assert main(["plan", "--model", tiny.name, "--mode", "nope"]) == 2
    assert main(["plan", "--model", tiny.name, "--memory-cap", "lots"]) == 2
    assert main(["plan", "--model", tiny.name, "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("slimfit plan: error:") == 4 and "Traceback" not in err


def test_comparison_markdown():
    rows = [
        {"workload": "bert-base-seqcls", "mode": "full", "batch_size": 128,
         "predicted_gib": 7.61, "measured_gib": 7.67},
        {"workload": "vit-base", "mode": "lora", "batch_size": 128,
         "predicted_gib": 5.0, "measured_gib": None},
    ]  # fmt: skip
    md = plan.comparison_markdown(rows)
    assert "| bert-base-seqcls | full | 128 | 7.61 | 7.67 | -0.8% |" in md
    assert "| vit-base | lora | 128 | 5.00 | - | - |" in md
    assert "within 10%: 1/1" in md


def test_compare_with_a_bench_result(tiny, tmp_path, capsys):
    """`slimfit plan --compare bench.json` writes plan_vs_measured.md/.json."""
    full = plan.simulate(tiny, "full", 8).peak_bytes
    bench = {
        "date": "2026-11-23T12:00:00+00:00",
        "command": "slimfit bench --model tiny",
        "env": {"device": "NVIDIA H100 80GB HBM3"},
        "settings": {"model": tiny.name, "size": "base", "batch_size": 8, "freeze_ratio": None},
        "workloads": [
            {
                "workload": "bert-base-seqcls",
                "task": "seqcls",
                "seq_len": 64,
                "batch_size": 8,
                "modes": {
                    "full": {"status": "ok", "memory": {"peak_allocated_bytes": int(full * 1.05)}},
                    "ckpt": {"status": "oom"},
                },
            }
        ],
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    out = tmp_path / "out"
    assert main(["plan", "--compare", str(tmp_path), "--output-dir", str(out)]) == 0
    md = (out / "plan_vs_measured.md").read_text()
    assert "| full | 8 |" in md and "-4.8%" in md and "within 10%: 1/1" in md
    rows = json.loads((out / "plan_vs_measured.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["predicted_gib"] * GiB == pytest.approx(full)
    capsys.readouterr()
    assert main(["plan", "--compare", str(tmp_path / "nothing.json")]) == 2


def test_compression_shrinks_saved_activations(tiny):
    """The converted ops' saved bytes are counted: same frozen set, fewer bytes saved."""
    plain = plan.simulate(tiny, "freeze-only", 16, only_step=0)
    lean = plan.simulate(tiny, "slimfit-paper", 16, only_step=0)
    assert lean.breakdown["activations"] < 0.8 * plain.breakdown["activations"]
    assert plain.breakdown["weights"] == lean.breakdown["weights"]


def test_simulate_a_given_trained_set(tiny):
    frozen = plan.simulate(tiny, "slimfit", 4, 0.9, only_step=-1)
    assert plan.simulate(tiny, "slimfit", 4, 0.9, trained=()).peak_bytes == frozen.peak_bytes
    emb = "bert.embeddings.word_embeddings.weight"
    one = plan.simulate(tiny, "slimfit", 4, 0.9, trained=(emb,))
    # its gradient (fp32, 500 x 64) and its AdamW state paged back in: at most 3 copies
    assert 0 < one.peak_bytes - frozen.peak_bytes <= 3 * 4 * 500 * 64 + 4096
    assert any("the given units trained" in n for n in one.notes)
    with pytest.raises(ValueError, match="'bert.nothing' is not a unit"):
        plan.simulate(tiny, "freeze-only", 4, 0.9, trained=("bert.nothing",))


def test_resident_state_is_counted(tiny):
    """With every unit frozen, slimfit-resident keeps exactly its resident units' AdamW
    moments (two fp32 tensors each, in 512-byte allocator blocks) that slimfit pages to
    the host."""
    from slimfit.optim.paging import resident_units

    names = plan.unit_names(tiny)
    paged = plan.simulate(tiny, "slimfit", 4, 0.9, trained=())
    kept = plan.simulate(tiny, "slimfit-resident", 4, 0.9, trained=())
    with torch.device("meta"):
        model = plan._build(tiny, "sdpa")
    sizes = dict(model.named_parameters())
    numels = [sizes[n].numel() for n in names]
    fraction = plan.BENCH_MODES["slimfit-resident"].slimfit["resident_state_fraction"]
    keep = resident_units(numels, fraction)
    assert keep  # the tiny model's norm gains and more
    blocks = sum(512 * -(-4 * numels[i] // 512) for i in keep)
    assert kept.peak_bytes - paged.peak_bytes == 2 * blocks


def test_unit_names_are_the_units_attach_finds(tiny):
    from transformers import BertForSequenceClassification

    import slimfit

    names = plan.unit_names(tiny)
    # 2 layers x (Q, K, V, attention out, FFN in, FFN out, 2 norm gains) + word, position,
    # token-type embeddings and their norm gain + the pooler; the classifier is the head
    assert len(names) == 2 * 8 + 4 + 1 and len(set(names)) == len(names)
    model = BertForSequenceClassification(tiny.config)
    opt = torch.optim.AdamW(model.parameters())
    sf = slimfit.attach(model, opt, slimfit.SlimFitConfig(compression="none"))
    assert names == sf.unit_names
    # every name is one simulate's `trained` takes
    assert plan.simulate(tiny, "freeze-only", 4, 0.9, trained=(names[-1],)).peak_bytes > 0
