"""The inter-layer scheduler on its own: counts, visiting order, stale scores, state."""

import math

import pytest
import torch

from slimfit.scheduler import INITIAL_SCORE, InterLayerScheduler


def frozen_set(s: InterLayerScheduler) -> set[int]:
    return set(torch.nonzero(s.frozen).flatten().tolist())


@pytest.mark.parametrize("n,ratio", [(102, 0.95), (100, 0.9), (7, 0.5), (3, 0.0), (10, 0.85)])
def test_exact_frozen_count_every_step(n, ratio):
    s = InterLayerScheduler(n, ratio, "ils", seed=1)
    for _ in range(30):
        assert int(s.frozen.sum()) == int(ratio * n)
        trained = torch.nonzero(~s.frozen).flatten()
        s.advance(trained, torch.rand(len(trained), dtype=torch.float64) * 1e-3)


@pytest.mark.parametrize("n,ratio", [(102, 0.95), (100, 0.9), (50, 0.8), (13, 0.75)])
def test_every_unit_trains_within_first_ceil_steps(n, ratio):
    s = InterLayerScheduler(n, ratio, "ils", seed=3)
    seen = set()
    for _ in range(math.ceil(1 / (1 - ratio))):
        trained = torch.nonzero(~s.frozen).flatten()
        seen.update(trained.tolist())
        s.advance(trained, torch.full((len(trained),), 1e-4, dtype=torch.float64))
    assert seen == set(range(n))


def test_stale_scores_hand_worked_example():
    # 4 units, ratio 0.5: the 2 lowest scores are frozen; only trained units get new scores.
    s = InterLayerScheduler(4, 0.5, "ils", seed=0)
    s.scores = torch.tensor([5.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    s.frozen = s._choose()
    assert frozen_set(s) == {1, 3}  # lowest: unit1 (1.0), unit3 (2.0)
    # units 0 and 2 trained; they get fresh scores 0.5 and 4.0
    s.advance(torch.tensor([0, 2]), torch.tensor([0.5, 4.0], dtype=torch.float64))
    # scores now [0.5, 1.0(stale), 4.0, 2.0(stale)] -> frozen {0, 1}
    assert frozen_set(s) == {0, 1}
    assert s.scores.tolist() == [0.5, 1.0, 4.0, 2.0]
    # units 2 and 3 trained: 2 -> 0.1, 3 -> 0.2 ; scores [0.5, 1.0, 0.1, 0.2] -> frozen {2, 3}
    s.advance(torch.tensor([2, 3]), torch.tensor([0.1, 0.2], dtype=torch.float64))
    assert frozen_set(s) == {2, 3}
    # ties: equal scores freeze the lower index first (stable order)
    s.advance(torch.tensor([0, 1]), torch.tensor([0.1, 0.1], dtype=torch.float64))
    assert s.scores.tolist() == [0.1, 0.1, 0.1, 0.2]
    assert frozen_set(s) == {0, 1}


def test_initial_scores_are_large_random_and_seeded():
    a = InterLayerScheduler(100, 0.9, "ils", seed=7)
    b = InterLayerScheduler(100, 0.9, "ils", seed=7)
    c = InterLayerScheduler(100, 0.9, "ils", seed=8)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.frozen, b.frozen)
    assert not torch.equal(a.frozen, c.frozen)
    assert float(a.scores.min()) >= INITIAL_SCORE


def test_random_policy_fresh_set_each_step_and_none_policy():
    s = InterLayerScheduler(100, 0.9, "random", seed=0)
    sets = []
    for _ in range(5):
        assert int(s.frozen.sum()) == 90
        sets.append(frozen_set(s))
        s.advance()
    assert len({frozenset(x) for x in sets}) == 5
    n = InterLayerScheduler(100, 0.9, "none", seed=0)
    for _ in range(3):
        assert int(n.frozen.sum()) == 0
        n.advance()


def test_warmup_freezes_nothing_then_exact_count():
    s = InterLayerScheduler(20, 0.9, "ils", seed=0, warmup_steps=2)
    counts = []
    for _ in range(4):
        counts.append(int(s.frozen.sum()))
        s.advance(torch.nonzero(~s.frozen).flatten(), None)
    assert counts == [0, 0, 18, 18]


def test_state_dict_round_trip_continues_identically():
    a = InterLayerScheduler(30, 0.8, "random", seed=5)
    for _ in range(3):
        a.advance()
    b = InterLayerScheduler(30, 0.8, "random", seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert torch.equal(a.frozen, b.frozen)
        a.advance()
        b.advance()
    with pytest.raises(ValueError, match="units"):
        InterLayerScheduler(31, 0.8, "random", seed=5).load_state_dict(a.state_dict())


def test_max_stale_steps_bounds_how_long_a_unit_waits():
    # Without the cap, unit 0's tiny stale score keeps it frozen forever; with it,
    # no unit stays frozen more than max_stale_steps consecutive steps.
    for cap, expect_starved in [(None, True), (4, False)]:
        s = InterLayerScheduler(10, 0.8, "ils", seed=0, max_stale_steps=cap)
        longest = [0] * 10
        run = [0] * 10
        for _ in range(40):
            trained = torch.nonzero(~s.frozen).flatten()
            for i in range(10):
                run[i] = run[i] + 1 if s.frozen[i] else 0
                longest[i] = max(longest[i], run[i])
            # unit 0 always measures tiny, the others large
            fresh = torch.tensor(
                [1e-9 if i == 0 else 1.0 + i for i in trained.tolist()], dtype=torch.float64
            )
            s.advance(trained, fresh)
            assert int(s.frozen.sum()) == 8
        if expect_starved:
            assert longest[0] > 30
        else:
            assert max(longest) <= cap


@pytest.mark.parametrize("explore, n_explore", [(0.0, 0), (0.5, 5), (0.34, 3), (1.0, 10)])
def test_explore_keeps_the_top_scores_and_draws_the_other_slots(explore, n_explore):
    # 100 units, 10 trained per step; fixed scores 0..99, so without exploration the
    # same top 10 (90..99) would train every step.
    s = InterLayerScheduler(100, 0.9, "ils", seed=3, explore=explore)
    top = set(range(100 - (10 - n_explore), 100))
    seen = set()
    for _ in range(20):
        s.scores = torch.arange(100, dtype=torch.float64)
        s.advance()
        trained = set(range(100)) - frozen_set(s)
        assert len(trained) == 10 and int(s.frozen.sum()) == 90
        assert top <= trained  # the highest scores keep their slots
        seen |= trained - top
    if n_explore == 0:
        assert seen == set()
    else:  # the drawn slots come from the rest, and move from step to step
        assert seen <= set(range(100 - len(top))) and len(seen) > 3 * n_explore


def test_explore_is_ils_only_and_a_fraction():
    assert InterLayerScheduler(100, 0.9, "random", seed=0, explore=0.5).n_explore == 0
    from slimfit import SlimFitConfig

    with pytest.raises(ValueError, match="explore must be a fraction"):
        SlimFitConfig(explore=1.5)
    with pytest.raises(ValueError, match="explore and max_stale_steps"):
        SlimFitConfig(explore=0.5, max_stale_steps=10)


def test_normalized_score_divides_by_first_measurement():
    s = InterLayerScheduler(4, 0.5, "ils", seed=0, score="normalized")
    trained = torch.nonzero(~s.frozen).flatten()
    s.advance(trained, torch.tensor([2e-3, 4e-5], dtype=torch.float64))
    assert s.scores[trained].tolist() == [1.0, 1.0]
    s.advance(trained, torch.tensor([1e-3, 4e-5], dtype=torch.float64))
    assert s.scores[trained].tolist() == [0.5, 1.0]
    state = s.state_dict()
    t = InterLayerScheduler(4, 0.5, "ils", seed=1, score="normalized")
    t.load_state_dict(state)
    assert torch.equal(t.first_scores.nan_to_num(-1), s.first_scores.nan_to_num(-1))
    assert torch.equal(t.last_trained, s.last_trained)
