"""Optimizer-state paging of frozen units: same training, state in the right place, no loss."""

import copy
import io

import pytest
import torch
from torch import nn

import slimfit
from slimfit import SlimFitConfig

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state, paged as one block


def build(offload, opt_name="adamw", foreach=None, seed=0, resident=0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(12, 12), nn.LayerNorm(12)) for _ in range(5)], nn.Linear(12, 2)
    )
    if opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=foreach)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, foreach=foreach)
    sf = slimfit.attach(
        model,
        opt,
        SlimFitConfig(
            freeze_ratio=0.7,
            train_head=False,
            offload_optimizer_state=offload,
            resident_state_fraction=resident,
        ),
    )
    return model, opt, sf


def run(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(6, 12, generator=g), torch.randint(0, 2, (6,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("foreach", [False, True])
def test_paging_gives_bit_identical_weights(opt_name, foreach):
    ref, ref_opt, _ = build(False, opt_name, foreach)
    run(ref, ref_opt, 25)
    paged, paged_opt, sf = build(True, opt_name, foreach)
    assert sf.pager is not None
    run(paged, paged_opt, 25)
    for a, b in zip(ref.parameters(), paged.parameters()):
        assert torch.equal(a, b)


def test_state_lives_in_host_buffers_only_while_frozen_and_nothing_is_lost():
    model, opt, sf = build(True)
    packed_seen = 0
    for _ in range(30):
        run(model, opt, 1)
        frozen = sf.scheduler.frozen.tolist()
        # after a step the units about to train still have their state on the host; the
        # next forward brings it back (after the forward's memory peak)
        due = set(sf.pager._due_in)
        assert not any(frozen[i] for i in due)
        assert all(i in sf.pager._paged for i in due if opt.state.get(sf.units[i].param))
        with torch.no_grad():
            model(torch.randn(2, 12))
        assert not sf.pager._due_in
        for i, unit in enumerate(sf.units):
            state = opt.state.get(unit.param, {})
            if not state:
                continue
            # no host block before the first page-out: then every state is on the device
            _block, rows = sf.pager._host.get((i, MOMENTS), (None, (None, None)))
            for key, row in zip(MOMENTS, rows):
                assert (state[key] is row) == frozen[i], (unit.name, key)
            # on the device, the two moments are rows of one block (one copy each way)
            # from the second page-in on; before that the optimizer's own two tensors
            if not frozen[i] and state["exp_avg"]._base is not None:
                packed_seen += 1
                block = state["exp_avg"]._base
                assert block.shape == (2, *unit.param.shape)
                assert state["exp_avg_sq"]._base is block
        assert sf.pager._paged == {
            i for i, f in enumerate(frozen) if f and opt.state.get(sf.units[i].param)
        }
    assert packed_seen > 0
    # every unit has trained by now and owns exactly one pair of moments
    assert all(set(opt.state[u.param]) == {"step", "exp_avg", "exp_avg_sq"} for u in sf.units)
    assert len(sf.pager._host) == len(sf.units)
    resident = sum(
        opt.state[u.param][k].numel() * 4
        for i, u in enumerate(sf.units)
        if i not in sf.pager._paged
        for k in ("exp_avg", "exp_avg_sq")
    )
    assert sf.pager.resident_bytes() == resident


def test_host_buffers_are_allocated_once_for_every_unit_at_the_first_page_out():
    """The first page-out allocates a host block for both moments of every unit (pinning
    is slow on CUDA: no allocation stalls are left for later steps); afterwards every
    page-out reuses those same blocks."""
    model, opt, sf = build(True)
    pager = sf.pager
    run(model, opt, 2)  # the first step's scores choose the second step's set
    assert pager._paged  # something paged out already
    n = len(pager.params)
    assert {keys for (_, keys) in pager._host} == {MOMENTS}
    assert len(pager._host) == n
    for (j, _keys), (block, rows) in pager._host.items():
        param = pager.params[j]
        assert block.shape == (2, *param.shape) and block.dtype == param.dtype
        assert [r.data_ptr() for r in rows] == [block[0].data_ptr(), block[1].data_ptr()]
    buffers = {key: id(block) for key, (block, _) in pager._host.items()}
    run(model, opt, 20)
    assert {key: id(block) for key, (block, _) in pager._host.items()} == buffers


def test_state_dict_round_trip_with_paging_continues_identically():
    ref, ref_opt, _ = build(True)
    run(ref, ref_opt, 12)

    model, opt, sf = build(True)
    run(model, opt, 5)
    resident, resident_opt, _ = build(False)
    run(resident, resident_opt, 5)
    # through torch.save, as checkpoints go: moments held as rows of one block (paged in)
    # or of a host block (paged out) are written once each, as the unpaged state's are
    files = []
    for state in (opt.state_dict(), resident_opt.state_dict()):
        f = io.BytesIO()
        torch.save(state, f)
        files.append(f.getvalue())
    assert len(files[0]) <= len(files[1]) + 4096
    saved = (
        copy.deepcopy(model.state_dict()),
        torch.load(io.BytesIO(files[0]), weights_only=True),
        copy.deepcopy(sf.state_dict()),
    )
    # the checkpoint holds the full state, paged or not
    assert len(saved[1]["state"]) == sum(1 for p in model.parameters() if opt.state.get(p))

    model2, opt2, sf2 = build(True, seed=9)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sf2.load_state_dict(saved[2])
    sf.pager.prefetch()
    sf2.pager.prefetch()
    assert sf2.pager._paged == sf.pager._paged
    # continue with the same data stream as the reference's steps 5..11
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        torch.randn(6, 12, generator=g), torch.randint(0, 2, (6,), generator=g)
    for _ in range(7):
        x, y = torch.randn(6, 12, generator=g), torch.randint(0, 2, (6,), generator=g)
        nn.functional.cross_entropy(model2(x), y).backward()
        opt2.step()
        opt2.zero_grad()
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_detach_brings_all_state_back():
    model, opt, sf = build(True)
    run(model, opt, 6)
    assert sf.pager._paged
    pager = sf.pager
    sf.detach()
    assert not pager._paged


def test_bad_offload_setting():
    with pytest.raises(ValueError, match="offload_optimizer_state"):
        SlimFitConfig(offload_optimizer_state="sometimes")
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match=r"resident_state_fraction .*\[0, 1\]"):
            SlimFitConfig(resident_state_fraction=bad)
    with pytest.raises(ValueError, match="resident_state_fraction.*offload_optimizer_state=False"):
        SlimFitConfig(resident_state_fraction=0.3, offload_optimizer_state=False)


def test_resident_units_are_the_smallest_within_the_fraction():
    from slimfit.optim.paging import resident_units

    sizes = [100, 5, 40, 5, 20, 1000]  # 1170 elements
    assert resident_units(sizes, 0.0) == set()
    assert resident_units(sizes, 10 / 1170) == {1, 3}
    assert resident_units(sizes, 30 / 1170) == {1, 3, 4}  # 30 of 30: exactly at the budget
    assert resident_units(sizes, 69 / 1170) == {1, 3, 4}  # the 40 would pass it
    assert resident_units(sizes, 170 / 1170) == {1, 3, 4, 2, 0}
    assert resident_units(sizes, 1.0) == set(range(6))


def test_resident_units_never_page_and_training_is_unchanged():
    """The resident units' state stays on the device through freezing; the others page as
    before, and the weights match training without paging bit for bit."""
    from slimfit.optim.paging import resident_units

    ref, ref_opt, _ = build(False)
    for _ in range(25):
        run(ref, ref_opt, 1)
    model, opt, sf = build(True, resident=0.2)
    sizes = [u.param.numel() for u in sf.units]
    assert sorted(sizes) == [12] * 5 + [24] + [144] * 5  # LayerNorm gains, head, weights
    keep = resident_units(sizes, 0.2)  # 0.2 of 804: the gains and the head (84), no weight
    assert keep == {i for i, n in enumerate(sizes) if n <= 24}
    for _ in range(25):
        run(model, opt, 1)
        model(torch.randn(2, 12))  # the forward's prefetch brings the trained units back
        frozen = sf.scheduler.frozen.tolist()
        assert not (sf.pager._paged & keep)
        assert sf.pager._paged == {
            i
            for i, f in enumerate(frozen)
            if f and i not in keep and opt.state.get(sf.units[i].param)
        }
    assert any(frozen[i] for i in keep)  # a resident unit was frozen and kept its state
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_sync_to_follows_changing_masks_and_keeps_every_value():
    """Only units whose flag changed are touched, yet state created since the last call
    (a unit that just trained) is paged, and a round trip returns the same values."""
    from slimfit.optim.paging import OptimizerStatePager

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4)) for _ in range(12)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(3)
    frozen = torch.rand(12, generator=g) < 0.5
    pager = OptimizerStatePager(opt, params, lambda: frozen)
    pager.sync_to(frozen)
    for _ in range(40):
        for p, f in zip(params, frozen.tolist()):
            p.grad = None if f else torch.randn_like(p)
        opt.step()
        expect = {
            i: {k: v.clone() for k, v in opt.state[p].items()}
            for i, p in enumerate(params)
            if opt.state.get(p)
        }
        flip = torch.rand(12, generator=g) < 0.25
        frozen = frozen ^ flip
        pager.sync_to(frozen)
        # the units about to train come back with prefetch (after a forward)
        pager.prefetch()
        for i, p in enumerate(params):
            state = opt.state.get(p)
            if not state:
                assert i not in pager._paged
                continue
            on_host = bool(frozen[i])
            assert (i in pager._paged) == on_host
            _block, rows = pager._host[(i, MOMENTS)]
            for k, row in zip(MOMENTS, rows):
                assert (state[k] is row) == on_host
                assert torch.equal(state[k], expect[i][k])
    pager.remove()
    assert not pager._paged
    host_rows = [r for _block, rows in pager._host.values() for r in rows]
    assert all(not any(t is r for r in host_rows) for s in opt.state.values() for t in s.values())


def test_a_unit_pages_as_one_block_after_its_first_round_trip(monkeypatch):
    """The first page-out copies the optimizer's two moments one by one; the page-in gives
    them back as the rows of one device block, and from then on each way is one copy."""
    from slimfit.optim.paging import OptimizerStatePager

    params = [nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    copies = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(
        torch,
        "_foreach_copy_",
        lambda dst, src, **kw: (copies.append(len(dst)), real_copy(dst, src, **kw)),
    )
    pager = OptimizerStatePager(opt, params, lambda: None)
    expect = {k: v.clone() for k, v in opt.state[params[1]].items()}
    pager.page_out([1])
    assert copies == [2]  # the optimizer's own exp_avg and exp_avg_sq
    pager.page_in([1])
    state = opt.state[params[1]]
    block = state["exp_avg"]._base
    assert block is not None and block.shape == (2, 5, 3) and state["exp_avg_sq"]._base is block
    pager.page_out([1])
    pager.page_in([1])
    assert copies == [2, 1, 1, 1]
    moments = 2 * 5 * 3 * 4  # two fp32 moments of a 5 x 3 parameter
    assert pager.moved_bytes == [2 * moments, 2 * moments]
    for k, v in expect.items():
        assert torch.equal(opt.state[params[1]][k], v)
    # a step on the rows updates the optimizer's state as on its own tensors
    params[1].grad = torch.ones_like(params[1])
    opt.step()
    assert not torch.equal(opt.state[params[1]]["exp_avg"], expect["exp_avg"])
    assert opt.state[params[1]]["exp_avg"]._base is opt.state[params[1]]["exp_avg_sq"]._base


def test_state_replaced_while_paged_out_comes_back_as_given():
    """A moment replaced by the user while its unit is paged out (not by torch's
    optimizers, which never touch a frozen unit's state) is brought back as it is."""
    from slimfit.optim.paging import OptimizerStatePager

    params = [nn.Parameter(torch.randn(4, 2)) for _ in range(2)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    pager = OptimizerStatePager(opt, params, lambda: None)
    pager.page_out([0])
    state = opt.state[params[0]]
    kept = state["exp_avg_sq"].clone()
    state["exp_avg"] = torch.full((4, 2), 3.0)
    pager.page_in([0])
    assert torch.equal(state["exp_avg"], torch.full((4, 2), 3.0))
    assert torch.equal(state["exp_avg_sq"], kept)
    _block, rows = pager._host[(0, MOMENTS)]
    assert not any(state[k] is r for k in MOMENTS for r in rows)


def test_paging_with_stateless_sgd():
    """SGD without momentum keeps no per-element state: paging has nothing to move."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sf = slimfit.attach(
        model, opt, SlimFitConfig(freeze_ratio=0.5, train_head=False, offload_optimizer_state=True)
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        model(torch.randn(3, 6, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert sf.pager.resident_bytes() == 0
    sf.detach()


@pytest.mark.parametrize("opt_name", ["adam-fused", "adamw-fused", "sgd-nesterov"])
def test_paging_fused_optimizers_param_groups_and_schedulers(opt_name):
    """Fused implementations, two param groups with their own lr and a scheduler: the
    paged run ends bit-identical to the resident one."""

    def build_groups(offload):
        torch.manual_seed(0)
        model = nn.Sequential(
            *[nn.Sequential(nn.Linear(12, 12), nn.LayerNorm(12)) for _ in range(5)],
            nn.Linear(12, 2),
        )
        groups = [
            {"params": list(model[:3].parameters()), "lr": 2e-2},
            {"params": list(model[3:].parameters()), "lr": 5e-3},
        ]
        if opt_name == "adam-fused":
            opt = torch.optim.Adam(groups, fused=True)
        elif opt_name == "adamw-fused":
            opt = torch.optim.AdamW(groups, weight_decay=0.01, fused=True)
        else:
            opt = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        sf = slimfit.attach(
            model,
            opt,
            SlimFitConfig(freeze_ratio=0.7, train_head=False, offload_optimizer_state=offload),
        )
        return model, opt, sched, sf

    def train(model, opt, sched):
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            x, y = torch.randn(6, 12, generator=g), torch.randint(0, 2, (6,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    ref, ref_opt, ref_sched, _ = build_groups(False)
    train(ref, ref_opt, ref_sched)
    model, opt, sched, sf = build_groups(True)
    train(model, opt, sched)
    assert sf.pager._paged  # something was paged
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
