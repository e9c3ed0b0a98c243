"""Tensor-level handling of transformers' ``DynamicCache``: read its tensors, point it at others, copy a prefix.

CUDA-graph replay (``drrl_gym.cuda_graphs``) needs the cache's tensors at fixed addresses, and the episode's
full-rank reference starts from a copy of the warm-up prefix; both work on the per-layer (keys, values) pairs.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig

KVTensors = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) per layer, each (B, H_kv, L, d)


def kv_tensors(cache: DynamicCache) -> KVTensors:
    return [(layer.keys, layer.values) for layer in cache.layers]


def point_cache(cache: DynamicCache, tensors: KVTensors) -> None:
    """Make ``cache``'s layers hold ``tensors`` (no copy)."""
    for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
        layer.keys, layer.values = keys, values


def cache_prefix(cache: DynamicCache, length: int, config: PretrainedConfig) -> DynamicCache:
    """A new cache holding copies of the first ``length`` positions of ``cache``.

    Built layer by layer rather than with ``DynamicCache.crop``, whose meaning changed across transformers releases.
    """
    prefix = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        prefix.update(layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone(), index)
    return prefix
