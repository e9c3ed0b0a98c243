"""drrl-gym: a Gymnasium environment for learning dynamic low-rank attention on frozen Hugging Face causal LMs.

``import drrl_gym`` registers ``DRRL-Attention-v0`` (``gymnasium.make("drrl_gym:DRRL-Attention-v0")`` imports it
for you). The public names below are imported on first use, so importing the package stays cheap and loads no model.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

import gymnasium

ENV_ID = "DRRL-Attention-v0"

if ENV_ID not in gymnasium.registry:  # re-importing (e.g. importlib.reload) must not register twice
    gymnasium.register(
        id=ENV_ID,
        entry_point="drrl_gym.env:DRRLAttentionEnv",
        # gymnasium.make_vec(ENV_ID, num_envs=N, vectorization_mode="vector_entry_point"): N episodes, one forward
        vector_entry_point="drrl_gym.vector:DRRLAttentionVecEnv",
    )

_EXPORTS = {
    "DRRLAttentionEnv": "drrl_gym.env",
    "DRRLAttentionVecEnv": "drrl_gym.vector",
    "EnvConfig": "drrl_gym.config",
    "shared_backbone": "drrl_gym.resources",
    "free_shared_resources": "drrl_gym.resources",
    "OBSERVATION_FEATURES": "drrl_gym.observation",
    "observation_feature_names": "drrl_gym.observation",
    "DecisionSpace": "drrl_gym.observation",
    "FIDELITY_METRICS": "drrl_gym.reward",
    "Backbone": "drrl_gym.backbone",
    "AttentionGeometry": "drrl_gym.backbone",
    "load_backbone": "drrl_gym.backbone",
    "CorpusConfig": "drrl_gym.corpus",
    "load_corpus": "drrl_gym.corpus",
    "DynamicRankAttention": "drrl_gym.lowrank",
    "segmented_perplexity": "drrl_gym.perplexity",
}
# Old names, resolved with a DeprecationWarning for one release: name -> (module, new name).
_DEPRECATED = {
    "RankController": ("drrl_gym.observation", "DecisionSpace"),
    "DRRLAttentionSB3VecEnv": ("drrl_gym.training.sb3_vec_env", "DRRLAttentionSB3VecEnv"),
}
__all__ = ["ENV_ID", *_EXPORTS]

if TYPE_CHECKING:
    from drrl_gym.backbone import AttentionGeometry, Backbone, load_backbone
    from drrl_gym.config import EnvConfig
    from drrl_gym.corpus import CorpusConfig, load_corpus
    from drrl_gym.env import DRRLAttentionEnv
    from drrl_gym.lowrank import DynamicRankAttention
    from drrl_gym.observation import OBSERVATION_FEATURES, DecisionSpace, observation_feature_names
    from drrl_gym.perplexity import segmented_perplexity
    from drrl_gym.resources import free_shared_resources, shared_backbone
    from drrl_gym.reward import FIDELITY_METRICS
    from drrl_gym.vector import DRRLAttentionVecEnv


def __getattr__(name: str) -> Any:  # PEP 562: import torch and transformers only when a name is used
    if name in _DEPRECATED:
        module, new = _DEPRECATED[name]
        warnings.warn(f"drrl_gym.{name} is deprecated; use {module}.{new}.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), new)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drrl_gym' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
