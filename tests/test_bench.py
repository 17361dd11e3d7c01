"""`slimfit bench` on CPU: tiny configs, real measurements, no timed assertions."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from slimfit.bench import parse_bytes, report, run_bench, search_max_batch
from slimfit.bench import runner as runner_mod
from slimfit.bench.measure import SavedTensorCounter, percentile, static_memory, time_stats
from slimfit.bench.modes import MODES, get_modes
from slimfit.bench.readme_blocks import markers
from slimfit.bench.readme_table import main as readme_main
from slimfit.cli.main import main

CPU_MODES = "full-fp32-eager,full,ckpt,lora,freeze-only"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: OpenMP spinning makes 2 threads ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(
        [
            "bench",
            "--workload",
            "bert-base-seqcls",
            "--mode",
            CPU_MODES,
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--output",
            str(out),
        ]
    )
    return rc, out


def test_cli_writes_json_markdown_png(cli_run):
    rc, out = cli_run
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    for key in ("command", "date", "env", "settings", "workloads"):
        assert key in data
    for key in ("device", "driver", "cuda", "torch", "transformers", "triton", "peft"):
        assert key in data["env"]
    assert data["settings"]["size"] == "tiny"
    (w,) = data["workloads"]
    assert w["workload"] == "bert-base-seqcls" and w["batch_size"] == 2 and w["seq_len"] == 32
    assert list(w["modes"]) == CPU_MODES.split(",")
    for name, res in w["modes"].items():
        assert res["status"] == "ok", (name, res.get("reason"))
        assert res["memory"]["peak_allocated_bytes"] is None  # no CUDA counters on CPU
        assert res["activations"]["saved_bytes"] > 0
        assert sum(res["activations"]["by_module"].values()) == res["activations"]["saved_bytes"]
        if name != "ckpt":  # no per-op walk under checkpointing (it would unpack/recompute)
            assert sum(res["activations"]["by_op"].values()) == res["activations"]["saved_bytes"]
        assert res["time"]["steps"] == 2 and len(res["time"]["all_s"]) == 2
        assert res["time"]["p10_s"] <= res["time"]["median_s"] <= res["time"]["p90_s"]
        st = res["static"]
        assert (
            st["total_bytes"]
            == st["weights_bytes"]
            + st["buffers_bytes"]
            + st["optimizer_state_bytes"]
            + st["grads_bytes"]
        )
    full = w["modes"]["full"]
    assert full["ratios"]["step_vs_full"] == pytest.approx(1.0)
    assert full["ratios"]["peak_vs_full"] is None
    # eager attention saves its softmax; checkpointing keeps only block inputs
    assert "SoftmaxBackward0" in w["modes"]["full-fp32-eager"]["activations"]["by_op"]
    assert "SoftmaxBackward0" not in full["activations"]["by_op"]
    assert "(not in graph)" not in full["activations"]["by_op"]  # the walk reaches every node
    assert w["modes"]["ckpt"]["activations"]["saved_bytes"] < full["activations"]["saved_bytes"]
    # LoRA trains far fewer parameters; freezing leaves most weights without gradients
    assert w["modes"]["lora"]["static"]["trainable_params"] < full["static"]["trainable_params"]
    assert w["modes"]["freeze-only"]["static"]["grads_bytes"] < full["static"]["grads_bytes"]
    hooks = w["modes"]["freeze-only"]["slimfit"]["hooks"]
    assert hooks["steps"] > 0 and hooks["median_ms"] >= 0
    assert [c["status"] for c in w["checks"]] == ["n/a"] * 4  # slimfit not run here
    b2b = full["time_b2b"]
    assert b2b["steps"] == 2 and b2b["median_s"] > 0 and b2b["wall_per_step_s"] > 0
    assert full["ratios"]["step_b2b_vs_full"] == pytest.approx(1.0)
    md = (out / "bench.md").read_text()
    assert "| mode | status | peak alloc |" in md and "| full | ok | n/a |" in md
    assert "Saved activations by module" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_static_memory_of_full_bert_is_measured(cli_run):
    _, out = cli_run
    full = json.loads((out / "bench.json").read_text())["workloads"][0]["modes"]["full"]["static"]
    # fp32 weights; AdamW keeps exp_avg + exp_avg_sq per parameter (plus one 4-byte step each)
    assert full["weights_bytes"] == 4 * full["params"]
    assert (
        8 * full["trainable_params"]
        <= full["optimizer_state_bytes"]
        <= 8 * full["trainable_params"] + 4 * 1000
    )
    assert full["grads_bytes"] == 4 * full["trainable_params"]


def test_slimfit_modes_report_unavailable_or_run(tmp_path):
    res = run_bench(
        ["vit-base", "bert-base-qa"],
        ["full", "lora", "slimfit"],
        device="cpu",
        batch_size=2,
        steps=1,
        warmup=0,
        output=str(tmp_path),
        png=False,
        profile=True,
        log=lambda _m: None,
    )
    assert [w["workload"] for w in res["workloads"]] == ["vit-base", "bert-base-qa"]
    prof = res["workloads"][0]["modes"]["full"]["profile"]
    assert prof["sort"] == "self_cpu_ms" and prof["top"] and prof["total_ms"] > 0
    phases = res["workloads"][0]["modes"]["full"]["phases"]
    assert phases["steps"] == 2 and phases["forward_ms"] > 0 and phases["backward_ms"] > 0
    have_convert = importlib.util.find_spec("slimfit.convert") is not None
    for w in res["workloads"]:
        lora = w["modes"]["lora"]
        assert lora["status"] == "ok", lora.get("reason")
        assert (
            lora["static"]["trainable_params"]
            < w["modes"]["full"]["static"]["trainable_params"] // 2
        )
        sf = w["modes"]["slimfit"]
        if not have_convert:
            assert sf["status"] == "unavailable" and "not implemented" in sf["reason"]
            continue
        assert sf["status"] == "ok", sf.get("reason")
        assert sf["slimfit"]["frozen_units"] == int(0.95 * sf["slimfit"]["units"])
        assert sf["slimfit"]["hooks"]["steps"] == 2
        counts = sf["slimfit"]["trained_steps_per_unit"]
        n_train = sf["slimfit"]["units"] - sf["slimfit"]["frozen_units"]
        assert len(counts) == sf["slimfit"]["units"]
        assert sum(counts.values()) == n_train * sf["slimfit"]["steps"] > 0
        # compression keeps less than the uncompressed bf16 model saves
        assert sf["activations"]["saved_bytes"] < w["modes"]["full"]["activations"]["saved_bytes"]
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.png").exists()


def test_paired_rounds_alternate_and_take_the_median_round_ratio():
    from slimfit.bench.measure import paired_rounds

    clock = [0.0]
    calls = []
    # "a" costs 2 s per step and "b" 1 s, except a slow host in round 1 doubles both
    cost = {"a": 2.0, "b": 1.0}

    def runner(name):
        def run(n):
            calls.append(name)
            slow = 2.0 if len(calls) in (3, 4) else 1.0
            clock[0] += n * cost[name] * slow

        return run

    res = paired_rounds(
        {"a": runner("a"), "b": runner("b")}, 3, 5, sync=lambda: None, clock=lambda: clock[0]
    )
    assert calls == ["a", "b", "b", "a", "a", "b"]  # order flips every round
    assert res["step_s_rounds"] == {"a": [2.0, 4.0, 2.0], "b": [1.0, 2.0, 1.0]}
    assert res["ratio_rounds"] == [2.0, 2.0, 2.0] and res["ratio_median"] == 2.0
    assert res["step_s_median"] == {"a": 2.0, "b": 1.0} and res["ratio"] == "a / b"
    assert "probe_rounds" not in res
    # a probe (the host-speed probe) is read once at the start of every round
    calls.clear()
    res = paired_rounds(
        {"a": runner("a"), "b": runner("b")}, 3, 5, sync=lambda: None, clock=lambda: clock[0],
        probe=lambda: float(len(calls)),
    )  # fmt: skip
    assert res["probe_rounds"] == [0.0, 2.0, 4.0]


def test_host_speed_reports_microseconds_per_unit_of_work():
    """The probe's arithmetic on a fake clock (each read advances it: 20 Python loops take
    the first interval, 200 tensor ops the second), and real values on this host."""
    from slimfit.bench import env

    ticks = iter([0.0, 0.002, 0.003] * 5)  # 2 ms for 20 loops, 1 ms for 200 ops
    speed = env.host_speed(clock=lambda: next(ticks))
    assert speed == {"python_us": pytest.approx(100.0), "torch_op_us": pytest.approx(5.0)}
    real = env.host_speed(repeats=2)
    assert 0 < real["python_us"] < 1e5 and 0 < real["torch_op_us"] < 1e4
    cpu = env.host_cpu()
    assert cpu is None or (isinstance(cpu, str) and cpu)


def test_bench_paired_rounds_of_slimfit_and_full(tmp_path):
    res = run_bench(
        ["bert-base-seqcls"],
        ["full", "slimfit"],
        device="cpu",
        batch_size=2,
        steps=2,
        warmup=0,
        paired_rounds=3,
        output=str(tmp_path),
        png=False,
        log=lambda _m: None,
    )
    w = res["workloads"][0]
    paired = w["paired"]
    assert paired["status"] == "ok" and paired["modes"] == ["slimfit", "full"]
    assert [len(v) for v in paired["step_s_rounds"].values()] == [3, 3]
    assert len(paired["probe_rounds"]) == 3 and min(paired["probe_rounds"]) > 0
    probe = w["modes"]["full"]["host_speed"]
    assert probe["before_timing"]["python_us"] > 0 and probe["after_timing"]["torch_op_us"] > 0
    check = [c for c in w["checks"] if c["check"].endswith("paired rounds")]
    assert len(check) == 1 and check[0]["status"] == (
        "pass" if paired["ratio_median"] <= 1 else "fail"
    )
    md = (tmp_path / "bench.md").read_text()
    assert "paired rounds" in md and "- host: " in md and "Python loop" in md
    # slimfit-nopage, when the run has it, joins the same rounds (paging's cost, no drift)
    res = run_bench(
        ["bert-base-seqcls"], ["full", "slimfit-nopage", "slimfit"], device="cpu",
        batch_size=2, steps=1, warmup=0, paired_rounds=2, output=str(tmp_path / "three"),
        png=False, log=lambda _m: None,
    )  # fmt: skip
    paired = res["workloads"][0]["paired"]
    assert paired["modes"] == ["slimfit", "full", "slimfit-nopage"]
    assert paired["ratio"] == "slimfit / full" and len(paired["ratio_rounds"]) == 2
    assert set(paired["step_s_median"]) == {"slimfit", "full", "slimfit-nopage"}


# -- saved-tensor counting is exact -----------------------------------------------------------


def test_saved_tensor_counter_counts_unique_storages():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    with SavedTensorCounter(model) as c:
        loss = model(x).sum()
    rep = c.report(loss)
    # Linear0 saves x (its weight needs a gradient), ReLU saves its output, which Linear2
    # saves again (same storage, counted once); the weights are parameters, not activations.
    assert rep["saved_bytes"] == 4 * 16 * 4 + 4 * 32 * 4
    assert rep["saved_param_bytes"] > 0
    assert rep["by_module"] == {"0": 4 * 16 * 4, "1": 4 * 32 * 4}
    assert sum(rep["by_op"].values()) == rep["saved_bytes"]
    # freezing the first linear drops its saved input (the "dynamic" activation)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    with SavedTensorCounter(model) as c:
        loss = model(x).sum()
    assert c.report()["saved_bytes"] == 4 * 32 * 4


def test_static_memory_counts_tensors():
    model = nn.Linear(10, 5)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    opt.step()
    st = static_memory(model, opt, torch.device("cpu"))
    assert st["weights_bytes"] == 4 * 55 and st["params"] == 55
    assert st["optimizer_state_bytes"] == 2 * 4 * 55 + 2 * 4  # two moments + two fp32 step scalars
    assert st["optimizer_state_host_bytes"] == 0


# -- numbers ----------------------------------------------------------------------------------


def test_ratio_and_checks():
    assert report.ratio(2.0, 4.0) == 0.5
    assert report.ratio(1.0, None) is None and report.ratio(None, 1.0) is None
    assert report.ratio(1.0, 0.0) is None

    def ok(peak, step):
        return {
            "status": "ok",
            "memory": {"peak_allocated_bytes": peak, "peak_reserved_bytes": peak},
            "activations": {"saved_bytes": 10},
            "time": {"median_s": step, "p10_s": step, "p90_s": step, "samples_per_s": 1 / step},
            "static": {"total_bytes": 1},
        }

    w = {
        "workload": "x",
        "batch_size": 1,
        "modes": {
            "full-fp32-eager": ok(16e9, 0.2),
            "full": ok(8e9, 0.05),
            "ckpt": ok(3e9, 0.09),
            "slimfit": ok(2.5e9, 0.06),
            "lora": {"status": "error", "reason": "boom"},
        },
    }
    report.add_ratios(w)
    assert w["modes"]["slimfit"]["ratios"]["peak_vs_full"] == pytest.approx(2.5 / 8)
    assert w["modes"]["slimfit"]["ratios"]["step_vs_full"] == pytest.approx(0.06 / 0.05)
    assert w["modes"]["slimfit"]["ratios"]["peak_reduction_vs_full-fp32-eager"] == pytest.approx(
        16 / 2.5
    )
    assert w["modes"]["lora"]["ratios"]["peak_vs_full"] is None
    assert [c["status"] for c in w["checks"]] == ["pass", "fail", "n/a", "pass"]  # no b2b timing
    md = report.to_markdown({"workloads": [w]})
    assert "| lora | error: boom |" in md and "FAIL" in md
    assert "slimfit" in report.to_text({"workloads": [w]})


def test_time_stats_and_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0], 10) == pytest.approx(1.1)
    st = time_stats([0.1, 0.3, 0.2], batch_size=4)
    assert st["median_s"] == 0.2 and st["samples_per_s"] == pytest.approx(20.0)


def test_parse_bytes():
    assert parse_bytes("32GiB") == 32 * 2**30
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == int(1.5 * 2**30)
    for bad in ("lots", "0GiB", "12XB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# -- max batch search ---------------------------------------------------------------------------


@pytest.mark.parametrize("quad", [0.0, 3.0])
def test_search_max_batch_brackets_the_answer(quad):
    static, per, cap = 1000, 100, 100_000

    def peak(b):
        return int(static + per * b + quad * b * b)

    calls = []

    def peak_at(b):
        calls.append(b)
        return None if b > 5000 else peak(b)  # None = out of memory

    out = search_max_batch(
        peak_at, cap, [(16, peak(16))], static, limit=4096, max_probes=12, rel_tol=0.0
    )
    true = max(b for b in range(1, 4097) if peak(b) <= cap)
    assert out["max_batch"] == true and out["upper_bound"] == true + 1
    assert out["stopped"] == "converged" and len(calls) <= 16
    assert all(p["fits"] == (peak(p["batch"]) <= cap) for p in out["probes"])


def test_search_max_batch_limits():
    out = search_max_batch(
        lambda b: 10 * b, cap=10**9, known=[(8, 80)], static=0, limit=64, max_probes=5
    )
    assert out["max_batch"] == 64 and out["stopped"] == "limit"
    out = search_max_batch(lambda b: None, cap=100, known=[], static=0, limit=64, max_probes=3)
    assert out["max_batch"] is None and out["upper_bound"] == 1 and len(out["probes"]) == 1
    out = search_max_batch(
        lambda b: 10 * b, cap=1000, known=[], static=0, limit=10**6, max_probes=1
    )
    assert out["stopped"] == "probe budget" and out["max_batch"] == 1 and out["upper_bound"] is None


def fake_cuda_counters(monkeypatch) -> list[int]:
    """CUDA memory counters faked as affine in the batch size (10 kB + 1 kB a sample), on
    CPU; returns the batch size of every training step, in order."""
    state = {"batch": 0}
    seen: list[int] = []
    real_make_batch = runner_mod.make_batch
    real_step = runner_mod.Trainer.step

    def make_batch(workload, config, model, batch_size, *a, **k):
        state["batch"] = batch_size
        return real_make_batch(workload, config, model, batch_size, *a, **k)

    def step(self, batch):
        seen.append(state["batch"])
        return real_step(self, batch)

    class FakeMemory(runner_mod.DeviceMemory):
        def __init__(self, device):
            super().__init__(device)
            self.available = True

        def sync(self):
            pass

        def reset_peak(self):
            pass

        def allocated(self):
            return 10_000

        def peak_allocated(self):
            return 10_000 + 1_000 * state["batch"]

        def peak_reserved(self):
            return self.peak_allocated()

        def free(self):
            pass

    monkeypatch.setattr(runner_mod, "make_batch", make_batch)
    monkeypatch.setattr(runner_mod.Trainer, "step", step)
    monkeypatch.setattr(runner_mod, "DeviceMemory", FakeMemory)
    return seen


def bench_max_batch(tmp_path, modes: list[str], steps: int, warmup: int) -> dict:
    """seq-cls at batch 2 with a max-batch search under a 50 kB cap (with the fake counters:
    the answer is batch 40) for every mode; the modes' results."""
    res = run_bench(
        ["bert-base-seqcls"],
        modes,
        device="cpu",
        batch_size=2,
        steps=steps,
        warmup=warmup,
        max_batch=True,
        memory_cap="50000B",
        max_batch_limit=64,
        output=str(tmp_path),
        png=False,
        log=lambda _m: None,
    )
    return res["workloads"][0]["modes"]


@pytest.mark.parametrize("mode, probe_steps", [("full", 2), ("freeze-only", 8)])
def test_max_batch_plumbing_with_fake_cuda_counters(tmp_path, monkeypatch, mode, probe_steps):
    """The --max-batch path end to end on CPU, with CUDA counters faked as affine in batch.
    A mode whose frozen set changes every step is probed over more steps."""
    seen = fake_cuda_counters(monkeypatch)
    mb = bench_max_batch(tmp_path, [mode], steps=1, warmup=0)[mode]["max_batch"]
    assert mb["status"] == "ok" and mb["max_batch"] == 40 and mb["upper_bound"] == 41
    assert mb["max_probed_batch_reserved_under_cap"] == 40
    assert all(p["peak_reserved_bytes"] == 10_000 + 1_000 * p["batch"] for p in mb["probes"])
    assert mb["probe_steps"] == probe_steps
    assert all(seen.count(p["batch"]) == probe_steps for p in mb["probes"])


def test_max_batch_searches_run_after_every_mode_is_timed(tmp_path, monkeypatch):
    """A search steps at thousands of samples for tens of seconds; the next mode timed
    after one stepped up to 30% slower, so every search waits until all modes are timed."""
    seen = fake_cuda_counters(monkeypatch)
    modes = bench_max_batch(tmp_path, ["full", "freeze-only"], steps=2, warmup=1)
    assert all(modes[m]["max_batch"]["max_batch"] == 40 for m in ("full", "freeze-only"))
    first_probe = next(i for i, b in enumerate(seen) if b != 2)
    # both modes' timed steps (batch 2) come before the first probe; after it only probes
    # and each search's warm-up steps at batch 2
    timed = [i for i, b in enumerate(seen) if b == 2]
    assert len([i for i in timed if i < first_probe]) >= 2 * (1 + 2)
    assert len([i for i in timed if i > first_probe]) == 1  # the second search's warm-up


# -- errors: one sentence, exit 2 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--workload", "gpt-9"], "unknown workload"),
        (["--mode", "full,turbo"], "unknown mode"),
        (["--batch-size", "0"], "--batch-size must be"),
        (["--steps", "0"], "--steps must be"),
        (["--max-batch"], "--memory-cap"),
        (["--max-batch", "--memory-cap", "lots"], "memory size"),
        (["--workload", "vit-base", "--seq-len", "64"], "--seq-len does not apply"),
        (["--attention-mask", "zeros"], "--attention-mask"),
    ],
)
def test_bad_arguments_exit_2_with_one_sentence(argv, words, capsys, tmp_path):
    rc = main(["bench", "--device", "cpu", "--output", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert words in err and len(err.splitlines()) == 1 and err.startswith("slimfit bench: error:")
    assert not (tmp_path / "o").exists()


def test_text_batches_carry_no_mask_unless_asked_and_train_the_same():
    """The bench's text batches are unpadded: by default no attention mask (nothing for
    transformers to read back from the device each forward), with ``"ones"`` the all-ones
    mask; the same loss and gradients either way."""
    from slimfit.bench.workloads import get_workload, load_config, make_batch

    w = get_workload("bert-base-seqcls")
    config = load_config(w, "tiny")
    mem = runner_mod.DeviceMemory(torch.device("cpu"))
    s = runner_mod.BenchSettings(2, 16, 1, 0, torch.device("cpu"))
    trainer, batch = runner_mod.trainer_and_batch(w, config, get_modes(["full"])[0], s, mem)
    assert "attention_mask" not in batch
    ones = make_batch(w, config, trainer.model, 2, 16, torch.device("cpu"), 0, "ones")
    assert torch.equal(ones.pop("attention_mask"), torch.ones(2, 16, dtype=torch.long))
    assert ones.keys() == batch.keys() and all(torch.equal(ones[k], batch[k]) for k in batch)
    trainer.model.train(False)
    grads = []
    for inputs in (batch, dict(batch, attention_mask=torch.ones(2, 16, dtype=torch.long))):
        trainer.model.zero_grad()
        trainer.forward(inputs).backward()
        grads.append([p.grad.clone() for p in trainer.model.parameters() if p.grad is not None])
    assert len(grads[0]) > 0 and all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="unknown attention mask"):
        make_batch(w, config, trainer.model, 2, 16, torch.device("cpu"), 0, "zeros")


def test_padded_text_batches_pad_rows_of_random_length_behind_their_mask():
    from slimfit.bench.workloads import get_workload, load_config, make_batch

    w = get_workload("bert-base-seqcls")
    config = load_config(w, "tiny")
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(config)
    b = make_batch(w, config, model, 64, 16, torch.device("cpu"), 0, "padded")
    lengths = b["attention_mask"].sum(1)
    assert lengths[0] == 16 and int(lengths.min()) >= 8 and len(set(lengths.tolist())) > 4
    positions = torch.arange(16)
    assert torch.equal(b["attention_mask"].bool(), positions < lengths[:, None])
    pad = config.pad_token_id or 0
    assert bool((b["input_ids"][b["attention_mask"] == 0] == pad).all())
    again = make_batch(w, config, model, 64, 16, torch.device("cpu"), 0, "padded")
    assert all(torch.equal(b[k], again[k]) for k in b)


def test_standalone_entry_exit_2(capsys, tmp_path):
    from slimfit.cli.bench import main as bench_main

    assert (
        bench_main(["--workload", "nope", "--device", "cpu", "--output", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "slimfit bench: error: unknown workload 'nope'; choose one of bert-base-seqcls, bert-base-qa, vit-base."
    )


def test_mode_registry():
    assert list(MODES)[:7] == [
        "full-fp32-eager",
        "full",
        "ckpt",
        "lora",
        "freeze-only",
        "slimfit-paper",
        "slimfit",
    ]
    assert [m.name for m in get_modes(["ckpt", "full"])] == ["ckpt", "full"]
    with pytest.raises(ValueError):
        get_modes(["full", "full"])


# -- README table comes from results ----------------------------------------------------------------


def test_readme_table_from_results(cli_run, tmp_path, capsys):
    _, out = cli_run
    assert readme_main([str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "bench.json").read_text())
    full = data["workloads"][0]["modes"]["full"]
    step = full["time_b2b"]["median_s"]  # the table shows the back-to-back step
    assert f"{step:.3f} s" in printed and "bert-base-seqcls (batch 2, seq 32)" in printed
    assert "run back to back" in printed and "SlimFit modes freeze 0.95" in printed
    readme = tmp_path / "README.md"
    start, end = markers("bench")
    readme.write_text(f"# x\n{start}\nold\n{end}\ntail\n")
    assert readme_main([str(out), "--check", str(readme)]) == 1
    assert readme_main([str(out), "--write", str(readme)]) == 0
    assert readme_main([str(out), "--check", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith("tail\n") and printed in text


def test_merge_marks_modes_a_killed_process_never_reached(cli_run, tmp_path):
    _, out = cli_run
    part = report.load(out)
    part["settings"]["modes"] = [*part["settings"]["modes"], "slimfit"]  # asked for, never run
    merged = report.merge([part, report.load(out)])
    assert [w["workload"] for w in merged["workloads"]] == ["bert-base-seqcls"] * 2
    assert merged["workloads"][0]["modes"]["slimfit"]["status"] == "not run"
    paths = report.write_all(merged, tmp_path / "merged")
    again = json.loads(paths["json"].read_text())
    assert again["workloads"][1]["modes"]["full"]["status"] == "ok"
    assert "not run" in paths["markdown"].read_text()


def test_model_option_takes_a_local_config(tmp_path, capsys):
    from transformers import BertConfig

    cfg = tmp_path / "cfg"
    BertConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(cfg)
    out = tmp_path / "o"
    rc = main(
        [
            "bench",
            "--device",
            "cpu",
            "--model",
            str(cfg),
            "--mode",
            "full",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--seq-len",
            "16",
            "--no-png",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    w = json.loads((out / "bench.json").read_text())["workloads"][0]
    assert w["model"]["hidden_size"] == 32 and w["seq_len"] == 16 and w["model_source"] == str(cfg)
    assert w["modes"]["full"]["static"]["params"] == sum(
        p.numel()
        for p in __import__("transformers")
        .BertForSequenceClassification(BertConfig.from_pretrained(cfg))
        .parameters()
    )
    capsys.readouterr()
    rc = main(
        [
            "bench",
            "--device",
            "cpu",
            "--model",
            str(tmp_path / "missing" / "x"),
            "--output",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot load a model configuration" in err and len(err.splitlines()) == 1


def test_readme_block_needs_its_markers(tmp_path):
    from slimfit.bench.readme_blocks import write_or_check

    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="has no <!-- slimfit-ddp:start -->"):
        write_or_check(readme, "ddp", "| table |\n", check=False, sources="x.json")
    assert readme.read_text() == "# no markers\n"


def test_trainers_built_side_by_side_keep_their_own_attention():
    """Paired rounds and the host-rounds scripts build slimfit and full from one config
    object. transformers' models keep the config they are given and set their attention on
    it: sharing it, building full after slimfit switched slimfit's model back to plain
    "sdpa" (no compressed attention) for the rest of the run."""
    from slimfit.bench.workloads import get_workload, load_config

    w = get_workload("bert-base-seqcls")
    config = load_config(w, "tiny")
    mem = runner_mod.DeviceMemory(torch.device("cpu"))
    s = runner_mod.BenchSettings(2, 16, 1, 0, torch.device("cpu"), freeze_ratio=0.5)
    lean, _ = runner_mod.trainer_and_batch(w, config, get_modes(["slimfit"])[0], s, mem)
    full, _ = runner_mod.trainer_and_batch(w, config, get_modes(["full"])[0], s, mem)
    assert lean.model.config._attn_implementation == "slimfit_sdpa"
    assert full.model.config._attn_implementation == "sdpa"
    assert lean.model.config is not full.model.config is not config


def test_measure_mode_reports_the_bytes_paging_moves_per_step():
    """A mode with optimizer-state paging records what its copies carry per timed step
    (the pager runs its bookkeeping on the CPU too, synchronously)."""
    from slimfit.bench.modes import Mode
    from slimfit.bench.workloads import get_workload, load_config

    w = get_workload("bert-base-seqcls")
    config = load_config(w, "tiny")
    mem = runner_mod.DeviceMemory(torch.device("cpu"))
    s = runner_mod.BenchSettings(2, 16, 4, 2, torch.device("cpu"), b2b_steps=0, diag_steps=0)
    paged = Mode("paged", "ILS 50% + paging", precision="fp32",
                 slimfit={"freeze_ratio": 0.5, "compression": "none", "offload_optimizer_state": True})  # fmt: skip
    res = runner_mod.measure_mode(w, config, paged, s, mem, log=lambda _: None)
    moved = res["slimfit"]["paged_bytes_per_step"]
    assert moved["to_host"] > 0 and moved["to_device"] > 0
    # every byte is an fp32 AdamW moment (two per element) of some unit
    assert all(round(v * s.steps) % 8 == 0 for v in moved.values())
    (row,) = report.mode_rows({"modes": {"paged": res}})
    out, back = (f"{moved[k] / 2**20:.0f}" for k in ("to_host", "to_device"))
    assert row[report.HEADER.index("hooks/step")].endswith(f"(paged {out} + {back} MiB)")
    plain = Mode("plain", "ILS 50%", precision="fp32",
                 slimfit={"freeze_ratio": 0.5, "compression": "none", "offload_optimizer_state": False})  # fmt: skip
    res = runner_mod.measure_mode(w, config, plain, s, mem, log=lambda _: None)
    assert "paged_bytes_per_step" not in res["slimfit"]


def test_gpu_state_parses_nvidia_smi_and_is_none_off_cuda(monkeypatch):
    from slimfit.bench import env

    assert env.gpu_state(torch.device("cpu")) is None
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        return "1755, 1980, 61, 312.45, 0x0000000000000004\n"

    monkeypatch.setattr(env, "_run", fake_run)
    state = env.gpu_state(torch.device("cuda", 1))
    assert "--id=1" in calls[0]
    assert state == {
        "clocks.sm": 1755.0,
        "clocks.max.sm": 1980.0,
        "temperature.gpu": 61.0,
        "power.draw": 312.45,
        "clocks_throttle_reasons.active": "0x0000000000000004",
    }
    monkeypatch.setattr(env, "_run", lambda cmd, cwd=None: "1755, [N/A], 61, [N/A], 0x0\n")
    state = env.gpu_state(torch.device("cuda", 0))
    assert state["clocks.max.sm"] is None and state["power.draw"] is None
    assert state["clocks.sm"] == 1755.0
    monkeypatch.setattr(env, "_run", lambda cmd, cwd=None: None)  # no nvidia-smi
    assert env.gpu_state(torch.device("cuda", 0)) is None


def test_mode_log_line_shows_the_gpu_clock_when_recorded():
    res = {
        "status": "ok",
        "time": {"median_s": 0.0412, "p10_s": 0.0405, "p90_s": 0.0431},
        "memory": {"peak_allocated_bytes": 2 * 2**30},
        "activations": {"saved_bytes": 3 * 2**20},
    }
    line = runner_mod._summary(res)
    assert line == "peak 2.00 GiB, saved 3.0 MiB, step 41.2 ms (p10 40.5, p90 43.1)"
    res["gpu_state"] = {
        "before_timing": None,
        "after_timing": {"clocks.sm": 1755.0, "temperature.gpu": 61.0},
    }
    assert runner_mod._summary(res) == line + ", SM 1755 MHz at 61 C"
    res["host_speed"] = {
        "before_timing": None,
        "after_timing": {"python_us": 75.4, "torch_op_us": 2.1},
    }
    assert runner_mod._summary(res) == line + ", SM 1755 MHz at 61 C, host probe 75 us"
