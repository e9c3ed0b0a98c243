"""Features extractor that attends across the observation's tokens, and its conversion to an exportable network.

    policy_kwargs = dict(features_extractor_class=TransformerFeaturesExtractor,
                         features_extractor_kwargs=dict(unit_shape=env.unit_shape, d_model=64, n_heads=4))

The network itself (:class:`drrl_gym.policies.TokenTransformer`) lives in the package, because an exported model
embeds it without SB3; here it is wrapped as an SB3 ``BaseFeaturesExtractor``.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from drrl_gym.policies import ACTIVATIONS, PolicyArch, RankPolicyNetwork, TokenTransformer


class TransformerFeaturesExtractor(BaseFeaturesExtractor):
    """Observations -> (B, n_units * d_model): a small pre-norm transformer over the observation's tokens.

    DRRL-Attention-v0 observations are the row-major flattening of an (n_units, n_features) matrix (SB3's
    convention for Box spaces); ``unit_shape`` says how to view them (``env.unit_shape``). A 2-D Box space gives
    it by itself. ``features_dim`` follows: flattened per-token features, so the MultiDiscrete head can address
    every token.
    """

    def __init__(self, observation_space: spaces.Box, unit_shape: tuple[int, int] | None = None, d_model: int = 64,
                 n_heads: int = 4, n_layers: int = 2, dim_feedforward: int = 128, dropout: float = 0.0) -> None:
        shape = observation_space.shape if isinstance(observation_space, spaces.Box) else None
        if unit_shape is None and shape is not None and len(shape) == 2:
            unit_shape = shape
        if unit_shape is None or shape is None or int(np.prod(shape)) != int(np.prod(unit_shape)):
            raise ValueError(f"TransformerFeaturesExtractor needs unit_shape=(n_units, n_features) matching the "
                             f"observation space {observation_space}, got unit_shape={unit_shape}. Fix: pass "
                             "features_extractor_kwargs=dict(unit_shape=env.unit_shape).")
        n_units, n_features = (int(n) for n in unit_shape)
        super().__init__(observation_space, features_dim=n_units * d_model)
        self.unit_shape = (n_units, n_features)
        self.encoder = TokenTransformer(n_units, n_features, d_model, n_heads, n_layers, dim_feedforward, dropout)
        self.sizes = dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, dim_feedforward=dim_feedforward)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.encoder(observations.reshape(-1, *self.unit_shape))


def policy_network_from_sb3(policy: ActorCriticPolicy) -> RankPolicyNetwork:
    """Copy the actor of an SB3 (Maskable)ActorCriticPolicy using this extractor into a plain RankPolicyNetwork."""
    extractor = policy.pi_features_extractor
    if not isinstance(extractor, TransformerFeaturesExtractor):
        raise TypeError(f"only policies with TransformerFeaturesExtractor can be exported, got {type(extractor).__name__}")
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    if policy.activation_fn not in names:
        raise ValueError(f"activation_fn {policy.activation_fn.__name__} is not exportable. "
                         f"Fix: use one of {tuple(ACTIVATIONS)}.")
    n_units, n_features = extractor.unit_shape
    arch = PolicyArch(
        n_units=n_units, n_features=n_features, n_choices=int(policy.action_space.nvec[0]), **extractor.sizes,
        pi_layers=tuple(m.out_features for m in policy.mlp_extractor.policy_net if isinstance(m, nn.Linear)),
        activation=names[policy.activation_fn],
    )
    network = RankPolicyNetwork(arch)
    network.encoder.load_state_dict(extractor.encoder.state_dict())
    network.pi.load_state_dict(policy.mlp_extractor.policy_net.state_dict())
    network.action.load_state_dict(policy.action_net.state_dict())
    return network.eval()
