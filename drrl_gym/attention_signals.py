"""Cheap by-products of a segment's attention for the observation: entropy, and per candidate (rank, keep) setting the
dropped softmax mass and the score margin at the keep boundary, from the segment's last few queries.

They let a policy see how much a segment needs: a flat softmax (high entropy) or a small margin at the boundary
means the choice of keys is fragile there. Equation numbers refer to ``drrl_gym.selection``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from drrl_gym.selection import (
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    approximate_scores,
    check_selection,
    check_shapes,
    checked_scaling,
    forced_mask,
    grid_counts,
    priorities,
    visible_mask,
)


@dataclass(frozen=True)
class AttentionSignals:
    """Cheap by-products of a segment for the observation, from its last queries (:func:`attention_signals`)."""

    entropy: torch.Tensor  # (B, H_kv) float32: softmax entropy over the visible keys / log(visible), in [0, 1]
    dropped_mass: torch.Tensor | None  # (B, H_kv, n_ranks, n_keeps) float32: exact mass the choice would drop
    margin: torch.Tensor | None  # (B, H_kv, n_ranks, n_keeps) float32: priority gap at the keep boundary, >= 0


def attention_signals(
    rotated_query: torch.Tensor,
    rotated_keys: torch.Tensor,
    grid: tuple[Sequence[int], Sequence[float]] | None = None,
    *,
    scaling: float | None = None,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
    selection: str = "group",
) -> AttentionSignals:
    """Attention entropy and, for every (rank, keep) of ``grid``, the estimated dropped mass and score margin.

    ``rotated_query`` (B, H, m, d): the LAST m queries of a segment (any basis, as long as the keys share it: the
    exact scores do not depend on it, (1)); ``rotated_keys`` (B, H_kv, L, d). Per query row: the entropy of the exact
    softmax over V_i divided by log n_i; the exact softmax mass outside the set (2)-(4) would keep, m of (8); and the
    margin pi_(k_i) - pi_(k_i + 1) of the sorted priorities (3) around the last kept key (its distance to a change of
    the kept set; forced keys aside; 1e4 where every key is kept). Means over the group's rows. Costs m / T of the
    segment's scores per rank: a few percent of its attention for m = 8, T = 128.
    """
    batch, heads, n_queries, d, kv_heads, n_keys = check_shapes(rotated_query, rotated_keys, rotated_keys, None, None)
    scaling, group, device = checked_scaling(scaling, d), heads // kv_heads, rotated_query.device
    q = rotated_query.float().reshape(batch, kv_heads, group, n_queries, d)
    k = rotated_keys.float()
    visible = visible_mask(n_queries, n_keys, device)
    log_p = (scaling * q @ k[:, :, None].transpose(-1, -2)).masked_fill(~visible, float("-inf")).log_softmax(-1)
    p = log_p.exp()
    entropy = -(p * log_p.masked_fill(~visible, 0)).sum(-1) / visible.sum(-1).clamp_min(2).log()
    if grid is None:
        return AttentionSignals(entropy.mean((2, 3)), None, None)
    check_selection(selection)
    ranks, keeps = grid
    forced = forced_mask(n_queries, n_keys, sink_tokens, recent_tokens, device)
    counts = grid_counts(keeps, n_queries, n_keys, sink_tokens, recent_tokens, device)  # k_i (4), (n_keep, m)
    index = counts.T[None, None, None].expand(batch, kv_heads, group, n_queries, len(keeps))
    masses, margins = [], []
    for r in ranks:
        rank = torch.full((batch, kv_heads), int(r), dtype=torch.long, device=device)
        priority = priorities(approximate_scores(q, k, rank, scaling), visible, forced, selection)
        ordered, order = priority.sort(dim=-1, descending=True, stable=True)
        kept_mass = p.gather(-1, order.expand_as(p)).cumsum(-1)  # mass of the first j + 1 keys of the order
        masses.append((1 - kept_mass.gather(-1, index - 1)).clamp_min(0).mean((2, 3)))
        ordered = torch.cat([ordered, torch.full_like(ordered[..., :1], float("-inf"))], -1).expand(
            batch, kv_heads, group, n_queries, n_keys + 1)
        gap = (ordered.gather(-1, index - 1) - ordered.gather(-1, index)).nan_to_num(1e4, 1e4).clamp(0, 1e4)
        margins.append(gap.mean((2, 3)))
    return AttentionSignals(entropy.mean((2, 3)), torch.stack(masses, 2), torch.stack(margins, 2))
