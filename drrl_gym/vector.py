"""``DRRL-Attention-v0`` as a vector env: N episodes as one batch through the frozen model.

RL needs millions of steps, and N single envs cost N forward passes per step, each too small to fill a GPU. Here
the N episodes are the rows of one :class:`drrl_gym.env.EpisodeBatch` (the same step path as the single env,
which is the batch of one), so a step is one batched forward.

* :class:`DRRLAttentionVecEnv`: a ``gymnasium.vector.VectorEnv``, built by
  ``gymnasium.make_vec("DRRL-Attention-v0", num_envs=N, vectorization_mode="vector_entry_point", **kwargs)``.
* :class:`DRRLAttentionSB3VecEnv`: the same env as a Stable-Baselines3 ``VecEnv`` (for PPO, MaskablePPO).

Equivalence: sub-env i behaves as a single env reset with seed ``seed + i`` (as gymnasium's and SB3's vector envs
seed their sub-envs) and given the same actions: same sequences, masks, projections and ranks (exactly), same
observations, rewards and infos up to float rounding (~1e-6 in fp32: a batched forward sums in another order).

Lockstep: every episode has n_segments - 1 steps, so all N terminate on the same step. Autoreset is SAME_STEP (as
SB3 expects): that step returns the first observation of N new episodes, each sequence drawn from its sub-env's own
RNG, and the last observations in the info (gymnasium: ``final_obs``/``final_info``; SB3:
``terminal_observation`` per env).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from drrl_gym.backbone import Backbone
from drrl_gym.env import BatchAttributes, EpisodeBatch, check_reset_options, config_for, info_row

# Batched values with one row per sub-env: ``call``/``get_attr`` hand sub-env i its row. Anything else is shared.
PER_ENV = frozenset({"action_masks", "transition_bounds", "probe_layer_fidelity"})


def _vector_info(info: dict[str, np.ndarray]) -> dict[str, Any]:
    """Gymnasium's vector-info layout: each key's per-env array plus a "_key" mask (every env has every key)."""
    masks = {f"_{key}": np.ones(len(value), dtype=bool) for key, value in info.items()}
    return {**info, **masks}


class DRRLAttentionVecEnv(BatchAttributes, VectorEnv):
    """``num_envs`` episodes of ``DRRL-Attention-v0`` stepped as one batch (see the module docstring).

    Arguments are those of :class:`drrl_gym.env.DRRLAttentionEnv` (``num_envs`` aside); ``render_mode`` is not
    supported (render a single env). Spaces: ``single_observation_space``/``single_action_space`` are one env's,
    ``observation_space`` (num_envs, n_tokens * n_features) and ``action_space`` MultiDiscrete (num_envs, n_tokens).
    ``action_masks()`` returns (num_envs, n_tokens * n_choices); ``transition_bounds`` (num_envs, n_tokens,
    n_choices); ``probe_layer_fidelity(candidates)`` (num_envs, K, n_tokens). ``call(name)`` and ``get_attr(name)``
    return one value per sub-env, as gymnasium's ``SyncVectorEnv`` does.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int, backbone: Backbone | None = None, **kwargs: Any) -> None:
        if kwargs.get("render_mode") is not None:
            raise ValueError(f"render_mode={kwargs['render_mode']!r}: the vector env does not render. Fix: pass "
                             "render_mode=None, or render a single DRRLAttentionEnv.")
        kwargs.pop("render_mode", None)
        self.batch = EpisodeBatch(config_for(backbone, kwargs), num_envs, backbone)
        self.num_envs = self.batch.batch_size
        self.single_observation_space = self.batch.observation_space()
        self.single_action_space = self.batch.action_space()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.render_mode = None
        self._rngs: list[np.random.Generator | None] = [None] * self.num_envs

    # ------------------------------------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start N new episodes. ``seed``: an int (sub-env i gets seed + i), one seed (or None) per sub-env, or
        None (keep each sub-env's RNG going). ``options={"sequence_index": [i_0, ..., i_{N-1}]}`` (entries may be
        None) picks train sequences."""
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"seed={seed!r}: {len(seeds)} seeds for {self.num_envs} envs. Fix: pass an int, None or "
                             "one seed per env.")
        for i, env_seed in enumerate(seeds):
            if env_seed is not None or self._rngs[i] is None:
                self._rngs[i] = seeding.np_random(env_seed)[0]
        requested = check_reset_options(options).get("sequence_index")
        if requested is not None and (isinstance(requested, (str, bytes)) or not hasattr(requested, "__len__")
                                      or len(requested) != self.num_envs):
            raise ValueError(f"options['sequence_index']={requested!r}: the vector env needs one entry (an index or "
                             f"None) per env. Fix: pass a list of {self.num_envs} entries.")
        requested = [None] * self.num_envs if requested is None else list(requested)
        return self._reset(requested)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        self.batch.require_running("step()")
        requested = self.batch.check_indices(actions, (self.num_envs, self.n_tokens), "actions must be (num_envs="
                                             f"{self.num_envs}, n_tokens={self.n_tokens}) integer indices",
                                             "sample from env.action_space")
        result = self.batch.step(requested)
        observation, info = self._flat(result.observation), _vector_info(result.info)
        terminated = np.full(self.num_envs, result.terminated)
        if result.terminated:  # same-step autoreset, as SyncVectorEnv's SAME_STEP mode lays it out
            final_obs = np.empty(self.num_envs, dtype=object)  # gymnasium's layout: one array per env
            for i, row in enumerate(observation):
                final_obs[i] = row
            final = {"final_obs": final_obs, "final_info": info}
            observation, info = self._reset([None] * self.num_envs)
            info = {**info, **final, "_final_obs": terminated.copy(), "_final_info": terminated.copy()}
        return observation, result.reward.copy(), terminated, np.zeros(self.num_envs, dtype=bool), info

    def action_masks(self) -> np.ndarray:
        """(num_envs, n_tokens * n_choices) bool: row i is sub-env i's MaskablePPO mask."""
        return self.batch.allowed().reshape(self.num_envs, -1)

    @property
    def transition_bounds(self) -> np.ndarray:
        """(num_envs, n_tokens, n_choices) normalised bounds from each token's r_{t-1} to every choice."""
        return self.batch.transition_bounds()

    def probe_layer_fidelity(self, candidates: np.ndarray) -> np.ndarray:
        """(K, n_tokens) candidates -> (num_envs, K, n_tokens): ``DRRLAttentionEnv.probe_layer_fidelity`` per env."""
        return self.batch.probe_layer_fidelity(candidates)

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """``name`` called (or read, if not callable) for every sub-env: its row if batched, else the shared value."""
        value = getattr(self, name)
        return self._per_env(name, value(*args, **kwargs) if callable(value) else value)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """Attribute ``name`` of every sub-env (methods are returned, not called)."""
        return self._per_env(name, getattr(self, name))

    def close_extras(self, **kwargs: Any) -> None:
        self.batch.close()

    # ------------------------------------------------------------------------------------------ internals
    def _reset(self, requested: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
        indices = self.batch.sequence_indices(self._rngs, requested)
        observation, info = self.batch.reset(indices)
        return self._flat(observation), _vector_info(info)

    def _flat(self, observation: np.ndarray) -> np.ndarray:
        return observation.reshape(self.num_envs, -1)

    def _per_env(self, name: str, value: Any) -> tuple[Any, ...]:
        if name in PER_ENV and not callable(value):
            return tuple(value)
        return (value,) * self.num_envs


class DRRLAttentionSB3VecEnv(VecEnv):
    """A :class:`DRRLAttentionVecEnv` as a Stable-Baselines3 ``VecEnv`` (batched: one forward per step).

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
    def make(cls, num_envs: int, **kwargs: Any) -> "DRRLAttentionSB3VecEnv":
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
        # token_shape, n_tokens, controller, config, ...: the batched env's, as VecEnvWrapper forwards them.
        if name == "venv":  # not set yet (during __init__): avoid recursing
            raise AttributeError(name)
        return getattr(self.venv, name)

    @staticmethod
    def _sb3_info(info: dict[str, Any], row: int) -> dict[str, Any]:
        return {**info_row(info, row), "TimeLimit.truncated": False}  # episodes end naturally, never by a time limit
