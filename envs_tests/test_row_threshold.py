"""The k-th largest value of each row and where its ties stop (``drrl_gym.row_threshold``): the sort path against a
brute-force definition, the Triton kernel against the sort path (on the CPU through Triton's interpreter, on CUDA
with the ``gpu`` marker), and the operator under torch.compile."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from triton_interpreter import assert_runs_in_interpreter

from drrl_gym.row_threshold import kept_mask, kept_masks, row_thresholds, sorted_thresholds

HAS_TRITON = importlib.util.find_spec("triton") is not None


def priority_rows(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Priorities as selection forms them: forced keys +inf, invisible ones -inf, and rows with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, length, generator=g)
    values[:, :2] = float("inf")
    values[0, length // 2:] = float("-inf")
    values[1::3] = torch.randint(0, 3, (len(values[1::3]), length), generator=g).float()  # ties at every count
    if rows > 2:
        values[2] = 0.25  # one tie over the whole row
    return values


def random_counts(rows: int, length: int, n_counts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, length + 1, (rows, n_counts), generator=g)
    counts[0, 0], counts[-1, -1] = 1, length
    return counts


def test_sort_path_keeps_the_first_k_keys_of_a_stable_descending_order():
    values, counts = priority_rows(7, 40), random_counts(7, 40, 3)
    threshold, last = sorted_thresholds(values, counts)
    for row in range(len(values)):
        order = sorted(range(values.shape[1]), key=lambda j: (-values[row, j].item(), j))  # stable, descending
        for c, count in enumerate(counts[row].tolist()):
            expected = torch.zeros(values.shape[1], dtype=torch.bool)
            expected[order[:count]] = True
            assert threshold[row, c] == values[row, order[count - 1]]
            assert torch.equal(kept_mask(values[row], threshold[row, c], last[row, c]), expected)


def test_row_thresholds_broadcasts_counts_and_keeps_the_dtype():
    values = priority_rows(2 * 3 * 5, 17).double().reshape(2, 3, 5, 17)
    counts = torch.randint(1, 18, (2, 1, 5, 4))  # one count set per (batch, query), shared by the 3 heads
    threshold, last = row_thresholds(values, counts)
    assert threshold.shape == last.shape == (2, 3, 5, 4) and threshold.dtype == torch.float64
    expected = sorted_thresholds(values.reshape(-1, 17), counts.expand(2, 3, 5, 4).reshape(-1, 4))
    assert torch.equal(threshold.reshape(-1, 4), expected[0])  # the CPU's topk path against the sort
    assert torch.equal(last.reshape(-1, 4), expected[1])
    with pytest.raises(ValueError, match="float32 or float64"):
        row_thresholds(values.half(), counts)
    with pytest.raises(ValueError, match="counts must be integers"):
        row_thresholds(values, counts.float())


def test_kept_masks_copy_each_rows_kept_set():
    values = priority_rows(2 * 4 * 9, 13, seed=3).reshape(2, 4, 9, 13)
    counts = random_counts(2 * 4 * 9, 13, 1, seed=3).reshape(2, 4, 9)
    masks = kept_masks(values, counts, copies=3)
    assert masks.shape == (2, 4, 3, 9, 13) and masks.dtype == torch.bool
    threshold, last = sorted_thresholds(values.reshape(-1, 13), counts.reshape(-1, 1))
    expected = kept_mask(values, threshold.reshape(2, 4, 9), last.reshape(2, 4, 9))
    assert torch.equal(masks, expected[:, :, None].expand(masks.shape))
    assert torch.equal(masks.sum(-1), counts[:, :, None].expand(2, 4, 3, 9))
    additive = kept_masks(values, counts, copies=3, dtype=torch.bfloat16)  # SDPA's additive form of the same sets
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive, torch.zeros_like(additive).masked_fill(~masks, float("-inf")))
    with pytest.raises(ValueError, match="counts must be integers"):
        kept_masks(values, counts[..., :1])
    with pytest.raises(ValueError, match="copies must be"):
        kept_masks(values, counts, copies=0)
    with pytest.raises(ValueError, match="dtype must be torch.bool or a float dtype"):
        kept_masks(values, counts, dtype=torch.int8)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_row_thresholds_under_torch_compile():
    """The custom operator traces whole (no graph break) and gives the eager result."""
    values, counts = priority_rows(6, 33), random_counts(6, 33, 2)

    def mask_sums(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        threshold, last = row_thresholds(v * 2, c)
        return kept_mask(v * 2, threshold[:, 1], last[:, 1]).sum(-1)

    compiled = torch.compile(mask_sums, fullgraph=True)
    assert torch.equal(compiled(values, counts), counts[:, 1])


INTERPRETER_SCRIPT = """
    import torch
    from test_row_threshold import priority_rows, random_counts
    from drrl_gym.row_threshold import _kernel_kept_masks, _kernel_thresholds, kept_mask, sorted_thresholds

    for seed, (rows, length, n_counts) in enumerate([(5, 37, 3), (3, 1, 1), (20, 9, 2)]):
        values = priority_rows(rows, length, seed)
        counts = random_counts(rows, length, n_counts, seed).int()
        expected = sorted_thresholds(values, counts)
        for launch in [(), (4, 4)]:  # the default (one row per program) and several rows per program
            got = _kernel_thresholds(values, counts, *launch)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (seed, launch, got, expected)
        outer = rows if rows % 5 else rows // 5  # several queries per outer row where the row count allows
        grouped = values.reshape(outer, rows // outer, length)
        masks = _kernel_kept_masks(grouped, counts[:, 0].reshape(outer, -1).contiguous(), 2)
        assert masks.shape == (outer, 2, rows // outer, length)
        expected_mask = kept_mask(values, expected[0][:, 0], expected[1][:, 0]).reshape(grouped.shape)
        assert torch.equal(masks, expected_mask[:, None].expand(masks.shape)), seed
        additive = _kernel_kept_masks(grouped, counts[:, 0].reshape(outer, -1).contiguous(), 2, torch.float16)
        assert additive.dtype == torch.float16 and torch.equal(additive == 0, masks), seed
        assert bool((additive[~masks] == float("-inf")).all()), seed
    print("interpreter ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_matches_the_sort_in_triton_interpreter():
    """Rows shorter than a power of two, one and several rows per program, ties, +-inf, counts 1 and L; the masks
    written from the same search, copied per head.
    Small: the interpreter runs a search pass in about 0.1 s."""
    assert_runs_in_interpreter(INTERPRETER_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, length, n_counts", [(24576, 1024, 3), (3000, 8192, 3), (64, 20000, 2), (999, 77, 1)])
def test_kernel_matches_the_sort_on_cuda(rows: int, length: int, n_counts: int):
    """The env's shapes (64 sequences x 3 KV heads x 128 queries over 1024 keys), long rows, rows past MAX_ROW (the
    sort path) and odd sizes; the masks of the first count, copied twice, as bool and in SDPA's additive form."""
    values = priority_rows(rows, length).cuda()
    counts = random_counts(rows, length, n_counts).cuda()
    got = row_thresholds(values, counts)
    expected = sorted_thresholds(values, counts)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    masks = kept_masks(values.reshape(-1, 1, length), counts[:, :1].reshape(-1, 1), copies=2)
    expected_mask = kept_mask(values, expected[0][:, 0], expected[1][:, 0])
    assert torch.equal(masks, expected_mask[:, None, None].expand(masks.shape))
    additive = kept_masks(values.reshape(-1, 1, length), counts[:, :1].reshape(-1, 1), copies=2, dtype=torch.bfloat16)
    assert torch.equal(additive, torch.zeros_like(additive).masked_fill(~masks, float("-inf")))
