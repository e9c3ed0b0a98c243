"""The priorities (3) of every key (``drrl_gym.key_priorities``): the torch expression against selection's own
definition, the Triton kernel against the torch expression (on the CPU through Triton's interpreter, on CUDA with the
``gpu`` marker), and the operator under torch.compile."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from triton_interpreter import assert_runs_in_interpreter

from drrl_gym.key_priorities import key_priorities, torch_priorities
from drrl_gym.selection import approximate_scores, forced_mask, priorities, visible_mask

HAS_TRITON = importlib.util.find_spec("triton") is not None


def priority_inputs(batch: int, kv_heads: int, group: int, n_queries: int, n_keys: int, d: int, seed: int = 0,
                    key_dtype: torch.dtype = torch.float32) -> dict:
    """Random rotated queries and keys with a different rank per (sequence, KV head), d included."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randint(1, d + 1, (batch, kv_heads), generator=g)
    rank.view(-1)[0] = d
    return {"rotated_query": 2 * torch.randn(batch, kv_heads, group, n_queries, d, generator=g),
            "rotated_keys": (2 * torch.randn(batch, kv_heads, n_keys, d, generator=g)).to(key_dtype),
            "rank": rank, "scaling": d**-0.5, "sink_tokens": 2, "recent_tokens": 3}


@pytest.mark.parametrize("selection", ["group", "head"])
def test_torch_priorities_are_selections_definition(selection: str):
    inputs = priority_inputs(2, 3, 3, 5, 12, 8)
    got = key_priorities(**inputs, selection=selection)
    q, k, rank = inputs["rotated_query"], inputs["rotated_keys"], inputs["rank"]
    approx = approximate_scores(q, k, rank, inputs["scaling"])
    expected = priorities(approx, visible_mask(5, 12), forced_mask(5, 12, 2, 3), selection)
    assert got.shape == (2, 3, 1 if selection == "group" else 3, 5, 12)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="key_priorities needs"):
        key_priorities(q[0], k, rank, 1.0, 2, 3, selection)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_key_priorities_under_torch_compile():
    """The custom operator traces whole (no graph break) and gives the eager result."""
    inputs = priority_inputs(1, 2, 3, 4, 9, 8)
    compiled = torch.compile(lambda **kw: key_priorities(**kw, selection="group") * 1, fullgraph=True)
    torch.testing.assert_close(compiled(**inputs), key_priorities(**inputs, selection="group"))


INTERPRETER_SCRIPT = """
    import torch
    from test_key_priorities import priority_inputs
    from drrl_gym.key_priorities import _kernel_priorities, torch_priorities

    cases = [("group", (1, 2, 3, 5, 37, 32), torch.float32), ("head", (2, 1, 3, 3, 20, 16), torch.bfloat16),
             ("group", (1, 1, 1, 1, 1, 8), torch.float32), ("group", (1, 1, 3, 20, 70, 24), torch.float32)]
    for seed, (selection, shape, key_dtype) in enumerate(cases):
        inputs = priority_inputs(*shape, seed=seed, key_dtype=key_dtype)
        args = list(inputs.values()) + [selection == "head"]
        got, expected = _kernel_priorities(*args), torch_priorities(*args)
        assert torch.equal(got.isinf(), expected.isinf()) and torch.equal(got.isposinf(), expected.isposinf())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    print("interpreter ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_matches_torch_in_triton_interpreter():
    """Group and head selection, ranks below d, key counts that are not multiples of the key block, more queries
    than a query block, bf16 keys, one key. Small: the interpreter is slow."""
    assert_runs_in_interpreter(INTERPRETER_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["group", "head"])
def test_kernel_matches_torch_on_cuda(selection: str):
    """The env's shapes (3 KV heads of 3 query heads, 128 queries over 1024 bf16 keys). The kernel's products are
    TF32, the reference's float32: the priorities agree to about 1e-3 of a score, the infinities exactly."""
    inputs = {key: value.cuda() if isinstance(value, torch.Tensor) else value
              for key, value in priority_inputs(4, 3, 3, 128, 1024, 64, key_dtype=torch.bfloat16).items()}
    got = key_priorities(**inputs, selection=selection)
    expected = torch_priorities(*inputs.values(), selection == "head")
    assert torch.equal(got.isinf(), expected.isinf()) and torch.equal(got.isposinf(), expected.isposinf())
    finite = ~expected.isinf()
    torch.testing.assert_close(got[finite], expected[finite], rtol=0, atol=2e-2)
