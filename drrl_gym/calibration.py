"""Fitting the calibrated rank basis: full-rank forward passes over calibration text, then one eigendecomposition.

P = eigenvectors of C = sum over the calibration sequences of (Q^T Q + K^T K) per (layer, KV head), for the
group's post-RoPE queries and its keys, columns by decreasing eigenvalue (``drrl_gym.bases``). The second moments
come from a :class:`~drrl_gym.lowrank.DynamicRankAttention` with the identity basis, whose recorded statistics are
then the raw moments. The result is cached on disk, keyed by the model's and the corpus' fingerprints.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from drrl_gym import downloads
from drrl_gym.backbone import Backbone
from drrl_gym.bases import exact_basis
from drrl_gym.corpus import CorpusConfig, load_corpus
from drrl_gym.files import atomic_write
from drrl_gym.lowrank import DynamicRankAttention


@torch.no_grad()
def calibrate_basis(backbone: Backbone, sequences: torch.Tensor, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Calibrated basis (num_layers, num_kv_heads, d, d) from full-rank forward passes over ``sequences`` (n, L)."""
    g = backbone.geometry
    identity = torch.eye(g.head_dim).expand(g.num_layers, g.num_kv_heads, -1, -1).contiguous()
    probe = DynamicRankAttention(g, identity)  # identity basis: its statistics are the raw second moments
    moment = torch.zeros(g.num_layers, g.num_kv_heads, g.head_dim, g.head_dim, dtype=torch.float64)
    with probe.attached(backbone.model), probe.recording(statistics=True) as recorded:
        for start in tqdm(range(0, len(sequences), batch_size), desc="calibrating basis", disable=not progress):
            backbone.model(sequences[start : start + batch_size].to(backbone.device), use_cache=False)
            stats = recorded.stats()
            moment += (stats.query_gram + stats.key_gram).sum(0).double().cpu()
    return exact_basis(moment, torch.zeros_like(moment))


def load_or_calibrate_basis(backbone: Backbone, sequences: torch.Tensor, corpus_fingerprint: str) -> torch.Tensor:
    """The calibrated basis for (model, calibration data), from the disk cache or computed and cached."""
    path = downloads.cache_dir() / "bases" / f"{backbone.fingerprint}-{corpus_fingerprint}-{len(sequences)}.safetensors"
    if path.exists():
        return load_file(path)["basis"]
    basis = calibrate_basis(backbone, sequences)
    atomic_write(path, lambda tmp: save_file({"basis": basis.contiguous()}, tmp))
    return basis


def corpus_basis(backbone: Backbone, corpus: str = "shakespeare-plays", seq_len: int = 1024,
                 sequences: int = 8) -> torch.Tensor:
    """The calibrated basis fitted on the first ``sequences`` blocks of ``seq_len`` tokens of ``corpus`` (cached on
    disk): the fit ``benchmarks/selection_front.py`` uses, disjoint from its held-out text (``britannica-1911``)."""
    fit = load_corpus(backbone.tokenizer, CorpusConfig(corpus, seq_len=seq_len, calibration_sequences=sequences,
                                                       eval_sequences=1))
    return load_or_calibrate_basis(backbone, fit.calibration, fit.fingerprint)
