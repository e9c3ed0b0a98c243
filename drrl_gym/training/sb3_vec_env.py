"""The batched ``DRRL-Attention-v0`` vector env as a Stable-Baselines3 ``VecEnv`` (one forward per step for all envs).

Lives here rather than beside :class:`drrl_gym.vector.DRRLAttentionVecEnv` because it needs SB3, which the core
package does not depend on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from drrl_gym import DRRLAttentionVecEnv
from drrl_gym.episode_view import info_row


class DRRLAttentionSB3VecEnv(VecEnv):
    """A :class:`drrl_gym.vector.DRRLAttentionVecEnv` as a Stable-Baselines3 ``VecEnv`` (batched: one forward per step).

    ``DRRLAttentionSB3VecEnv(DRRLAttentionVecEnv(num_envs=N, **kwargs))`` or ``DRRLAttentionSB3VecEnv.make(N,
    **kwargs)``. As SB3's ``DummyVecEnv``: a finished episode is reset inside the same ``step_wait``, with its last
    observation in ``info["terminal_observation"]`` (here all envs finish together); ``seed(s)`` seeds env i with
    s + i at the next ``reset``; ``env_method("action_masks")`` gives each env's mask (what MaskablePPO asks for).
    Attributes are shared by all envs, so ``set_attr`` sets one for all of them or fails.
    """

    def __init__(self, venv: DRRLAttentionVecEnv) -> None:
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    @classmethod
    def make(cls, num_envs: int, **kwargs: Any) -> DRRLAttentionSB3VecEnv:
        return cls(DRRLAttentionVecEnv(num_envs, **kwargs))

    def reset(self) -> VecEnvObs:
        options = {"sequence_index": [o.get("sequence_index") for o in self._options]}
        observation, info = self.venv.reset(seed=list(self._seeds), options=options)
        self.reset_infos = [info_row(info, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return observation

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async(). Fix: call step(actions), or step_async first.")
        observation, reward, terminated, truncated, info = self.venv.step(self._actions)
        self._actions = None
        rows = range(self.num_envs)
        if not terminated.any():
            infos = [self._sb3_info(info, i) for i in rows]
        else:  # all envs ended together and were reset in the same step
            self.reset_infos = [info_row(info, i) for i in rows]  # the new episodes' reset infos
            final = info["final_info"]
            infos = [{**self._sb3_info(final, i), "terminal_observation": info["final_obs"][i]} for i in rows]
        return observation, reward.astype(np.float32), terminated | truncated, infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        values = self.venv.get_attr(attr_name)
        return [values[i] for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if sorted(self._get_indices(indices)) != list(range(self.num_envs)):
            raise ValueError(f"set_attr({attr_name!r}) for some envs only: the envs of a batch share their attributes. "
                             "Fix: set it for all envs (indices=None).")
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        values = self.venv.call(method_name, *method_args, **method_kwargs)
        return [values[i] for i in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]  # the sub-envs are rows of a batch: nothing wraps them

    def __getattr__(self, name: str) -> Any:
        # unit_shape, n_units, controller, config, ...: the batched env's, as VecEnvWrapper forwards them.
        if name == "venv":  # not set yet (during __init__): avoid recursing
            raise AttributeError(name)
        return getattr(self.venv, name)

    @staticmethod
    def _sb3_info(info: dict[str, Any], row: int) -> dict[str, Any]:
        return {**info_row(info, row), "TimeLimit.truncated": False}  # episodes end naturally, never by a time limit
