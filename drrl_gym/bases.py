"""Orthonormal rank bases per (layer, KV head): a rank r means "the first r columns".

* ``calibrated`` (default): P = eigenvectors of C = sum over calibration text of (Q^T Q + K^T K) for the group's
  post-RoPE queries and its keys, ordered by decreasing eigenvalue (docs/bounds.md, "Setting and notation").
  Fitting it runs the model (``drrl_gym.calibration``); it is cached on disk.
* ``exact``: the same eigendecomposition of the current segment's own Q and K, every forward pass (the paper's
  online SVD). Kept as a comparison: 144 eigh of 64x64 per segment cost more than the forward pass itself on a GPU.
"""

from __future__ import annotations

import torch

BASIS_MODES = ("calibrated", "exact")


def exact_basis(query_gram: torch.Tensor, key_gram: torch.Tensor) -> torch.Tensor:
    """Eigenbasis of Q^T Q + K^T K with columns by decreasing eigenvalue: (..., d, d) -> (..., d, d)."""
    _, vectors = torch.linalg.eigh((query_gram + key_gram).double())  # ascending eigenvalues
    return vectors.flip(-1).float()
