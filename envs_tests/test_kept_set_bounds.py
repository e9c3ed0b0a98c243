"""The bound (7) of nested kept sets (``drrl_gym.kept_set_bounds``): the torch expression against the float64
bound of ``drrl_gym.selection.dropped_mass_bound``, and the Triton kernel against the torch expression (on the CPU
through Triton's interpreter, on CUDA with the ``gpu`` marker)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from triton_interpreter import assert_runs_in_interpreter

from drrl_gym.kept_set_bounds import kept_set_bounds, torch_bounds
from drrl_gym.row_threshold import kept_mask, row_thresholds
from drrl_gym.selection import dropped_mass_bound, forced_mask, priorities, visible_mask

HAS_TRITON = importlib.util.find_spec("triton") is not None


def bound_inputs(batch: int, kv_heads: int, group: int, n_queries: int, n_keys: int, rank: int, selection: str,
                 seed: int = 0) -> dict:
    """The table's inputs at one rank for random rotated queries and keys, with the counts of three keeps."""
    g = torch.Generator().manual_seed(seed)
    d = 2 * rank
    q = 2 * torch.randn(batch, kv_heads, group, n_queries, d, generator=g)
    k = 2 * torch.randn(batch, kv_heads, n_keys, d, generator=g)
    scaling = d**-0.5
    approx = scaling * q[..., :rank] @ k[:, :, None, :, :rank].transpose(-1, -2)
    visible, forced = visible_mask(n_queries, n_keys), forced_mask(n_queries, n_keys, 1, 2)
    priority = priorities(approx, visible, forced, selection)
    n = torch.arange(n_keys - n_queries + 1, n_keys + 1)
    counts = torch.stack([torch.clamp((n * keep).ceil().long(), min=3).minimum(n) for keep in (0.2, 0.4, 1.0)], -1)
    threshold, last = row_thresholds(priority, counts[None, None, None])
    q_tail = scaling * torch.linalg.vector_norm(q[..., rank:], dim=-1)
    k_tail = torch.linalg.vector_norm(k[..., rank:], dim=-1)
    return {"q": q, "k": k, "rank": rank, "scaling": scaling, "args": [x.flatten(0, 1) for x in
            (approx, q_tail, k_tail, priority, threshold, last)]}


@pytest.mark.parametrize("selection", ["group", "head"])
def test_torch_bounds_equal_the_float64_bound_of_the_same_kept_sets(selection: str):
    inputs = bound_inputs(2, 2, 3, 5, 11, 4, selection)
    approx, _, _, priority, threshold, last = inputs["args"]
    bounds = kept_set_bounds(*inputs["args"])  # the CPU: the torch expression
    assert bounds.shape == (4, 3, 5, 3)
    q, k = inputs["q"], inputs["k"]
    for c in range(3):
        kept = kept_mask(priority, threshold[..., c], last[..., c]).expand(approx.shape)  # (R, G, T, L)
        expected = dropped_mass_bound(q.flatten(1, 2), k, kept.reshape(2, 6, 5, 11), inputs["rank"],
                                      scaling=inputs["scaling"])
        torch.testing.assert_close(bounds[..., c].reshape(2, 6, 5), expected.float(), rtol=1e-5, atol=1e-7)
    assert (bounds[..., 2] == 0).all()  # keep 1 drops nothing
    with pytest.raises(ValueError, match="kept_set_bounds needs"):
        kept_set_bounds(approx.half(), *inputs["args"][1:])


INTERPRETER_SCRIPT = """
    import torch
    from test_kept_set_bounds import bound_inputs
    from drrl_gym.kept_set_bounds import _kernel_bounds, torch_bounds

    for seed, (selection, shape) in enumerate([("group", (1, 2, 3, 4, 13)), ("head", (1, 1, 3, 2, 5)),
                                               ("group", (1, 1, 1, 1, 1))]):
        args = bound_inputs(*shape, rank=2, selection=selection, seed=seed)["args"]
        torch.testing.assert_close(_kernel_bounds(*args), torch_bounds(*args), rtol=1e-5, atol=1e-7)
    print("interpreter ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_matches_torch_in_triton_interpreter():
    """Group and head selection, rows shorter than a power of two, one key. Small: the interpreter is slow."""
    assert_runs_in_interpreter(INTERPRETER_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["group", "head"])
def test_kernel_matches_torch_on_cuda(selection: str):
    """The env's shapes: 3 KV heads of 3 query heads, 128 queries over 1024 keys."""
    args = [x.cuda() for x in bound_inputs(4, 3, 3, 128, 1024, 16, selection)["args"]]
    torch.testing.assert_close(kept_set_bounds(*args), torch_bounds(*args), rtol=1e-4, atol=1e-6)
