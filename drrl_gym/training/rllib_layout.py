"""How ``agents/train_rllib.py --gpus N`` lays RLlib PPO out on one node's GPUs: env runners spread evenly, each
with its own frozen model, and the learner on a slice of one of them. Pure arithmetic (no Ray): it turns the layout
into the ``rllib.*`` resource settings, which the run records in its config.yaml like any others.

Layout ``GpuLayout(num_gpus=G, env_runners_per_gpu=k, learner_gpu_fraction=f)``:

* G * k env runners, each asking Ray for (1 - f) / k of a GPU (rounded down to Ray's 1e-4 resource unit). Each
  runner process loads its own frozen model (``drrl_gym.training.rllib_env``), so with k = 1 it is one model per
  GPU, and its ``num_envs_per_env_runner`` envs step as one batch on it (``DRRLAttentionVecEnv``: one forward per
  step);
* one learner actor asking for f of a GPU (the policy network is small: a slice is enough).

Why the shares pack as intended: Ray gives a fractional GPU request a GPU with that much left. k + 1 runners need
(k + 1)(1 - f) / k of a GPU, more than 1 when f < 1 / (k + 1) (checked below), so no GPU takes more than k runners;
G * k runners on G GPUs then means exactly k on each, leaving f on every GPU, where the learner fits. Ray places
them in whatever order; the argument holds for any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drrl_gym.training.config import ConfigError

RAY_RESOURCE_UNIT = 1e-4  # Ray accounts fractional resources in multiples of this


@dataclass(frozen=True)
class GpuLayout:
    """G GPUs of one node: k env runners on each, the learner on a fraction f of one (see the module docstring)."""

    num_gpus: int
    env_runners_per_gpu: int = 1
    learner_gpu_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.num_gpus, int) and self.num_gpus >= 1):
            raise ConfigError(f"--gpus {self.num_gpus!r}: the layout needs at least one GPU. Fix: pass --gpus N >= 1, "
                              "or drop --gpus and set --num-env-runners (CPU runners).")
        if not (isinstance(self.env_runners_per_gpu, int) and self.env_runners_per_gpu >= 1):
            raise ConfigError(f"--env-runners-per-gpu {self.env_runners_per_gpu!r}: must be an int >= 1. Fix: pass 1 "
                              "(one model per GPU) or more.")
        limit = 1 / (self.env_runners_per_gpu + 1)
        fraction = self.learner_gpu_fraction
        # The last clause is the exact condition (k + 1 runner shares exceed one GPU), after rounding the shares.
        if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and RAY_RESOURCE_UNIT <= fraction < limit
                and (self.env_runners_per_gpu + 1) * self.gpus_per_env_runner > 1):
            raise ConfigError(f"--learner-gpu-fraction {self.learner_gpu_fraction!r}: must be in [1e-4, "
                              f"1/(env runners per GPU + 1) = {limit:.4g}), or a GPU could take one runner too many "
                              f"and another none. Fix: pass e.g. {limit / 2:.3g}.")

    @property
    def num_env_runners(self) -> int:
        return self.num_gpus * self.env_runners_per_gpu

    @property
    def gpus_per_env_runner(self) -> float:
        """(1 - f) / k, rounded down to Ray's unit so that k of them and the learner never exceed one GPU."""
        share = (1 - self.learner_gpu_fraction) / self.env_runners_per_gpu
        return math.floor(round(share / RAY_RESOURCE_UNIT, 6)) * RAY_RESOURCE_UNIT

    def rllib_settings(self) -> dict[str, float | int]:
        """The ``rllib.*`` resource settings of this layout (each one a key of ``RLlibConfig``)."""
        return {"num_env_runners": self.num_env_runners, "num_gpus_per_env_runner": self.gpus_per_env_runner,
                "num_learners": 1, "num_gpus_per_learner": self.learner_gpu_fraction}

    def expected_packing(self) -> list[float]:
        """The GPU share used on each GPU once Ray has placed everything (learner counted on GPU 0; on whichever
        GPU Ray puts it, the per-GPU totals are these up to order)."""
        used = [self.env_runners_per_gpu * self.gpus_per_env_runner] * self.num_gpus
        used[0] += self.learner_gpu_fraction
        return used
