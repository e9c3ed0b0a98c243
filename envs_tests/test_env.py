"""DRRL-Attention-v0: API conformance, determinism, safety mask, projection, reward, arguments, rendering, purity.

Tiny random models with short sequences keep this file fast; one test (marked slow, still in the default run)
checks the real default model, SmolLM2-135M, at a small size.
"""

from __future__ import annotations

import math
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import TINY_ENV
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from transformers import Cache

import drrl_gym
from drrl_gym.config import EnvConfig
from drrl_gym.env import DRRLAttentionEnv
from drrl_gym.episode import EpisodeBatch
from drrl_gym.lowrank import DynamicRankAttention, SegmentStats
from drrl_gym.observation import observation_feature_names
from drrl_gym.resources import shared_backbone

SMOLLM2 = dict(model="smollm2-135m", seq_len=256, segment_len=64, calibration_sequences=2, eval_sequences=2,
               device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run this file's forwards on one thread, then restore the setting.

    Measured on the 2-core CI machine with one core busy elsewhere: a SmolLM2 step took 0.66 s on one thread and
    15.6 s on two (the second thread waits for a core at every parallel op). Tiny models never gain from two.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_env(model: str = "tiny-random-llama", **overrides) -> DRRLAttentionEnv:
    return DRRLAttentionEnv(**{**TINY_ENV, "model": model, **overrides})


def run_episode(env: DRRLAttentionEnv, seed: int) -> list[tuple]:
    """(observation, reward, terminated, truncated, info) of every step, with seeded random actions."""
    observation, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    trace = [(observation, 0.0, False, False, info)]
    terminated = False
    while not terminated:
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
        trace.append((observation, reward, terminated, truncated, info))
    return trace


def assert_same_info(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def check_both(env: gym.Env) -> None:
    """Gymnasium's and SB3's checkers with every warning an error and no filter: the env itself must be clean."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gymnasium_check_env(env)
        sb3_check_env(env)


# ------------------------------------------------------------------------------------------- registration
def test_import_registers_and_make_works() -> None:
    assert drrl_gym.ENV_ID in gym.registry
    env = gym.make("drrl_gym:DRRL-Attention-v0", **{**TINY_ENV, "model": "tiny-random-gpt2"})
    assert isinstance(env.unwrapped, DRRLAttentionEnv)
    env.reset(seed=0)
    env.close()


def test_make_with_module_prefix_imports_and_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in a fresh process: the package not imported and the id not registered (both restored afterwards).
    monkeypatch.delitem(sys.modules, "drrl_gym")
    monkeypatch.delitem(gym.registry, drrl_gym.ENV_ID)
    env = gym.make("drrl_gym:DRRL-Attention-v0", **TINY_ENV)
    assert drrl_gym.ENV_ID in gym.registry and isinstance(env.unwrapped, DRRLAttentionEnv)


# ------------------------------------------------------------------------------------------ API checkers
@pytest.mark.parametrize(
    "model, granularity",
    [("tiny-random-llama", "layer"), ("tiny-random-llama", "kv_head"), ("tiny-random-gpt2", "layer")],
)
def test_env_checkers_pass_without_warnings_on_tiny_models(model: str, granularity: str) -> None:
    # Through make so that the env has a spec and gymnasium's checker also builds it in every render mode.
    env = gym.make("DRRL-Attention-v0", **{**TINY_ENV, "model": model, "granularity": granularity})
    check_both(env.unwrapped)


@pytest.mark.slow
def test_env_checkers_pass_without_warnings_on_smollm2() -> None:
    env = gym.make("DRRL-Attention-v0", **SMOLLM2)
    unwrapped = env.unwrapped
    assert unwrapped.rank_choices == (16, 32, 48, 64) and unwrapped.n_units == 30
    check_both(unwrapped)


# ------------------------------------------------------------------------------------------------ spaces
@pytest.mark.parametrize("granularity, tokens", [("layer", 2), ("kv_head", 4)])
def test_spaces_and_episode_structure(granularity: str, tokens: int) -> None:
    env = tiny_env(granularity=granularity)
    n_features = len(observation_feature_names(env.rank_choices))
    assert n_features == 8 + 6 * 4 == len(env.feature_names)
    # Flat (SB3's convention); unit_shape gives the documented (tokens, features) matrix view.
    assert env.observation_space.shape == (tokens * n_features,) and env.observation_space.dtype == np.float32
    assert env.unit_shape == (tokens, n_features)
    assert list(env.action_space.nvec) == [4] * tokens
    trace = run_episode(env, seed=3)
    assert len(trace) - 1 == 128 // 32 - 1  # the warm-up segment is not a step
    assert [t[2] for t in trace[1:]] == [False, False, True] and not any(t[3] for t in trace)
    for observation, *_ in trace:
        assert env.observation_space.contains(observation) and np.isfinite(observation).all()
    assert [t[4]["segment"] for t in trace] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.action_space.sample())


def test_bad_action_is_rejected() -> None:
    env = tiny_env()
    env.reset(seed=0)
    for action in (np.array([0, 4]), np.array([0]), np.array([0.0, 1.0])):
        with pytest.raises(ValueError, match="action must be"):
            env.step(action)


# ------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("fidelity", ["attention_cosine", "kl", "hidden_cosine"])
def test_same_seed_gives_identical_trajectories(fidelity: str) -> None:
    first = run_episode(tiny_env(fidelity=fidelity), seed=7)
    second = run_episode(tiny_env(fidelity=fidelity), seed=7)
    for (obs_a, reward_a, *_, info_a), (obs_b, reward_b, *_, info_b) in zip(first, second, strict=True):
        assert np.array_equal(obs_a, obs_b) and reward_a == reward_b
        assert_same_info(info_a, info_b)
    other = run_episode(tiny_env(fidelity=fidelity), seed=8)
    assert other[0][4]["sequence_index"] != first[0][4]["sequence_index"]


def test_envs_sharing_one_model_do_not_interfere() -> None:
    alone = run_episode(tiny_env(), seed=5)
    a, b = tiny_env(), tiny_env()
    assert a.backbone is b.backbone  # the process-level cache
    a.reset(seed=5)
    b.reset(seed=6)
    a.action_space.seed(5)
    for step in alone[1:]:
        b.step(b.action_space.sample())  # interleaved on the same model object
        observation, reward, *_ = a.step(a.action_space.sample())
        assert np.array_equal(observation, step[0]) and reward == step[1]


def test_explicit_backbone_is_used_and_conflicts_are_errors() -> None:
    backbone = shared_backbone("tiny-random-llama", "cpu")
    env = DRRLAttentionEnv(backbone=backbone, **{k: v for k, v in TINY_ENV.items() if k not in ("device", "model")})
    assert env.backbone is backbone and env.config.model == "tiny-random-llama"
    with pytest.raises(ValueError, match="model.*conflicts with the passed backbone"):
        DRRLAttentionEnv(backbone=backbone, **{**TINY_ENV, "model": "tiny-random-gpt2"})


# -------------------------------------------------------------------------------------------------- mask
def test_mask_format_and_at_least_one_choice() -> None:
    env = tiny_env(granularity="kv_head")
    with pytest.raises(RuntimeError, match="reset"):
        env.action_masks()
    env.reset(seed=0)
    for _ in range(3):
        mask = env.action_masks()
        assert mask.dtype == np.bool_ and mask.shape == (env.n_units * 4,)
        assert mask.reshape(env.n_units, 4).any(axis=1).all()
        env.step(env.action_space.sample())


def test_mask_follows_epsilon() -> None:
    closed = tiny_env(epsilon_start=0.0, epsilon_end=0.0)
    closed.reset(seed=0)
    blocks = closed.action_masks().reshape(closed.n_units, 4)
    assert (blocks.sum(axis=1) == 1).all() and blocks[:, -1].all()  # only r_{t-1} = the largest choice
    open_ = tiny_env(epsilon_start=math.inf, epsilon_end=math.inf)
    open_.reset(seed=0)
    assert open_.action_masks().all()
    # In between, a choice is allowed exactly when its transition bound is <= epsilon.
    bounds = open_.transition_bounds
    epsilon = float(np.median(bounds[bounds > 0]))
    middle = tiny_env(epsilon_start=epsilon, epsilon_end=epsilon)
    middle.reset(seed=0)
    mask = middle.action_masks().reshape(middle.n_units, 4)
    assert np.array_equal(mask, bounds <= epsilon) and mask.any() and not mask.all()


def test_epsilon_schedule_is_linear_over_env_steps() -> None:
    env = tiny_env(epsilon_start=1.0, epsilon_end=0.0, epsilon_anneal_steps=4)
    epsilons = [info["epsilon"] for *_, info in run_episode(env, seed=0)[1:]]
    epsilons += [info["epsilon"] for *_, info in run_episode(env, seed=1)[1:]]  # continues across episodes
    assert epsilons == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    resumed = tiny_env(epsilon_start=1.0, epsilon_end=0.0, epsilon_anneal_steps=4)
    resumed.continue_schedule(3)  # what train_ppo.py --resume does: the schedule goes on from the checkpoint's step
    assert [info["epsilon"] for *_, info in run_episode(resumed, seed=0)[1:]] == [0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="steps=-1"):
        resumed.continue_schedule(-1)


def test_masked_actions_are_projected_and_reported() -> None:
    env = tiny_env(epsilon_start=0.0, epsilon_end=0.0, granularity="kv_head")
    env.reset(seed=0)
    action = np.array([0, 1, 3, 2])
    *_, info = env.step(action)
    assert np.array_equal(info["projected"], action != 3)
    assert info["mask_rejections"] == 3
    assert (info["ranks"] == 16).all() and info["perturbation"] == 0.0


def test_projection_picks_the_nearest_allowed_rank_with_ties_to_the_larger() -> None:
    controller = tiny_env(granularity="kv_head").decisions  # 4 units, choices (4, 8, 12, 16)
    allowed = np.array([[True, False, True, False], [True, True, False, False], [False, False, False, True],
                        [True, True, True, True]])
    applied, projected = controller.project(np.array([[1, 3, 3, 0]]), allowed[None])
    assert applied.tolist() == [[2, 1, 3, 0]]  # 8 -> 12 (tie with 4), 16 -> 8, 16 and 4 allowed
    assert projected.tolist() == [[True, True, False, False]]


# -------------------------------------------------------------------------------------- controller, probe
def test_controller_is_batched_and_matches_the_env() -> None:
    env = tiny_env(granularity="kv_head", epsilon_start=math.inf, epsilon_end=math.inf)
    env.reset(seed=0)
    observation, _, _, _, info = env.step(np.array([0, 1, 2, 3]))
    stats = env.batch.episode.stats  # the statistics the env just observed, to replay through the decision space
    both = SegmentStats(stats.query_gram.expand(2, -1, -1, -1, -1), stats.key_gram.expand(2, -1, -1, -1, -1),
                        stats.num_queries, stats.num_keys)
    prev = np.array([[0, 1, 2, 3], [3, 3, 3, 3]])
    matrices, transition, to_full = env.decisions.observe(both, prev, segment=2)
    assert matrices.shape == (2, *env.unit_shape) and transition.shape == (2, 4, 4)
    # The env's observation is the controller's matrix flattened row-major; unit_shape undoes it.
    assert np.array_equal(matrices[0].reshape(-1), observation)
    assert np.array_equal(observation.reshape(env.unit_shape), matrices[0])
    assert all(env.observation_space.contains(m.reshape(-1)) for m in matrices)
    assert np.array_equal(transition[0], env.transition_bounds)
    assert (transition[np.arange(2)[:, None], np.arange(4), prev] == 0).all()  # staying costs nothing
    ranks = env.decisions.layer_ranks(np.array([[0, 1, 2, 3]]))
    assert ranks.tolist() == [[[4, 8], [12, 16]]] and np.array_equal(info["ranks"], [4, 8, 12, 16])


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_probe_layer_fidelity_does_not_advance_the_episode(granularity: str) -> None:
    probed, plain = tiny_env(granularity=granularity), tiny_env(granularity=granularity)
    probed.reset(seed=2)
    plain.reset(seed=2)
    candidates = np.repeat(np.arange(4)[:, None], probed.n_units, axis=1)
    cosine = probed.probe_layer_fidelity(candidates)
    assert cosine.shape == (4, probed.n_units)
    assert np.allclose(cosine[-1], 1.0, atol=1e-5) and (cosine[0] < cosine[-1]).all()
    action = np.full(probed.n_units, 3)
    observation, reward, *_ = probed.step(action)
    expected, expected_reward, *_ = plain.step(action)
    assert np.array_equal(observation, expected) and reward == expected_reward
    # At one rank everywhere, the per-token cosines average to the env's attention-cosine fidelity.
    probed.reset(seed=2)
    mean = probed.probe_layer_fidelity(np.zeros((1, probed.n_units), dtype=np.int64)).mean()
    assert mean == pytest.approx(probed.step(np.zeros(probed.n_units, dtype=np.int64))[4]["fidelity"], abs=1e-6)


# ------------------------------------------------------------------------------------------------ reward
@pytest.mark.parametrize("fidelity", ["attention_cosine", "kl", "hidden_cosine"])
def test_reward_is_the_weighted_sum_of_its_components(fidelity: str) -> None:
    env = tiny_env(fidelity=fidelity, fidelity_weight=2.0, cost_weight=0.3, perturbation_weight=0.7, epsilon_start=math.inf, epsilon_end=math.inf)
    env.reset(seed=0)
    for action in ([0, 2], [3, 1], [1, 1]):
        bounds = env.transition_bounds
        _, reward, _, _, info = env.step(np.array(action))
        expected = 2.0 * info["fidelity"] - 0.3 * info["flops_cost"] - 0.7 * info["perturbation"]
        assert reward == info["reward"] == expected
        ranks = np.array(env.rank_choices)[action]
        assert np.array_equal(info["ranks"], ranks)
        assert info["perturbation"] == pytest.approx(bounds[[0, 1], action].mean())
        # Scores FLOPs are linear in the rank: the cost is the mean r / d over (layer, KV head).
        assert info["flops_cost"] == pytest.approx(ranks.mean() / 16) == pytest.approx(info["rank_fraction"])
        assert info["flops_saved_scores"] == pytest.approx(1 - info["flops_cost"])
        assert info["flops_saved_attention"] < info["flops_saved_scores"]  # overheads only add to the whole
        assert 0 < info["fidelity"] <= 1 + 1e-6


@pytest.mark.parametrize("fidelity", ["attention_cosine", "kl", "hidden_cosine"])
def test_full_rank_has_full_fidelity_and_full_cost(fidelity: str) -> None:
    env = tiny_env(fidelity=fidelity)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([3, 3]))
    assert info["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert info["flops_cost"] == 1.0 and info["perturbation"] == 0.0 and info["mask_rejections"] == 0


def test_lower_rank_loses_fidelity() -> None:
    full, low = tiny_env(), tiny_env(epsilon_start=math.inf, epsilon_end=math.inf)
    full.reset(seed=0)
    low.reset(seed=0)
    assert low.step(np.array([0, 0]))[4]["fidelity"] < full.step(np.array([3, 3]))[4]["fidelity"]


# --------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(rank_choices=()), r"rank_choices=\(\).*non-empty.*Fix"),
        (dict(rank_choices=(8, 4)), r"rank_choices=\(8, 4\).*strictly increasing.*Fix: pass \(4, 8\)"),
        (dict(rank_choices=(0, 4)), r"rank_choices.*positive.*Fix"),
        (dict(rank_choices=(4, 8, 32)), r"rank_choices=\(4, 8, 32\).*head_dim=16.*Fix"),
        (dict(rank_choices=EnvConfig.rank_choices), r"rank_choices=\(16, 32, 48, 64\).*head_dim=16.*\(4, 8, 12, 16\)"),
        (dict(granularity="head"), r"granularity='head'.*Fix.*'layer', 'kv_head'"),
        (dict(seq_len=100), r"seq_len=100.*not a multiple of segment_len=32.*Fix: use seq_len=96"),
        (dict(seq_len=32), r"seq_len=32.*1 segment.*Fix: use seq_len >= 64"),
        (dict(segment_len=0), r"segment_len=0.*positive integer.*Fix"),
        (dict(fidelity="mse"), r"fidelity='mse'.*Fix.*attention_cosine"),
        (dict(fidelity_weight=-1.0), r"fidelity_weight=-1.0.*>= 0.*Fix"),
        (dict(epsilon_start=-0.1, epsilon_end=-0.1), r"epsilon_start=-0.1.*Fix"),
        (dict(epsilon_start=1.0, epsilon_end=0.0), r"epsilon_anneal_steps=0.*Fix"),
        (dict(basis="svd"), r"basis='svd'.*Fix.*calibrated"),
        (dict(dtype="int8"), r"dtype='int8'.*Fix"),
        (dict(corpus="/no/such/corpus.txt"), r"corpus='/no/such/corpus.txt'.*no such file.*Fix"),
        (dict(seq_len=8192, segment_len=4096), r"seq_len=8192.*context window of 4096.*Fix"),
        (dict(episode_len=3), r"episode_len=3.*unknown argument.*Fix"),
        (dict(render_mode="human"), r"render_mode='human'.*Fix"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_env(**overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"device='cuda'.*CUDA is not available.*Fix"):
        EnvConfig(device="cuda")


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown model './no-such-model'.*Fix"):
        tiny_env(model="./no-such-model")


def test_config_normalises_types() -> None:
    config = EnvConfig(rank_choices=[16, np.int64(32)], dtype=torch.float32)
    assert config.rank_choices == (16, 32) and config.dtype == "float32" and config.n_segments == 8


# ------------------------------------------------------------------------------------------------ render
def test_render_modes() -> None:
    text = tiny_env(render_mode="ansi")
    text.reset(seed=0)
    assert "warm-up" in text.render()
    text.step(np.array([0, 3]))
    summary = text.render()
    assert "segment 1/3" in summary and "fidelity" in summary and "ranks: 4 16" in summary

    image = tiny_env(render_mode="rgb_array")
    blank = image.render()
    image.reset(seed=0)
    start = image.render()
    image.step(np.array([0, 3]))
    frame = image.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert frame.shape == start.shape == blank.shape
    columns = frame.shape[1] // 4
    assert not np.array_equal(frame[:, columns : 2 * columns], start[:, columns : 2 * columns])  # segment 1 drawn
    assert np.array_equal(frame[:, 2 * columns :], blank[:, 2 * columns :])  # later segments still dark
    assert tiny_env().render() is None


# ---------------------------------------------------------------------------------------------- frozen
def _tensors(obj, seen: set[int], depth: int = 0):
    """Every tensor reachable from the env's state (caches, controller, arrays), the model's included."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, Cache):
        for layer in obj.layers:
            yield from _tensors(vars(layer), seen, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, seen, depth + 1)
    elif isinstance(obj, (DRRLAttentionEnv, EpisodeBatch, DynamicRankAttention)) or hasattr(
        obj, "__dataclass_fields__"
    ):
        yield from _tensors(vars(obj), seen, depth + 1)


def test_model_stays_frozen_and_nothing_requires_grad() -> None:
    env = tiny_env(fidelity="kl")
    model = env.backbone.model
    before = {name: value.clone() for name, value in model.state_dict().items()}
    implementation = model.config._attn_implementation
    run_episode(env, seed=0)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.config._attn_implementation == implementation  # detached between steps
    assert not any(hasattr(module, "drrl_attention") for module in model.modules())
    tensors = list(_tensors(env, set()))
    assert len(tensors) > len(before)  # the walk reached the caches and statistics, not only the weights
    assert not any(t.requires_grad or t.grad_fn is not None for t in tensors)


# --------------------------------------------------------------------------------------- maskable agent
@pytest.mark.slow
def test_maskable_ppo_trains_on_the_env_and_respects_the_mask() -> None:
    from sb3_contrib import MaskablePPO

    env = tiny_env(granularity="kv_head", epsilon_start=0.0, epsilon_end=0.0)  # only the largest rank is allowed
    model = MaskablePPO("MlpPolicy", env, n_steps=12, batch_size=6, n_epochs=1, seed=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=12)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))  # it updated
    observation, _ = env.reset(seed=5)
    for _ in range(env.unwrapped.config.n_segments - 1):
        action, _ = model.predict(observation, action_masks=env.action_masks(), deterministic=False)
        observation, _, _, _, info = env.step(action)
        assert info["mask_rejections"] == 0  # a masked policy never asks for a disallowed rank


# ------------------------------------------------------------------------------------- mask and executed cost
def test_mask_bounds_the_distance_from_full_rank_not_the_last_step() -> None:
    open_ = tiny_env(granularity="kv_head", epsilon_start=math.inf, epsilon_end=math.inf)
    open_.reset(seed=0)
    to_full = open_.full_rank_bounds
    epsilon = float(np.median(to_full[to_full > 0]))
    env = tiny_env(granularity="kv_head", epsilon_start=epsilon, epsilon_end=epsilon)
    env.reset(seed=0)
    moved = False
    for _ in range(env.unwrapped.config.n_segments - 1):
        mask = env.action_masks().reshape(env.n_units, 4)
        expected = env.full_rank_bounds <= epsilon
        expected[:, -1] = True  # the largest choice is always allowed
        assert np.array_equal(mask, expected)
        # Step as far down as allowed: the next mask still measures from full rank, whatever the last step was.
        lowest = mask.argmax(axis=1)
        *_, info = env.step(lowest)
        assert info["mask_rejections"] == 0
        below = lowest < 3  # units now below full rank: their step bounds and bounds from full rank differ
        if below.any():
            moved = True
            assert not np.allclose(env.full_rank_bounds[below], env.transition_bounds[below])
    assert moved


def test_info_reports_executed_beside_counted_savings() -> None:
    env = tiny_env(granularity="kv_head", epsilon_start=math.inf, epsilon_end=math.inf)  # CPU: eager forwards
    env.reset(seed=0)
    *_, info = env.step(np.array([0, 3, 1, 1]))  # layer 0 runs (4, 16), layer 1 (8, 8) of head_dim 16
    assert info["flops_saved_scores"] == pytest.approx(1 - (4 + 16 + 8 + 8) / 64)
    # Eagerly a layer runs at the largest rank of its heads: layer 0 at 16, layer 1 at 8.
    assert info["flops_saved_scores_executed"] == pytest.approx(1 - (16 + 16 + 8 + 8) / 64)
    assert info["flops_saved_attention_executed"] < info["flops_saved_attention"]


def test_deprecated_reward_weight_names_still_work_for_one_release() -> None:
    with pytest.warns(DeprecationWarning, match="'gamma' is deprecated; use 'perturbation_weight'"):
        config = EnvConfig(gamma=0.5)
    assert (config.perturbation_weight, config.gamma) == (0.5, None)
    with pytest.raises(ValueError, match="gamma=0.5: is the deprecated name of perturbation_weight"):
        EnvConfig(gamma=0.5, perturbation_weight=0.2)
    env = tiny_env()
    with pytest.warns(DeprecationWarning, match="unit_shape"):
        assert env.unwrapped.token_shape == env.unwrapped.unit_shape


def test_kl_budget_reward_is_kl_plus_a_hinge_on_cost() -> None:
    env = tiny_env(reward="kl_budget", cost_budget=0.5, budget_penalty=3.0, epsilon_start=math.inf,
                   epsilon_end=math.inf)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.array([3, 3]))  # full rank: no KL, cost 1, half of it above the budget
    assert info["kl"] == pytest.approx(0.0, abs=1e-6) and info["over_budget"] == pytest.approx(0.5)
    assert reward == pytest.approx(-3.0 * 0.5, abs=1e-6)
    for action in ([0, 0], [1, 2]):
        _, reward, _, _, info = env.step(np.array(action))
        expected = -info["kl"] - 3.0 * max(0.0, info["flops_cost"] - 0.5)
        assert reward == pytest.approx(expected) and info["kl"] >= 0
        assert info["fidelity"] == pytest.approx(np.exp(-info["kl"]))
    with pytest.raises(ValueError, match="reward='nope': unknown reward"):
        EnvConfig(reward="nope")
