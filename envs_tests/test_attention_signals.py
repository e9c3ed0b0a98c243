"""The observation's attention signals (drrl_gym.attention_signals) and the selectable feature groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_ENV

from drrl_gym.attention_signals import attention_signals
from drrl_gym.backbone import AttentionGeometry
from drrl_gym.config import EnvConfig
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.observation import DEFAULT_FEATURE_GROUPS, FEATURE_GROUPS, DecisionSpace, observation_feature_names
from drrl_gym.selection import rotate, selection_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ALL_GROUPS = FEATURE_GROUPS


def random_case(seed: int, batch=2, kv_heads=2, group=3, n_queries=12, n_keys=40, d=8):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, n_queries, d, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n_keys, d, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n_keys, d, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(kv_heads, d, d, generator=generator, dtype=torch.float64))[0]
    return q, k, v, basis


@pytest.mark.parametrize("selection", ["group", "head"])
def test_estimated_mass_is_the_true_dropped_mass_of_the_last_queries(selection):
    q, k, v, basis = random_case(0)
    last, ranks, keeps = 5, (2, 8), (0.125, 0.5)
    signals = attention_signals(rotate(q, basis)[:, :, -last:], k @ basis[None], (ranks, keeps), selection=selection)
    for i, r in enumerate(ranks):
        for j, keep in enumerate(keeps):
            _, details = selection_attention(q, k, v, basis, r, keep, selection=selection, return_details=True)
            true = details.dropped_mass[:, :, -last:].reshape(2, 2, 3 * last).mean(-1)  # (B, H_kv) over group rows
            torch.testing.assert_close(signals.dropped_mass[..., i, j].double(), true, rtol=1e-4, atol=1e-5)
    assert (signals.margin >= 0).all() and (signals.margin[..., -1, :] < 1e4).any()


def test_entropy_and_edge_cases():
    q, k, _, basis = random_case(1)
    signals = attention_signals(torch.zeros_like(q[:, :, -4:]), k, ((8,), (1.0,)))
    torch.testing.assert_close(signals.entropy, torch.ones(2, 2))  # equal scores: the uniform softmax, entropy 1
    assert (signals.dropped_mass < 1e-6).all() and (signals.margin == 1e4).all()  # every key kept (float32 sums)
    peaked = attention_signals(100 * q[:, :, -4:], k)
    assert peaked.dropped_mass is None and (peaked.entropy < signals.entropy).all()


def test_default_features_are_unchanged_and_groups_select_columns():
    geometry = AttentionGeometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)
    ranks = (4, 8, 16)
    assert len(observation_feature_names(ranks)) == 8 + 6 * len(ranks)
    default = DecisionSpace(geometry, ranks, "layer", 32, 4)
    assert default.feature_names == observation_feature_names(ranks) and default.signal_queries == 0
    full = DecisionSpace(geometry, ranks, "layer", 32, 4, (0.25, 1.0), ALL_GROUPS)
    assert full.feature_names[:len(observation_feature_names(ranks, full.settings))] == \
        observation_feature_names(ranks, full.settings)
    n = full.n_choices
    assert sum(name.startswith("score_margin@") for name in full.feature_names) == n
    assert sum(name.endswith("_change") or "_change@" in name for name in full.feature_names) == 1 + 2 * n
    only = DecisionSpace(geometry, ranks, "layer", 32, 4, None, ("context", "attention"))
    assert only.feature_names == ("prev_rank_fraction", "position", "layer_fraction", "kv_head_fraction",
                                  "attention_entropy")
    for bad in ((), ("spectra", "spectra"), ("spectrum",)):
        with pytest.raises(ValueError, match="observation_features"):
            EnvConfig(observation_features=bad)


@pytest.mark.parametrize("attention", ["lowrank_scores", "select"])
def test_env_observes_the_signals_and_their_change(attention):
    env = DRRLAttentionEnv(**TINY_ENV, attention=attention, observation_features=ALL_GROUPS, reward="kl_budget")
    names = env.feature_names
    change = [i for i, name in enumerate(names) if "_change" in name]
    observation, _ = env.reset(seed=0)
    matrix = observation.reshape(env.unit_shape)
    assert matrix.shape[1] == len(names) and np.all(matrix[:, change] == 0.5)  # no last segment yet
    previous = matrix
    for _ in range(2):
        observation, reward, _, _, info = env.step(env.action_space.sample())
        matrix = observation.reshape(env.unit_shape)
        assert np.all((matrix >= 0) & (matrix <= 1))
        signal = [names.index(name.replace("_change", "")) for name in np.asarray(names)[change]]
        np.testing.assert_allclose(matrix[:, change], 0.5 + (matrix[:, signal] - previous[:, signal]) / 2, atol=1e-6)
        previous = matrix
        # every term of kl_budget's reward is in info, and they make the reward
        assert math.isclose(reward, -info["kl"] - env.config.budget_penalty * info["over_budget"], abs_tol=1e-12)
        assert info["over_budget"] == max(0.0, info["flops_cost"] - env.config.cost_budget)
    env.close()
    assert DEFAULT_FEATURE_GROUPS == ("spectra", "bounds", "context")


class Recorder:
    """A policy that keeps every observation it is shown and picks the cheapest choice."""

    kind, needs_statistics = "recorder", True

    def __init__(self, controller: DecisionSpace) -> None:
        self.controller, self.seen = controller, []

    def reset(self, batch_size: int) -> None:
        pass

    def act(self, observation: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        self.seen.append(observation)
        return np.zeros(observation.shape[:2], dtype=np.int64)

    def config(self) -> dict:
        return {}


@pytest.mark.parametrize("attention", ["lowrank_scores", "select"])
def test_deployed_runtime_observes_the_selected_groups(attention):
    from drrl_gym.backbone import load_backbone
    from drrl_gym.runtime import ControllerSpec, build_dynamic_rank_model

    backbone = load_backbone("tiny-random-llama", "cpu")
    g = backbone.geometry
    basis = torch.linalg.qr(torch.randn(g.num_layers, g.num_kv_heads, g.head_dim, g.head_dim,
                                        generator=torch.Generator().manual_seed(0)))[0]
    spec = ControllerSpec((4, 8, 16), "layer", 16, 64, None, "calibrated", attention,
                          (0.25, 1.0) if attention == "select" else None, ALL_GROUPS)
    policy = Recorder(spec.controller(g))
    model = build_dynamic_rank_model(backbone, policy, basis, spec)
    model(torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(1)))
    names = policy.controller.feature_names
    change = [i for i, name in enumerate(names) if "_change" in name]
    assert len(policy.seen) == 3 and all(o.shape == (2, g.num_layers, len(names)) for o in policy.seen)
    assert np.all(policy.seen[0][..., change] == 0.5) and not np.all(policy.seen[1][..., change] == 0.5)


def test_feature_ablation_gathers_the_policy_and_its_measured_neighbours(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import feature_ablation

    assert set(feature_ablation.VARIANTS["+signals"]) == set(ALL_GROUPS)
    rows = [{"method": "uniform r=8", "perplexity": 9.0}, {"method": "learned policy", "perplexity": 7.0},
            {"method": "uniform r=8 (measured, saves more)", "perplexity": 9.0}]
    (tmp_path / "default" / "eval").mkdir(parents=True)
    (tmp_path / "default" / "eval" / "results.json").write_text(json.dumps({"rows": rows}))
    gathered = feature_ablation.summary_rows(tmp_path, ["default", "+attention"])
    assert [r["method"] for r in gathered] == ["learned policy", "uniform r=8 (measured, saves more)",
                                               "(no evaluation: the run failed or was skipped)"]
