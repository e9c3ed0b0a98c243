"""FLOPs of one decoder layer's self-attention for a segment of T new tokens with L keys visible (L >= T).

A multiply-add counts as 2 FLOPs. Causal masking is counted honestly: query i of the segment (absolute position
L - T + i) sees L - T + i + 1 keys, so the score matrix has P = T (L - T) + T (T + 1) / 2 live entries (the diagonal
block is a triangle). With H query heads, H_kv KV heads, head width d, model width D and rank r_g for KV head g
(G = H / H_kv query heads each):

    projections  q, o: 2 T D H d each;  k, v: 2 T D H_kv d each              (unchanged by rank)
    scores       sum_g G * 2 P r_g                                              (full rank: 2 H P d)
    softmax      5 H P                                                          (max, subtract, exp, sum, divide)
    values       2 H P d                                                        (A V)
    basis        2 T H d r_max + 2 L H_kv d r_max                               (q and the L cached keys onto P_r;
                                                                                 keys are re-projected every segment)
    statistics   (only when spectra are recorded) the basis product at full width d instead of r_max, plus the
                 Grams 2 T H d^2 + 2 L H_kv d^2
    key cache    (``key_cache=True``: ``DynamicRankAttention(cache_projected_keys=True)``, what deployed models
                 run) only the T new keys are projected, at full width, and added to a running key Gram, on every
                 segment whatever the ranks: basis 2 T H d r_max (queries; none when every rank is d and no
                 statistics are recorded) + 2 T H_kv d^2 (new keys), statistics 2 T H_kv d^2 (running key Gram)
                 plus, when recorded, the query Gram 2 T H d^2 and the queries at full width
    exact basis  (mode "exact") Grams as above plus one symmetric eigendecomposition per KV head, ~9 d^3
                 (Golub & Van Loan's count for eigenvalues and vectors; the only estimate in this module)

``AttentionFlops.scores`` is the QK^T term the rank acts on; ``total`` is the whole attention. Reports must say which
one a reduction refers to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from drrl_gym.backbone import AttentionGeometry
from drrl_gym.bases import BASIS_MODES
from drrl_gym.selection import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS
from drrl_gym.selection_cost import full_attention_flops, selection_flops


@dataclass(frozen=True)
class AttentionFlops:
    """FLOPs of one layer for one segment, by term."""

    projections: int
    scores: int
    softmax: int
    values: int
    basis: int
    statistics: int

    @property
    def total(self) -> int:
        return self.projections + self.scores + self.softmax + self.values + self.basis + self.statistics

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def __add__(self, other: AttentionFlops) -> AttentionFlops:
        return AttentionFlops(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


def causal_pairs(new_tokens: int, keys: int) -> int:
    """Live (query, key) pairs of a causal segment: T (L - T) + T (T + 1) / 2."""
    if not 1 <= new_tokens <= keys:
        raise ValueError(f"need 1 <= new_tokens <= keys, got new_tokens={new_tokens}, keys={keys}")
    return new_tokens * (keys - new_tokens) + new_tokens * (new_tokens + 1) // 2


def layer_flops(
    geometry: AttentionGeometry,
    new_tokens: int,
    keys: int,
    ranks: Sequence[int] | int | None = None,
    statistics: bool = False,
    basis_mode: str = "calibrated",
    key_cache: bool = False,
) -> AttentionFlops:
    """FLOPs of one layer. ``ranks``: one per KV head, an int for all, or None for the unmodified model
    (full width, no basis work at all: the baseline every reduction is measured against)."""
    if basis_mode not in BASIS_MODES:
        raise ValueError(f"unknown basis_mode {basis_mode!r}; choose one of {BASIS_MODES}")
    if key_cache and basis_mode != "calibrated":
        raise ValueError("key_cache needs basis_mode='calibrated' (an exact basis changes every segment)")
    g, t, n_keys = geometry, new_tokens, keys
    d, heads, kv_heads = g.head_dim, g.num_heads, g.num_kv_heads
    pairs = causal_pairs(t, n_keys)
    projections = 2 * t * g.hidden_size * d * (2 * heads + 2 * kv_heads)
    softmax, values = 5 * heads * pairs, 2 * heads * pairs * d
    if ranks is None:
        return AttentionFlops(projections, 2 * heads * pairs * d, softmax, values, 0, 0)
    per_head = [ranks] * kv_heads if isinstance(ranks, int) else list(ranks)
    if len(per_head) != kv_heads or not all(1 <= r <= d for r in per_head):
        raise ValueError(f"ranks must be {kv_heads} values in [1, {d}], got {ranks}")
    scores = sum(g.group_size * 2 * pairs * r for r in per_head)
    if key_cache:
        width = d if statistics else max(per_head)
        queries = 0 if not statistics and min(per_head) == d else 2 * t * heads * d * width
        query_gram = 2 * t * heads * d * d if statistics else 0
        new_keys = 2 * t * kv_heads * d * d  # projection of the new keys, and again for their running Gram
        return AttentionFlops(projections, scores, softmax, values, queries + new_keys, query_gram + new_keys)
    exact = basis_mode == "exact"
    if not statistics and min(per_head) == d:
        return AttentionFlops(projections, scores, softmax, values, 0, 0)  # full rank skips the basis (a rotation)
    width = d if statistics else max(per_head)  # without statistics only the prefix is projected, exact mode too
    basis = 2 * (t * heads + n_keys * kv_heads) * d * width
    gram_passes = int(statistics) + int(exact)  # exact mode needs raw Grams for its eigh, then (if asked) stats
    stats = gram_passes * 2 * (t * heads + n_keys * kv_heads) * d * d + (kv_heads * 9 * d**3 if exact else 0)
    return AttentionFlops(projections, scores, softmax, values, basis, stats)


@dataclass(frozen=True)
class FlopsFractions:
    """FLOPs at the chosen ranks relative to the unmodified model, for one segment over all layers, per row."""

    scores: np.ndarray  # QK^T term only: the cost in (R)
    attention: np.ndarray  # whole attention incl. basis projections and the statistics the observation needs

    @property
    def saved_scores(self) -> np.ndarray:
        return 1.0 - self.scores

    @property
    def saved_attention(self) -> np.ndarray:
        """Can be negative: at full rank the statistics overhead is pure cost."""
        return 1.0 - self.attention


def flops_fractions(
    geometry: AttentionGeometry, ranks: np.ndarray, new_tokens: int, keys: int, basis_mode: str = "calibrated"
) -> FlopsFractions:
    """Fractions for ``ranks`` of shape (..., num_layers, num_kv_heads), a segment of ``new_tokens`` seeing ``keys``
    keys: arrays of shape (...), one value per row.

    Each row is accounted on its own ranks, also when a batch runs rows of different ranks through one forward
    (``DynamicRankAttention`` then zero-masks q's extra columns: the FLOPs a row would cost run alone, which is what
    a deployed model pays). The statistics (Grams) are always counted: the environment records them every step to
    build the observation, so a deployed policy pays for them too.
    """
    ranks = np.asarray(ranks)
    g = geometry
    if ranks.ndim < 2 or ranks.shape[-1] != g.num_kv_heads or ranks.size and not (
            (ranks >= 1).all() and (ranks <= g.head_dim).all()):
        raise ValueError(f"ranks must be (..., num_layers, {g.num_kv_heads}) values in [1, {g.head_dim}], got shape "
                         f"{ranks.shape}")
    # With statistics recorded the basis product runs at full width, so only the scores term depends on the ranks,
    # linearly: sum_g G * 2 P r_g (layer_flops). One full-rank count gives every other term; float64 holds these
    # integer counts exactly (far below 2**53), so the sums are exact too. No loop over rows or layers.
    full = layer_flops(g, new_tokens, keys, g.head_dim, True, basis_mode)
    scores = (g.group_size * 2 * causal_pairs(new_tokens, keys)) * ranks.sum(-1).astype(np.float64)  # (..., layers)
    total = scores + float(full.total - full.scores)
    baseline, layers = layer_flops(g, new_tokens, keys, None), ranks.shape[-2]
    return FlopsFractions(scores=scores.sum(-1) / (layers * baseline.scores),
                          attention=total.sum(-1) / (layers * baseline.total))


def selection_fractions(geometry: AttentionGeometry, ranks: np.ndarray, keeps: np.ndarray, new_tokens: int,
                        keys: int, dense_reference: bool = False) -> FlopsFractions:
    """Fractions for selection attention at ``ranks`` and ``keeps`` (..., num_layers, num_kv_heads), one per row.

    Counted as a deployed kernel executes them (``drrl_gym.selection``, (9)): ``scores`` = scoring, choosing and
    exact scores over the chosen keys against full attention's QK^T; ``attention`` = every term (rotation, softmax
    and A V too) against full attention's scores, softmax and A V. A (head_dim, 1.0) setting is full attention
    itself. ``dense_reference=True`` gives what the reference implementation executes instead: exact attention over
    every key plus the rank-r scoring, choosing and rotation on top (more than full attention)."""
    g = geometry
    # A batch holds a handful of distinct ranks and keeps (the action space's choices): count (9) once on their
    # (ranks x keeps) grid and look every entry up, rather than form k_i for each of B x layers x kv_heads x T
    # queries (that took 90 ms a step at 256 envs on a 2-core CPU, host time beside the device's step).
    (rank_values, rank_at), (keep_values, keep_at) = (
        np.unique(values, return_inverse=True)
        for values in np.broadcast_arrays(np.asarray(ranks), np.asarray(keeps, dtype=np.float64)))
    rank, keep = torch.as_tensor(rank_values)[:, None], torch.as_tensor(keep_values)[None, :]  # the grid's axes
    cost = selection_flops(rank, keep, new_tokens=new_tokens, keys=keys, head_dim=g.head_dim,
                           group_size=g.group_size, sink_tokens=DEFAULT_SINK_TOKENS, recent_tokens=DEFAULT_RECENT_TOKENS)
    full = full_attention_flops(new_tokens=new_tokens, keys=keys, head_dim=g.head_dim, group_size=g.group_size)
    exact = ((rank == g.head_dim) & (keep == 1.0)).numpy()
    overhead = (cost.scoring + cost.choosing).double().numpy()
    if dense_reference:
        scores = np.where(exact, float(full.scores), float(full.scores) + overhead)
        total = np.where(exact, float(full.total), float(full.total) + overhead + cost.rotation.double().numpy())
    else:
        scores = np.where(exact, float(full.scores), overhead + cost.scores.double().numpy())
        total = np.where(exact, float(full.total), cost.total.double().numpy())
    return FlopsFractions(scores=scores[rank_at, keep_at].mean((-2, -1)) / float(full.scores),
                          attention=total[rank_at, keep_at].mean((-2, -1)) / float(full.total))
