"""The dropped-mass bound (7) of several nested kept sets of each row, with the rank-r scores formed on chip.

The bound table (``drrl_gym.selection.dropped_mass_bound_table``) needs, per candidate rank, query row and candidate
keep c,

    m_c <= U_c / (U_c + W_c),                                                                                  (7)
    U_c = sum_{j in V \\ S_c} exp(s^_j + delta_j),   W_c = sum_{j in S_c} exp(s^_j - delta_j)

with s^ the rank-r scores (2), delta_j = s ||q_{>r}|| ||k~_{j,>r}|| (6) and the kept sets S_c given by each row's
priority threshold and tie position (``drrl_gym.row_threshold``). One shift per row, the row's largest s^ + delta,
serves every sum: the exponentials lie in [0, 1], and terms more than ~87 nats below the shift underflow in float32,
which can only raise the bound (an empty W gives 1) or drop from U terms below e^-87 of its largest.

On CUDA, in float32, a Triton kernel takes one (rank setting, sequence, KV head) and a block of queries per program,
the group's G heads stacked as rows, as ``drrl_gym.key_priorities`` does: it streams the keys in on-chip tiles,
forms s^ and delta there (3xTF32 tensor-core products, float32 accuracy: s^ must be the rank-r score itself for (6)
to hold), keeps the shift online (a running maximum that rescales the sums, as flash attention does its softmax),
and writes (G, C) bounds per query: the (..., L) scores never go through memory. Every rank setting is one launch.
Elsewhere the torch expression, which the tests compare the kernel with. A ``torch.library`` custom op
(``drrl_gym::kept_set_bounds``), so torch.compile and CUDA graphs keep it whole.
"""

from __future__ import annotations

import torch

from drrl_gym.row_threshold import kept_mask

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch brings no Triton
    triton = None


def kept_set_bounds(rotated_query: torch.Tensor, rotated_keys: torch.Tensor, rank: torch.Tensor, scaling: float,
                    priority: torch.Tensor, threshold: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """U / (U + W) of (7) for C kept sets of every row at S rank settings: (S, B, H_kv, G, T, C) in the queries'
    dtype.

    Args:
        rotated_query: (B, H_kv, G, T, d) q P, float32 or float64: G query heads' T queries, the last T of the L
            positions (query t sees keys 0 .. L - T + t).
        rotated_keys: (B, H_kv, L, d) K~ = K P, any float dtype.
        rank: (S, B, H_kv) integers in [1, d] on the queries' device (not checked: a check would wait for it).
        scaling: the model's score scaling s.
        priority: (S, B, H_kv, P, T, L) the rows' priorities (3) at each setting, P = 1 (one key set per group) or
            G (one per head): ``drrl_gym.key_priorities.key_priorities``.
        threshold, last: (S, B, H_kv, P, T, C) in the priorities' dtype and int64:
            ``drrl_gym.row_threshold.row_thresholds`` of ``priority`` for the C counts.
    """
    batch, kv_heads, group, n_queries, d = rotated_query.shape if rotated_query.dim() == 5 else (0,) * 5
    settings = rank.shape[0] if rank.dim() == 3 else 0
    chosen = priority.shape[3] if priority.dim() == 6 else 0
    n_keys = rotated_keys.shape[2] if rotated_keys.dim() == 4 else 0
    rows = (settings, batch, kv_heads, chosen, n_queries)
    if (rotated_query.dtype not in (torch.float32, torch.float64) or not batch or rank.is_floating_point()
            or tuple(rotated_keys.shape) != (batch, kv_heads, n_keys, d) or not 1 <= n_queries <= n_keys
            or tuple(rank.shape) != rows[:3] or chosen not in (1, group)
            or tuple(priority.shape) != (*rows, n_keys) or threshold.shape[:-1] != rows
            or last.shape != threshold.shape):
        raise ValueError(f"kept_set_bounds needs rotated_query (B, H_kv, G, T, d) float32 or float64, rotated_keys "
                         f"(B, H_kv, L, d) with T <= L, integer rank (S, B, H_kv), priority (S, B, H_kv, 1 or G, T, "
                         f"L) and threshold, last (S, B, H_kv, 1 or G, T, C); got rotated_query "
                         f"{rotated_query.dtype} {tuple(rotated_query.shape)}, rotated_keys "
                         f"{tuple(rotated_keys.shape)}, rank {rank.dtype} {tuple(rank.shape)}, priority "
                         f"{tuple(priority.shape)}, threshold {tuple(threshold.shape)}, last {tuple(last.shape)}")
    return torch.ops.drrl_gym.kept_set_bounds(rotated_query.contiguous(), rotated_keys, rank.contiguous(),
                                              float(scaling), *(x.contiguous() for x in (priority, threshold, last)))


@torch.library.custom_op("drrl_gym::kept_set_bounds", mutates_args=())
def _kept_set_bounds(rotated_query: torch.Tensor, rotated_keys: torch.Tensor, rank: torch.Tensor, scaling: float,
                     priority: torch.Tensor, threshold: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    if (rotated_query.is_cuda and rotated_query.dtype == torch.float32 and triton is not None
            and rotated_keys.stride(-1) == 1 and priority.numel()):
        return _kernel_bounds(rotated_query, rotated_keys, rank, scaling, priority, threshold, last)
    return torch_bounds(rotated_query, rotated_keys, rank, scaling, priority, threshold, last)


@_kept_set_bounds.register_fake
def _(rotated_query, rotated_keys, rank, scaling, priority, threshold, last):
    return rotated_query.new_empty(rank.shape[0], *rotated_query.shape[:4], threshold.shape[-1])


def torch_bounds(rotated_query: torch.Tensor, rotated_keys: torch.Tensor, rank: torch.Tensor, scaling: float,
                 priority: torch.Tensor, threshold: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The torch expression of :func:`kept_set_bounds` (the CPU path, and the kernel's reference in the tests)."""
    from drrl_gym.selection import approximate_scores, score_radius, visible_mask  # (it imports this module)

    q, k = rotated_query, rotated_keys.to(rotated_query.dtype)
    visible = visible_mask(*priority.shape[-2:], q.device)  # (T, L)
    settings = []
    for s in range(rank.shape[0]):
        approx = approximate_scores(q, k, rank[s], scaling)  # (B, H_kv, G, T, L), (2)
        delta = score_radius(q, k, rank[s], scaling)  # (6)
        high = (approx + delta).masked_fill_(~visible, float("-inf"))  # s^ + delta
        shift = high.amax(-1, keepdim=True)  # finite: every row sees its own key
        exp_high = (high - shift).exp()  # 0 at invisible keys
        exp_low = (approx - delta - shift).exp()  # s^ - delta
        bounds = []
        for c in range(threshold.shape[-1]):
            kept = kept_mask(priority[s], threshold[s, ..., c], last[s, ..., c]) & visible  # S_c
            w = (exp_low * kept).sum(-1)
            u = (exp_high * ~kept).sum(-1)  # 0 (a bound of 0) when nothing is dropped
            bounds.append(u / (u + w).clamp_min(torch.finfo(u.dtype).tiny))  # U / (U + W), (7)
        settings.append(torch.stack(bounds, -1))
    return torch.stack(settings)


def _kernel_bounds(rotated_query, rotated_keys, rank, scaling, priority, threshold, last, block_queries: int = 16,
                   block_keys: int = 64, num_warps: int = 4) -> torch.Tensor:
    """The Triton path; the block sizes and warps override the launch (``benchmarks/bound_table.py --launches``
    sweeps them)."""
    batch, kv_heads, group, n_queries, d = rotated_query.shape
    n_keys, n_counts = rotated_keys.shape[2], threshold.shape[-1]
    bound = torch.empty(rank.shape[0], batch, kv_heads, group, n_queries, n_counts, dtype=torch.float32,
                        device=rotated_query.device)
    grid = (rank.numel(), triton.cdiv(n_queries, block_queries))  # (setting, sequence, KV head) x query blocks
    _kept_set_bounds_kernel[grid](
        rotated_query, rotated_keys, rank, priority, threshold, last, bound, batch * kv_heads, kv_heads, n_queries,
        n_keys, d, scaling, *rotated_keys.stride()[:3], G=group, GROUP_ROWS=triton.next_power_of_2(group),
        PER_HEAD=priority.shape[3] == group and group > 1, C=n_counts, C_PAD=triton.next_power_of_2(n_counts),
        D=max(16, triton.next_power_of_2(d)), BLOCK_T=block_queries, BLOCK_N=block_keys, num_warps=num_warps)
    return bound


if triton is not None:
    @triton.jit
    def _kept_set_bounds_kernel(q_ptr, k_ptr, rank_ptr, priority_ptr, threshold_ptr, last_ptr, bound_ptr, groups,
                                kv_heads, n_queries, n_keys, d, scaling, k_stride_b, k_stride_h, k_stride_l,
                                G: tl.constexpr, GROUP_ROWS: tl.constexpr, PER_HEAD: tl.constexpr, C: tl.constexpr,
                                C_PAD: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        setting_group = tl.program_id(0).to(tl.int64)  # (s B + b) H_kv + kv: the setting's rows
        group_index = setting_group % groups  # b H_kv + kv: the queries and keys, shared by the settings
        first = tl.program_id(1) * BLOCK_T
        b, kv = group_index // kv_heads, group_index % kv_heads
        k_ptr += b * k_stride_b + kv * k_stride_h
        columns = tl.arange(0, D)
        rank = tl.load(rank_ptr + setting_group).to(tl.int32)
        head_columns, tail_columns = columns < rank, (columns >= rank) & (columns < d)
        # rows: the G heads' queries stacked, head-major (padded to a power of two)
        stacked = tl.arange(0, GROUP_ROWS * BLOCK_T)
        head, t = stacked // BLOCK_T, first + stacked % BLOCK_T
        row_ok = (head < G) & (t < n_queries)
        q = tl.load(q_ptr + ((group_index * G + head) * n_queries + t)[:, None] * d + columns[None, :],
                    mask=row_ok[:, None] & (columns < d)[None, :], other=0.0)
        q_head = tl.where(head_columns[None, :], q, 0.0)  # q P_r, (2)
        q_tail = scaling * tl.sqrt(tl.sum(tl.where(tail_columns[None, :], q * q, 0.0), 1))  # s ||q_{>r}||, (6)
        # the row's priorities, thresholds and tie positions: its head's (PER_HEAD) or its group's
        choice = (setting_group * (G if PER_HEAD else 1) + (head if PER_HEAD else 0)) * n_queries + t
        counts = tl.arange(0, C_PAD)
        count_ok = row_ok[:, None] & (counts < C)[None, :]
        threshold = tl.load(threshold_ptr + choice[:, None] * C + counts[None, :], mask=count_ok, other=float("inf"))
        last = tl.load(last_ptr + choice[:, None] * C + counts[None, :], mask=count_ok, other=-1)
        position = n_keys - n_queries + t  # query t sees keys 0 .. position
        shift = tl.full((GROUP_ROWS * BLOCK_T,), float("-inf"), tl.float32)  # running max of s^ + delta
        u = tl.zeros((GROUP_ROWS * BLOCK_T, C_PAD), tl.float32)
        w = tl.zeros((GROUP_ROWS * BLOCK_T, C_PAD), tl.float32)
        end = tl.minimum(n_keys, n_keys - n_queries + first + BLOCK_T)  # past the block's last visible key
        for start in range(0, end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + j[None, :] * k_stride_l + columns[:, None],
                        mask=(j[None, :] < n_keys) & (columns < d)[:, None], other=0.0).to(tl.float32)  # (D, keys)
            s = scaling * tl.dot(q_head, tl.where(head_columns[:, None], k, 0.0), input_precision="tf32x3")  # (2)
            k_tail = tl.sqrt(tl.sum(tl.where(tail_columns[:, None], k * k, 0.0), 0))  # ||k~_{j,>r}||
            delta = q_tail[:, None] * k_tail[None, :]  # (6)
            visible = j[None, :] <= position[:, None]
            high = tl.where(visible, s + delta, float("-inf"))
            new_shift = tl.maximum(shift, tl.max(high, 1))  # finite from the first tile on: key 0 is visible
            rescale = tl.exp(shift - new_shift)[:, None]
            exp_high = tl.exp(high - new_shift[:, None])  # 0 at invisible keys
            exp_low = tl.where(visible, tl.exp(s - delta - new_shift[:, None]), 0.0)
            priority = tl.load(priority_ptr + choice[:, None] * n_keys + j[None, :], mask=row_ok[:, None] & visible,
                               other=float("-inf"))[:, None, :]
            kept = (priority > threshold[:, :, None]) | ((priority == threshold[:, :, None])
                                                         & (j[None, None, :] <= last[:, :, None]))  # S_c
            kept = kept & visible[:, None, :]
            w = w * rescale + tl.sum(tl.where(kept, exp_low[:, None, :], 0.0), 2)
            u = u * rescale + tl.sum(tl.where(kept, 0.0, exp_high[:, None, :]), 2)
            shift = new_shift
        out_rows = (setting_group * G + head) * n_queries + t  # (s, b, kv, g, t) of (S, B, H_kv, G, T, C)
        tl.store(bound_ptr + out_rows[:, None] * C + counts[None, :], u / tl.maximum(u + w, 1.1754943508222875e-38),
                 mask=count_ok)  # (7)
