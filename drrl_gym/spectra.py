"""Spectral state from second moments in the basis: energies, NER and tail energies, all without a decomposition.

With an orthonormal basis P and X's Gram matrix in that basis G = (XP)^T (XP), the energy of direction j is
e_j = ||X p_j||^2 = G_jj. For every rank r at once (cumulative sums):

    NER(r)  = sum_{j<=r} e_j / sum_j e_j          (the paper's Normalized Energy Ratio)
    tail(r) = ||X - X P_r P_r^T||_F^2 = sum_{j>r} e_j   (exact for any orthonormal P; equals the Eckart-Young
                                                        optimum when P is X's own singular basis)

and the stable rank ||X||_F^2 / sigma_max(X)^2 = tr(G) / lambda_max(G), the signal of the ALRT rank controller
(the ALRT technical report's signal: the stable rank of the activations), with lambda_max from a few power iterations on the d x d Gram:
matmuls only, no decomposition and no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def energies(gram: torch.Tensor) -> torch.Tensor:
    """Per-direction energies e_j: the diagonal of (..., d, d) -> (..., d)."""
    return gram.diagonal(dim1=-2, dim2=-1)


def normalized_energy_ratio(energy: torch.Tensor, rank_choices: Sequence[int]) -> torch.Tensor:
    """NER(r) for each r in ``rank_choices``: (..., d) -> (..., len(rank_choices)); 1 where all energy is zero."""
    cumulative = energy.cumsum(-1)
    total = cumulative[..., -1:]
    kept = _columns(cumulative, [r - 1 for r in rank_choices])
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(energy.dtype).tiny), torch.ones_like(kept))


def tail_energy(energy: torch.Tensor, rank_choices: Sequence[int]) -> torch.Tensor:
    """sum_{j>r} e_j for each r in ``rank_choices``: (..., d) -> (..., len(rank_choices))."""
    # Sum the tail from the end rather than subtracting prefix sums, so small tails keep their relative precision.
    from_end = energy.flip(-1).cumsum(-1).flip(-1)  # from_end[j] = sum_{i>=j} e_i
    padded = torch.cat([from_end, torch.zeros_like(from_end[..., :1])], dim=-1)
    return _columns(padded, list(rank_choices))


def stable_rank(gram: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """tr(G) / lambda_max(G) for PSD Grams (..., d, d) -> (...), in [1, d]; 1 where G is zero.

    lambda_max by ``iterations`` power iterations (the ALRT report uses 5) started from the diagonal, which is
    non-negative and leans towards the top eigenvector. The Rayleigh quotient never exceeds lambda_max, so the
    estimate can only err upwards (towards more rank, the safe side); it is clamped into [1, d].
    """
    gram = gram.float()
    d = gram.shape[-1]
    # The diagonal plus a small ramp: the ramp breaks the symmetry that could leave the start orthogonal to the top
    # eigenvector (e.g. [[5.5, -4.5], [-4.5, 5.5]], whose diagonal is flat).
    ramp = torch.arange(1, d + 1, device=gram.device, dtype=gram.dtype) / d
    vector = (energies(gram) + 1e-3 * energies(gram).mean(-1, keepdim=True) * ramp + ramp * torch.finfo(gram.dtype).eps).unsqueeze(-1)
    for _ in range(iterations):
        vector = gram @ vector
        vector = vector / vector.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
    top = (vector.transpose(-1, -2) @ gram @ vector)[..., 0, 0]
    trace = energies(gram).sum(-1)
    ratio = trace / top.clamp_min(torch.finfo(gram.dtype).tiny)
    return torch.where(trace > 0, ratio, torch.ones_like(ratio)).clamp(1.0, gram.shape[-1])


def _columns(x: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
    """x[..., index] by integer slices: indexing with a Python list would copy the index to the device, a host
    copy that a CUDA graph capture (the env's, drrl_gym.env.SegmentGraphs) cannot contain."""
    return torch.stack([x[..., i] for i in index], dim=-1)
