"""The cost model of selection attention, counted as a deployed kernel executes it (``drrl_gym.selection`` (9)-(10)).

Per KV group (G query heads) and segment of T new queries, with P = sum_i n_i visible (query, key) pairs and
K = sum_i k_i chosen ones:

    rotation  2 G T d^2 + 2 T d^2    (queries to full width, the T new keys into K~ once)
    scoring   2 G P r                choosing  5 G P + P (group: log-normalise, max over heads, select) or G P (head)
    scores    2 G K d                softmax   5 G K          values  2 G K d                                    (9)
    full attention: scores 2 G P d, softmax 5 G P, values 2 G P d, nothing else
    decode traffic relative to full attention (2 L d values read per KV head):  r / (2 d) + k / L                 (10)

The choosing term is an estimate (a selection is comparisons rather than arithmetic); everything else is exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from drrl_gym.selection import (
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    check_selection,
    checked_keep,
    kept_counts,
    visible_key_counts,
    visible_mask,
)


@dataclass(frozen=True)
class SelectionFlops:
    """FLOPs of one segment by term of (9), per KV group (its G query heads): tensors shaped like the settings."""

    rotation: torch.Tensor
    scoring: torch.Tensor
    choosing: torch.Tensor
    scores: torch.Tensor
    softmax: torch.Tensor
    values: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.rotation + self.scoring + self.choosing + self.scores + self.softmax + self.values

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {**asdict(self), "total": self.total}


def selection_flops(
    rank: torch.Tensor | int,
    keep: torch.Tensor | float,
    *,
    new_tokens: int,
    keys: int,
    head_dim: int,
    group_size: int,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
    selection: str = "group",
) -> SelectionFlops:
    """FLOPs (9) a deployed selection kernel executes for one segment, per KV group; rank and keep broadcast
    (e.g. (B, H_kv) settings give (B, H_kv) counts; sum over the last axis for a layer's row)."""
    check_selection(selection)
    rank, keep, visible, counts = _cost_settings(rank, keep, new_tokens, keys, head_dim, sink_tokens, recent_tokens)
    d, g, pairs, chosen = head_dim, group_size, visible.sum(), counts.sum(-1)
    rotation = torch.full_like(rank, 2 * g * new_tokens * d * d + 2 * new_tokens * d * d)
    choosing = (5 * g * pairs + pairs) if selection == "group" else g * pairs
    return SelectionFlops(rotation=rotation, scoring=2 * g * pairs * rank,
                          choosing=torch.full_like(rank, int(choosing)),
                          scores=2 * g * chosen * d, softmax=5 * g * chosen, values=2 * g * chosen * d)


def full_attention_flops(*, new_tokens: int, keys: int, head_dim: int, group_size: int) -> SelectionFlops:
    """FLOPs of plain causal attention for the same segment, per KV group: 2 G P d + 5 G P + 2 G P d (0-dim tensors)."""
    pairs = int(visible_mask(new_tokens, keys).sum())
    zero, g, d = torch.tensor(0), group_size, head_dim
    return SelectionFlops(rotation=zero, scoring=zero, choosing=zero, scores=torch.tensor(2 * g * pairs * d),
                          softmax=torch.tensor(5 * g * pairs), values=torch.tensor(2 * g * pairs * d))


def decode_traffic(
    rank: torch.Tensor | int,
    keep: torch.Tensor | float,
    *,
    keys: int,
    head_dim: int,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    recent_tokens: int = DEFAULT_RECENT_TOKENS,
    group_size: int = 1,
    selection: str = "group",
) -> torch.Tensor:
    """Values one decoded token reads per KV head, relative to full attention's 2 L d: r/(2d) + k/L by (10).

    k is (4) for the token at position L - 1 (it sees all L keys). With selection="head" the G heads of a group may
    choose different keys; the group then reads their union, counted here at its worst, min(G k, L). Above 1 means
    selection reads more than full attention (r = d and keep = 1 read 1.5 times as much).
    """
    check_selection(selection)
    rank, keep, _, counts = _cost_settings(rank, keep, 1, keys, head_dim, sink_tokens, recent_tokens)
    chosen = counts[..., 0] if selection == "group" else torch.clamp(group_size * counts[..., 0], max=keys)
    return rank.double() / (2 * head_dim) + chosen.double() / keys


def _cost_settings(rank, keep, new_tokens, keys, head_dim, sink_tokens, recent_tokens):
    """rank (long) and keep broadcast together, n_i (T,) and k_i (..., T) for the cost formulas."""
    rank = torch.as_tensor(rank)
    if rank.is_floating_point() or rank.numel() == 0 or not bool(((rank >= 1) & (rank <= head_dim)).all()):
        raise ValueError(f"rank must be integers in [1, head_dim={head_dim}], got {rank}. Fix: clip the ranks.")
    keep = checked_keep(keep)
    rank, keep = torch.broadcast_tensors(rank.long(), keep)
    visible = visible_key_counts(new_tokens, keys)
    return rank, keep, visible, kept_counts(keep, visible, sink_tokens, recent_tokens)
