"""Perplexity of a backbone run segment by segment, at whatever ranks a DynamicRankAttention holds.

Segments are fed in order with a KV cache, so segment t attends to every earlier token, exactly as the environment
runs them; with ``exact`` bases the basis of each segment is computed from that segment's queries and all its keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from drrl_gym.backbone import Backbone


@torch.no_grad()
def segmented_perplexity(
    backbone: Backbone, sequences: torch.Tensor, segment_len: int, batch_size: int = 4, progress: bool = True
) -> float:
    """exp(mean next-token NLL) over ``sequences`` (n, L), run ``segment_len`` tokens at a time."""
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(sequences), batch_size), desc="perplexity", disable=not progress):
        tokens = sequences[start : start + batch_size].to(backbone.device)
        cache = DynamicCache(config=backbone.model.config)
        for s in range(0, tokens.shape[1] - 1, segment_len):
            segment = tokens[:, s : s + segment_len]
            logits = backbone.model(segment, past_key_values=cache, use_cache=True).logits.float()
            targets = tokens[:, s + 1 : s + 1 + segment_len]
            logits = logits[:, : targets.shape[1]]  # the last segment has no target for its final token
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return math.exp(nll / count)
