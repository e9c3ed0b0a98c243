"""Perturbation bounds on the softmax attention matrix for a rank switch r -> r' (derivation: docs/bounds.md).

For one query head with queries Q (T x d), keys K (L x d), scaling s and basis P, ranks r < r' differ by the basis
columns D = P[:, r:r']. The score change and the bound are

    dS = s * Q P_D P_D^T K^T                                                         (1)
    ||dS||_F^2 = s^2 * <P_D^T Q^T Q P_D, P_D^T K^T K P_D>_F = s^2 * sum_{i,j in D} Gq_ij Gk_ij      (2)
    ||dA||_F <= 1/2 ||dS||_F                                                         (3)

(2) is an identity, not an inequality: Gq, Gk are the Gram matrices in the basis that dynamic-rank attention
already records (``SegmentStats``). (3) holds row by row because the softmax Jacobian diag(p) - p p^T has spectral
norm <= 1/2 (Gershgorin), and the causal mask only removes entries. Summed over the query heads of one KV head,
Gq is the group's summed Gram, which is what ``SegmentStats.query_gram`` holds. By Cauchy-Schwarz (2) never
exceeds the energy-product bound s * ||Q P_D||_F * ||K P_D||_F (docs/bounds.md), and is often far below it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def _indicator(ranks: tuple[int, ...], dim: int, device: torch.device) -> torch.Tensor:
    """(n, n, d) 0/1 masks of the basis columns between ranks[a] and ranks[b] (either order)."""
    r = torch.as_tensor(ranks, device=device)
    lo, hi = torch.minimum(r[:, None], r[None, :]), torch.maximum(r[:, None], r[None, :])
    j = torch.arange(dim, device=device)
    return ((j >= lo[..., None]) & (j < hi[..., None])).double()


# Cached for eager callers (they only read it): the environment captures its step in a CUDA graph
# (drrl_gym.cuda_graphs), which cannot contain the host-to-device copy that building it from a list needs. Under
# torch.compile the uncached function is traced (Dynamo would ignore the cache anyway, with a warning); the compiled
# step's graph capture works with it (the env's CUDA-graph test, compiled).
_cached_indicator = functools.lru_cache(maxsize=32)(_indicator)


def score_change_norm(query_gram: torch.Tensor, key_gram: torch.Tensor, ranks: Sequence[int], scaling: float) -> torch.Tensor:
    """||S_{ranks[a]} - S_{ranks[b]}||_F for every pair, by identity (2): (..., d, d) x2 -> (..., n, n).

    Computed in float64 as a masked sum of Gq * Gk (no prefix-sum differences, which would cancel catastrophically
    for small tails and could let rounding push the value below the truth).
    """
    products = (query_gram.double() * key_gram.double())  # (..., d, d)
    indicator = _indicator if torch.compiler.is_compiling() else _cached_indicator
    mask = indicator(tuple(int(r) for r in ranks), products.shape[-1], products.device)  # (n, n, d)
    squared = torch.einsum("abi,...ij,abj->...ab", mask, products, mask)
    return scaling * squared.clamp_min(0).sqrt()


def attention_change_bound(query_gram: torch.Tensor, key_gram: torch.Tensor, ranks: Sequence[int], scaling: float) -> torch.Tensor:
    """Upper bound on ||A_{ranks[a]} - A_{ranks[b]}||_F for every pair, by (3): (..., d, d) x2 -> (..., n, n)."""
    return 0.5 * score_change_norm(query_gram, key_gram, ranks, scaling)
