"""Orthonormal rank bases per (layer, KV head): a rank r means "the first r columns".

* ``calibrated`` (default): P = eigenvectors of C = sum over calibration text of (Q^T Q + K^T K) for the group's
  post-RoPE queries and its keys, ordered by decreasing eigenvalue (DESIGN-NOTES sec. 2). Computed once and cached on
  disk, keyed by the model's and the corpus' fingerprints.
* ``exact``: the same eigendecomposition of the current segment's own Q and K, every forward pass (the paper's
  online SVD). Kept as a comparison: 144 eigh of 64x64 per segment cost more than the forward pass itself on a GPU.
"""

from __future__ import annotations

import os

from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from drrl_gym import assets

if TYPE_CHECKING:
    from drrl_gym.backbone import Backbone

BASIS_MODES = ("calibrated", "exact")


def exact_basis(query_gram: torch.Tensor, key_gram: torch.Tensor) -> torch.Tensor:
    """Eigenbasis of Q^T Q + K^T K with columns by decreasing eigenvalue: (..., d, d) -> (..., d, d)."""
    _, vectors = torch.linalg.eigh((query_gram + key_gram).double())  # ascending eigenvalues
    return vectors.flip(-1).float()


@torch.no_grad()
def calibrate_basis(backbone: "Backbone", sequences: torch.Tensor, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Calibrated basis (num_layers, num_kv_heads, d, d) from full-rank forward passes over ``sequences`` (n, L)."""
    from drrl_gym.lowrank import DynamicRankAttention

    g = backbone.geometry
    identity = torch.eye(g.head_dim).expand(g.num_layers, g.num_kv_heads, -1, -1).contiguous()
    probe = DynamicRankAttention(g, identity)  # identity basis: its statistics are the raw second moments
    probe.collect_stats = True
    moment = torch.zeros(g.num_layers, g.num_kv_heads, g.head_dim, g.head_dim, dtype=torch.float64)
    with probe.attached(backbone.model):
        for start in tqdm(range(0, len(sequences), batch_size), desc="calibrating basis", disable=not progress):
            backbone.model(sequences[start : start + batch_size].to(backbone.device), use_cache=False)
            stats = probe.stats()
            moment += (stats.query_gram + stats.key_gram).sum(0).double().cpu()
    return exact_basis(moment, torch.zeros_like(moment))


def load_or_calibrate_basis(backbone: "Backbone", sequences: torch.Tensor, corpus_fingerprint: str) -> torch.Tensor:
    """The calibrated basis for (model, calibration data), from the disk cache or computed and cached."""
    path = assets.cache_dir() / "bases" / f"{backbone.fingerprint}-{corpus_fingerprint}-{len(sequences)}.safetensors"
    if path.exists():
        return load_file(path)["basis"]
    basis = calibrate_basis(backbone, sequences)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: parallel runners may calibrate at once
    save_file({"basis": basis.contiguous()}, tmp)
    tmp.replace(path)
    return basis
