"""``DRRL-Attention-v0``: choose the attention rank of every layer of a frozen causal LM, segment by segment."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from drrl_gym.backbone import Backbone
from drrl_gym.config import EnvConfig, fail
from drrl_gym.episode import EpisodeBatch
from drrl_gym.episode_view import EpisodeBatchView, check_reset_options, info_row
from drrl_gym.render import rank_heatmap, render_text


class DRRLAttentionEnv(EpisodeBatchView, gym.Env[np.ndarray, np.ndarray]):
    """Dynamic-rank attention on a frozen causal LM (DR-RL): one rank decision per segment of tokens.

    ## Description
    An episode is one train sequence of ``seq_len`` tokens, fed to the frozen model in ``n_segments = seq_len //
    segment_len`` segments through a KV cache, so segment t attends to all ``(t+1) * segment_len`` tokens so far.
    Segment 0 is a warm-up at full rank. At step t (t = 1 .. n_segments-1) the agent picks, for every decision unit
    (a layer, or a (layer, KV head) pair), the rank r of that attention's scores S_r = (Q P_r)(K P_r)^T / sqrt(d)
    in an orthonormal basis P (``drrl_gym.lowrank``); with ``attention="select"`` it picks a (rank, keep) pair
    instead: rank-r scores choose ``keep`` of the visible keys, exact attention computes them (docs/selection.md). Segment t runs at those ranks in the agent's trajectory (its
    own KV cache, so truncations compound) and is compared with a full-rank reference trajectory, computed once per
    train sequence and kept (``reference_cache_gib``). The model's weights never change. ``gymnasium.make_vec`` gives the same env as N rows of one batched
    forward (``drrl_gym.vector``).

    ## Action Space
    ``MultiDiscrete([n_choices] * n_units)``: an index into ``rank_choices`` per unit (selection mode: into the
    (rank, keep) pairs of ``env.unwrapped.decisions.settings``). ``n_units`` is
    ``num_layers`` (``granularity="layer"``) or ``num_layers * num_kv_heads`` (``"kv_head"``, layer-major).
    ``action_masks()`` (MaskablePPO's name) allows choice i of a unit iff the normalised bound from full rank
    b(d -> r_i) <= epsilon_t; the largest choice is always allowed. Disallowed sub-actions are projected to the
    nearest allowed rank (ties: the larger) and reported in ``info``. What the mask certifies, and what it does not
    at the default epsilon: docs/accounting.md.

    ## Observation Space
    ``Box(0, 1, (n_units * n_features,), float32)``, n_features = 8 + 6 * len(rank_choices): the row-major
    flattening of a (units, features) matrix, ``obs.reshape(env.unwrapped.unit_shape)``, built from the last
    segment's statistics: activation scales, stable ranks, NER and tail energies per rank choice, bounds to full
    rank and from the previous rank, the previous rank, position, layer and KV head. Columns: docs/env.md.

    ## Rewards
    ``R_t = fidelity_weight * fidelity_t - cost_weight * flops_cost_t - perturbation_weight * perturbation_t``
    (``drrl_gym.reward.FidelityMinusCost``): fidelity of segment t against the reference by ``fidelity``
    (``"attention_cosine"``, ``"kl"`` or ``"hidden_cosine"``; 1 when nothing was truncated), the QK^T FLOPs at the
    chosen ranks over those at full rank (counted; executed and counted cost: docs/accounting.md), and the mean bound of
    the switch from the previous ranks.

    ## Starting State
    ``reset`` draws a train sequence with the env's ``np_random`` (or takes ``options={"sequence_index": i}``),
    runs segment 0 at full rank and observes it; the previous rank is the largest choice.

    ## Episode End
    ``terminated=True`` after the last segment: an episode has exactly n_segments - 1 steps. ``truncated`` is always
    False (add a ``TimeLimit`` wrapper for shorter horizons).

    ## Info
    Every step: ``segment``, ``fidelity``, ``flops_cost``, ``perturbation``, ``reward`` (the reward's components),
    ``ranks`` (per unit), ``rank_fraction`` (mean r / d), ``flops_saved_scores`` and ``flops_saved_attention``
    (counted; the whole attention includes the basis and statistics overhead, so it is negative at full rank), the
    same two with ``_executed`` (what this env's forward ran), ``mask_rejections``, ``projected`` (per unit),
    ``epsilon`` and ``sequence_index``. ``reset`` returns ``segment``, ``epsilon`` and ``sequence_index``.

    ## Arguments
    ``gymnasium.make("DRRL-Attention-v0", **kwargs)``, all optional, validated by :class:`~drrl_gym.config.EnvConfig`:

    * model="smollm2-135m" (embedded, offline; or "tiny-random-llama"/"tiny-random-gpt2", a local directory, a hub
      name); corpus="shakespeare" (or "shakespeare-plays", "britannica-1911", a .txt file or directory, a hub
      dataset); calibration_sequences=8 and eval_sequences=16 are held out of the train split.
    * seq_len=1024, segment_len=128 (seq_len a multiple of segment_len, >= 2 segments).
    * rank_choices=(16, 32, 48, 64): strictly increasing, within [1, head_dim]; granularity="layer" or "kv_head".
    * fidelity_weight=1.0, cost_weight=0.15, perturbation_weight=0.01, fidelity="attention_cosine";
      reward="fidelity_minus_cost" or "kl_budget" (-KL - budget_penalty * max(0, cost - cost_budget); cost_budget=0.75,
      budget_penalty=2.0; docs/env.md).
    * attention="lowrank_scores" or "select"; keep_choices=(0.0625, 0.125, 0.25, 1.0): the kept fractions of
      selection mode (a choice is then a (rank, keep) pair; the mask, perturbation and cost are selection's);
      bound_queries=None: in selection mode, take the mask's bound over the last m queries of a segment (None: 32, or
      the whole of a shorter segment; pass segment_len for every query; docs/env.md); bound_source="agent": whose
      bound table the mask and observation read, the agent's own forward's (each step) or, with "reference", the
      full-rank reference's of the same segment (computed once per train sequence and cached: a faster step).
    * epsilon_start=epsilon_end=None (4.0 for low-rank scores, 0.25 for selection), epsilon_anneal_steps=0: the
      mask threshold, linear over env steps (counted over the env's lifetime); math.inf turns the mask off.
    * basis="calibrated" (fixed, cached on disk) or "exact" (per-segment eigenbasis, for comparison).
    * device="auto", dtype=None (bf16 on CUDA, fp32 on CPU); cuda_graphs=True (replay each segment's step as a
      CUDA graph on a GPU; same results up to rounding); compile=False: torch.compile the step (about 2x faster on
      an H200 in low-rank mode, after a one-time compilation in the first episode; docs/env.md);
      reference_cache_gib=8.0: memory for the warm-ups and full-rank references kept per train sequence across
      episodes, so a reset of a seen sequence runs no forward (0 disables; docs/env.md, "Reference cache").
    * render_mode: "ansi" (text) or "rgb_array" (rank heatmap). backbone: an already loaded
      :class:`~drrl_gym.backbone.Backbone` to share (envs built by name share one per model, device and dtype).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, backbone: Backbone | None = None, **kwargs: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            fail("render_mode", render_mode, "unsupported render mode",
                 f"choose None or one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.batch = EpisodeBatch(EnvConfig.from_kwargs(kwargs, backbone), 1, backbone)
        self.observation_space, self.action_space = self.batch.observation_space(), self.batch.action_space()
        self._last_info: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        options = check_reset_options(options)
        super().reset(seed=seed)
        indices = self.batch.sequence_indices([self.np_random], [options.get("sequence_index")])
        observation, info = self.batch.reset(indices)
        self._last_info = {}
        return observation[0].reshape(-1), info_row(info, 0)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.batch.require_running("step()")
        requested = self.batch.check_indices(action, (self.n_units,), f"action must be {self.n_units} integer "
                                             "indices", "sample from env.action_space")
        result = self.batch.step(requested[None])
        self._last_info = info_row(result.info, 0)
        observation, reward = result.observation[0].reshape(-1), float(result.reward[0])
        return observation, reward, result.terminated, False, dict(self._last_info)

    def action_masks(self) -> np.ndarray:
        """Flat bool mask (n_units * len(rank_choices),): block i says which choices unit i may take now."""
        return self.batch.allowed()[0].reshape(-1)

    @property
    def transition_bounds(self) -> np.ndarray:
        """(n_units, len(rank_choices)) normalised bounds from each unit's r_{t-1} to every choice (unclipped)."""
        return self.batch.transition_bounds()[0]

    @property
    def full_rank_bounds(self) -> np.ndarray:
        """(n_units, len(rank_choices)) normalised bounds from full rank to every choice: what the mask compares."""
        return self.batch.full_rank_bounds()[0]

    def probe_layer_fidelity(self, candidates: np.ndarray) -> np.ndarray:
        """What-if: the attention-output cosine per unit if the current segment ran at each candidate action.

        ``candidates``: (K, n_units) choice indices, applied as given (no mask, no projection). The segment runs,
        batched over the candidates, on copies of the agent's cache and is compared with the full-rank reference;
        the episode does not advance. Returns (K, n_units): a unit's cosine averaged over the segment's tokens and
        its query heads (what ``"attention_cosine"`` averages). With another fidelity metric the first probe of an
        episode reruns the reference once, recording attention outputs.
        """
        return self.batch.probe_layer_fidelity(candidates)[0]

    def render(self) -> str | np.ndarray | None:
        episode, d, n_segments = self.batch.episode, self.geometry.head_dim, self.config.n_segments
        if self.render_mode == "ansi":
            index = None if episode is None else int(episode.sequence_index[0])
            return render_text(self._last_info, self.batch.segment, n_segments, d, index)
        if self.render_mode == "rgb_array":
            return rank_heatmap(None if episode is None else episode.rank_history[0], d, self.n_units, n_segments)
        return None

    def close(self) -> None:
        self.batch.close()
