"""Which keys selection keeps: per row of priorities, the k-th largest value and where its ties stop.

Selection keeps the first k_i keys of each row in priority order, ties broken by position, as a stable descending
sort would order them (``drrl_gym.selection``, (4)). That set is fixed by two numbers per row and count k:

    t    = the k-th largest priority of the row                                   (the threshold)
    last = the position of the k-th key of the stable descending order            (where the ties at t stop)
    kept = {j : pi_j > t} + {j : pi_j == t, j <= last}                             exactly k keys

so a kept mask, or a sum over the kept keys, is one elementwise pass given (t, last) (:func:`kept_mask`); nothing
is sorted or gathered. On CUDA a Triton kernel finds (t, last) for every count of a row in one read of the row: a
4-ary search over the float bit pattern (as int32, in the float order) whose passes are each one reduction of the
row held in registers, stopping as soon as the count at the lower bound is exactly k (about log_4 of the spread of
the values, ~8 passes), then one prefix count of the ties. The search spans the row's finite values only: +inf
(forced keys) and -inf (invisible ones) are counted before it. Selection itself needs the mask, not (t, last):
:func:`kept_masks` runs the same search and writes the row's kept mask, once per query head that shares the row,
so neither (t, last) nor the mask goes through memory twice; it can write the mask in SDPA's additive form (0 or
-inf in the attention's dtype), which SDPA would otherwise make from a bool mask in a pass of its own. On the CPU,
``topk`` of the largest count and a count of the ties in position order; elsewhere, a stable sort. None of them
has a data-dependent output shape, and the CUDA ones never synchronise with the host, so the operator runs inside
torch.compile and CUDA graphs; it is a ``torch.library`` custom op (``drrl_gym::row_thresholds``) so the compiler
keeps it whole.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch brings no Triton: the CPU path needs none
    triton = None

MAX_ROW = 16384  # the kernels hold a row in registers; longer rows take the sort (or torch) path


def row_thresholds(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``values`` (..., L) and each of its counts (..., C) (integers in [1, L]): the count-th
    largest value and the position of the count-th key in stable descending order, int64; both (..., C).

    ``values`` is float32 or float64 (priorities: +inf and -inf allowed, no NaN), the thresholds come in its dtype;
    ``counts`` broadcasts against its rows. Counts out of range are not checked (a check would wait for the device):
    they are clamped into [1, L].
    """
    if values.dtype not in (torch.float32, torch.float64) or values.dim() < 1:
        raise ValueError(f"values must be a float32 or float64 tensor (..., L), got {values.dtype} "
                         f"{tuple(values.shape)}")
    if counts.is_floating_point() or counts.dim() != values.dim():
        raise ValueError(f"counts must be integers (..., C) with the rows of values {tuple(values.shape[:-1])}, got "
                         f"{counts.dtype} {tuple(counts.shape)}")
    rows = torch.broadcast_shapes(values.shape[:-1], counts.shape[:-1])
    length, n_counts = values.shape[-1], counts.shape[-1]
    flat_values = values.expand(*rows, length).reshape(-1, length)
    flat_counts = counts.expand(*rows, n_counts).reshape(-1, n_counts).clamp(1, length).to(torch.int32)
    threshold, last = torch.ops.drrl_gym.row_thresholds(flat_values.contiguous(), flat_counts.contiguous())
    return threshold.reshape(*rows, n_counts), last.reshape(*rows, n_counts)


def kept_mask(values: torch.Tensor, threshold: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The kept set of one count as a bool mask like ``values`` (..., L): threshold and last (...) of
    :func:`row_thresholds` for that count."""
    position = torch.arange(values.shape[-1], device=values.device)
    return (values > threshold[..., None]) | ((values == threshold[..., None]) & (position <= last[..., None]))


def kept_masks(values: torch.Tensor, counts: torch.Tensor, copies: int = 1,
               dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The kept sets of one count per row as masks, each written ``copies`` times: values (..., T, L) float32 or
    float64, counts (..., T) integers in [1, L] (clamped, not checked) -> (..., copies, T, L) of ``dtype``.

    ``dtype`` bool gives True where kept; a float dtype gives SDPA's additive mask, 0 where kept and -inf elsewhere.
    SDPA turns a bool mask into that form with an elementwise pass over the whole (B, H, T, L) mask before it
    attends; on an H100 at the env's shapes (64 x 3 x 384 rows of 1024 keys) that pass took 0.18 ms, more than the
    attention itself (0.12 ms).

    Selection by KV group chooses one key set per group (one row of priorities per query) that the group's G query
    heads share: ``copies=G`` lays it out once per head, as attention over the stacked heads takes it. On CUDA one
    Triton program per row searches its threshold and writes the mask straight away, so neither the (t, last) pair
    nor the mask is formed in a second pass over the priorities."""
    if values.dtype not in (torch.float32, torch.float64) or values.dim() < 2:
        raise ValueError(f"values must be a float32 or float64 tensor (..., T, L), got {values.dtype} "
                         f"{tuple(values.shape)}")
    if counts.is_floating_point() or counts.shape != values.shape[:-1]:
        raise ValueError(f"counts must be integers of values' rows {tuple(values.shape[:-1])}, got {counts.dtype} "
                         f"{tuple(counts.shape)}")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive int, got {copies!r}")
    if not (dtype == torch.bool or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
        raise ValueError(f"dtype must be torch.bool or a float dtype (an additive mask), got {dtype!r}")
    n_queries, length = values.shape[-2:]
    flat = values.reshape(-1, n_queries, length).contiguous()
    clamped = counts.reshape(-1, n_queries).clamp(1, length).to(torch.int32).contiguous()
    masks = torch.ops.drrl_gym.kept_masks(flat, clamped, copies, dtype)
    return masks.reshape(*values.shape[:-2], copies, n_queries, length)


@torch.library.custom_op("drrl_gym::row_thresholds", mutates_args=())
def _row_thresholds(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L) float values, (R, C) int32 counts in [1, L] -> (R, C) thresholds, (R, C) int64 positions."""
    if not values.numel():
        return sorted_thresholds(values, counts)
    if not values.is_cuda:
        return _topk_thresholds(values, counts)
    if values.dtype == torch.float32 and triton is not None and values.shape[-1] <= MAX_ROW:
        return _kernel_thresholds(values, counts)
    return sorted_thresholds(values, counts)  # no host value: CUDA graphs can capture it


@_row_thresholds.register_fake
def _(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return values.new_empty(counts.shape), counts.new_empty(counts.shape, dtype=torch.int64)


@torch.library.custom_op("drrl_gym::kept_masks", mutates_args=())
def _kept_masks(values: torch.Tensor, counts: torch.Tensor, copies: int, dtype: torch.dtype) -> torch.Tensor:
    """(O, T, L) float values, (O, T) int32 counts in [1, L] -> (O, copies, T, L) of dtype (bool, or additive)."""
    outer, n_queries, length = values.shape
    if values.is_cuda and values.dtype == torch.float32 and triton is not None and length <= MAX_ROW \
            and values.numel():
        return _kernel_kept_masks(values, counts, copies, dtype)
    threshold, last = _row_thresholds(values.reshape(-1, length), counts.reshape(-1, 1))
    kept = kept_mask(values, threshold.reshape(outer, n_queries), last.reshape(outer, n_queries))
    if dtype != torch.bool:
        kept = torch.zeros(kept.shape, dtype=dtype, device=kept.device).masked_fill_(~kept, float("-inf"))
    return kept[:, None].expand(outer, copies, n_queries, length).contiguous()


@_kept_masks.register_fake
def _(values: torch.Tensor, counts: torch.Tensor, copies: int, dtype: torch.dtype) -> torch.Tensor:
    outer, n_queries, length = values.shape
    return values.new_empty(outer, copies, n_queries, length, dtype=dtype)


def sorted_thresholds(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, through a stable descending sort: (R, L), (R, C) -> (R, C), (R, C) (CUDA rows the kernel
    does not take, and the tests' reference)."""
    order = values.sort(dim=-1, descending=True, stable=True)
    index = counts.long() - 1
    return order.values.gather(-1, index), order.indices.gather(-1, index)


def _topk_thresholds(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: the top max(counts) values of each row (no sort of the whole row), then the ties at each
    threshold counted in position order. Reads the largest count on the host, which costs nothing there (and the
    operator is opaque to torch.compile, so it breaks no graph)."""
    top = values.topk(int(counts.max()), dim=-1, sorted=True).values
    threshold = top.gather(-1, counts.long() - 1)  # (R, C)
    tied = values[:, None, :] == threshold[..., None]  # (R, C, L)
    room = counts.long() - (values[:, None, :] > threshold[..., None]).sum(-1)  # tied keys kept, >= 1
    # Where every tied key is kept (always, without ties), the last is the last tied; the others count in order.
    last = (tied * torch.arange(values.shape[-1])).amax(-1)
    split = room < tied.sum(-1)
    if split.any():
        ties = tied[split]
        last[split] = (ties & (ties.cumsum(-1) == room[split][:, None])).long().argmax(-1)
    return threshold, last


def _kernel_thresholds(values: torch.Tensor, counts: torch.Tensor, rows_per_program: int | None = None,
                       num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path; ``rows_per_program`` and ``num_warps`` override the launch (benchmarks/row_threshold.py
    sweeps them)."""
    n_rows, length = values.shape
    n_counts = counts.shape[1]
    block = triton.next_power_of_2(length)
    if rows_per_program is None:
        rows_per_program, num_warps = 1, row_warps(block)
    threshold = torch.empty(n_rows, n_counts, dtype=torch.float32, device=values.device)
    last = torch.empty(n_rows, n_counts, dtype=torch.int64, device=values.device)
    _row_threshold_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        values, counts, threshold, last, n_rows, length, C=n_counts, ROWS=rows_per_program, BLOCK=block,
        num_warps=num_warps)
    return threshold, last


def _kernel_kept_masks(values: torch.Tensor, counts: torch.Tensor, copies: int,
                       dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The Triton path of :func:`kept_masks`: (O, T, L) float32, (O, T) int32 -> (O, copies, T, L) of dtype."""
    outer, n_queries, length = values.shape
    mask = torch.empty(outer, copies, n_queries, length, dtype=dtype, device=values.device)
    block = triton.next_power_of_2(length)
    _kept_mask_kernel[(outer * n_queries,)](values, counts, mask, length, n_queries, COPIES=copies, BLOCK=block,
                                            ADDITIVE=dtype != torch.bool, num_warps=row_warps(block))
    return mask


def row_warps(block: int) -> int:
    """Warps for a program holding one row of ``block`` (a power of two) values in registers: 16 values per thread,
    up to 16 warps (also ``drrl_gym.kept_set_bounds``'s). The search takes one row per program at this width: a
    pass's reductions then stay within a warp or two, and rows finish independently. On an H200 at the env's
    shapes (24,576 rows of 1024) this took 0.43 ms for three counts, against 1.37 ms for eight rows over eight
    warps (docs/results.md, "Selection step: a faster threshold search")."""
    return max(1, min(16, block // 512))


if triton is not None:
    @triton.jit
    def add3(a0, a1, a2, b0, b1, b2):
        """Three sums in one reduction (one barrier instead of three): the combine function of ``tl.reduce``."""
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def ordered_int(x):
        """float32 -> int32 in the float order (negative floats flip their magnitude bits); its own inverse on the
        int32 bits, so ``ordered_int(key).to(tl.float32, bitcast=True)`` gives the float back."""
        bits = x.to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    NEG_INF_KEY = tl.constexpr(-2139095041)  # ordered_int(-inf): 0x807FFFFF as int32, the least non-NaN key
    POS_INF_KEY = tl.constexpr(2139095040)  # ordered_int(+inf): 0x7F800000, the greatest

    @triton.jit
    def _row_keys(values_ptr, rows, row_ok, length, cols):
        """A tile of rows as ordered keys, the padding below every real key, and the counts the search starts from.

        The search runs over the finite keys only. +inf (forced keys) and -inf (invisible ones) sit at the ends of the
        order and are counted first: a range spanning them would cost the passes that cross the empty bit patterns
        between them and the scores."""
        inside = row_ok[:, None] & (cols[None, :] < length)
        x = tl.load(values_ptr + rows[:, None].to(tl.int64) * length + cols[None, :], mask=inside, other=0.0)
        key = tl.where(inside, ordered_int(x), -2147483648)  # padding below every real key, -inf's included
        finite = inside & (key > NEG_INF_KEY) & (key < POS_INF_KEY)
        finite_low = tl.min(tl.where(finite, key, 2147483647), 1).to(tl.int64)
        finite_high = tl.max(tl.where(finite, key, -2147483648), 1).to(tl.int64) + 1
        n_pos_inf = tl.sum((key == POS_INF_KEY).to(tl.int32), 1)
        n_above_neg_inf = tl.sum((key > NEG_INF_KEY).to(tl.int32), 1)
        return key, finite_low, finite_high, n_pos_inf, n_above_neg_inf

    @triton.jit
    def _search(key, cols, row_ok, need, finite_low, finite_high, n_pos_inf, n_above_neg_inf):
        """(threshold key, last) of each row of ``key`` for its count ``need``: the 4-ary search, then the ties."""
        # invariant: count(key >= low) = at_low >= need > count(key >= high); done when at_low == need (the keys >=
        # low are then exactly the need largest) or high == low + 1 (low is the need-th largest)
        on_pos_inf = need <= n_pos_inf
        on_neg_inf = need > n_above_neg_inf
        low = tl.where(on_pos_inf, POS_INF_KEY, tl.where(on_neg_inf, NEG_INF_KEY, finite_low))
        high = tl.where(on_pos_inf | on_neg_inf, low + 1, finite_high)
        at_low = tl.where(on_pos_inf | on_neg_inf | ~row_ok, need, n_above_neg_inf)
        while tl.max(((high - low > 1) & (at_low != need)).to(tl.int32), 0) > 0:
            width = high - low
            probe1 = low + width // 4
            probe2 = low + width // 2
            probe3 = low + 3 * width // 4
            count1, count2, count3 = tl.reduce(((key >= probe1.to(tl.int32)[:, None]).to(tl.int32),
                                                (key >= probe2.to(tl.int32)[:, None]).to(tl.int32),
                                                (key >= probe3.to(tl.int32)[:, None]).to(tl.int32)), 1, add3)
            low, at_low = tl.where(count1 >= need, probe1, low), tl.where(count1 >= need, count1, at_low)
            low, at_low = tl.where(count2 >= need, probe2, low), tl.where(count2 >= need, count2, at_low)
            low, at_low = tl.where(count3 >= need, probe3, low), tl.where(count3 >= need, count3, at_low)
            high = tl.where(count3 < need, probe3, high)
            high = tl.where(count2 < need, probe2, high)
            high = tl.where(count1 < need, probe1, high)
        # low may sit below the need-th largest key when at_low == need stopped the search: move it up to it
        low = tl.min(tl.where(key >= low.to(tl.int32)[:, None], key, 2147483647), 1)
        tied = key == low[:, None]
        room = need - tl.sum((key > low[:, None]).to(tl.int32), 1)  # tied keys still kept, >= 1
        place = tl.cumsum(tied.to(tl.int32), 1)
        last = tl.max(tl.where(tied & (place == room[:, None]), cols[None, :], -1), 1)
        return low, last

    @triton.jit
    def _row_threshold_kernel(values_ptr, counts_ptr, threshold_ptr, last_ptr, n_rows, length,
                              C: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        key, finite_low, finite_high, n_pos_inf, n_above_neg_inf = _row_keys(values_ptr, rows, row_ok, length, cols)
        for c in tl.static_range(C):
            need = tl.load(counts_ptr + rows * C + c, mask=row_ok, other=1)
            low, last = _search(key, cols, row_ok, need, finite_low, finite_high, n_pos_inf, n_above_neg_inf)
            threshold = ordered_int(low.to(tl.float32, bitcast=True)).to(tl.float32, bitcast=True)
            tl.store(threshold_ptr + rows * C + c, threshold, mask=row_ok)
            tl.store(last_ptr + rows * C + c, last.to(tl.int64), mask=row_ok)

    @triton.jit
    def _kept_mask_kernel(values_ptr, counts_ptr, mask_ptr, length, n_queries, COPIES: tl.constexpr,
                          BLOCK: tl.constexpr, ADDITIVE: tl.constexpr):
        """One row (o, t) of (O, T, L) per program; writes its kept mask to rows (o, c, t) of (O, COPIES, T, L):
        bool, or ADDITIVE (0 where kept, -inf elsewhere, in the mask's dtype)."""
        row = tl.program_id(0)
        rows = row + tl.arange(0, 1)
        cols = tl.arange(0, BLOCK)
        row_ok = rows >= 0
        key, finite_low, finite_high, n_pos_inf, n_above_neg_inf = _row_keys(values_ptr, rows, row_ok, length, cols)
        need = tl.load(counts_ptr + rows)
        low, last = _search(key, cols, row_ok, need, finite_low, finite_high, n_pos_inf, n_above_neg_inf)
        kept = (key > low[:, None]) | ((key == low[:, None]) & (cols[None, :] <= last[:, None]))
        if ADDITIVE:
            kept = tl.where(kept, 0.0, float("-inf")).to(mask_ptr.dtype.element_ty)
        outer, t = row // n_queries, row % n_queries
        for c in tl.static_range(COPIES):
            out_row = ((outer * COPIES + c) * n_queries + t).to(tl.int64)
            tl.store(mask_ptr + out_row * length + cols[None, :], kept, mask=cols[None, :] < length)
