"""The priority (3) of every visible key for every query of a segment, without writing the rank-r scores.

Selection (``drrl_gym.selection``) ranks the keys each query may attend to by

    s^_hij = s (q_hi P_r)(K~_{j,:r})^T                                                                         (2)
    pi_ij  = max_h (s^_hij - logsumexp_{j' in V_i} s^_hij')      (selection="group"; pi_hij = s^_hij for "head") (3)

with forced keys (sinks, recents) at +inf and invisible keys at -inf. In torch this writes the (B, H_kv, G, T, L)
scores, then reads and writes them again for the mask, the logsumexp, the difference and the maximum: several
passes over the largest tensor of the layer. On CUDA a Triton kernel takes one KV group and a block of queries per
program, the group's G heads stacked as rows, and runs two passes over the keys in on-chip tiles: the first
accumulates each row's logsumexp online (as flash attention does its softmax), the second forms the priorities and
writes them, the only (B, H_kv, 1 or G, T, L) tensor it writes. The rank-r product reads the first r columns of
the keys only; it multiplies all d on tensor cores (the zeroed columns cost arithmetic, which is not what limits it,
and no memory).

The kernel's products run on tensor cores in TF32 (10-bit mantissas; the keys come in the model's dtype, bf16's
8 bits, already). Its priorities differ from the float32 torch expression by about 1e-3 of a score, so ties and
near-ties at the k-th key may go the other way. That changes which keys are kept only among keys whose priorities
nearly tie, and the exact attention over the kept keys is computed the same way; the bound (7) holds for any kept
set. Elsewhere (the CPU, float64) the torch expression, which the tests compare the kernel with. A ``torch.library``
custom op (``drrl_gym::key_priorities``), so torch.compile and CUDA graphs take it whole.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch brings no Triton
    triton = None


def key_priorities(rotated_query: torch.Tensor, rotated_keys: torch.Tensor, rank: torch.Tensor, scaling: float,
                   sink_tokens: int, recent_tokens: int, selection: str) -> torch.Tensor:
    """(3) for every key: (B, H_kv, 1 or G, T, L) float32 (G rows for selection="head"), or float64 for float64
    queries.

    Args:
        rotated_query: (B, H_kv, G, T, d) q P, float32 or float64: the last T of the L positions.
        rotated_keys: (B, H_kv, L, d) K~ = K P, any float dtype.
        rank: (B, H_kv) integers in [1, d] on the queries' device (not checked here: a check would wait for it).
        scaling: the model's score scaling s.
        sink_tokens, recent_tokens: the forced keys of (4), at +inf.
        selection: "group" (one row per group) or "head" (one per query head).
    """
    if rotated_query.dim() != 5 or rotated_keys.dim() != 4 or rank.shape != rotated_query.shape[:2] \
            or rotated_keys.shape[:2] != rotated_query.shape[:2] or rotated_keys.shape[-1] != rotated_query.shape[-1] \
            or rotated_query.dtype not in (torch.float32, torch.float64) or rank.is_floating_point() \
            or not 1 <= rotated_query.shape[3] <= rotated_keys.shape[2]:
        raise ValueError(f"key_priorities needs rotated_query (B, H_kv, G, T, d) float32 or float64, rotated_keys "
                         f"(B, H_kv, L, d) with T <= L, and integer rank (B, H_kv); got {rotated_query.dtype} "
                         f"{tuple(rotated_query.shape)}, {tuple(rotated_keys.shape)}, {rank.dtype} "
                         f"{tuple(rank.shape)}")
    return torch.ops.drrl_gym.key_priorities(rotated_query.contiguous(), rotated_keys, rank.contiguous(),
                                             float(scaling), int(sink_tokens), int(recent_tokens),
                                             selection == "head")


@torch.library.custom_op("drrl_gym::key_priorities", mutates_args=())
def _key_priorities(rotated_query: torch.Tensor, rotated_keys: torch.Tensor, rank: torch.Tensor, scaling: float,
                    sink_tokens: int, recent_tokens: int, per_head: bool) -> torch.Tensor:
    if rotated_query.is_cuda and rotated_query.dtype == torch.float32 and triton is not None \
            and rotated_query.numel() and rotated_keys.stride(-1) == 1:
        return _kernel_priorities(rotated_query, rotated_keys, rank, scaling, sink_tokens, recent_tokens, per_head)
    return torch_priorities(rotated_query, rotated_keys, rank, scaling, sink_tokens, recent_tokens, per_head)


@_key_priorities.register_fake
def _(rotated_query, rotated_keys, rank, scaling, sink_tokens, recent_tokens, per_head):
    batch, kv_heads, group, n_queries, _ = rotated_query.shape
    return rotated_query.new_empty(batch, kv_heads, group if per_head else 1, n_queries, rotated_keys.shape[2])


def torch_priorities(rotated_query: torch.Tensor, rotated_keys: torch.Tensor, rank: torch.Tensor, scaling: float,
                     sink_tokens: int, recent_tokens: int, per_head: bool) -> torch.Tensor:
    """The torch expression of :func:`key_priorities` (the CPU path, and the kernel's reference in the tests)."""
    from drrl_gym.selection import approximate_scores, forced_mask, priorities, visible_mask  # imports this module

    n_queries, n_keys = rotated_query.shape[3], rotated_keys.shape[2]
    device = rotated_query.device
    approx = approximate_scores(rotated_query, rotated_keys.to(rotated_query.dtype), rank, scaling)
    return priorities(approx, visible_mask(n_queries, n_keys, device),
                      forced_mask(n_queries, n_keys, sink_tokens, recent_tokens, device), "head" if per_head else "group")


def _kernel_priorities(rotated_query, rotated_keys, rank, scaling, sink_tokens, recent_tokens, per_head,
                       block_queries: int = 32, block_keys: int = 64, num_warps: int = 4) -> torch.Tensor:
    """The Triton path; the block sizes and warps override the launch. ``benchmarks/key_priorities.py`` sweeps them:
    on an H100 at the env's shapes (64 x 3 groups x 128 queries over 1024 keys) 32 queries x 64 keys over 4 warps
    took 0.39 ms, 16 x 64 x 4 0.62 ms, 64 x 64 x 8 0.42 ms, the torch expression 2.45 ms."""
    batch, kv_heads, group, n_queries, d = rotated_query.shape
    n_keys = rotated_keys.shape[2]
    out = torch.empty(batch, kv_heads, group if per_head else 1, n_queries, n_keys, dtype=torch.float32,
                      device=rotated_query.device)
    grid = (batch * kv_heads, triton.cdiv(n_queries, block_queries))
    _key_priorities_kernel[grid](
        rotated_query, rotated_keys, rank, out, kv_heads, n_queries, n_keys, d, scaling, sink_tokens, recent_tokens,
        *rotated_keys.stride()[:3], G=group, GROUP_ROWS=triton.next_power_of_2(group), PER_HEAD=per_head,
        D=max(16, triton.next_power_of_2(d)), BLOCK_T=block_queries, BLOCK_N=block_keys, num_warps=num_warps)
    return out


if triton is not None:
    @triton.jit
    def _rank_r_scores(q, k):
        """(q P_r)(K~_{:, :r})^T without the scaling, (2): tiles q (rows, D) and k (D, keys) whose columns beyond r
        are zero (masked loads: those columns are not read). TF32 tensor-core products (the module's docstring says
        what that changes)."""
        return tl.dot(q, k.to(tl.float32), input_precision="tf32")

    @triton.jit
    def _key_tile(k_ptr, keys, n_keys, k_stride_l, columns, column_ok):
        """The keys' first r columns as a (D, BLOCK_N) tile, the rest 0 (not read)."""
        return tl.load(k_ptr + keys[None, :] * k_stride_l + columns[:, None],
                       mask=(keys[None, :] < n_keys) & column_ok[:, None], other=0.0)

    @triton.jit
    def _key_priorities_kernel(q_ptr, k_ptr, rank_ptr, out_ptr, kv_heads, n_queries, n_keys, d, scaling,
                               sink_tokens, recent_tokens, k_stride_b, k_stride_h, k_stride_l,
                               G: tl.constexpr, GROUP_ROWS: tl.constexpr, PER_HEAD: tl.constexpr,
                               D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        group_index = tl.program_id(0).to(tl.int64)  # b H_kv + kv
        first = tl.program_id(1) * BLOCK_T
        b, kv = group_index // kv_heads, group_index % kv_heads
        k_ptr += b * k_stride_b + kv * k_stride_h
        columns = tl.arange(0, D)
        column_ok = columns < tl.load(rank_ptr + group_index).to(tl.int32)  # the first r columns, (2)
        # rows: the G heads' queries stacked, head-major (padded to a power of two for the reshape below)
        stacked = tl.arange(0, GROUP_ROWS * BLOCK_T)
        head, t = stacked // BLOCK_T, first + stacked % BLOCK_T
        row_ok = (head < G) & (t < n_queries)
        q_rows = (group_index * G + head) * n_queries + t
        q = tl.load(q_ptr + q_rows[:, None] * d + columns[None, :], mask=row_ok[:, None] & column_ok[None, :],
                    other=0.0)
        position = n_keys - n_queries + t  # query t sees keys 0 .. position
        if not PER_HEAD:
            # pass 1: each row's logsumexp over its visible keys, online (a running maximum and a rescaled sum)
            running_max = tl.full((GROUP_ROWS * BLOCK_T,), float("-inf"), tl.float32)
            running_sum = tl.zeros((GROUP_ROWS * BLOCK_T,), tl.float32)
            end = tl.minimum(n_keys, n_keys - n_queries + first + BLOCK_T)  # past the block's last visible key
            for start in range(0, end, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N)
                s = scaling * _rank_r_scores(q, _key_tile(k_ptr, j, n_keys, k_stride_l, columns, column_ok))
                s = tl.where(j[None, :] <= position[:, None], s, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(s, 1))  # finite from the first block on: key 0 is visible
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
                running_max = new_max
            log_sum = running_max + tl.log(running_sum)
        # pass 2: the priorities of every key, written once
        block_t = first + tl.arange(0, BLOCK_T)
        block_position = n_keys - n_queries + block_t
        for start in range(0, n_keys, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            s = scaling * _rank_r_scores(q, _key_tile(k_ptr, j, n_keys, k_stride_l, columns, column_ok))
            if PER_HEAD:
                priority = s  # rows (head, t)
                rows_position, out_rows, out_ok = position, q_rows, row_ok
            else:
                stacked_priority = tl.where(head[:, None] < G, s - log_sum[:, None], float("-inf"))
                priority = tl.max(tl.reshape(stacked_priority, (GROUP_ROWS, BLOCK_T, BLOCK_N)), 0)  # max over heads
                rows_position, out_rows, out_ok = block_position, group_index * n_queries + block_t, block_t < n_queries
            visible = j[None, :] <= rows_position[:, None]
            forced = visible & ((j[None, :] < sink_tokens) | (j[None, :] > rows_position[:, None] - recent_tokens))
            priority = tl.where(forced, float("inf"), tl.where(visible, priority, float("-inf")))
            tl.store(out_ptr + out_rows[:, None] * n_keys + j[None, :], priority,
                     mask=out_ok[:, None] & (j[None, :] < n_keys))
