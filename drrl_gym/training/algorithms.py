"""Helpers for plugging other RL algorithms into DRRL-Attention-v0 (SB3, sb3-contrib, or a custom loop).

The env speaks plain Gymnasium: a flat ``Box`` observation (view it as ``obs.reshape(env.unwrapped.unit_shape)``),
a ``MultiDiscrete([len(rank_choices)] * n_units)`` action and, optionally, ``env.unwrapped.action_masks()`` (flat
bool, n_units blocks of len(rank_choices)). Algorithms that accept ``MultiDiscrete`` (PPO, A2C, MaskablePPO,
RecurrentPPO) need nothing from this module but, optionally, :func:`transformer_policy_kwargs`. Algorithms that need
a ``Discrete`` action space (DQN, QR-DQN, ...) go through :class:`UniformRankAction`.

    env = make_env(model="tiny-random-llama", device="cpu")
    model = make_model("a2c", env, transformer=True, n_steps=8)
    model.learn(64)

Tested algorithms: see ``envs_tests/test_algorithms.py`` and ``agents/README.md``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ENV_ID = "DRRL-Attention-v0"


def make_env(**env_kwargs: Any) -> gym.Env:
    """``gymnasium.make("DRRL-Attention-v0", **env_kwargs)`` (registers the env by importing ``drrl_gym``)."""
    import drrl_gym  # noqa: F401  (registers the id)

    return gym.make(ENV_ID, **env_kwargs)


def transformer_policy_kwargs(env: gym.Env, d_model: int = 32, n_heads: int = 4, n_layers: int = 1,
                              **extra: Any) -> dict[str, Any]:
    """``policy_kwargs`` that put :class:`drrl_gym.training.extractor.TransformerFeaturesExtractor` in any SB3 actor-critic.

    The extractor needs ``unit_shape`` (the env's observation is flat); it is read from ``env.unwrapped`` (works
    through wrappers, including :class:`UniformRankAction`, which keeps the observation unchanged).
    """
    from drrl_gym.training.extractor import TransformerFeaturesExtractor

    return dict(features_extractor_class=TransformerFeaturesExtractor,
                features_extractor_kwargs=dict(unit_shape=tuple(env.unwrapped.unit_shape), d_model=d_model,
                                               n_heads=n_heads, n_layers=n_layers), **extra)


class UniformRankAction(gym.ActionWrapper):
    """``Discrete(len(rank_choices))``: one rank choice applied to *every* token, for value-based algorithms (DQN).

    Why this design: DQN (and SB3's other Q-learning algorithms) needs a ``Discrete`` action space, and the joint
    space ``len(rank_choices) ** n_units`` is too large to enumerate beyond a handful of tokens (4 choices, 30
    layers: 10^18). The uniform wrapper is the simplest honest reduction.

    Limitation (read before comparing numbers): the agent can only pick a *global* rank per step; it cannot give
    different layers / KV heads different ranks, which is the point of DR-RL. A DQN agent through this wrapper is
    a per-step global-rank baseline, not a replacement for a per-token policy (PPO, MaskablePPO, minimal_ppo).

    Safety mask: :meth:`action_masks` allows choice i iff every token may take it. That can be empty (tokens'
    previous ranks differ and epsilon is tight); then every choice is reported allowed and the env projects each
    disallowed sub-action to the closest allowed rank, as for any agent that ignores the mask (``info`` reports it).
    DQN itself ignores masks; the method is there for masked algorithms and for inspection.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.action_space
        if not isinstance(space, spaces.MultiDiscrete) or len(set(int(n) for n in space.nvec)) != 1:
            raise TypeError(f"UniformRankAction needs MultiDiscrete([k] * n_units), got {space}")
        self.n_units, self.n_choices = len(space.nvec), int(space.nvec[0])
        self.action_space = spaces.Discrete(self.n_choices)

    def action(self, action: Any) -> np.ndarray:
        index = int(np.asarray(action).reshape(-1)[0])
        if not 0 <= index < self.n_choices:
            raise ValueError(f"action must be in [0, {self.n_choices}), got {index}")
        return np.full(self.n_units, index, dtype=np.int64)

    def action_masks(self) -> np.ndarray:
        allowed = np.asarray(self.env.unwrapped.action_masks(), dtype=bool).reshape(self.n_units, self.n_choices)
        uniform = allowed.all(axis=0)
        return uniform if uniform.any() else np.ones(self.n_choices, dtype=bool)


def algorithm_class(name: str) -> type:
    """SB3 / sb3-contrib class by lower-case name: ppo, a2c, dqn, maskable_ppo, recurrent_ppo."""
    import sb3_contrib
    import stable_baselines3

    classes = {"ppo": stable_baselines3.PPO, "a2c": stable_baselines3.A2C, "dqn": stable_baselines3.DQN,
               "maskable_ppo": sb3_contrib.MaskablePPO, "recurrent_ppo": sb3_contrib.RecurrentPPO}
    if name not in classes:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(classes)}")
    return classes[name]


def make_model(name: str, env: gym.Env, transformer: bool = False, policy: str | None = None,
               transformer_kwargs: dict[str, Any] | None = None, **algo_kwargs: Any):
    """Build an SB3 / sb3-contrib model on ``env`` with sensible defaults for this env.

    - ``dqn`` wraps ``env`` in :class:`UniformRankAction` (unless its action space is already Discrete);
    - ``recurrent_ppo`` defaults to ``MlpLstmPolicy``, the others to ``MlpPolicy``;
    - ``transformer=True`` adds :func:`transformer_policy_kwargs` (merged under any ``policy_kwargs`` given).
    """
    cls = algorithm_class(name)
    if name == "dqn" and not isinstance(env.action_space, spaces.Discrete):
        env = UniformRankAction(env)
    policy = policy or ("MlpLstmPolicy" if name == "recurrent_ppo" else "MlpPolicy")
    if transformer:
        algo_kwargs["policy_kwargs"] = {**transformer_policy_kwargs(env, **(transformer_kwargs or {})),
                                        **algo_kwargs.get("policy_kwargs", {})}
    algo_kwargs.setdefault("device", "cpu")
    return cls(policy, env, **algo_kwargs)
