"""Grouped-query attention through one SDPA call, without copying each key and value head once per query head.

With G = H / H_kv query heads per KV head (SmolLM2: 9 over 3), transformers' SDPA integration expands K and V to H
heads (``repeat_kv``) whenever the forward has an attention mask, which every forward over a KV cache with more than
one new token has: G copies of every visible key and value, written and read again by each layer. On an H200 that
expansion cost the env step about as much as the attention itself (docs/results.md). Here the G query heads that
share KV head j are stacked along the query axis instead,

    Q (B, H, T, d)  ->  Q_grouped (B, H_kv, G*T, d),   row g*T + t of group j = query t of head j*G + g,

so one SDPA call attends (B, H_kv, G*T) queries to the (B, H_kv, L) keys as they are, with the (T, L) mask tiled G
times along the query axis. The softmax of each query row is over the same keys with the same mask as before, so
the output is the model's attention (up to the kernel's summation order). The mask is tiled once per forward shape,
not per row, where the batch shares it (transformers' causal masks are expanded views over the batch).

Used by ``drrl_gym.lowrank.DynamicRankAttention`` for every SDPA call, and registered as the attention
implementation ``"drrl_grouped_sdpa"`` so a plain model can run it too (``model.set_attn_implementation``): the
benchmarks compare the env against the plain model with either attention.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from drrl_gym.selection import visible_mask

GROUPED_SDPA = "drrl_grouped_sdpa"


def grouped_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, is_causal: bool = True
                            ) -> torch.Tensor:
    """softmax(Q K^T * scaling + mask) V for (B, H, T, dq) queries, (B, H_kv, L, dq) keys and (B, H_kv, L, dv)
    values, H a multiple of H_kv; returns (B, T, H, dv), the layout transformers' attention functions return.

    ``attention_mask``: boolean (True: attend) or additive, broadcastable to (B, 1, T, L); None with ``is_causal``
    means the causal mask aligned to the last key (query t sees keys 0 .. L - T + t), as SDPA's ``is_causal`` would
    be for T = L.
    """
    batch, heads, n_queries, width = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    group = heads // kv_heads
    mask = attention_mask
    if mask is None and is_causal and n_queries > 1:
        mask = visible_mask(n_queries, n_keys, query.device)  # (T, L)
    if mask is not None and group > 1:
        mask = mask if mask.dim() == 4 else mask.reshape(1, 1, *mask.shape[-2:])
        if mask.shape[0] > 1 and mask.stride(0) == 0:  # a view of one mask over the batch: tile that one
            mask = mask[:1]
        mask = mask.repeat(1, 1, group, 1)  # (B or 1, 1, G*T, L): row g*T + t is query t's
    grouped = query.reshape(batch, kv_heads, group * n_queries, width)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, n_queries, value.shape[-1]).transpose(1, 2).contiguous()


def grouped_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature around :func:`grouped_query_attention` (inference only)."""
    if dropout:
        raise ValueError(f"{GROUPED_SDPA} runs inference only (dropout={dropout}). Fix: call model.eval().")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return grouped_query_attention(query, key, value, attention_mask, scaling, causal), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_forward)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
