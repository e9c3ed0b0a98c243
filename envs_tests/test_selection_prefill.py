"""The fused choose-and-attend kernel of a segment (``drrl_gym.selection_prefill_triton``) against the composed path
of ``drrl_gym.selection.selection_attention`` (which it replaces on CUDA): on the CPU through Triton's interpreter, on
CUDA with the ``gpu`` marker, and captured as a CUDA graph."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from triton_interpreter import assert_runs_in_interpreter

from drrl_gym.selection import kept_counts, rotate, selection_attention, visible_key_counts

HAS_TRITON = importlib.util.find_spec("triton") is not None


def segment_case(batch: int, kv_heads: int, group: int, d: int, n_queries: int, n_keys: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    """A segment of ``n_queries`` new tokens over ``n_keys`` keys; rank and keep drawn per (row, KV head), with a
    full rank and a keep of 1 among them (full attention on that head)."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randint(1, d + 1, (batch, kv_heads), generator=g)
    keep = torch.tensor([0.1, 0.25, 0.375, 1.0], dtype=torch.float64)[torch.randint(4, (batch, kv_heads), generator=g)]
    rank.view(-1)[0], keep.view(-1)[-1] = d, 1.0
    tensors = {"query": 2 * torch.randn(batch, kv_heads * group, n_queries, d, generator=g),
               "key": 2 * torch.randn(batch, kv_heads, n_keys, d, generator=g),
               "value": torch.randn(batch, kv_heads, n_keys, d, generator=g),
               "basis": torch.linalg.qr(torch.randn(kv_heads, d, d, generator=g))[0]}
    return {**{name: x.to(device, dtype) for name, x in tensors.items()}, "rank": rank.to(device), "keep": keep}


def composed(case: dict, **window) -> torch.Tensor:
    """The composed path the kernel replaces (priorities, kept masks, SDPA; the torch expressions on the CPU)."""
    return selection_attention(**case, **window, fused=False)[0]


# ------------------------------------------------------------------------------- kernel, Triton interpreter
INTERPRETER_SCRIPT = """
    import torch
    from test_selection_prefill import composed, segment_case
    from drrl_gym.selection import kept_counts, rotate, visible_key_counts
    from drrl_gym.selection_prefill_triton import selection_prefill

    torch.set_num_threads(1)
    for seed, (shape, window) in enumerate([((2, 2, 3, 16, 20, 70), (4, 8)), ((1, 1, 4, 16, 17, 17), (0, 1)),
                                            ((1, 3, 1, 32, 5, 80), (2, 3))]):
        case = segment_case(*shape, seed=seed)
        n_queries, n_keys = shape[4], shape[5]
        counts = kept_counts(case["keep"], visible_key_counts(n_queries, n_keys), *window).to(torch.long)
        out = selection_prefill(case["query"], case["key"], case["value"], case["basis"],
                                rotate(case["key"], case["basis"]), case["rank"], counts, shape[3] ** -0.5, *window)
        expected = composed(case, sink_tokens=window[0], recent_tokens=window[1])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    print("interpreter ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_matches_composed_path_in_triton_interpreter():
    """Several query blocks, a partial last block, more keys than a key tile (not a multiple of it), one block's
    keys all visible to its first query, heads per group 3, 4 and 1, empty and wide windows, keep 1 on a head.
    Small: the interpreter is slow."""
    assert_runs_in_interpreter(INTERPRETER_SCRIPT)


# ------------------------------------------------------------------------------------------- kernel, CUDA
GPU_CASES = [  # (batch, kv_heads, group, d, queries, keys): the env's segment, its first, a long context, others
    (8, 3, 3, 64, 128, 1024),
    (8, 3, 3, 64, 128, 128),
    (2, 3, 3, 64, 128, 8192),
    (3, 2, 4, 128, 50, 300),
    (2, 1, 1, 32, 7, 90),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=[f"B{c[0]}-Hkv{c[1]}-G{c[2]}-d{c[3]}-T{c[4]}-L{c[5]}"
                                                  for c in GPU_CASES])
def test_kernel_matches_composed_path_on_cuda(shape, dtype):
    """A key whose priority sits within rounding of a row's threshold may flip between the kernel and the composed
    path (its q P in another summation order), changing that row's output by about the key's weight: hence a max
    tolerance that allows a flip and a mean tolerance that allows few."""
    case = segment_case(*shape, seed=sum(shape), dtype=dtype, device="cuda")
    out, _ = selection_attention(**case, fused=True)
    expected = composed(case)
    error = (out.float() - expected.float()).abs()
    max_tol, mean_tol = (5e-2, 1e-4) if dtype == torch.float32 else (1e-1, 3e-3)
    assert out.dtype == dtype and out.shape == expected.shape
    assert float(error.max()) <= max_tol and float(error.mean()) <= mean_tol, (float(error.max()), float(error.mean()))


@pytest.mark.gpu
def test_full_rank_and_keep_one_is_plain_attention_on_cuda():
    """At r = d and keep = 1 every visible key is kept: the kernel is causal attention."""
    case = segment_case(4, 3, 3, 64, 128, 640, dtype=torch.bfloat16, device="cuda")
    case["rank"], case["keep"] = torch.full_like(case["rank"], 64), torch.ones_like(case["keep"])
    out, _ = selection_attention(**case, fused=True)
    repeat = case["query"].shape[1] // case["key"].shape[1]
    expected = torch.nn.functional.scaled_dot_product_attention(
        case["query"], case["key"].repeat_interleave(repeat, 1), case["value"].repeat_interleave(repeat, 1),
        attn_mask=torch.ones(128, 640, dtype=torch.bool, device="cuda").tril(640 - 128))
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_kernel_call_is_a_cuda_graph():
    """Captured once, a call replays with new queries, keys, ranks and counts written in place: nothing is read on
    the host."""
    from drrl_gym.cuda_graphs import capture_cuda_graph
    from drrl_gym.selection_prefill_triton import selection_prefill

    def inputs(seed: int) -> dict:
        case = segment_case(4, 3, 3, 64, 128, 512, seed=seed, dtype=torch.bfloat16, device="cuda")
        counts = kept_counts(case["keep"], visible_key_counts(128, 512), 4, 8).cuda()
        return {"query": case["query"], "key": case["key"], "value": case["value"], "basis": case["basis"],
                "rotated_keys": rotate(case["key"], case["basis"]), "rank": case["rank"], "counts": counts}

    live = inputs(0)
    graph, out = capture_cuda_graph(lambda: selection_prefill(**live, scaling=0.125, sink_tokens=4, recent_tokens=8))
    fresh = inputs(1)
    for name, tensor in fresh.items():
        live[name].copy_(tensor)
    graph.replay()
    torch.testing.assert_close(out, selection_prefill(**fresh, scaling=0.125, sink_tokens=4, recent_tokens=8),
                               atol=0, rtol=0)
