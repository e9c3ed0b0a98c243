"""The pieces of the headroom measurement (drrl_gym.headroom, benchmarks/headroom.py) on the tiny model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_basis

from drrl_gym.headroom import (
    ChoiceSet,
    at_budget,
    first_order_gains,
    greedy_static_path,
    layer_groups,
    per_segment_plan,
    plan_cost,
    predicted_changes,
    segment_allocation,
    segment_nll,
    unit_costs,
)
from drrl_gym.lowrank import DynamicRankAttention
from drrl_gym.perplexity import segmented_perplexity

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEGMENT = 16


def test_choice_set_validates_and_costs(tiny_llama):
    g = tiny_llama.geometry
    with pytest.raises(ValueError, match="end with exact"):
        ChoiceSet("select", ((4, 0.25),), g.head_dim)
    with pytest.raises(ValueError, match="low-rank scores keep every key"):
        ChoiceSet("lowrank_scores", ((4, 0.5), (16, 1.0)), g.head_dim)
    costs = ChoiceSet("lowrank_scores", ((4, 1.0), (8, 1.0), (16, 1.0)), g.head_dim).layer_costs(g, 32, 3)
    np.testing.assert_allclose(costs, np.tile([0.25, 0.5, 1.0], (3, 1)))  # the QK^T fraction r / d
    select = ChoiceSet("select", ((4, 0.25), (16, 1.0)), g.head_dim).layer_costs(g, 32, 3)
    # forced sink and recent keys weigh less as the keys grow; exact attention costs 1 everywhere
    assert select[2, 0] < select[1, 0] < 1 and (select[:, 1] == 1).all()


def test_groups_costs_and_plan_cost():
    np.testing.assert_array_equal(layer_groups(5, 2), [0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="n_groups"):
        layer_groups(2, 3)
    cost = unit_costs(np.array([[0.5, 1.0], [0.25, 1.0]]), np.array([0, 0, 0, 1]))  # 2 segments, 2 choices
    np.testing.assert_allclose(cost[1], [[0.1875, 0.75], [0.0625, 0.25]])
    plan = np.array([[[1, 1], [0, 1]]])  # segment 0 (warm-up) is not charged; segment 1: unit 0 low
    np.testing.assert_allclose(plan_cost(plan, cost), [0.1875 + 0.25])


def test_segment_allocation_spends_the_budget_where_it_hurts_least():
    cost = np.array([[0.2, 0.5], [0.2, 0.5]])  # two units, choice 0 cheap, choice 1 exact
    static = np.array([1, 0])  # cost 0.7; delta is 0 at the static choices by definition
    delta = np.array([[0.2, 0.0], [0.0, -1.0]])  # unit 0 loses little when cheap, unit 1 gains much when exact
    np.testing.assert_array_equal(segment_allocation(delta, cost, 0.7, static), [0, 1])  # estimate -0.8: swap
    sensitive = np.array([[2.0, 0.0], [0.0, -1.0]])  # now lowering unit 0 costs more than unit 1 gains
    np.testing.assert_array_equal(segment_allocation(sensitive, cost, 0.7, static), static)
    np.testing.assert_array_equal(segment_allocation(delta, cost, 0.4, static), [0, 0])  # a smaller budget
    assert cost[[0, 1], segment_allocation(delta, cost, 0.45, static)].sum() <= 0.45


def test_per_segment_plan_from_the_segment_or_from_the_past():
    cost = np.repeat(np.array([[[0.2, 0.5], [0.2, 0.5]]]), 5, 0)  # 5 segments, 2 units, choice 1 exact
    static = np.array([1, 0])
    helps_unit_1 = np.array([[0.2, 0.0], [0.0, -1.0]])  # segment_allocation moves the budget to unit 1
    delta = np.zeros((1, 5, 2, 2))
    delta[0, 2] = helps_unit_1
    oracle = per_segment_plan(delta, cost, static)
    previous = per_segment_plan(predicted_changes(delta, "previous"), cost, static)
    np.testing.assert_array_equal(oracle[0], [static, static, [0, 1], static, static])  # where it helps
    np.testing.assert_array_equal(previous[0], [static, static, static, [0, 1], static])  # one segment late
    assert (plan_cost(previous, cost) <= plan_cost(np.repeat(static[None, None], 5, 1), cost) + 1e-12).all()
    mean = predicted_changes(delta, "past_mean")  # segment s: mean of segments 1..s-1
    np.testing.assert_allclose(mean[0, :3], 0)
    np.testing.assert_allclose(mean[0, 3], helps_unit_1 / 2)
    np.testing.assert_allclose(mean[0, 4], helps_unit_1 / 3)
    with pytest.raises(ValueError, match="rule"):
        predicted_changes(delta, "next")


def test_fitted_rule_learns_persistence_from_the_other_sequences_only():
    # need that halves from one segment to the next, exactly: the fit finds it on the other sequences
    rng = np.random.default_rng(0)
    delta = np.zeros((4, 6, 2, 3))
    delta[:, 1] = rng.normal(size=(4, 2, 3))
    for s in range(2, 6):
        delta[:, s] = 0.5 * delta[:, s - 1]
    fitted = predicted_changes(delta, "fitted")
    np.testing.assert_allclose(fitted[:, 2:], delta[:, 2:], atol=1e-9)
    np.testing.assert_allclose(fitted[:, :2], 0)  # segment 1 has no past: static choices
    # causal and held out: sequence 0's last segment is neither a feature of its own predictions nor fitted on
    changed = delta.copy()
    changed[0, -1] += 5.0
    np.testing.assert_allclose(predicted_changes(changed, "fitted")[0], fitted[0])
    with pytest.raises(ValueError, match="at least 2 sequences"):
        predicted_changes(delta[:1], "fitted")


def test_greedy_static_path_follows_the_measured_gain_per_cost():
    sensitivity = np.array([[3.0, 1.0, 0.0], [1.0, 0.5, 0.0]])  # unit 1 is cheaper to lower

    def evaluate(plans):  # a loss that adds up the units' sensitivities
        loss = sensitivity[np.arange(2), plans].sum(1)
        return np.broadcast_to(loss[:, None, None] / 2, (len(plans), 1, 2)).copy()

    cost = unit_costs(np.tile([0.25, 0.5, 1.0], (2, 1)), np.array([0, 1]))
    path = greedy_static_path(evaluate, cost, 2, min_cost=0.3)
    assert [s.units for s in path][:3] == [(2, 2), (2, 1), (1, 1)]
    assert all(a.cost > b.cost for a, b in zip(path, path[1:])) and path[-1].cost <= 0.3
    assert at_budget(path, 0.75).units == (2, 1) and at_budget(path, 0.01) is None


@pytest.fixture(scope="module")
def setup(tiny_llama):
    attention = DynamicRankAttention(tiny_llama.geometry, random_basis(tiny_llama), approximation="select")
    choices = ChoiceSet("select", ((4, 0.25), (8, 0.5), (16, 1.0)), tiny_llama.geometry.head_dim)
    tokens = torch.randint(0, 1000, (2, 3 * SEGMENT), generator=torch.Generator().manual_seed(0))
    return attention, choices, np.array([0, 1]), tokens


def test_segment_nll_of_exact_plan_is_the_model_perplexity(tiny_llama, setup):
    attention, choices, groups, tokens = setup
    plan = np.full((2, 3, 2), 2)
    nll = segment_nll(tiny_llama, attention, choices, groups, tokens, plan, SEGMENT)
    expected = segmented_perplexity(tiny_llama, tokens, SEGMENT, progress=False)
    assert math.exp(nll.sum() / (2 * (3 * SEGMENT - 1))) == pytest.approx(expected, rel=1e-5)


def test_first_order_gains_match_a_plan_changed_in_one_segment(tiny_llama, setup):
    attention, choices, groups, tokens = setup
    static = np.array([1, 0])
    delta, static_nll = first_order_gains(tiny_llama, attention, choices, groups, tokens, static, SEGMENT,
                                          max_rows=3)
    plan = np.broadcast_to(static, (2, 3, 2)).copy()
    np.testing.assert_allclose(segment_nll(tiny_llama, attention, choices, groups, tokens, plan, SEGMENT),
                               static_nll, rtol=1e-6)
    plan[:, 2, 1] = 2  # unit 1 exact in segment 2 only
    changed = segment_nll(tiny_llama, attention, choices, groups, tokens, plan, SEGMENT)
    np.testing.assert_allclose(delta[:, 2, 1, 2], changed[:, 2] - static_nll[:, 2], rtol=1e-5, atol=1e-6)
    assert (delta[:, 0] == 0).all() and (delta[:, :, 0, 1] == 0).all() and (delta[:, :, 1, 0] == 0).all()


@pytest.mark.slow
def test_smoke_run_writes_its_results(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import headroom

    rows = headroom.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and {r["attention"] for r in rows} == {"lowrank_scores", "select"}
    for row in rows:
        assert row["oracle_cost"] <= row["static_cost"] + 1e-9
        assert row["headroom_pp"] == pytest.approx(row["static_increase_pct"] - row["oracle_increase_pct"])
        assert math.isfinite(row["first_order_estimate_pct"])
        assert row["need_autocorrelation"] is None or -1 <= row["need_autocorrelation"] <= 1
        for figures in row["causal"].values():
            assert figures["cost"] <= row["static_cost"] + 1e-9 and 0 <= figures["changed_fraction"] <= 1
            assert math.isfinite(figures["increase_pct"]) and math.isfinite(figures["first_order_estimate_pct"])
    assert "past_mean % (cost); first order" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_smoke_run_of_one_sequence_leaves_out_the_fitted_policy(tmp_path, monkeypatch):
    # the fitted policy is fitted on the other sequences: with one, it is reported as n/a, and the rest still runs
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import headroom

    parse_args = headroom.parse_args

    def one_sequence(argv=None):
        args = parse_args(argv)
        args.eval_tokens = args.seq_lens[0]
        return args

    monkeypatch.setattr(headroom, "parse_args", one_sequence)
    rows = headroom.main(["--smoke", "--out", str(tmp_path)])
    assert all(r["sequences"] == 1 and sorted(r["causal"]) == ["past_mean", "previous"] for r in rows)
    assert "n/a | n/a |" in (tmp_path / "results.md").read_text()
