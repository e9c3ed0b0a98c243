"""The dropped-mass bound (7) of several nested kept sets of each row, in one read of the row's scores.

The bound table (``drrl_gym.selection.dropped_mass_bound_table``) needs, per rank, query row and candidate keep c,

    m_c <= U_c / (U_c + W_c),                                                                                  (7)
    U_c = sum_{j in V \\ S_c} exp(s^_j + delta_j),   W_c = sum_{j in S_c} exp(s^_j - delta_j)

with delta_j = s ||q_{>r}|| ||k~_{j,>r}|| (6) and the kept sets S_c given by each row's priority threshold and tie
position (``drrl_gym.row_threshold``). One shift per row, the row's largest s^ + delta, serves every sum: the
exponentials lie in [0, 1], and terms more than ~87 nats below the shift underflow in float32, which can only raise
the bound (an empty W gives 1) or drop from U terms below e^-87 of its largest.

On CUDA, in float32, a Triton kernel takes one (sequence, KV head, query) per program: it reads the G heads' rank-r
scores, the keys' tails and the priority row once and writes (G, C) bounds, where the same sums in torch read the
(..., L) scores once per sum and write the exponentials between. Elsewhere the torch expression, which the tests compare
the kernel with. A ``torch.library`` custom op (``drrl_gym::kept_set_bounds``), so torch.compile keeps it whole.
"""

from __future__ import annotations

import torch

from drrl_gym.row_threshold import MAX_ROW, kept_mask, row_warps

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch brings no Triton
    triton = None

def kept_set_bounds(approx: torch.Tensor, query_tail: torch.Tensor, key_tail: torch.Tensor, priority: torch.Tensor,
                    threshold: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """U / (U + W) of (7) for C kept sets of every row: (R, G, T, C) in approx's dtype.

    Args:
        approx: (R, G, T, L) float32 or float64 rank-r scores s^ (2) of G query heads' T queries over L keys,
            R = B H_kv; the queries are the last T of the L positions (query t sees keys 0 .. L - T + t).
        query_tail: (R, G, T) s ||q_{>r}||; key_tail: (R, L) ||k~_{>r}||, so delta = query_tail key_tail (6).
        priority: (R, P, T, L) the rows' priorities (3), P = 1 (one key set per group) or G (one per head).
        threshold, last: (R, P, T, C) in approx's dtype and int64: ``drrl_gym.row_threshold.row_thresholds`` of
            ``priority`` for the C counts.
    """
    rows, group, n_queries, n_keys = approx.shape
    heads_chosen, n_counts = priority.shape[1], threshold.shape[-1]
    if (approx.dtype not in (torch.float32, torch.float64) or query_tail.shape != (rows, group, n_queries)
            or key_tail.shape != (rows, n_keys) or heads_chosen not in (1, group)
            or priority.shape != (rows, heads_chosen, n_queries, n_keys)
            or threshold.shape != (rows, heads_chosen, n_queries, n_counts) or last.shape != threshold.shape):
        raise ValueError(f"kept_set_bounds needs approx (R, G, T, L) float32 or float64, query_tail (R, G, T), "
                         f"key_tail (R, L), priority (R, 1 or G, T, L) and threshold, last (R, 1 or G, T, C); got "
                         f"approx "
                         f"{approx.dtype} {tuple(approx.shape)}, query_tail {tuple(query_tail.shape)}, key_tail "
                         f"{tuple(key_tail.shape)}, priority {tuple(priority.shape)}, threshold "
                         f"{tuple(threshold.shape)}, last {tuple(last.shape)}")
    return torch.ops.drrl_gym.kept_set_bounds(*(x.contiguous() for x in (approx, query_tail, key_tail, priority,
                                                                         threshold, last)))


@torch.library.custom_op("drrl_gym::kept_set_bounds", mutates_args=())
def _kept_set_bounds(approx: torch.Tensor, query_tail: torch.Tensor, key_tail: torch.Tensor, priority: torch.Tensor,
                     threshold: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    if (approx.is_cuda and approx.dtype == torch.float32 and triton is not None and approx.shape[-1] <= MAX_ROW
            and approx.numel()):
        return _kernel_bounds(approx, query_tail, key_tail, priority, threshold, last)
    return torch_bounds(approx, query_tail, key_tail, priority, threshold, last)


@_kept_set_bounds.register_fake
def _(approx, query_tail, key_tail, priority, threshold, last):
    return approx.new_empty(*approx.shape[:3], threshold.shape[-1])


def torch_bounds(approx: torch.Tensor, query_tail: torch.Tensor, key_tail: torch.Tensor, priority: torch.Tensor,
                 threshold: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The torch expression of :func:`kept_set_bounds` (the CPU path, and the kernel's reference in the tests)."""
    from drrl_gym.selection import visible_mask  # here: drrl_gym.selection imports this module

    visible = visible_mask(*approx.shape[-2:], approx.device)  # (T, L)
    delta = query_tail[..., None] * key_tail[:, None, None, :]  # (6)
    high = (approx + delta).masked_fill_(~visible, float("-inf"))  # s^ + delta
    shift = high.amax(-1, keepdim=True)  # finite: every row sees its own key
    exp_high = (high - shift).exp()  # 0 at invisible keys
    exp_low = (approx - delta - shift).exp()  # s^ - delta
    bounds = []
    for c in range(threshold.shape[-1]):
        kept = kept_mask(priority, threshold[..., c], last[..., c])  # S_c, never an invisible key
        w = (exp_low * kept).sum(-1)
        u = (exp_high * ~kept).sum(-1)  # 0 (a bound of 0) when nothing is dropped
        bounds.append(u / (u + w).clamp_min(torch.finfo(u.dtype).tiny))  # U / (U + W), (7)
    return torch.stack(bounds, -1)


def _kernel_bounds(approx, query_tail, key_tail, priority, threshold, last) -> torch.Tensor:
    rows, group, n_queries, n_keys = approx.shape
    n_counts = threshold.shape[-1]
    block = triton.next_power_of_2(n_keys)
    bound = torch.empty(rows, group, n_queries, n_counts, dtype=torch.float32, device=approx.device)
    _kept_set_bounds_kernel[(rows * n_queries,)](
        approx, query_tail, key_tail, priority, threshold, last, bound, n_queries, n_keys,
        G=group, PER_HEAD=priority.shape[1] == group and group > 1, C=n_counts, BLOCK=block,
        num_warps=row_warps(block))
    return bound


if triton is not None:
    @triton.jit
    def _kept_set_bounds_kernel(approx_ptr, query_tail_ptr, key_tail_ptr, priority_ptr, threshold_ptr, last_ptr,
                                bound_ptr, n_queries, n_keys, G: tl.constexpr, PER_HEAD: tl.constexpr,
                                C: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0).to(tl.int64)
        row, t = program // n_queries, program % n_queries
        cols = tl.arange(0, BLOCK)
        visible = cols <= n_keys - n_queries + t  # < n_keys too
        key_tail = tl.load(key_tail_ptr + row * n_keys + cols, mask=visible, other=0.0)
        for g in tl.static_range(G):
            head_row = (row * G + g) * n_queries + t  # (r, g, t) of (R, G, T, ...)
            choice_row = head_row if PER_HEAD else row * n_queries + t  # (r, g or 0, t) of (R, P, T, ...)
            s = tl.load(approx_ptr + head_row * n_keys + cols, mask=visible, other=0.0)
            delta = tl.load(query_tail_ptr + head_row) * key_tail  # (6)
            high = tl.where(visible, s + delta, float("-inf"))
            shift = tl.max(high, 0)
            exp_high = tl.exp(high - shift)  # 0 at invisible keys
            exp_low = tl.where(visible, tl.exp(s - delta - shift), 0.0)
            priority = tl.load(priority_ptr + choice_row * n_keys + cols, mask=visible, other=float("-inf"))
            for c in tl.static_range(C):
                threshold = tl.load(threshold_ptr + choice_row * C + c)
                last = tl.load(last_ptr + choice_row * C + c)
                kept = (priority > threshold) | ((priority == threshold) & (cols <= last))
                w = tl.sum(tl.where(kept, exp_low, 0.0), 0)
                u = tl.sum(tl.where(kept, 0.0, exp_high), 0)
                tl.store(bound_ptr + head_row * C + c, u / tl.maximum(u + w, 1.1754943508222875e-38))  # (7)
