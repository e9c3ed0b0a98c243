"""Training rank policies for DRRL-Attention-v0 with Stable-Baselines3: the typed config tree of the training
scripts, the Transformer features extractor, the oracle and behaviour cloning, algorithm plug-ins and the SB3
VecEnv adapter of the batched env.

The core package (``drrl_gym``) needs none of this; this subpackage alone imports SB3, sb3-contrib, OmegaConf and
TensorBoard, which come with the ``train`` extra: ``pip install -e ".[train]"``. Its ``rllib_*`` modules are Ray
RLlib's side of ``agents/train_rllib.py`` (the ``rllib`` extra; ``rllib_layout`` alone needs no Ray), imported only
by that script. The runnable scripts that use it are in ``agents/``.
"""

from __future__ import annotations

import importlib.util

_TRAIN_EXTRA = ("stable_baselines3", "sb3_contrib", "omegaconf")
_missing = [name for name in _TRAIN_EXTRA if importlib.util.find_spec(name) is None]
if _missing:  # fail on import with the fix, not deep inside a training run
    raise ImportError(f"drrl_gym.training needs {', '.join(_missing)} (the `train` extra). "
                      'Fix: pip install -e ".[train]"')
