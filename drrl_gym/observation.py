"""The decision space of the rank decisions, without a model: observation, safety mask, projection, rank layout.

A *decision unit* is what one sub-action sets: a layer (``granularity="layer"``) or a (layer, KV head) pair.
:class:`DecisionSpace` turns a segment's statistics (``SegmentStats``) and the previous choices into the
observation matrix (units x features) and the bounds, says which rank choices the safety mask allows, projects
disallowed choices and lays choices out as the (B, num_layers, num_kv_heads) ranks ``DynamicRankAttention`` takes.
It decides nothing: policies (``drrl_gym.policies``) decide. The environment and an exported dynamic-rank model
both use it, so a deployed policy sees exactly what it was trained on. Everything is batched over sequences (B);
the features are documented in docs/env.md.

Normalised bound b (``drrl_gym.bounds``, docs/bounds.md): ``attention_change_bound`` bounds ||A_r - A_r'||_F
summed over the G query heads of a KV head and T queries; dividing by sqrt(G * T) makes it an RMS per query row.
A layer unit combines its KV heads in quadrature: sqrt(sum_g b_g^2) / sqrt(H * T). No softmax row can move by more
than sqrt(2) in this norm, so only a threshold below sqrt(2) certifies anything (docs/accounting.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from drrl_gym.backbone import AttentionGeometry
from drrl_gym.bounds import attention_change_bound
from drrl_gym.lowrank import SegmentStats
from drrl_gym.spectra import energies, normalized_energy_ratio, stable_rank, tail_energy

GRANULARITIES = ("layer", "kv_head")
# Feature groups (docs/env.md, "Observation"): the columns a config may select, for ablations. The default is the
# observation every earlier release had; "attention" and "attention_change" are cheap by-products of the step
# (drrl_gym.attention_signals on its last SIGNAL_QUERIES queries).
FEATURE_GROUPS = ("spectra", "bounds", "context", "attention", "attention_change")
DEFAULT_FEATURE_GROUPS = ("spectra", "bounds", "context")
SIGNAL_QUERIES = 8

# Per-token observation features, in column order. A name ending in "@r" stands for one column per rank choice
# (named e.g. "query_ner@32"); observation_feature_names() expands them.
OBSERVATION_FEATURES = (
    "query_log_energy",
    "key_log_energy",
    "query_stable_rank",
    "key_stable_rank",
    "query_ner@r",
    "key_ner@r",
    "query_log_tail@r",
    "key_log_tail@r",
    "bound_to_full@r",
    "transition_bound@r",
    "prev_rank_fraction",
    "position",
    "layer_fraction",
    "kv_head_fraction",
)
# Every feature is mapped into [0, 1]. Energies and bounds span orders of magnitude, so they enter as
# log1p(x) / scale: e^12 ~ 1.6e5 is far above the mean squared norm of a post-RoPE query or key of the models we
# ship (SmolLM2: ~1e2 to 4e2), and e^4 - 1 ~ 53 above the normalised bounds seen on SmolLM2 (up to ~18).
LOG_ENERGY_SCALE = 12.0
LOG_BOUND_SCALE = 4.0
# Which group each feature stem belongs to (selection-only stems included).
_FEATURE_GROUP = {
    **dict.fromkeys(("query_log_energy", "key_log_energy", "query_stable_rank", "key_stable_rank", "query_ner",
                     "key_ner", "query_log_tail", "key_log_tail"), "spectra"),
    **dict.fromkeys(("bound_to_full", "transition_bound", "dropped_mass_bound"), "bounds"),
    **dict.fromkeys(("prev_rank_fraction", "position", "layer_fraction", "kv_head_fraction", "prev_keep"), "context"),
    **dict.fromkeys(("attention_entropy", "dropped_mass_estimate", "score_margin"), "attention"),
}


_Array = TypeVar("_Array", np.ndarray, torch.Tensor)


@dataclass
class StatsSummary:
    """What the observation needs from one segment's statistics, reduced on their device (see summarize)."""

    columns: torch.Tensor  # (B, n_units, 4 + 5 * n_ranks) float32: the features before transition_bound@r
    bound: torch.Tensor  # (B, n_units, m, m) float64 normalised bounds between the ranks (and full rank, last)
    selection: torch.Tensor | None = None  # selection mode: (B, n_units, n_choices) dropped-mass bound per setting
    # with signal groups: (B, n_units, 1 (+ 2 * n_choices in selection mode)) attention signals, mapped to [0, 1]
    signals: torch.Tensor | None = None


def observation_feature_names(rank_choices: tuple[int, ...],
                              settings: tuple[tuple[int, float], ...] | None = None,
                              feature_groups: tuple[str, ...] = DEFAULT_FEATURE_GROUPS) -> tuple[str, ...]:
    """Column names of the observation for these rank choices and feature groups.

    The default groups give 8 + 6 * len(rank_choices) features, plus in selection mode (``settings``: the
    (rank, keep) choices) one ``dropped_mass_bound@r/keep`` per choice and ``prev_keep``. "attention" adds
    ``attention_entropy`` and, in selection mode, ``dropped_mass_estimate@r/keep`` and ``score_margin@r/keep`` per
    choice; "attention_change" the same names ending in ``_change``."""
    return tuple(name for name, group in _all_columns(rank_choices, settings) if group in feature_groups)


def check_feature_groups(feature_groups: tuple[str, ...]) -> tuple[str, ...]:
    """``feature_groups`` as a tuple of known, distinct group names, or a ValueError saying the fix."""
    groups = (feature_groups,) if isinstance(feature_groups, str) else tuple(feature_groups)
    if not groups or any(g not in FEATURE_GROUPS for g in groups) or len(set(groups)) != len(groups):
        raise ValueError(f"observation_features={feature_groups!r}: must be distinct names of {FEATURE_GROUPS}. Fix: "
                         f"pass e.g. {DEFAULT_FEATURE_GROUPS} (the default) or {(*DEFAULT_FEATURE_GROUPS, 'attention')}.")
    return groups


def _all_columns(rank_choices: tuple[int, ...],
                 settings: tuple[tuple[int, float], ...] | None) -> list[tuple[str, str]]:
    """(name, group) of every column the observation computes, in order (before the groups select)."""
    names: list[str] = []
    for feature in OBSERVATION_FEATURES:
        stem, per_choice, _ = feature.partition("@")
        names.extend(f"{stem}@{r}" for r in rank_choices) if per_choice else names.append(feature)
    signals = ["attention_entropy"]
    if settings is not None:
        names.extend(f"dropped_mass_bound@{r}/{keep:g}" for r, keep in settings)
        names.append("prev_keep")
        signals += [f"{stem}@{r}/{keep:g}" for stem in ("dropped_mass_estimate", "score_margin") for r, keep in settings]
    columns = [(name, _FEATURE_GROUP[name.partition("@")[0]]) for name in names + signals]
    stem_change = [(f"{name.partition('@')[0]}_change" + "".join(name.partition("@")[1:]), "attention_change")
                   for name in signals]
    return columns + stem_change


def selection_settings(rank_choices: tuple[int, ...], keep_choices: tuple[float, ...],
                       head_dim: int) -> tuple[tuple[int, float], ...]:
    """Every (rank, keep < 1) pair, then (largest rank, 1.0), by decode traffic r / (2d) + keep (ties: the smaller
    rank first). Keeping every key is exact attention whatever the rank, so keep 1 appears once, last: the choice
    the mask always allows."""
    pairs = [(r, k) for r in rank_choices for k in keep_choices if k < 1]
    ordered = sorted(pairs, key=lambda s: (s[0] / (2 * head_dim) + s[1], s[0]))
    return (*ordered, (rank_choices[-1], 1.0))


class Observed(NamedTuple):
    """One observation of a batch: the matrices and the bounds the mask and the perturbation term read."""

    matrix: np.ndarray  # (B, n_units, n_features) float32 in [0, 1]
    # (B, n_units, n_choices). Low-rank scores: normalised bounds from each unit's previous rank (what the
    # perturbation term charges) and from full rank d (what the mask compares). Selection: both are each choice's
    # dropped-mass bound.
    transition: np.ndarray
    to_full: np.ndarray


class DecisionSpace:
    """Observation, mask, projection and rank layout for one model geometry and rank-choice set.

    Units are layers (``granularity="layer"``: all KV heads of a layer share its rank) or (layer, KV head)
    pairs, layer-major. With ``keep_choices=None`` (low-rank scores) a choice is a rank of ``rank_choices``; with
    ``keep_choices`` (selection mode) a choice is a (rank, keep) pair of :func:`selection_settings`, and the bounds
    the mask and the perturbation term read are each choice's dropped-mass bound. The initial previous choice is
    the last (the largest).
    """

    def __init__(
        self, geometry: AttentionGeometry, rank_choices: tuple[int, ...], granularity: str, segment_len: int,
        n_segments: int, keep_choices: tuple[float, ...] | None = None,
        feature_groups: tuple[str, ...] = DEFAULT_FEATURE_GROUPS, bound_queries: int | None = None,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}: unknown. Fix: choose one of {GRANULARITIES}.")
        self.geometry, self.rank_choices, self.granularity = geometry, tuple(rank_choices), granularity
        self.segment_len, self.n_segments = segment_len, n_segments
        self.bound_queries = bound_queries  # selection mode: last queries of a segment the bound is taken over
        self.per_layer = granularity == "layer"
        units_per_layer = 1 if self.per_layer else geometry.num_kv_heads
        self.kv_heads_per_unit = geometry.num_kv_heads // units_per_layer
        self.n_units = geometry.num_layers * units_per_layer
        d = geometry.head_dim
        self.selection = keep_choices is not None
        if self.selection:
            self.settings = selection_settings(self.rank_choices, tuple(keep_choices), d)
            self.keep_choices = tuple(keep_choices)
            # where each setting sits in the (rank, keep) grid the attention records bounds on
            self._grid_index = torch.tensor([self.rank_choices.index(r) * len(self.keep_choices)
                                             + self.keep_choices.index(k) for r, k in self.settings])
        else:
            self.settings = tuple((r, 1.0) for r in self.rank_choices)
        self.feature_groups = check_feature_groups(feature_groups)
        columns = _all_columns(self.rank_choices, self.settings if self.selection else None)
        self._columns = np.asarray([i for i, (_, group) in enumerate(columns) if group in self.feature_groups])
        self.feature_names = tuple(columns[i][0] for i in self._columns)
        # the attention signals are recorded only when a selected group reads them (they cost a little each step)
        self.signal_queries = SIGNAL_QUERIES if {"attention", "attention_change"} & set(self.feature_groups) else 0
        self.n_choices = len(self.settings)
        self.choice_ranks = np.asarray([r for r, _ in self.settings])
        self.choice_keeps = np.asarray([k for _, k in self.settings])
        # projection distance: rank value (low-rank scores) or decode traffic (selection)
        self.choice_costs = self.choice_ranks / (2 * d) + self.choice_keeps if self.selection else self.choice_ranks
        # Bounds are computed for the choices plus full rank d (the last index) when d is not a choice.
        self._bound_ranks = self.rank_choices if self.rank_choices[-1] == d else (*self.rank_choices, d)
        layer = np.repeat(np.arange(geometry.num_layers), units_per_layer) / max(geometry.num_layers - 1, 1)
        head = np.tile(np.arange(units_per_layer), geometry.num_layers) / max(units_per_layer - 1, 1)
        self._static = np.stack([layer, head], axis=1)  # (n_units, 2); a fraction is 0 where there is only one

    def observe(self, stats: SegmentStats, prev_index: np.ndarray, segment: int) -> Observed:
        """Observation (B, n_units, n_features) float32 in [0, 1] and the bounds (:class:`Observed`).

        ``stats``: the last segment's statistics; ``prev_index``: (B, n_units) choices applied to it; ``segment``:
        the index of the segment about to run (the position feature is segment / n_segments, clipped to 1).
        Equals ``observe_summary(summarize(stats), prev_index, segment)``.
        """
        return self.observe_summary(self.summarize(stats), prev_index, segment)

    def summarize(self, stats: SegmentStats) -> StatsSummary:
        """The part of the observation that needs no previous rank, reduced on the statistics' device.

        Torch only, on the Grams' device (the GPU when training): only these (B, n_units, ...) summaries cross to
        the CPU, not the (B, layers, kv_heads, d, d) Grams (~190 MB a step for 64 SmolLM2 sequences), and the
        environment can capture it in its CUDA graph. The bound is float64 on every device
        (attention_change_bound), so it stays as rigorous as on the CPU.
        """
        g, n, choices = self.geometry, len(self.rank_choices), self.rank_choices
        query_gram, key_gram = stats.query_gram, stats.key_gram  # (B, layers, kv_heads, d, d)
        bound = attention_change_bound(query_gram, key_gram, self._bound_ranks, g.head_dim**-0.5)  # (..., m, m)
        e_query, e_key = energies(query_gram), energies(key_gram)  # (B, layers, kv_heads, d)
        s_query, s_key = stable_rank(query_gram) / g.head_dim, stable_rank(key_gram) / g.head_dim  # (B, layers, kv_heads)
        if self.per_layer:  # a layer token: energies add over KV heads, bounds add in quadrature (Frobenius norms)
            e_query, e_key, bound = e_query.sum(2), e_key.sum(2), bound.square().sum(2).sqrt()
            s_query, s_key = s_query.mean(2), s_key.mean(2)  # stable ranks do not add: a layer takes its heads' mean
        else:
            e_query, e_key, bound = e_query.flatten(1, 2), e_key.flatten(1, 2), bound.flatten(1, 2)
            s_query, s_key = s_query.flatten(1, 2), s_key.flatten(1, 2)
        heads = g.num_heads if self.per_layer else g.group_size
        n_queries, n_keys = heads * stats.num_queries, self.kv_heads_per_unit * stats.num_keys
        bound = bound / math.sqrt(n_queries)  # RMS per query row, (B, n_units, m, m)
        columns = [
            _log_scaled(e_query.sum(-1, keepdim=True) / n_queries, LOG_ENERGY_SCALE),
            _log_scaled(e_key.sum(-1, keepdim=True) / n_keys, LOG_ENERGY_SCALE),
            s_query[..., None],
            s_key[..., None],
            normalized_energy_ratio(e_query, choices),
            normalized_energy_ratio(e_key, choices),
            _log_scaled(tail_energy(e_query, choices) / n_queries, LOG_ENERGY_SCALE),
            _log_scaled(tail_energy(e_key, choices) / n_keys, LOG_ENERGY_SCALE),
            _log_scaled(bound[..., :n, -1], LOG_BOUND_SCALE),
        ]
        selection = None
        if self.selection:
            if stats.selection_bound is None:
                raise ValueError("selection mode needs statistics recorded with a selection_grid. Fix: record with "
                                 "attention.recording(True, **decisions.recording_options(True)).")
            grid = stats.selection_bound.flatten(-2)[..., self._grid_index_on(stats.selection_bound.device)]
            selection = grid.mean(2) if self.per_layer else grid.flatten(1, 2)  # a layer: mean over its rows
        signals = self._signals(stats) if self.signal_queries else None
        return StatsSummary(torch.cat([c.float() for c in columns], dim=-1), bound, selection, signals)

    def _signals(self, stats: SegmentStats) -> torch.Tensor:
        """(B, n_units, n_signals) in [0, 1]: entropy, then in selection mode every choice's estimated dropped mass
        and log1p(score margin) / LOG_BOUND_SCALE; a layer unit takes the mean over its KV heads."""
        if stats.entropy is None or (self.selection and stats.signal_mass is None):
            raise ValueError("the attention feature groups need statistics recorded with signal_queries. Fix: record "
                             "with attention.recording(True, **decisions.recording_options(True)).")
        parts = [stats.entropy[..., None]]  # (B, layers, kv_heads, 1)
        if self.selection:
            index = self._grid_index_on(stats.signal_mass.device)
            parts += [stats.signal_mass.flatten(-2)[..., index],
                      _log_scaled(stats.signal_margin.flatten(-2)[..., index], LOG_BOUND_SCALE)]
        signals = torch.cat([p.float() for p in parts], -1).clamp(0, 1)
        return signals.mean(2) if self.per_layer else signals.flatten(1, 2)

    def _grid_index_on(self, device: torch.device) -> torch.Tensor:
        """The grid index on ``device``, copied once: a copy per step would wait for the device (and cannot be
        captured in a CUDA graph)."""
        if self._grid_index.device != device:
            self._grid_index = self._grid_index.to(device)
        return self._grid_index

    @property
    def selection_grid(self) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """The (ranks, keeps) grid the attention must record bounds on in selection mode; None otherwise."""
        return (self.rank_choices, self.keep_choices) if self.selection else None

    def recording_options(self, statistics: bool) -> dict[str, Any]:
        """The arguments of ``DynamicRankAttention.recording`` beyond (statistics, outputs) that a forward recording
        this space's observation needs: none without statistics."""
        if not statistics:
            return {}
        return {"selection_grid": self.selection_grid, "signal_queries": self.signal_queries,
                "bound_queries": self.bound_queries}

    def observe_summary(self, summary: StatsSummary, prev_index: np.ndarray, segment: int,
                        previous_signals: np.ndarray | None = None) -> Observed:
        """:meth:`observe` from a :meth:`summarize` result: adds what depends on the previous ranks, on the CPU.

        ``previous_signals``: :meth:`signals_of` the last segment's summary, for the "attention_change" group (the
        change since the last segment, 0.5 + change / 2; 0.5 when there is no last segment)."""
        g, n = self.geometry, len(self.rank_choices)
        summarized, bound = summary.columns.cpu().numpy(), summary.bound.cpu().numpy()
        batch = np.arange(len(bound))[:, None]
        prev_rank = self.choice_ranks[prev_index]
        prev_rank_index = np.searchsorted(np.asarray(self.rank_choices), prev_rank)
        transition = bound[batch, np.arange(self.n_units), prev_rank_index, :n]  # (B, n_units, n_ranks)
        to_full = bound[..., :n, -1]  # (B, n_units, n_ranks): the last bound index is full rank d
        columns = [
            summarized,
            _log_scaled(transition, LOG_BOUND_SCALE),
            (prev_rank / g.head_dim)[..., None],
            np.full((*prev_index.shape, 1), segment / self.n_segments),
            np.broadcast_to(self._static, (*prev_index.shape, 2)),
        ]
        if self.selection:  # the mask and the perturbation term read each choice's dropped-mass bound
            mass = summary.selection.cpu().numpy()
            columns += [mass, self.choice_keeps[prev_index][..., None]]
            transition = to_full = mass
        signals = self.signals_of(summary)
        if signals is not None:
            change = 0.5 + (signals - (signals if previous_signals is None else previous_signals)) / 2
            columns += [signals, change]
        observation = np.concatenate(columns, axis=-1).astype(np.float32)
        if signals is None:  # the columns of the signal groups are computed only when one is selected
            observation = np.concatenate([observation, np.zeros((*observation.shape[:2], self._n_signal_columns),
                                                                np.float32)], -1)
        # nan_to_num: zero energies cannot give NaN here, but an observation must never carry one.
        observation = np.clip(np.nan_to_num(observation[..., self._columns]), 0.0, 1.0)
        return Observed(observation, transition, to_full)

    @staticmethod
    def signals_of(summary: StatsSummary) -> np.ndarray | None:
        """The summary's attention signals (B, n_units, n_signals) on the CPU (a copy: a CUDA graph's next replay
        overwrites the summary), or None when no selected group reads them."""
        return None if summary.signals is None else np.nan_to_num(summary.signals.cpu().numpy())

    @property
    def _n_signal_columns(self) -> int:
        return 2 * (1 + 2 * self.n_choices if self.selection else 1)

    @staticmethod
    def allowed(to_full: np.ndarray, epsilon: float) -> np.ndarray:
        """The safety mask: choices whose bound from full rank (selection: dropped-mass bound) is <= epsilon,
        (B, n_units, n_choices) bool.

        Bounding the distance from full rank, not the step from the previous choice, means a chain of small steps
        (64 -> 48 -> 32 -> 16 over three segments) is held to the same threshold as one big step. The largest
        choice is always allowed, so every unit keeps at least one choice.
        """
        allowed = to_full <= epsilon
        allowed[..., -1] = True
        return allowed

    def project(self, requested: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replace each disallowed choice by the allowed one nearest in cost (rank value, or decode traffic in
        selection mode), ties to the larger.

        ``requested``: (B, n_units) indices; ``allowed``: (B, n_units, n_choices). Returns the indices applied and
        a (B, n_units) bool array saying which were projected.
        """
        costs = self.choice_costs
        distance = np.abs(costs[requested][..., None] - costs).astype(np.float64)
        distance[~allowed] = np.inf
        # argmin returns the first minimum; searching the reversed choices makes that the largest.
        nearest = self.n_choices - 1 - np.argmin(distance[..., ::-1], axis=-1)
        projected = ~np.take_along_axis(allowed, requested[..., None], axis=-1)[..., 0]
        return np.where(projected, nearest, requested), projected

    @property
    def choices(self) -> np.ndarray:
        """The rank of every choice (with the keep, :attr:`choice_keeps`, it is the setting in selection mode)."""
        return self.choice_ranks

    def layer_ranks(self, chosen: np.ndarray) -> torch.Tensor:
        """(B, n_units) choice indices -> (B, num_layers, num_kv_heads) ranks for ``DynamicRankAttention``."""
        ranks = self.choice_ranks[chosen].reshape(len(chosen), self.geometry.num_layers, -1)
        return torch.from_numpy(ranks.repeat(self.kv_heads_per_unit, axis=2))

    def layer_keeps(self, chosen: np.ndarray) -> torch.Tensor:
        """(B, n_units) choice indices -> (B, num_layers, num_kv_heads) kept fractions (1 for low-rank scores)."""
        keeps = self.choice_keeps[chosen].reshape(len(chosen), self.geometry.num_layers, -1)
        return torch.from_numpy(keeps.repeat(self.kv_heads_per_unit, axis=2))


def _log_scaled(x: _Array, scale: float) -> _Array:
    """log1p(x) / scale for x >= 0: about [0, 1] for the magnitudes above (clipped with the whole observation)."""
    if isinstance(x, torch.Tensor):
        return torch.log1p(x.clamp_min(0)) / scale
    return np.log1p(np.maximum(x, 0)) / scale


def __getattr__(name: str) -> Any:  # PEP 562: the old name, for one release
    if name == "RankController":
        warnings.warn("drrl_gym.observation.RankController is now DecisionSpace (it decides nothing: it builds the "
                      "observation, mask, projection and rank layout).", DeprecationWarning, stacklevel=2)
        return DecisionSpace
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
