"""drrl_gym.training.algorithms and agents/minimal_ppo.py: short training runs of other RL algorithms on the tiny
random Llama on CPU (SB3 PPO and A2C with MLP and transformer extractors, MaskablePPO, RecurrentPPO, DQN through
UniformRankAction, and the single-file PPO). Each run is a few dozen env steps: it checks that training runs the
exact number of steps, updates the weights, stays finite and gives a valid action, not that it learns. Well under
a minute; the runs are marked slow."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import TINY_ENV as SHARED_TINY_ENV
from gymnasium import spaces

from agents.minimal_ppo import ActorCritic, gae, train
from drrl_gym.training.algorithms import UniformRankAction, make_env, make_model, transformer_policy_kwargs
from drrl_gym.training.extractor import TransformerFeaturesExtractor

TINY_ENV = dict(SHARED_TINY_ENV, seq_len=64, segment_len=16)  # shorter episodes: these tests train
SMALL_NET = dict(net_arch=[32, 32])


@pytest.fixture(scope="module")
def env() -> gym.Env:
    return make_env(**TINY_ENV)


def learn_and_check(model, steps: int) -> None:
    """Train for exactly ``steps`` env steps; the weights must change, stay finite, and the logged losses too."""
    before = {name: p.detach().clone() for name, p in model.policy.named_parameters()}
    model.learn(total_timesteps=steps)
    assert model.num_timesteps == steps
    after = dict(model.policy.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before), "no weight changed"
    for name, parameter in after.items():
        assert torch.isfinite(parameter).all(), name
    losses = {k: v for k, v in model.logger.name_to_value.items() if k.startswith("train/") and "loss" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses


def assert_valid_action(env: gym.Env, action: np.ndarray) -> None:
    assert env.action_space.contains(np.asarray(action, dtype=np.int64)), action
    env.step(action)  # the env accepts it


# ------------------------------------------------------------------------------------------ SB3 PPO and A2C
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppo", "a2c"])
@pytest.mark.parametrize("transformer", [False, True], ids=["mlp", "transformer"])
def test_sb3_on_policy(env: gym.Env, name: str, transformer: bool) -> None:
    kwargs = dict(n_steps=8, seed=0, policy_kwargs=SMALL_NET)
    if name == "ppo":
        kwargs.update(batch_size=8, n_epochs=2)
    model = make_model(name, env, transformer=transformer, transformer_kwargs=dict(d_model=16, n_heads=2), **kwargs)
    if transformer:
        assert isinstance(model.policy.features_extractor, TransformerFeaturesExtractor)
        assert model.policy.features_extractor.unit_shape == env.unwrapped.unit_shape
    learn_and_check(model, 16)
    assert "train/value_loss" in model.logger.name_to_value
    observation, _ = env.reset(seed=1)
    action, _ = model.predict(observation, deterministic=True)
    assert_valid_action(env, action)


@pytest.mark.slow
def test_transformer_policy_kwargs_by_hand(env: gym.Env) -> None:
    """The README's form: SB3 used directly, policy_kwargs from the helper (or written out)."""
    from stable_baselines3 import A2C

    model = A2C("MlpPolicy", env, n_steps=8, device="cpu", seed=0,
                policy_kwargs=transformer_policy_kwargs(env, d_model=16, n_heads=2))
    learn_and_check(model, 8)


# ------------------------------------------------------------------------------------------------ sb3-contrib
@pytest.mark.slow
def test_maskable_ppo(env: gym.Env) -> None:
    model = make_model("maskable_ppo", env, n_steps=8, batch_size=8, n_epochs=2, seed=0, policy_kwargs=SMALL_NET)
    learn_and_check(model, 16)
    observation, _ = env.reset(seed=1)
    mask = env.unwrapped.action_masks()
    action, _ = model.predict(observation, action_masks=mask, deterministic=True)
    n_units, n_choices = len(env.action_space.nvec), int(env.action_space.nvec[0])
    assert mask.reshape(n_units, n_choices)[np.arange(n_units), action].all()
    assert_valid_action(env, action)


@pytest.mark.slow
def test_recurrent_ppo(env: gym.Env) -> None:
    model = make_model("recurrent_ppo", env, n_steps=8, batch_size=8, n_epochs=2, seed=0,
                       policy_kwargs=dict(lstm_hidden_size=16, net_arch=[16]))
    assert type(model.policy).__name__ == "RecurrentActorCriticPolicy"
    learn_and_check(model, 16)
    observation, _ = env.reset(seed=1)
    state, start = None, np.ones((1,), dtype=bool)
    for _ in range(2):  # the LSTM state carries over between steps
        action, state = model.predict(observation, state=state, episode_start=start, deterministic=True)
        assert state is not None
        assert env.action_space.contains(np.asarray(action, dtype=np.int64))
        observation, *_ = env.step(action)
        start = np.zeros((1,), dtype=bool)


# ---------------------------------------------------------------------------------------- DQN via the wrapper
def test_uniform_rank_action_wrapper(env: gym.Env) -> None:
    wrapped = UniformRankAction(env)
    n_units, n_choices = len(env.action_space.nvec), int(env.action_space.nvec[0])
    assert wrapped.action_space == spaces.Discrete(n_choices)
    assert wrapped.observation_space == env.observation_space
    assert np.array_equal(wrapped.action(2), np.full(n_units, 2))
    wrapped.reset(seed=0)
    mask = wrapped.action_masks()
    assert mask.shape == (n_choices,) and mask.any()
    wrapped.step(np.int64(n_choices - 1))
    with pytest.raises(ValueError, match="action must be in"):
        wrapped.action(n_choices)
    with pytest.raises(TypeError, match="MultiDiscrete"):
        UniformRankAction(gym.make("CartPole-v1"))


@pytest.mark.slow
def test_dqn_through_uniform_rank_action(env: gym.Env) -> None:
    model = make_model("dqn", env, learning_starts=8, train_freq=4, batch_size=8, buffer_size=256,
                       target_update_interval=16, seed=0, policy_kwargs=SMALL_NET)
    assert model.action_space == spaces.Discrete(4)  # make_model wrapped the env in UniformRankAction
    learn_and_check(model, 24)
    assert model._n_updates > 0
    observation, _ = env.reset(seed=1)
    action, _ = model.predict(observation, deterministic=True)
    assert model.action_space.contains(int(action))
    env.step(UniformRankAction(env).action(action))


# --------------------------------------------------------------------------------------------- minimal PPO
def test_gae_matches_hand_computation() -> None:
    rewards, values = np.array([1.0, 2.0, 3.0], np.float32), np.array([0.5, 0.5, 0.5], np.float32)
    dones = np.array([0.0, 1.0, 0.0], np.float32)
    advantages, returns = gae(rewards, values, dones, last_value=2.0, gamma=0.9, lam=0.5)
    d2 = 3.0 + 0.9 * 2.0 - 0.5
    d1 = 2.0 - 0.5  # episode ended: no bootstrap
    d0 = 1.0 + 0.9 * 0.5 - 0.5
    assert np.allclose(advantages, [d0 + 0.45 * d1, d1, d2])
    assert np.allclose(returns, advantages + values)


def test_minimal_ppo_masks_respected() -> None:
    policy = ActorCritic(6, n_units=2, n_choices=3)
    mask = np.array([False, True, False, True, False, False])
    for _ in range(5):
        assert np.array_equal(policy.act(np.random.rand(6), mask), [1, 0])


@pytest.mark.slow
def test_minimal_ppo_trains(env: gym.Env) -> None:
    result = train(env=env, total_steps=32, seed=0, n_steps=16, n_epochs=2, batch_size=8)
    assert result["num_timesteps"] == 32 and result["updates"] == 2
    assert result["used_masks"] and len(result["episode_returns"]) > 0
    for losses in result["losses"]:
        assert all(math.isfinite(v) for v in losses.values()), losses
    policy = result["policy"]
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    observation, _ = env.reset(seed=1)
    mask = env.unwrapped.action_masks()
    action = policy.act(observation, mask, deterministic=True)
    assert action.shape == (len(env.action_space.nvec),)
    assert_valid_action(env, action)


@pytest.mark.slow
def test_minimal_ppo_from_env_kwargs_without_masks() -> None:
    result = train(TINY_ENV, total_steps=8, seed=1, n_steps=8, n_epochs=1, batch_size=8, use_masks=False)
    assert result["num_timesteps"] == 8 and not result["used_masks"]
