"""`slimfit.attach` inside plain training loops: freezing, scoring, state, errors."""

import copy
import math

import pytest
import torch
from torch import nn

import slimfit
from slimfit import SlimFitConfig


class TinyNet(nn.Module):
    def __init__(self, width: int = 16, depth: int = 6, classes: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())
            for _ in range(depth)
        )
        self.classifier = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.classifier(x)


def make(init_seed=0, opt="adamw", **cfg):
    torch.manual_seed(init_seed)
    model = TinyNet()
    if opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    elif opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01)
    elif opt == "groups":
        decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        optimizer = torch.optim.Adam(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "lr": 5e-3}]
        )
    cfg.setdefault("compression", "none")  # exact comparisons against plain training
    sf = slimfit.attach(model, optimizer, SlimFitConfig(**cfg))
    return model, optimizer, sf


def batches(n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def train(model, optimizer, data, accumulate=1, set_to_none=True):
    for i, (x, y) in enumerate(data):
        loss = nn.functional.cross_entropy(model(x), y) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)


def test_units_are_weights_and_norm_gains_head_excluded():
    _, _, sf = make(freeze_ratio=0.5)
    assert len(sf.unit_names) == 12  # 6 linear weights + 6 LayerNorm gains
    assert all(n.endswith("weight") for n in sf.unit_names)
    assert not any(n.startswith("classifier") for n in sf.unit_names)
    _, _, sf = make(freeze_ratio=0.5, train_head=False)
    assert "classifier.weight" in sf.unit_names and len(sf.unit_names) == 13


def test_bert_unit_count():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    model = BertForSequenceClassification(cfg)
    sf = slimfit.attach(
        model, torch.optim.AdamW(model.parameters()), SlimFitConfig(freeze_ratio=0.9)
    )
    # 3 embeddings + embedding LN + 2 x (q, k, v, attn-out, attn LN, ffn-in, ffn-out, out LN) + pooler
    assert len(sf.unit_names) == 3 + 1 + 2 * 8 + 1
    assert "classifier.weight" not in sf.unit_names


@pytest.mark.parametrize("opt", ["adamw", "sgd", "groups"])
def test_exact_counts_and_frozen_units_bit_identical(opt):
    model, optimizer, sf = make(opt=opt, freeze_ratio=0.75)
    n_frozen = int(0.75 * len(sf.units))
    for x, y in batches(8):
        frozen = sf.frozen_units
        trained_before = {
            n: p.detach().clone() for n, p in model.named_parameters() if n in sf.trained_units
        }
        assert len(frozen) == n_frozen
        params = dict(model.named_parameters())
        before = {n: params[n].detach().clone() for n in frozen}
        state_before = {n: copy.deepcopy(optimizer.state.get(params[n], {})) for n in frozen}
        train(model, optimizer, [(x, y)], set_to_none=False)  # stale zero grads must not move them
        for n in frozen:
            assert torch.equal(params[n], before[n]), n
            after = optimizer.state.get(params[n], {})
            assert after.keys() == state_before[n].keys()
            for k, v in after.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(state_before[n][k])), (n, k)
        assert all(not torch.equal(params[n], w) for n, w in trained_before.items())


def test_every_unit_trains_in_first_ceil_steps_and_scores_match_formula():
    # the published timing: a step's scores reach the scheduler at its end
    model, optimizer, sf = make(freeze_ratio=0.75, score="relative", async_scores=False)
    trained_ever = set()
    steps = math.ceil(1 / (1 - 0.75))
    for x, y in batches(steps):
        trained_names = sf.trained_units
        params = dict(model.named_parameters())
        prev = {n: params[n].detach().clone() for n in trained_names}
        train(model, optimizer, [(x, y)])
        for n in trained_names:
            expected = ((prev[n] - params[n]).abs() / prev[n].abs()).mean()
            i = sf.unit_names.index(n)
            assert sf.scheduler.scores[i].item() == pytest.approx(expected.item(), rel=1e-5)
        trained_ever.update(trained_names)
    assert trained_ever == set(sf.unit_names)


def test_taylor_score_is_first_order_loss_drop_in_float64():
    model, optimizer, sf = make(freeze_ratio=0.75, score="taylor", async_scores=False)
    for x, y in batches(4):
        trained_names = sf.trained_units
        params = dict(model.named_parameters())
        prev = {n: params[n].detach().double().clone() for n in trained_names}
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: params[n].grad.detach().double().clone() for n in trained_names}
        optimizer.step()
        for n in trained_names:
            expected = ((prev[n] - params[n].double()) * grads[n]).sum().abs()
            got = sf.scheduler.scores[sf.unit_names.index(n)].item()
            assert got == pytest.approx(expected.item(), rel=1e-4)
        optimizer.zero_grad()
    # an AdamW step goes downhill: the predicted drop is positive and nonzero for every unit
    measured = sf.scheduler.scores[sf.scheduler.last_trained >= 0]
    assert (measured > 0).all() and (measured < 1.0).all()


def test_multi_tensor_snapshot_and_taylor_scores_match_per_unit_bit_for_bit():
    from slimfit.attach import _loss_drop, _loss_drops

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    with torch.no_grad():
        params[1][0] = -0.0
        params[3][0] = float("nan")
    snap = torch._foreach_mul([p.detach() for p in params], 1.0)
    for a, p in zip(snap, params):  # every bit kept (-0.0 and NaN included), a new tensor
        assert torch.equal(a.view(torch.int32), p.detach().view(torch.int32))
        assert a.data_ptr() != p.data_ptr()
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
    per_unit = torch.stack([_loss_drop(a, p) for a, p in zip(snap, params)])
    got = _loss_drops(snap, params)
    assert per_unit[3].isnan() and got[3].isnan()  # the NaN unit's score stays NaN
    assert torch.equal(got[:3], per_unit[:3])
    # bf16 units take the per-unit path (fp32 arithmetic), with the same result as before
    half = [nn.Parameter(p.detach().bfloat16()) for p in params[:3]]
    for h in half:
        h.grad = torch.randn(h.shape, generator=g).bfloat16()
    prev = [h.detach() * 1.01 for h in half]
    assert torch.equal(
        _loss_drops(prev, half), torch.stack([_loss_drop(a, h) for a, h in zip(prev, half)])
    )


def test_snapshot_holds_only_trained_units():
    model, optimizer, sf = make(freeze_ratio=0.75)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    sizes = []
    orig = sf._post_step

    def spy(*a):
        sizes.append(len(sf._snapshot))
        orig(*a)

    optimizer._optimizer_step_post_hooks.clear()
    optimizer.register_step_post_hook(spy)
    optimizer.step()
    assert sizes == [len(sf.units) - int(0.75 * len(sf.units))]


def test_determinism_for_a_seed():
    runs = []
    for _ in range(2):
        model, optimizer, sf = make(init_seed=4, freeze_ratio=0.5)
        train(model, optimizer, batches(6))
        runs.append((torch.stack(sf.history), [p.detach().clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    model, optimizer, sf = make(init_seed=4, freeze_ratio=0.5, seed=1)
    train(model, optimizer, batches(6))
    assert not torch.equal(torch.stack(sf.history), runs[0][0])


@pytest.mark.parametrize("policy", ["ils", "random"])
def test_state_dict_round_trip_continues_identically(policy):
    data = batches(10)
    model, optimizer, sf = make(freeze_ratio=0.5, policy=policy)
    train(model, optimizer, data)
    reference = [p.detach().clone() for p in model.parameters()]

    model, optimizer, sf = make(freeze_ratio=0.5, policy=policy)
    train(model, optimizer, data[:4])
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), sf.state_dict()))

    model2, optimizer2, sf2 = make(init_seed=77, freeze_ratio=0.5, policy=policy)
    model2.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    sf2.load_state_dict(saved[2])
    assert sf2.frozen_units == sf.frozen_units and sf2.step == 4
    train(model2, optimizer2, data[4:])
    assert all(torch.equal(a, b) for a, b in zip(reference, model2.parameters()))
    assert len(sf2.history) == 10


def test_gradient_accumulation_changes_frozen_set_only_at_steps():
    model, optimizer, sf = make(freeze_ratio=0.5)
    seen = []
    for i, (x, y) in enumerate(batches(12)):
        seen.append(tuple(sf.frozen_units))
        (nn.functional.cross_entropy(model(x), y) / 4).backward()
        if (i + 1) % 4 == 0:
            optimizer.step()
            optimizer.zero_grad()
    assert sf.step == 3
    windows = [set(seen[i : i + 4]) for i in (0, 4, 8)]
    assert all(len(w) == 1 for w in windows)  # constant between optimizer steps
    # the first step's scores choose the third step's set (async_scores, the default)
    assert windows[0] != windows[2]


def test_async_scores_reach_the_scheduler_one_step_late():
    """With ``async_scores`` (the default) the scores of step t are those the published
    timing reports at step t, reported at the end of step t + 1: every step's scores are
    the same numbers, one step later; ``last_trained`` is not delayed. The unreported
    scores travel with ``state_dict``."""
    from slimfit.scheduler import INITIAL_SCORE

    model, optimizer, sf = make(freeze_ratio=0.75, score="taylor")
    assert sf.config.async_scores
    initial = sf.scheduler.scores.clone()
    reported = []
    for step, (x, y) in enumerate(batches(4)):
        trained = [sf.unit_names.index(n) for n in sf.trained_units]
        prev = {i: sf.units[i].param.detach().double().clone() for i in trained}
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {i: sf.units[i].param.grad.detach().double().clone() for i in trained}
        optimizer.step()
        optimizer.zero_grad()
        expect = {
            i: ((prev[i] - sf.units[i].param.double()) * grads[i]).sum().abs().item()
            for i in trained
        }
        assert (sf.scheduler.last_trained[trained] == step).all()
        scores = sf.scheduler.scores
        if step == 0:  # nothing reported yet
            assert torch.equal(scores, initial)
        else:
            for i, value in reported[-1].items():
                assert scores[i].item() == pytest.approx(value, rel=1e-4)
        pending = sf.state_dict()["pending_scores"]
        assert pending["units"].tolist() == trained
        assert pending["scores"].tolist() == pytest.approx([expect[i] for i in trained], rel=1e-4)
        reported.append(expect)
    assert (sf.scheduler.scores < INITIAL_SCORE).sum() > 0


def test_policy_none_is_plain_training():
    data = batches(5)
    model, optimizer, sf = make(freeze_ratio=0.9, policy="none")
    train(model, optimizer, data)
    torch.manual_seed(0)
    plain = TinyNet()
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.01)
    train(plain, popt, data)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    assert all(len(r["frozen"]) == 0 for r in sf.schedule())


def test_bf16_autocast_and_step_callback_records():
    model, optimizer, sf = make(freeze_ratio=0.5)
    records = []
    sf.add_step_callback(records.append)
    for x, y in batches(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records == list(sf.schedule())
    for r in records:
        assert len(r["frozen"]) == 6 and len(r["trained"]) == 6
        assert set(r["frozen"]) | set(r["trained"]) == set(sf.unit_names)


def test_detach_unfreezes_and_removes_hooks():
    model, optimizer, sf = make(freeze_ratio=0.5)
    sf.detach()
    assert all(p.requires_grad for p in model.parameters())
    train(model, optimizer, batches(2))
    assert sf.step == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"freeze_ratio": 1.0}, "freeze_ratio"),
        ({"freeze_ratio": -0.1}, "freeze_ratio"),
        ({"policy": "magic"}, "unknown policy"),
        ({"units": "("}, "regular expression"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlimFitConfig(**kwargs)


def test_bad_model_or_optimizer():
    model = TinyNet()
    other = TinyNet()
    with pytest.raises(ValueError, match="optimizer holds none"):
        slimfit.attach(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no freezable units"):
        slimfit.attach(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            SlimFitConfig(units="nothing_matches"),
        )
    biases_only = nn.Linear(3, 3, bias=True)
    biases_only.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no freezable units"):
        slimfit.attach(
            biases_only,
            torch.optim.SGD([biases_only.bias], lr=0.1),
            SlimFitConfig(train_head=False),
        )


def test_default_config_converts_modules_and_detach_restores():
    torch.manual_seed(0)
    model = TinyNet()
    plain_types = [type(m) for m in model.modules()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sf = slimfit.attach(model, optimizer)  # default: ILS 0.9, compression "default"
    assert sf.conversion is not None
    assert [type(m) for m in model.modules()] != plain_types
    train(model, optimizer, batches(3))
    assert sf.step == 3 and all(torch.isfinite(p).all() for p in model.parameters())
    sf.detach()
    assert [type(m) for m in model.modules()] == plain_types


def test_frozen_pattern_fixes_params_for_the_run_and_detach_restores():
    model, optimizer, sf = make(freeze_ratio=0.5, frozen=r"^layers\.0\.")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fixed = {n for n in before if n.startswith("layers.0.")}
    # layers.0's weight, gain (units) and biases (never units) are all out of the pool
    assert not fixed & set(sf.unit_names) and len(sf.unit_names) == 10
    train(model, optimizer, batches(4))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in fixed), n
        assert p.requires_grad is False or n not in fixed
    assert all(len(optimizer.state[p]) == 0 for n, p in model.named_parameters() if n in fixed)
    sf.detach()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"frozen": "nothing_matches"}, "matches no trainable parameter"),
        ({"frozen": r"layers\.1\.", "exclude": r"layers\.1\.0\.weight"}, "exclude both claim"),
        ({"frozen": "classifier"}, "train_head both claim"),
    ],
)
def test_frozen_pattern_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_trained_steps_per_unit_counts_the_schedule():
    model, optimizer, sf = make(freeze_ratio=0.75)
    assert sf.trained_steps_per_unit() == dict.fromkeys(sf.unit_names, 0)
    train(model, optimizer, batches(7))
    counts = sf.trained_steps_per_unit()
    expected = {n: sum(n in r["trained"] for r in sf.schedule()) for n in sf.unit_names}
    assert counts == expected
    n_trained = len(sf.units) - int(0.75 * len(sf.units))
    assert sum(counts.values()) == 7 * n_trained
