"""The forward's building blocks the env's step runs on: the grouped-query attention against transformers' SDPA
integration, and the preallocated KV cache against a DynamicCache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from drrl_gym.backbone import DEFAULT_MODEL, Backbone, load_backbone
from drrl_gym.grouped_attention import GROUPED_SDPA, grouped_query_attention, grouped_sdpa_forward
from drrl_gym.hf_compat import cache_argument
from drrl_gym.kv_cache import PreallocatedCache, kv_tensors
from drrl_gym.selection import visible_mask

B, H, H_KV, D = 3, 6, 2, 8


def _inputs(n_queries: int, n_keys: int, value_dim: int = D, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n_queries, D, generator=generator), torch.randn(B, H_KV, n_keys, D, generator=generator),
            torch.randn(B, H_KV, n_keys, value_dim, generator=generator))


def _causal(n_queries: int, n_keys: int) -> torch.Tensor:
    """transformers' layout: one (1, 1, T, L) causal mask aligned to the last key, viewed over the batch."""
    return visible_mask(n_queries, n_keys)[None, None].expand(B, 1, n_queries, n_keys)


MODULE = SimpleNamespace(num_key_value_groups=H // H_KV, is_causal=True)


@pytest.mark.parametrize("n_queries, n_keys, mask_kind, value_dim", [
    (5, 9, "causal", D), (5, 9, "none", D), (7, 7, "none", D), (1, 9, "none", D), (5, 9, "padding", D),
    (5, 9, "additive", D), (5, 9, "causal", 2 * D),
])
def test_grouped_attention_is_transformers_sdpa(n_queries: int, n_keys: int, mask_kind: str, value_dim: int) -> None:
    """Same output as transformers' sdpa_attention_forward (which expands K and V per query head) for its mask
    forms: a causal mask over the batch, none (causal from the shapes), per-row padding, an additive float mask."""
    query, key, value = _inputs(n_queries, n_keys, value_dim)
    mask = None
    if mask_kind == "causal":
        mask = _causal(n_queries, n_keys)
    elif mask_kind == "padding":  # rows differ: row b cannot see its first b keys
        mask = _causal(n_queries, n_keys) & (torch.arange(n_keys) >= torch.arange(B)[:, None])[:, None, None]
    elif mask_kind == "additive":
        mask = torch.randn(B, 1, n_queries, n_keys, generator=torch.Generator().manual_seed(1))
    expected, _ = sdpa_attention_forward(MODULE, query, key, value, mask, scaling=0.3)
    if mask is None and n_keys > n_queries > 1:  # transformers would crop keys here (its prefill case): build it
        expected, _ = sdpa_attention_forward(MODULE, query, key, value, _causal(n_queries, n_keys), scaling=0.3)
    got, _ = grouped_sdpa_forward(MODULE, query, key, value, mask, scaling=0.3)
    assert got.shape == (B, n_queries, H, value_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_grouped_attention_refuses_uneven_groups_and_dropout() -> None:
    query, key, value = _inputs(4, 4)
    with pytest.raises(ValueError, match="evenly"):
        grouped_query_attention(query[:, :5], key, value, None, 0.3)
    with pytest.raises(ValueError, match="Fix: call model.eval"):
        grouped_sdpa_forward(MODULE, query, key, value, None, dropout=0.1)


def _segments(model, cache, tokens: torch.Tensor, length: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.base_model(tokens[:, s : s + length], **cache_argument(cache), use_cache=True)
                          .last_hidden_state for s in range(0, tokens.shape[1], length)], 1)


def test_a_model_runs_the_grouped_attention(tiny_llama: Backbone) -> None:
    """As a model's attention implementation: the hidden states of segments over a KV cache are SDPA's."""
    model = tiny_llama.model
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = _segments(model, DynamicCache(config=model.config), tokens, 8)
    previous = model.config._attn_implementation
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        got = _segments(model, DynamicCache(config=model.config), tokens, 8)
    finally:
        model.set_attn_implementation(previous)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_preallocated_cache_computes_what_a_dynamic_cache_does(tiny_llama: Backbone) -> None:
    """Started from a first segment, appended to (with and without a reservation), in place, at fixed addresses."""
    model = tiny_llama.model
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    dynamic = DynamicCache(config=model.config)
    expected = _segments(model, dynamic, tokens, 8)
    first = DynamicCache(config=model.config)
    _segments(model, first, tokens[:, :8], 8)
    cache = PreallocatedCache(model.config.num_hidden_layers, 32)
    cache.start(kv_tensors(first))
    addresses = [keys.data_ptr() for keys, _ in kv_tensors(cache)]
    got = [_segments(model, cache, tokens[:, 8:16], 8)]  # no reservation: appends like a DynamicCache
    with cache.reserved(8):
        assert cache.get_seq_length() == 16
        got += [_segments(model, cache, tokens[:, 16:24], 8), _segments(model, cache, tokens[:, 16:24], 8)]
    torch.testing.assert_close(got[1], got[2])  # a reserved forward can run twice (a CUDA graph capture does)
    with cache.reserved(8):
        got.append(_segments(model, cache, tokens[:, 24:], 8))
    torch.testing.assert_close(torch.cat([got[0], got[1], got[3]], 1), expected[:, 8:], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 32 and [keys.data_ptr() for keys, _ in kv_tensors(cache)] == addresses
    for (keys, values), (want_keys, want_values) in zip(kv_tensors(cache), kv_tensors(dynamic), strict=True):
        torch.testing.assert_close(keys, want_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, want_values, atol=1e-5, rtol=1e-5)


def test_preallocated_cache_refuses_what_it_cannot_hold(tiny_llama: Backbone) -> None:
    model = tiny_llama.model
    first = DynamicCache(config=model.config)
    tokens = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    _segments(model, first, tokens, 8)
    cache = PreallocatedCache(model.config.num_hidden_layers, 12)
    with pytest.raises(RuntimeError, match="start"):  # a forward before start()
        _segments(model, cache, tokens, 8)
    cache.start(kv_tensors(first))
    with pytest.raises(ValueError, match="capacity"):
        _segments(model, cache, tokens, 8)  # 8 + 8 > 12
    assert cache.get_seq_length() == 8  # a refused forward leaves the cache as it was
    with pytest.raises(ValueError, match="reserve the forward's token count"), cache.reserved(2):
        _segments(model, cache, tokens[:, :3], 3)
    assert cache.get_seq_length() == 8  # the failed reservation is dropped, not counted as written
    with pytest.raises(NotImplementedError, match="Fix"):
        cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="layers"):
        cache.start(kv_tensors(first)[:1])


@pytest.mark.gpu
def test_grouped_attention_keeps_smollm2s_logits_on_cuda() -> None:
    """bf16 on CUDA (SDPA's fused kernels, the mask tiled over the group): the grouped attention's logits are no
    further from the float32 model's than transformers' own bf16 SDPA forward's, over two segments with a KV cache."""
    tokens = torch.randint(0, 49152, (8, 256), generator=torch.Generator().manual_seed(3)).cuda()
    logits = {}
    for name, dtype, attention in (("float32", torch.float32, "sdpa"), ("sdpa", torch.bfloat16, "sdpa"),
                                   ("grouped", torch.bfloat16, GROUPED_SDPA)):
        model = load_backbone(DEFAULT_MODEL, "cuda", dtype=dtype).model
        previous = model.config._attn_implementation
        model.set_attn_implementation(attention)
        try:
            cache = DynamicCache(config=model.config)
            with torch.inference_mode():
                logits[name] = torch.cat([model(tokens[:, s : s + 128], **cache_argument(cache), use_cache=True)
                                          .logits.float() for s in (0, 128)], 1)
        finally:
            model.set_attn_implementation(previous)
    error = {name: (logits[name] - logits["float32"]).abs().max().item() for name in ("sdpa", "grouped")}
    assert error["grouped"] <= 1.5 * error["sdpa"], error
    agree = (logits["grouped"].argmax(-1) == logits["sdpa"].argmax(-1)).float().mean().item()
    assert agree > 0.98, agree
