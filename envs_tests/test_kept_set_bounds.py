"""The bound (7) of nested kept sets (``drrl_gym.kept_set_bounds``): the torch expression against the float64
bound of ``drrl_gym.selection.dropped_mass_bound``, and the Triton kernel against the torch expression (on the CPU
through Triton's interpreter, on CUDA with the ``gpu`` marker)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from triton_interpreter import assert_runs_in_interpreter

from drrl_gym.kept_set_bounds import kept_set_bounds, torch_bounds
from drrl_gym.key_priorities import key_priorities
from drrl_gym.row_threshold import kept_mask, row_thresholds
from drrl_gym.selection import dropped_mass_bound

HAS_TRITON = importlib.util.find_spec("triton") is not None


def bound_inputs(settings: int, batch: int, kv_heads: int, group: int, n_queries: int, n_keys: int, d: int,
                 selection: str, seed: int = 0, key_dtype: torch.dtype = torch.float32) -> list:
    """kept_set_bounds' arguments for random rotated queries and keys at ``settings`` random ranks per (sequence,
    KV head), d among them, with the counts of three keeps (the last keeps every key)."""
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(batch, kv_heads, group, n_queries, d, generator=g)
    k = (2 * torch.randn(batch, kv_heads, n_keys, d, generator=g)).to(key_dtype)
    rank = torch.randint(1, d + 1, (settings, batch, kv_heads), generator=g)
    rank.view(-1)[0] = d
    scaling = d**-0.5
    priority = key_priorities(q, k, rank, scaling, 1, 2, selection)
    n = torch.arange(n_keys - n_queries + 1, n_keys + 1)
    counts = torch.stack([torch.clamp((n * keep).ceil().long(), min=3).minimum(n) for keep in (0.2, 0.4, 1.0)], -1)
    threshold, last = row_thresholds(priority, counts[None, None, None, None])
    return [q, k, rank, scaling, priority, threshold, last]


@pytest.mark.parametrize("selection", ["group", "head"])
def test_torch_bounds_equal_the_float64_bound_of_the_same_kept_sets(selection: str):
    args = bound_inputs(2, 2, 2, 3, 5, 11, 8, selection)
    q, k, rank, scaling, priority, threshold, last = args
    bounds = kept_set_bounds(*args)  # the CPU: the torch expression
    assert bounds.shape == (2, 2, 2, 3, 5, 3)
    for s in range(2):
        for c in range(3):
            kept = kept_mask(priority[s], threshold[s, ..., c], last[s, ..., c]).expand(2, 2, 3, 5, 11)
            expected = dropped_mass_bound(q.flatten(1, 2), k, kept.reshape(2, 6, 5, 11), rank[s], scaling=scaling)
            torch.testing.assert_close(bounds[s, ..., c].reshape(2, 6, 5), expected.float(), rtol=1e-5, atol=1e-7)
    assert (bounds[..., 2] == 0).all()  # keep 1 drops nothing
    with pytest.raises(ValueError, match="kept_set_bounds needs"):
        kept_set_bounds(q.half(), *args[1:])
    with pytest.raises(ValueError, match="kept_set_bounds needs"):
        kept_set_bounds(q, k, rank[0], *args[3:])


INTERPRETER_SCRIPT = """
    import torch
    from test_kept_set_bounds import bound_inputs
    from drrl_gym.kept_set_bounds import _kernel_bounds, torch_bounds

    cases = [("group", (2, 1, 2, 3, 4, 13, 8), torch.float32), ("head", (1, 1, 1, 3, 2, 5, 16), torch.bfloat16),
             ("group", (1, 1, 1, 1, 1, 1, 8), torch.float32), ("group", (2, 1, 1, 3, 20, 70, 24), torch.float32)]
    for seed, (selection, shape, key_dtype) in enumerate(cases):
        args = bound_inputs(*shape, selection=selection, seed=seed, key_dtype=key_dtype)
        torch.testing.assert_close(_kernel_bounds(*args), torch_bounds(*args), rtol=1e-5, atol=1e-7)
    print("interpreter ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_matches_torch_in_triton_interpreter():
    """Group and head selection, several rank settings, key counts that are not multiples of the key block, more
    queries than a query block, bf16 keys, one key. Small: the interpreter is slow."""
    assert_runs_in_interpreter(INTERPRETER_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["group", "head"])
def test_kernel_matches_torch_on_cuda(selection: str):
    """The env's shapes: four ranks, 3 KV heads of 3 query heads, the last 32 queries over 1024 bf16 keys. The
    kernel's 3xTF32 products give the float32 scores, so the bounds agree to float32 rounding of the sums."""
    args = [x.cuda() if isinstance(x, torch.Tensor) else x
            for x in bound_inputs(4, 4, 3, 3, 32, 1024, 64, selection, key_dtype=torch.bfloat16)]
    torch.testing.assert_close(kept_set_bounds(*args), torch_bounds(*args), rtol=1e-4, atol=1e-6)
