"""The RLlib PPO module of ``agents/train_rllib.py``: its actor is a :class:`drrl_gym.policies.RankPolicyNetwork`,
the network an export holds, so an RLlib-trained policy exports exactly as an SB3 one does.

    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    spec = RLModuleSpec(module_class=RankPolicyRLModule, model_config=dict(d_model=64, pi_layers=[64, 64], ...))

Layout (that of SB3's ActorCriticPolicy with a shared features extractor, which ``agents/train_ppo.py`` trains):
observation (B, n_units * n_features), viewed as (B, n_units, n_features) -> the actor's token transformer ->
features (B, n_units * d_model) -> the actor's policy MLP and action head -> logits (B, n_units * n_choices), the
concatenated per-unit logits of RLlib's MultiCategorical; the same features -> value MLP -> value. The spaces give
n_units (the MultiDiscrete's length), n_choices and n_features; ``model_config`` gives the sizes (``ARCH_KEYS``,
``VALUE_KEYS``; other keys, such as those PPO adds to every model config, are not the module's and are ignored).

RLlib's deterministic action (``to_deterministic()``) is the per-unit argmax of these logits; the export's
:class:`~drrl_gym.policies.NetworkPolicy` takes the argmax over the allowed choices, so the two agree wherever the
argmax is allowed (always with the mask off: ``epsilon_start=epsilon_end=inf``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchMultiCategorical
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from drrl_gym.policies import PolicyArch, RankPolicyNetwork, mlp

# model_config keys and defaults: the actor's sizes (PolicyArch's) and the value MLP's.
ARCH_KEYS = {"d_model": 64, "n_heads": 4, "n_layers": 2, "dim_feedforward": 128, "pi_layers": (64, 64),
             "activation": "tanh"}
VALUE_KEYS = {"vf_layers": (64, 64)}


def arch_for_spaces(observation_space: spaces.Space, action_space: spaces.Space,
                    model_config: dict[str, Any]) -> PolicyArch:
    """The actor's :class:`PolicyArch` for DRRL-Attention-v0's spaces and the sizes in ``model_config``."""
    if not (isinstance(action_space, spaces.MultiDiscrete) and action_space.nvec.ndim == 1
            and len(set(action_space.nvec.tolist())) == 1 and isinstance(observation_space, spaces.Box)):
        raise ValueError(f"RankPolicyRLModule needs DRRL-Attention-v0's spaces (a flat Box observation and a "
                         f"MultiDiscrete action with one choice count), got {observation_space} and {action_space}. "
                         "Fix: train it on DRRL-Attention-v0.")
    n_units, size = len(action_space.nvec), int(np.prod(observation_space.shape))
    if size % n_units:
        raise ValueError(f"observation size {size} is not a multiple of the {n_units} action units. Fix: use "
                         "DRRL-Attention-v0's unflattened-per-unit observations.")
    sizes = {key: model_config.get(key, default) for key, default in ARCH_KEYS.items()}
    return PolicyArch(n_units=n_units, n_features=size // n_units, n_choices=int(action_space.nvec[0]), **sizes)


class RankPolicyRLModule(TorchRLModule, ValueFunctionAPI):
    """PPO's actor-critic for DRRL-Attention-v0: ``self.actor`` is the exportable :class:`RankPolicyNetwork`."""

    def setup(self) -> None:
        config = dict(self.model_config or {})
        arch = arch_for_spaces(self.observation_space, self.action_space, config)
        self.actor = RankPolicyNetwork(arch)
        vf_layers = tuple(config.get("vf_layers", VALUE_KEYS["vf_layers"]))
        self.value = mlp(self.actor.encoder.output_dim, vf_layers, arch.activation)
        self.value_head = nn.Linear(vf_layers[-1] if vf_layers else self.actor.encoder.output_dim, 1)
        self.action_dist_cls = TorchMultiCategorical.get_partial_dist_cls(input_lens=[arch.n_choices] * arch.n_units)

    def _features(self, batch: dict[str, Any]) -> torch.Tensor:
        arch = self.actor.arch
        return self.actor.encoder(batch[Columns.OBS].reshape(-1, arch.n_units, arch.n_features))

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.actor.flat_logits(self._features(batch))}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        features = self._features(batch)  # kept for compute_values: the encoder runs once per train batch
        return {Columns.ACTION_DIST_INPUTS: self.actor.flat_logits(features), Columns.EMBEDDINGS: features}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        features = self._features(batch) if embeddings is None else embeddings
        return self.value_head(self.value(features)).squeeze(-1)


def policy_network_from_rllib(module: RankPolicyRLModule) -> RankPolicyNetwork:
    """The actor of a trained module as a plain CPU :class:`RankPolicyNetwork` (a copy), ready for
    ``drrl_gym.export.export_env_policy``."""
    if not isinstance(module, RankPolicyRLModule):
        raise TypeError(f"{type(module).__name__} is not a RankPolicyRLModule: only that module's actor is an "
                        "exportable RankPolicyNetwork. Fix: train with agents/train_rllib.py (it uses RankPolicyRLModule).")
    return copy.deepcopy(module.actor).cpu().eval()
