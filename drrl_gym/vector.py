"""``DRRL-Attention-v0`` as a vector env: N episodes as one batch through the frozen model.

RL needs millions of steps, and N single envs cost N forward passes per step, each too small to fill a GPU. Here
the N episodes are the rows of one :class:`drrl_gym.episode.EpisodeBatch` (the same step path as the single env,
which is the batch of one), so a step is one batched forward.

:class:`DRRLAttentionVecEnv` is a ``gymnasium.vector.VectorEnv``, built by
``gymnasium.make_vec("DRRL-Attention-v0", num_envs=N, vectorization_mode="vector_entry_point", **kwargs)``. The same
env as a Stable-Baselines3 ``VecEnv`` is ``drrl_gym.training.sb3_vec_env.DRRLAttentionSB3VecEnv`` (``train`` extra).

Equivalence: sub-env i behaves as a single env reset with seed ``seed + i`` (as gymnasium's and SB3's vector envs
seed their sub-envs) and given the same actions: same sequences, masks, projections and ranks (exactly), same
observations, rewards and infos up to float rounding (~1e-6 in fp32: a batched forward sums in another order).

Lockstep: every episode has n_segments - 1 steps, so all N terminate on the same step. Autoreset, gymnasium's two
modes (``autoreset_mode=``, also a keyword of ``make_vec(..., vectorization_mode="vector_entry_point")``):

* SAME_STEP (the default, as SB3 expects): the terminal step returns the first observation of N new episodes, each
  sequence drawn from its sub-env's own RNG, and the last observations in the info (gymnasium: ``final_obs`` and
  ``final_info``; SB3: ``terminal_observation`` per env);
* NEXT_STEP (what RLlib's ``SingleAgentEnvRunner`` expects, as gymnasium's ``SyncVectorEnv`` does by default): the
  terminal step returns the last observations; the next ``step`` ignores its actions and returns the first
  observations of N new episodes with reward 0, not terminated, not truncated, and the reset info. With SAME_STEP
  RLlib would store a new episode's first observation as the old one's last and start the new episode one step
  late (its first action and reward lost).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from drrl_gym.backbone import Backbone
from drrl_gym.config import EnvConfig
from drrl_gym.episode import EpisodeBatch
from drrl_gym.episode_view import EpisodeBatchView, check_reset_options

# Batched values with one row per sub-env: ``call``/``get_attr`` hand sub-env i its row. Anything else is shared.
PER_ENV = frozenset({"action_masks", "transition_bounds", "full_rank_bounds", "probe_layer_fidelity"})


def _vector_info(info: dict[str, np.ndarray]) -> dict[str, Any]:
    """Gymnasium's vector-info layout: each key's per-env array plus a "_key" mask (every env has every key)."""
    masks = {f"_{key}": np.ones(len(value), dtype=bool) for key, value in info.items()}
    return {**info, **masks}


class DRRLAttentionVecEnv(EpisodeBatchView, VectorEnv):
    """``num_envs`` episodes of ``DRRL-Attention-v0`` stepped as one batch (see the module docstring).

    Arguments are those of :class:`drrl_gym.env.DRRLAttentionEnv` (``num_envs`` aside); ``render_mode`` is not
    supported (render a single env). Spaces: ``single_observation_space``/``single_action_space`` are one env's,
    ``observation_space`` (num_envs, n_units * n_features) and ``action_space`` MultiDiscrete (num_envs, n_units).
    ``action_masks()`` returns (num_envs, n_units * n_choices); ``transition_bounds`` (num_envs, n_units,
    n_choices); ``probe_layer_fidelity(candidates)`` (num_envs, K, n_units). ``call(name)`` and ``get_attr(name)``
    return one value per sub-env, as gymnasium's ``SyncVectorEnv`` does.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}  # this instance's: self.metadata

    def __init__(self, num_envs: int, backbone: Backbone | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP, **kwargs: Any) -> None:
        modes = {mode.value: mode for mode in (AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP)}
        if getattr(autoreset_mode, "value", autoreset_mode) not in modes:
            raise ValueError(f"autoreset_mode={autoreset_mode!r}: not supported (every episode ends on the same step, "
                             f"so only {list(modes)} apply). Fix: pass AutoresetMode.SAME_STEP or NEXT_STEP.")
        self.metadata = {**self.metadata, "autoreset_mode": AutoresetMode(autoreset_mode)}
        self._reset_pending = False  # NEXT_STEP: the episodes ended and the next step() starts new ones
        if kwargs.get("render_mode") is not None:
            raise ValueError(f"render_mode={kwargs['render_mode']!r}: the vector env does not render. Fix: pass "
                             "render_mode=None, or render a single DRRLAttentionEnv.")
        kwargs.pop("render_mode", None)
        self.batch = EpisodeBatch(EnvConfig.from_kwargs(kwargs, backbone), num_envs, backbone)
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
        self._reset_pending = False
        return self._reset(requested)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        not_done = np.zeros(self.num_envs, dtype=bool)
        if self._reset_pending:  # NEXT_STEP autoreset: this step only starts the new episodes
            self._reset_pending = False
            observation, info = self._reset([None] * self.num_envs)
            return observation, np.zeros(self.num_envs), not_done, not_done.copy(), info
        self.batch.require_running("step()")
        requested = self.batch.check_indices(actions, (self.num_envs, self.n_units), "actions must be (num_envs="
                                             f"{self.num_envs}, n_units={self.n_units}) integer indices",
                                             "sample from env.action_space")
        result = self.batch.step(requested)
        observation, info = self._flat(result.observation), _vector_info(result.info)
        terminated = np.full(self.num_envs, result.terminated)
        if result.terminated and self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:
            self._reset_pending = True
        elif result.terminated:  # same-step autoreset, as SyncVectorEnv's SAME_STEP mode lays it out
            final_obs = np.empty(self.num_envs, dtype=object)  # gymnasium's layout: one array per env
            for i, row in enumerate(observation):
                final_obs[i] = row
            final = {"final_obs": final_obs, "final_info": info}
            observation, info = self._reset([None] * self.num_envs)
            info = {**info, **final, "_final_obs": terminated.copy(), "_final_info": terminated.copy()}
        return observation, result.reward.copy(), terminated, not_done, info

    def action_masks(self) -> np.ndarray:
        """(num_envs, n_units * n_choices) bool: row i is sub-env i's MaskablePPO mask."""
        return self.batch.allowed().reshape(self.num_envs, -1)

    @property
    def transition_bounds(self) -> np.ndarray:
        """(num_envs, n_units, n_choices) normalised bounds from each unit's r_{t-1} to every choice."""
        return self.batch.transition_bounds()

    @property
    def full_rank_bounds(self) -> np.ndarray:
        """(num_envs, n_units, n_choices) normalised bounds from full rank to every choice: what the mask compares."""
        return self.batch.full_rank_bounds()

    def probe_layer_fidelity(self, candidates: np.ndarray) -> np.ndarray:
        """(K, n_units) candidates -> (num_envs, K, n_units): ``DRRLAttentionEnv.probe_layer_fidelity`` per env."""
        return self.batch.probe_layer_fidelity(candidates)

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """``name`` called (or read, if not callable) for every sub-env: its row if batched, else the shared value."""
        value = getattr(self, name)
        return self._per_env(name, value(*args, **kwargs) if callable(value) else value)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """Attribute ``name`` of every sub-env (methods are returned, not called)."""
        return self._per_env(name, getattr(self, name))

    def close_extras(self, **kwargs: Any) -> None:
        if hasattr(self, "batch"):  # not when __init__ refused its arguments (gymnasium closes on __del__)
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
