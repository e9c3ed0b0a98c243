"""Perplexity of a backbone run segment by segment, at whatever ranks a DynamicRankAttention holds.

Segments are fed in order with a KV cache, so segment t attends to every earlier token, exactly as the environment
runs them; with ``exact`` bases the basis of each segment is computed from that segment's queries and all its keys.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from drrl_gym.backbone import Backbone
from drrl_gym.hf_compat import cache_argument


@torch.no_grad()
def segmented_perplexity(
    backbone: Backbone, sequences: torch.Tensor, segment_len: int, batch_size: int = 4, progress: bool = True,
    before_segment: Callable[[int], object] | None = None,
) -> float:
    """exp(mean next-token NLL) over ``sequences`` (n, L), run ``segment_len`` tokens at a time.

    ``before_segment(start)``, if given, runs before each segment with its first position (e.g. to set ranks).
    """
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(sequences), batch_size), desc="perplexity", disable=not progress):
        tokens = sequences[start : start + batch_size].to(backbone.device)
        cache = DynamicCache(config=backbone.model.config)
        for s in range(0, tokens.shape[1] - 1, segment_len):
            if before_segment is not None:
                before_segment(s)
            segment = tokens[:, s : s + segment_len]
            logits = backbone.model(segment, **cache_argument(cache), use_cache=True).logits
            segment_nll, segment_count = next_token_nll(logits, tokens, s)
            nll, count = nll + segment_nll, count + segment_count
    return math.exp(nll / count)


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> tuple[float, int]:
    """Summed NLL of the tokens that a segment's logits (B, T, V), starting at position ``start`` of ``tokens`` (B, L),
    predict, and how many there are (:func:`predicted_targets`)."""
    logits, targets = predicted_targets(logits, tokens, start)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
    return nll, targets.numel()


def predicted_targets(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 logits (B, T', V) of a segment starting at position ``start`` of ``tokens`` (B, L) that have a
    next token, and those tokens (B, T'): the last segment of a sequence has no target for its final token."""
    targets = tokens[:, start + 1 : start + 1 + logits.shape[1]]
    return logits[:, : targets.shape[1]].float(), targets


def describe_machine(device: torch.device | None = None) -> str:
    """The machine a measurement ran on, for the records results carry (GPU name, or CPU and its thread count)."""
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
