"""Data-parallel SlimFit on 2 CPU processes (gloo on 127.0.0.1): weights identical on both
ranks and equal to one process on the same global batch, identical frozen sets at every
step, frozen units bit-identical, gradient accumulation, gradient clipping, parameters
unused on some or all ranks, and clear refusals.

One spawn of 2 ranks runs every scenario (module fixture); the single-process references
run in the test process. Models are float64, so "equal to one process" is checked to
1e-10 (the only difference is the order of the gradient sum: mean of the two ranks'
half-batch means against one mean over the global batch).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import slimfit
from slimfit import SlimFitConfig
from slimfit.distributed import stats

WORLD = 2
PER_RANK = 8
WIDTH = 16
TOL = 1e-10

OVERLAP = {"gradient_sync": "overlap", "bucket_mb": 1500 / 2**20}  # ~1.5 kB buckets

SCENARIOS = {
    # name: (SlimFitConfig kwargs, steps, accumulate, micro-batches under sf.no_sync(), clip)
    "ils": (dict(freeze_ratio=0.5, seed=3), 6, 1, False, 0.3),
    "accum_no_sync": (dict(freeze_ratio=0.5, seed=4), 4, 2, True, 0.3),
    "accum_every_backward": (dict(freeze_ratio=0.5, seed=4), 4, 2, False, 0.3),
    "accum_step_mode": (
        dict(freeze_ratio=0.5, seed=4, extra={"gradient_sync": "step"}),
        4,
        2,
        True,
        None,
    ),
    "random": (dict(freeze_ratio=0.75, policy="random", seed=5), 5, 1, False, None),
    "warmup_sgd": (dict(freeze_ratio=0.5, seed=6, warmup_steps=2), 4, 1, False, None),
    # buckets launched from the gradient hooks during backward (small buckets: several)
    "overlap": (dict(freeze_ratio=0.5, seed=9, extra=OVERLAP), 5, 1, False, 0.3),
    "overlap_accum_no_sync": (dict(freeze_ratio=0.5, seed=10, extra=OVERLAP), 3, 2, True, 0.3),
    "overlap_accum_every": (dict(freeze_ratio=0.5, seed=10, extra=OVERLAP), 3, 2, False, None),
    # the bare model inside DDP(find_unused_parameters=True), as the Trainer wraps it
    "outer_ddp": (dict(freeze_ratio=0.5, seed=8), 4, 2, True, 0.3),
}


class Net(nn.Module):
    """Residual MLP; `branch` is used only when asked, `never` is never used."""

    def __init__(self, depth: int = 4, classes: int = 3):
        super().__init__()
        # declared first: overlap buckets go in reverse declaration order, and a bucket
        # waiting for a gradient that never comes holds back the ones after it
        self.never = nn.Linear(WIDTH, WIDTH)
        self.branch = nn.Linear(WIDTH, WIDTH)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH), nn.GELU())
            for _ in range(depth)
        )
        self.classifier = nn.Linear(WIDTH, classes)

    def forward(self, x, use_branch: bool = False):
        for layer in self.layers:
            x = x + layer(x)
        if use_branch:
            x = x + self.branch(x)
        return self.classifier(x)


def make(name, *, perturb_rank: int | None = None):
    unused_cfg = dict(freeze_ratio=0.5, seed=7, extra=OVERLAP if "overlap" in name else {})
    cfg, *_ = SCENARIOS.get(name, (unused_cfg,))
    torch.manual_seed(0)
    model = Net().double()
    if perturb_rank:  # ranks start different: attach must broadcast rank 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * perturb_rank)
    if name == "warmup_sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    # Exact comparison with one process: compressed activations round per block, and a
    # block's content depends on how the batch is split across ranks.
    cfg.setdefault("compression", "none")
    if name == "outer_ddp" and dist.is_initialized():
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        return wrapped, opt, slimfit.attach(model, opt, SlimFitConfig(**cfg))
    sf = slimfit.attach(model, opt, SlimFitConfig(**cfg))
    return model, opt, sf


def global_batch(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(WORLD * PER_RANK, WIDTH, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD * PER_RANK,), generator=g)
    return x, y


def run(name, model, opt, sf, rank=None):
    """Train; rank=None is the single process on the whole global batch."""
    _, steps, accumulate, use_no_sync, clip = SCENARIOS[name]
    unchanged = []
    for step in range(steps):
        for micro in range(accumulate):
            x, y = global_batch(step, micro)
            if rank is not None:
                x, y = (
                    x[rank * PER_RANK : (rank + 1) * PER_RANK],
                    y[rank * PER_RANK : (rank + 1) * PER_RANK],
                )
            last = micro == accumulate - 1
            ctx = sf.no_sync() if (use_no_sync and not last) else _null()
            with ctx:
                loss = nn.functional.cross_entropy(model(x), y) / accumulate
                loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        frozen = [u.param.detach().clone() for u, f in zip(sf.units, sf.frozen_mask) if f]
        opt.step()
        after = [u.param for u, f in zip(sf.units, sf.history[-1]) if f]
        unchanged.append(all(torch.equal(a, b) for a, b in zip(frozen, after)))
        opt.zero_grad(set_to_none=True)
    return unchanged


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_unused(model, opt, sf, rank=None):
    """Rank 0 uses `branch`, rank 1 does not; the reference accumulates both halves."""
    for step in range(3):
        x, y = global_batch(step, 0)
        parts = [0, 1] if rank is None else [rank]
        for r in parts:
            xr, yr = x[r * PER_RANK : (r + 1) * PER_RANK], y[r * PER_RANK : (r + 1) * PER_RANK]
            loss = nn.functional.cross_entropy(model(xr, use_branch=(r == 0)), yr)
            (loss / len(parts)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result: dict = {}
    try:
        for name in SCENARIOS:
            model, opt, sf = make(name, perturb_rank=rank)
            unchanged = run(name, model, opt, sf, rank)
            result[name] = {
                "state": {k: v.clone() for k, v in sf.model.state_dict().items()},
                "history": torch.stack(sf.history),
                "unchanged": unchanged,
                "stats": stats(sf),
                "trained_bytes": _trained_bytes(sf),
            }
        for name in ("unused", "unused_overlap"):
            model, opt, sf = make(name, perturb_rank=rank)
            run_unused(model, opt, sf, rank)
            result[name] = {
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "history": torch.stack(sf.history),
            }
        result["biases_together"] = biases_together()
        result["refusals"] = refusals(rank)
        result["trainer"] = trainer_run(out_dir)
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _trained_bytes(sf) -> int:
    # What the last step should have all-reduced: every parameter that trained at it
    # (units not frozen + always-trainable ones), plus one float32 presence flag each.
    mask = sf.history[-1].tolist()
    frozen = {id(u.param) for u, f in zip(sf.units, mask) if f}
    trained = [p for p in sf.model.parameters() if id(p) not in frozen]
    frozen_bytes = sum(
        u.param.numel() * u.param.element_size() for u, f in zip(sf.units, mask) if f
    )
    return (
        sum(p.numel() * p.element_size() for p in trained) + 4 * len(trained),
        frozen_bytes,
        len(trained),
    )


def biases_together() -> dict:
    """How many linear biases a converted model casts in one node, per gradient_sync mode:
    none where buckets leave from backward's gradient hooks (the casts' gradients would all
    arrive at the end of backward and hold every bucket back)."""
    out = {}
    for mode in ("backward", "overlap"):
        model = Net().double()
        cfg = SlimFitConfig(freeze_ratio=0.5, compression="default", extra={"gradient_sync": mode})
        sf = slimfit.attach(model, torch.optim.AdamW(model.parameters()), cfg)
        out[mode] = len(sf._biases)
        sf.detach()
    return out


def refusals(rank: int) -> dict:
    out = {}
    model = Net().double()
    ddp = nn.parallel.DistributedDataParallel(model)
    try:
        slimfit.attach(ddp, torch.optim.AdamW(ddp.parameters()), SlimFitConfig())
        out["ddp"] = None
    except ValueError as err:
        out["ddp"] = str(err)
    model = Net().double()
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
    try:
        slimfit.attach(model, torch.optim.AdamW(model.parameters()), SlimFitConfig())
        out["outer_ddp"] = None
    except ValueError as err:
        out["outer_ddp"] = str(err)
    del ddp
    model = Net().double()
    try:
        slimfit.attach(model, torch.optim.AdamW(model.parameters()), SlimFitConfig(seed=rank))
        out["seed"] = None
    except ValueError as err:
        out["seed"] = str(err)
    # attach before init_process_group (simulated: no GradientSync) must not train silently
    model = Net().double()
    opt = torch.optim.AdamW(model.parameters())
    sf = slimfit.attach(model, opt, SlimFitConfig(freeze_ratio=0.5))
    sf._dist.remove()
    sf._dist = None
    model(torch.randn(2, WIDTH, dtype=torch.float64)).sum().backward()
    try:
        opt.step()
        out["late_init"] = None
    except ValueError as err:
        out["late_init"] = str(err)
    try:
        from torch.distributed.fsdp import fully_shard

        model = Net()
        fully_shard(model)
    except Exception:  # FSDP2 on CPU/gloo is not available everywhere
        out["fsdp2"] = "unavailable"
    else:
        try:
            slimfit.attach(model, torch.optim.AdamW(model.parameters()), SlimFitConfig())
            out["fsdp2"] = None
        except ValueError as err:
            out["fsdp2"] = str(err)
    return out


def trainer_run(out_dir: str) -> dict:
    """transformers.Trainer + SlimFitCallback as under torchrun: accelerate wraps the model
    in DDP (find_unused_parameters=True by default) before the callback attaches."""
    from transformers import BertConfig, BertForSequenceClassification

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": i % 2}

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    results = {}
    for shim in (False, True):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        results["shim" if shim else "ddp"] = _trainer(model, Data(), out_dir, shim)
    return results


def _trainer(model, data, out_dir, shim):
    from transformers import Trainer, TrainingArguments

    from slimfit.distributed import PassThrough
    from slimfit.integrations.transformers import SlimFitCallback

    callback = SlimFitCallback(SlimFitConfig(freeze_ratio=0.5, seed=0))

    class ShimTrainer(Trainer):
        def _wrap_model(self, model, training=True, dataloader=None):
            if training and not isinstance(model, PassThrough):
                model = self.accelerator.prepare_model(
                    model, device_placement=False, evaluation_mode=True
                )
                return PassThrough(model, lambda: callback.slimfit)
            return super()._wrap_model(model, training, dataloader)

    seen = {}

    def record(args, state, control, **kwargs):
        seen["history"] = torch.stack(callback.slimfit.history)
        seen["stats"] = stats(callback.slimfit)

    callback.on_step_end = record
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
    )
    cls = ShimTrainer if shim else Trainer
    trainer = cls(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    return {
        "wrapper": type(trainer.model_wrapped).__name__,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        **seen,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(
        worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference(name):
    model, opt, sf = make(name)
    unchanged = run(name, model, opt, sf)
    return model.state_dict(), torch.stack(sf.history), unchanged


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_identical_and_match_one_process(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # bit-identical across ranks
    assert torch.equal(r0["history"], r1["history"])  # same frozen set at every step
    assert r0["unchanged"] == r1["unchanged"] == [True] * len(r0["unchanged"])
    state, history, _ = reference(name)
    assert torch.equal(r0["history"], history)
    assert r0["history"].sum(1).gt(0).any()  # something was frozen
    for k, v in state.items():
        torch.testing.assert_close(r0["state"][k], v, rtol=0, atol=TOL, msg=k)
    # the weights moved (the test would be vacuous otherwise)
    init = make(name)[0].state_dict()
    assert any(not torch.allclose(init[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bytes_follow_the_trained_fraction(ranks, name):
    s = ranks[0][name]["stats"]
    if name == "outer_ddp":  # DDP averages everything; slimfit only agrees the scores
        assert s["mode"] == "ddp" and s["bytes_last_step"] == s["full_bytes"]
        return
    _, _, accumulate, use_no_sync, _ = SCENARIOS[name]
    mode = SCENARIOS[name][0].get("extra", {}).get("gradient_sync", "backward")
    syncs = 1 if (accumulate == 1 or use_no_sync or mode == "step") else accumulate
    assert s["world_size"] == WORLD and s["mode"] == mode
    assert s["syncs_last_step"] == syncs
    trained_bytes, frozen_bytes, n_trained = ranks[0][name]["trained_bytes"]
    assert s["bytes_last_step"] == syncs * trained_bytes
    # exactly the frozen units' bytes are saved against averaging everything (plain DDP)
    assert frozen_bytes > 0
    assert s["bytes_last_step"] == syncs * (s["full_bytes"] - frozen_bytes + 4 * n_trained)
    if mode == "overlap":  # several small buckets, then the presence flags
        assert s["collectives_last_step"] > 3 * syncs
        assert s["early_collectives_last_step"] > 0  # sent while backward still ran
    else:  # float64 gradients in one bucket, float32 presence flags in their own
        assert s["collectives_last_step"] == 2 * syncs


@pytest.mark.parametrize("name", ["unused", "unused_overlap"])
def test_parameter_unused_on_one_or_all_ranks(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert torch.equal(r0["history"], r1["history"])
    model, opt, sf = make(name)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    run_unused(model, opt, sf)
    assert torch.equal(r0["history"], torch.stack(sf.history))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=0, atol=TOL, msg=k)
    # `never` got no gradient anywhere: the optimizer skipped it (no weight decay either)
    assert torch.equal(r0["state"]["never.weight"], init["never.weight"])
    assert not torch.equal(r0["state"]["branch.bias"], init["branch.bias"])


def test_refusals(ranks):
    for rank in range(WORLD):
        msgs = ranks[rank]["refusals"]
        assert msgs["ddp"] and "DistributedDataParallel" in msgs["ddp"]
        assert "bare model" in msgs["ddp"]
        assert msgs["outer_ddp"] and "find_unused_parameters=True" in msgs["outer_ddp"]
        assert msgs["late_init"] and "before attach" in msgs["late_init"]
        assert msgs["seed"] and "seed" in msgs["seed"] and "same SlimFitConfig" in msgs["seed"]
        assert (
            msgs["fsdp2"] == "unavailable" or "FSDP" in msgs["fsdp2"] or "DTensor" in msgs["fsdp2"]
        )


def test_biases_cast_together_only_where_buckets_wait_for_backward(ranks):
    """A converted Net has 7 linear biases: cast together under gradient_sync="backward",
    each on its own under "overlap" (whose buckets leave from the gradient hooks)."""
    for rank in range(WORLD):
        assert ranks[rank]["biases_together"] == {"backward": 7, "overlap": 0}


def test_trainer_under_torchrun(ranks):
    runs = [ranks[r]["trainer"] for r in range(WORLD)]
    a, b = runs[0]["ddp"], runs[1]["ddp"]  # accelerate's DDP(find_unused_parameters=True)
    assert a["wrapper"] == "DistributedDataParallel"
    assert a["stats"]["mode"] == "ddp" and a["stats"]["steps"] == 3
    assert torch.equal(a["history"], b["history"]) and a["history"].sum(1).gt(0).all()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    c, d = runs[0]["shim"], runs[1]["shim"]  # no DDP: slimfit averages the trained units only
    assert c["wrapper"] == "PassThrough" and c["stats"]["mode"] == "backward"
    assert c["stats"]["syncs_last_step"] == 1  # accelerate's no_sync reached sf.no_sync
    assert c["stats"]["bytes_last_step"] < c["stats"]["full_bytes"]
    assert torch.equal(c["history"], d["history"]) and torch.equal(c["history"], a["history"])
    for k in c["state"]:
        assert torch.equal(c["state"][k], d["state"][k]), k
        torch.testing.assert_close(c["state"][k], a["state"][k], rtol=1e-5, atol=1e-6, msg=k)
