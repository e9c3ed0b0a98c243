"""What runs inside an RLlib env runner of ``agents/train_rllib.py``: the env creator (the runner's envs as one
batched :class:`drrl_gym.vector.DRRLAttentionVecEnv`) and the callback that logs the env's rank metrics.

Ray imports this module in every runner process (the creator and the callback are pickled by reference), so it
imports Ray only inside the functions, and only what a runner needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from drrl_gym.config import EnvConfig
from drrl_gym.vector import DRRLAttentionVecEnv

ENV_ID = "DRRL-Attention-v0"
INFO_METRICS = ("fidelity", "flops_saved_scores", "rank_fraction", "mask_rejections")
INFO_WINDOW = 256  # env steps per runner that the logged rank metrics average over


def runner_device(requested: str) -> str:
    """``"auto"`` in a Ray process: the GPU Ray assigned (the only one it sees, so ``"cuda"``), else the CPU."""
    import ray

    if requested != "auto":
        return requested
    return "cuda" if ray.get_gpu_ids() else "cpu"


def make_rllib_env(context: Mapping[str, Any]) -> DRRLAttentionVecEnv:
    """RLlib's vector env creator (``gym_env_vectorize_mode="vector_entry_point"``): the calling env runner's
    ``num_envs`` envs as one :class:`DRRLAttentionVecEnv` (one batched forward per step) with NEXT_STEP autoreset,
    the layout RLlib's ``SingleAgentEnvRunner`` records episodes in (``drrl_gym.vector`` says why SAME_STEP would
    not do).

    ``context`` is RLlib's env config (the ``env_kwargs``) with ``num_envs`` added. The model is loaded once per
    process (``drrl_gym.resources``), so each env runner holds exactly one model, on its own device.
    """
    kwargs = {**context, "device": runner_device(context.get("device", "auto"))}
    num_envs = kwargs.pop("num_envs", 1)
    env = DRRLAttentionVecEnv(num_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP, **kwargs)
    print(f"env runner (pid {os.getpid()}): {num_envs} x {ENV_ID} batched, with {kwargs.get('model', EnvConfig.model)} "
          f"on {env.batch.backbone.device} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
          flush=True)
    return env


def log_rank_metrics(*, episode: Any, metrics_logger: Any, **_: Any) -> None:
    """``on_episode_step`` callback: the env's rank info of each step as env-runner metrics ``drrl/<key>``."""
    info = episode.get_infos(-1)
    for key in INFO_METRICS:
        if key in info:
            metrics_logger.log_value(("drrl", key), float(np.mean(info[key])), window=INFO_WINDOW)
