"""Triton kernel of selection attention over a segment of T new tokens: choose and attend in one launch (the math:
``drrl_gym.selection``; ``selection_attention(..., fused=True)`` takes it on CUDA for selection="group" without
details).

The unfused path writes the (B, H_kv, T, L) priorities, reads them back to write the kept masks G times over, and
has SDPA read those masks: three kernels and four passes over the largest tensors of the layer, plus a float32
product for q P. Here one program takes one KV group and a block of BLOCK_T queries, the group's G query heads
stacked as rows (head-major, padded to GROUP_ROWS heads, as ``drrl_gym.key_priorities`` stacks them), and runs five
phases over the keys in on-chip tiles:

1. rotate     q~ = q P in float32 (3xTF32 products: float32's accuracy on tensor cores; IEEE products, done on
              the FMA units, made ptxas spill 496 bytes a thread for sm_90 at 16 queries per program, these 288),
              its columns beyond the group's rank r zeroed                                                      (2)
2. normalise  each stacked row's logsumexp of its rank-r scores over its visible keys, online (as flash attention
              does its softmax)                                                                               (3)
3. prioritise pi_ij = max_h (s^_hij - logsumexp_h), forced keys +inf, invisible ones -inf, into a float32 scratch
              (B H_kv, T, L): the block's rows are read back at once, from L2 for the most part                 (3)
4. threshold  the block's rows in registers: each row's k_i-th largest priority and where its ties stop, by the
              search of ``drrl_gym.row_threshold`` (the same functions)                                         (4)
5. attend     exact attention with the model's own q, k and v, the kept set recomputed per tile from the scratch
              and the two numbers per row, online softmax in float32 (the plain model's SDPA does the same)     (5)

The rank-r products of phases 2 and 3 run on tensor cores in TF32, as ``drrl_gym.key_priorities``'s do (its
docstring says what that changes: only near-ties at the k-th key). Phase 5's q k^T and p v run in the model's
dtype with float32 accumulation (IEEE for float32 inputs). Keys past the block's last visible key are neither
prioritised nor read. Nothing waits for the host: CUDA graphs and torch.compile take the op (``drrl_gym::
selection_prefill``) whole.

Register budget: phase 4 holds BLOCK_T rows of next_power_of_2(L) priorities, so BLOCK_T shrinks as L grows
(16 rows at L <= 1024, 2 at 8192); rows longer than ``drrl_gym.row_threshold.MAX_ROW`` take the unfused path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from drrl_gym.key_priorities import forced_or_hidden, group_priority_tile, rank_r_log_sums
from drrl_gym.row_threshold import MAX_ROW, _row_keys, _search, ordered_int

ROW_VALUES = 16384  # priorities phase 4 holds in registers per program: BLOCK_T x next_power_of_2(L)
MAX_BLOCK_T = 16  # queries per program (x G heads stacked): 64 rows for SmolLM2's 3 heads per group
BLOCK_N = 64  # keys per tile
NUM_WARPS = 8  # 64 priorities per thread in phase 4 at 16 x 1024


def selection_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, basis: torch.Tensor,
                      rotated_keys: torch.Tensor, rank: torch.Tensor, counts: torch.Tensor, scaling: float,
                      sink_tokens: int, recent_tokens: int) -> torch.Tensor:
    """Selection attention (selection="group") of one segment: (B, T, H, dv), the layout of transformers'
    ``sdpa_attention_forward``.

    Args:
        query: (B, H, T, d) post-RoPE, the last T of the L positions; head h belongs to KV head h // G.
        key, value: (B, H_kv, L, d) and (B, H_kv, L, dv) post-RoPE keys and values of every visible position.
        basis: (H_kv, d, d) P, orthonormal columns ordered by energy.
        rotated_keys: (B, H_kv, L, d) K~ = K P.
        rank: (B, H_kv) integers in [1, d] on the device (broadcast views allowed; not checked: a check would wait).
        counts: (B, H_kv, T) integers k_i of (4), in [1, n_i].
        scaling, sink_tokens, recent_tokens: as ``drrl_gym.selection.selection_attention`` takes them.
    """
    return torch.ops.drrl_gym.selection_prefill(query, key, value, basis, rotated_keys, rank, counts, float(scaling),
                                                int(sink_tokens), int(recent_tokens))


def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: CUDA, one float dtype for all three, rows that fit in registers,
    head dims the tiles take (powers of two from 16)."""
    d, dv, n_keys = query.shape[-1], value.shape[-1], key.shape[2]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and key.dtype == query.dtype and value.dtype == query.dtype and n_keys <= MAX_ROW
            and all(n >= 16 and n & (n - 1) == 0 for n in (d, dv)))


@torch.library.custom_op("drrl_gym::selection_prefill", mutates_args=())
def _selection_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, basis: torch.Tensor,
                       rotated_keys: torch.Tensor, rank: torch.Tensor, counts: torch.Tensor, scaling: float,
                       sink_tokens: int, recent_tokens: int) -> torch.Tensor:
    return launch(query, key, value, basis, rotated_keys, rank, counts, scaling, sink_tokens, recent_tokens)


def launch(query, key, value, basis, rotated_keys, rank, counts, scaling, sink_tokens, recent_tokens,
           max_block_t: int = MAX_BLOCK_T, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """The kernel's launch; the keywords override it (``benchmarks/selection_forward.py --launches`` sweeps them)."""
    batch, heads, n_queries, d = query.shape
    kv_heads, n_keys, dv = key.shape[1], key.shape[2], value.shape[-1]
    group = heads // kv_heads
    row_block = triton.next_power_of_2(n_keys)
    block_t = max(1, min(max_block_t, ROW_VALUES // row_block, triton.next_power_of_2(n_queries)))
    group_rows = max(triton.next_power_of_2(group), 16 // block_t)  # tl.dot needs 16 rows at least
    query, key, value, rotated_keys = (x if x.stride(-1) == 1 else x.contiguous()
                                       for x in (query, key, value, rotated_keys))
    basis = basis.to(torch.float32).contiguous()
    counts = counts.to(torch.int32).expand(batch, kv_heads, n_queries).contiguous()
    rank = rank.expand(batch, kv_heads)
    scratch = torch.empty(batch * kv_heads, n_queries, n_keys, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, n_queries, heads, dv, dtype=query.dtype, device=query.device)
    grid = (batch * kv_heads, triton.cdiv(n_queries, block_t))
    _selection_prefill_kernel[grid](
        query, key, value, rotated_keys, basis, rank, counts, scratch, out, kv_heads, n_queries, n_keys, d, scaling,
        sink_tokens, recent_tokens, *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
        *rotated_keys.stride()[:3], *rank.stride(), *out.stride()[:3],
        G=group, GROUP_ROWS=group_rows, D=d, DV=dv, BLOCK_T=block_t, BLOCK_N=block_n, ROW_BLOCK=row_block,
        EXACT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=num_warps)
    return out


@_selection_prefill.register_fake
def _(query, key, value, basis, rotated_keys, rank, counts, scaling, sink_tokens, recent_tokens):
    batch, heads, n_queries, _ = query.shape
    return query.new_empty(batch, n_queries, heads, value.shape[-1])


@triton.jit
def _selection_prefill_kernel(
        q_ptr, k_ptr, v_ptr, k_rot_ptr, basis_ptr, rank_ptr, count_ptr, scratch_ptr, out_ptr,
        kv_heads, n_queries, n_keys, d, scaling, sink_tokens, recent_tokens,
        q_stride_b, q_stride_h, q_stride_t, k_stride_b, k_stride_h, k_stride_l, v_stride_b, v_stride_h, v_stride_l,
        kr_stride_b, kr_stride_h, kr_stride_l, rank_stride_b, rank_stride_h, o_stride_b, o_stride_t, o_stride_h,
        G: tl.constexpr, GROUP_ROWS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr, EXACT_PRECISION: tl.constexpr):
    group_index = tl.program_id(0).to(tl.int64)  # b H_kv + kv
    first = tl.program_id(1) * BLOCK_T
    b, kv = group_index // kv_heads, group_index % kv_heads
    k_ptr += b * k_stride_b + kv * k_stride_h
    v_ptr += b * v_stride_b + kv * v_stride_h
    k_rot_ptr += b * kr_stride_b + kv * kr_stride_h
    rank = tl.load(rank_ptr + b * rank_stride_b + kv * rank_stride_h).to(tl.int32)
    columns = tl.arange(0, D)
    # stacked rows: row (head, t) for the group's G heads, head-major, padded to GROUP_ROWS heads
    stacked = tl.arange(0, GROUP_ROWS * BLOCK_T)
    head, t = stacked // BLOCK_T, first + stacked % BLOCK_T
    row_ok = (head < G) & (t < n_queries)
    position = n_keys - n_queries + t  # query t sees keys 0 .. position
    q = tl.load(q_ptr + b * q_stride_b + (kv * G + head)[:, None] * q_stride_h + t[:, None] * q_stride_t
                + columns[None, :], mask=row_ok[:, None], other=0.0)
    end = tl.minimum(n_keys, n_keys - n_queries + first + BLOCK_T)  # past the block's last visible key

    # 1. rotate, (2): q~ = q P, the columns beyond r zeroed
    basis = tl.load(basis_ptr + kv * D * D + columns[:, None] * D + columns[None, :])
    q_rot = tl.dot(q.to(tl.float32), basis, input_precision="tf32x3")
    column_ok = columns < rank
    q_rot = tl.where(column_ok[None, :], q_rot, 0.0)

    # 2. normalise, (3): each stacked row's logsumexp over its visible keys (a running maximum and a rescaled sum)
    log_sum = rank_r_log_sums(q_rot, k_rot_ptr, n_keys, end, kr_stride_l, columns, column_ok, position, scaling,
                              GROUP_ROWS * BLOCK_T, BLOCK_N)

    # 3. prioritise, (3): the best approximate log-probability over the group's heads, into the scratch
    block_t = first + tl.arange(0, BLOCK_T)
    block_ok = block_t < n_queries
    block_position = n_keys - n_queries + block_t
    scratch_rows = group_index * n_queries + block_t
    for start in range(0, end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        priority = group_priority_tile(q_rot, k_rot_ptr, j, n_keys, kr_stride_l, columns, column_ok, scaling,
                                       log_sum, head, G, GROUP_ROWS, BLOCK_T, BLOCK_N)
        priority = forced_or_hidden(priority, j, block_position, sink_tokens, recent_tokens)
        tl.store(scratch_ptr + scratch_rows[:, None] * n_keys + j[None, :], priority,
                 mask=block_ok[:, None] & (j[None, :] < end))
    tl.debug_barrier()  # the rows were written by other threads than those that read them next

    # 4. threshold, (4): the k_i-th largest priority of each row and the last tied key kept
    cols = tl.arange(0, ROW_BLOCK)
    row_keys, finite_low, finite_high, n_pos_inf, n_above_neg_inf = _row_keys(scratch_ptr, scratch_rows, block_ok,
                                                                              end, n_keys, cols)
    need = tl.load(count_ptr + scratch_rows, mask=block_ok, other=1)
    low, last = _search(row_keys, cols, block_ok, need, finite_low, finite_high, n_pos_inf, n_above_neg_inf)

    # 5. attend, (5): exact attention over the kept keys, each tile's kept set recomputed from the scratch
    running_max = tl.full((GROUP_ROWS * BLOCK_T,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_ROWS * BLOCK_T,), tl.float32)
    acc = tl.zeros((GROUP_ROWS * BLOCK_T, DV), tl.float32)
    value_columns = tl.arange(0, DV)
    for start in range(0, end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        priority = ordered_int(tl.load(scratch_ptr + scratch_rows[:, None] * n_keys + j[None, :],
                                       mask=block_ok[:, None] & (j[None, :] < end), other=float("-inf")))
        kept = (priority > low[:, None]) | ((priority == low[:, None]) & (j[None, :] <= last[:, None]))
        kept = tl.reshape(tl.broadcast_to(kept.to(tl.int8)[None, :, :], (GROUP_ROWS, BLOCK_T, BLOCK_N)),
                          (GROUP_ROWS * BLOCK_T, BLOCK_N)) != 0  # one key set per group, shared by its heads
        k_tile = tl.load(k_ptr + j[None, :] * k_stride_l + columns[:, None], mask=j[None, :] < n_keys, other=0.0)
        s = scaling * tl.dot(q, k_tile, input_precision=EXACT_PRECISION)
        s = tl.where(kept, s, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s, 1))
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)  # a row with no kept key yet stays at 0
        rescale = tl.exp(running_max - shift)
        p = tl.exp(s - shift[:, None])
        v_tile = tl.load(v_ptr + j[:, None] * v_stride_l + value_columns[None, :], mask=j[:, None] < n_keys,
                         other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=EXACT_PRECISION)
        running_sum = running_sum * rescale + tl.sum(p, 1)
        running_max = new_max
    out = acc / tl.where(row_ok, running_sum, 1.0)[:, None]
    tl.store(out_ptr + b * o_stride_b + t[:, None] * o_stride_t + (kv * G + head)[:, None] * o_stride_h
             + value_columns[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
