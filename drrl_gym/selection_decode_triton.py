"""Triton kernels of one-token selection attention over a rotated key cache (the math: ``drrl_gym.selection``).

Four kernels, all on the device, no host synchronisation (one decode step can be captured as a CUDA graph):

1. ``_score_kernel``, grid (B H_kv, score splits): the rank-r scores (2) of the G query heads of a group against
   every visible key, reading only the column blocks of K~ that start below r (a block-uniform mask: a skipped
   block is never fetched, and the loads stay vectorised; the dim-blocked layout makes those blocks contiguous).
   It writes the G scores per key to a float32 scratch (G L_max per group, small next to K~ and L2-resident) and,
   per split and head, the running (max, sum exp) of the scores for the logsumexp of (3).
2. ``_threshold_kernel``, grid (B H_kv): one program holds all of a group's keys in registers (L_max <= MAX_KEYS).
   It combines the partials into logsumexp_h, forms the priorities (3), computes k by (4) on the device, and finds
   the (k - forced)-th largest priority among the non-forced visible keys exactly: a search over the float bit
   pattern (as int32, in the float order) with 3 probes per pass, each pass one block reduction, that
   stops as soon as the count at the lower bound is exactly the number wanted (about log_4 n passes). The kept keys
   (forced, or priority >= that bound) are compacted into an index list.
3. ``_attend_kernel``, grid (B H_kv, attend splits): exact attention (5) over the kept list only, flash-decoding
   style: each split gathers its share of the kept K~ rows (full width) and V rows, so an unkept key costs no
   traffic and no arithmetic, and writes an online-softmax partial (normalised output, max, sum exp).
4. ``_combine_kernel``, grid (B H): merges the partials of the splits into the output.

Why this split: choosing needs the global logsumexp of every head before any key can be ranked, and the exact pass
needs the threshold, so there are three dependent reductions over L; a grid-wide barrier is a kernel boundary. The
split counts fill the GPU at any batch (B H_kv programs alone are 48 at B = 16, against 132 SMs), and the kept-list
gather makes the exact pass cost k rows, not L. The threshold stays one program per group: an exact radix select
spread over the splits (global histograms of the priorities' bits, one pass per level) measured slower on an H200,
because Triton has no shared-memory atomics: the pass that forms the priorities and histograms them alone took longer
than the whole serial search (``tl.histogram`` or a one-hot sum), and each further level (a launch, a boundary scan
of the histogram, per-key global atomics) added 6-10 us at B = 16 (docs/results/decode_attention_h200/analysis.md).

Ties: every non-forced key whose priority equals the threshold is kept, so a row may keep a few more than k keys
when priorities tie exactly (never fewer). The reference breaks ties by position instead; random data has no ties.

Settings (lengths, rank, keep) are read on the device with their strides (a broadcast (B, 1) or scalar view costs
no copy) and clamped into range (n into [1, L_max], r into [1, d], k into [1, n]): the kernel path cannot check
values without a host sync; the reference checks them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from drrl_gym.row_threshold import add3, ordered_int
from drrl_gym.selection import KEEP_RTOL
from drrl_gym.selection_decode import DIM_BLOCK

COLUMN_BLOCK = tl.constexpr(DIM_BLOCK)  # the kernels' view of DIM_BLOCK
MAX_KEYS = 16384  # the threshold kernel keeps a group's priorities in registers
SCORE_BLOCK = 128  # keys per tile of the score kernel
ATTEND_BLOCK = 64  # kept keys per tile of the attend kernel
WAVES = 4  # programs per SM the split counts aim at
THRESHOLD_WARPS = 8  # warps of the threshold kernel at L_max >= 4096
RTOL_INVERSE = round(1 / KEEP_RTOL)
assert 1 / RTOL_INVERSE == KEEP_RTOL, "the kernel forms KEEP_RTOL as 1 / RTOL_INVERSE in float64"


@triton.jit
def _score_kernel(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sg, k_sblk, k_srow, len_ptr, len_s, rank_ptr, rank_sb, rank_sg,
                  scores_ptr, pmax_ptr, psum_ptr, L_max, H_kv, n_splits, scaling,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    bg, split = tl.program_id(0), tl.program_id(1)
    b, g = bg // H_kv, bg % H_kv
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b * len_s).to(tl.int32), 1), L_max)
    r = tl.minimum(tl.maximum(tl.load(rank_ptr + b * rank_sb + g * rank_sg).to(tl.int32), 1), D)
    per = tl.cdiv(tl.cdiv(n, n_splits), BLOCK) * BLOCK
    start = split * per
    stop = tl.minimum(start + per, n)
    heads = tl.arange(0, G_PAD)
    cols = tl.arange(0, D)
    # (2): a column block of K~ is loaded only if it starts below r (a whole block is one 32-byte sector in bf16, and
    # a block-uniform mask keeps the loads vectorised); q's columns >= r are zero, so the partly used last block adds
    # nothing beyond r. Column c of a key lies at block c // 16 (stride k_sblk), place c % 16 in either layout.
    wanted = (cols // COLUMN_BLOCK) * COLUMN_BLOCK < r
    key_cols = (cols // COLUMN_BLOCK) * k_sblk + cols % COLUMN_BLOCK
    q = tl.load(q_ptr + b * q_sb + (g * G + heads)[:, None] * q_sh + cols[None, :],
                mask=(heads[:, None] < G) & (cols < r)[None, :], other=0.0)
    keys = k_ptr + b * k_sb + g * k_sg
    row_max = tl.full([G_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([G_PAD], tl.float32)
    for j0 in range(start, stop, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        in_range = j < stop
        k = tl.load(keys + j[:, None] * k_srow + key_cols[None, :], mask=in_range[:, None] & wanted[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            acc = tl.dot(q, tl.trans(k))  # bf16/fp16 products are exact in the fp32 accumulator
        s = tl.where(in_range[None, :], acc * scaling, float("-inf"))
        tl.store(scores_ptr + (bg * G + heads[:, None]) * L_max + j[None, :], s,
                 mask=(heads[:, None] < G) & in_range[None, :])
        new_max = tl.maximum(row_max, tl.max(s, 1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
        row_max = new_max
    partial = (bg * G + heads) * n_splits + split
    tl.store(pmax_ptr + partial, row_max, mask=heads < G)
    tl.store(psum_ptr + partial, row_sum, mask=heads < G)


@triton.jit
def _merge_softmax(max_a, sum_a, max_b, sum_b):
    """(max, sum exp) of the union of two sets of scores: the flash-decoding merge."""
    top = tl.maximum(max_a, max_b)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return top, sum_a * tl.exp(max_a - safe) + sum_b * tl.exp(max_b - safe)


@triton.jit
def _window_stats(f_a, c_a, lo_a, hi_a, f_b, c_b, lo_b, hi_b):
    """forced count, candidate count, smallest and largest candidate key: one reduction for four statistics."""
    return f_a + f_b, c_a + c_b, tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)


@triton.jit
def _threshold_kernel(scores_ptr, pmax_ptr, psum_ptr, len_ptr, len_s, keep_ptr, keep_sb, keep_sg, index_ptr,
                      total_ptr, L_max, H_kv, n_splits, sink_tokens, recent_tokens,
                      RTOL_INVERSE: tl.constexpr, G: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    # Block-wide reductions cost a barrier each and this kernel is one program per group (few programs, serial
    # steps), so statistics that can share a reduction do: about G + 2 + passes of them in all.
    bg = tl.program_id(0)
    b, g = bg // H_kv, bg % H_kv
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b * len_s).to(tl.int32), 1), L_max)
    j = tl.arange(0, BLOCK_N)
    visible = j < n
    splits = tl.arange(0, SPLITS_PAD)
    priority = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for h in tl.static_range(G):  # (3): max over heads of the score minus that head's logsumexp over V
        part = (bg * G + h) * n_splits + splits
        top, total = tl.reduce((tl.load(pmax_ptr + part, mask=splits < n_splits, other=float("-inf")),
                                tl.load(psum_ptr + part, mask=splits < n_splits, other=0.0)), 0, _merge_softmax)
        s = tl.load(scores_ptr + (bg * G + h) * L_max + j, mask=visible, other=float("-inf"))
        priority = tl.maximum(priority, s - (top + tl.log(total)))
    forced = visible & ((j < sink_tokens) | (j > n - 1 - recent_tokens))
    candidate = visible & ~forced
    # float bits -> int32 keys in the float order
    key = tl.where(candidate, ordered_int(priority), -2147483648)
    n_forced, at_low, low, high = tl.reduce((forced.to(tl.int32), candidate.to(tl.int32),
                                             tl.where(candidate, key, 2147483647), key), 0, _window_stats)
    # (4) as drrl_gym.selection.kept_counts: k = max(ceil(keep n (1 - rtol)), min(n, sinks + recent)), 1 <= k <= n
    keep = tl.load(keep_ptr + b * keep_sb + g * keep_sg).to(tl.float64)
    one = tl.full([], 1.0, tl.float64)
    rtol = one / RTOL_INVERSE  # KEEP_RTOL in float64 (a float argument or literal would be rounded to float32)
    wanted = tl.ceil(keep * n.to(tl.float64) * (one - rtol)).to(tl.int32)
    k = tl.minimum(tl.maximum(tl.maximum(wanted, tl.minimum(n, sink_tokens + recent_tokens)), 1), n)
    need = k - n_forced  # non-forced keys to keep
    # The need-th largest candidate key: a 4-ary search over [low, high) that keeps
    # count(key >= low) = at_low >= need > count(key >= high) and stops as soon as at_low == need (key >= low is then
    # exactly the need highest keys): about log_4 of the keys' spread over the gap at the threshold, ~8 passes.
    low = low.to(tl.int64)
    high = high.to(tl.int64) + 1
    while (high - low > 1) & (at_low != need) & (need > 0):
        width = high - low
        probe1 = (low + width // 4).to(tl.int32)
        probe2 = (low + width // 2).to(tl.int32)
        probe3 = (low + 3 * width // 4).to(tl.int32)  # low <= probe1 <= probe2 <= probe3 < high, probe2 > low
        count1, count2, count3 = tl.reduce(((key >= probe1).to(tl.int32), (key >= probe2).to(tl.int32),
                                            (key >= probe3).to(tl.int32)), 0, add3)
        low, at_low = tl.where(count1 >= need, probe1.to(tl.int64), low), tl.where(count1 >= need, count1, at_low)
        low, at_low = tl.where(count2 >= need, probe2.to(tl.int64), low), tl.where(count2 >= need, count2, at_low)
        low, at_low = tl.where(count3 >= need, probe3.to(tl.int64), low), tl.where(count3 >= need, count3, at_low)
        high = tl.where(count3 < need, probe3.to(tl.int64), high)
        high = tl.where(count2 < need, probe2.to(tl.int64), high)
        high = tl.where(count1 < need, probe1.to(tl.int64), high)
    chosen = candidate & (key >= low.to(tl.int32)) & (need > 0)
    kept = forced | chosen
    place = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(index_ptr + bg * L_max + place, j, mask=kept)
    tl.store(total_ptr + bg, n_forced + tl.where(need > 0, at_low, 0))


@triton.jit
def _attend_kernel(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sg, k_sblk, k_srow, v_ptr, v_sb, v_sg, v_srow, index_ptr,
                   total_ptr, out_ptr, omax_ptr, osum_ptr, L_max, H_kv, n_splits, scaling,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr,
                   IEEE: tl.constexpr):
    bg, split = tl.program_id(0), tl.program_id(1)
    b, g = bg // H_kv, bg % H_kv
    total = tl.load(total_ptr + bg)
    per = tl.cdiv(total, n_splits)
    start = split * per
    stop = tl.minimum(start + per, total)
    heads = tl.arange(0, G_PAD)
    cols = tl.arange(0, D)
    vcols = tl.arange(0, DV)
    q = tl.load(q_ptr + b * q_sb + (g * G + heads)[:, None] * q_sh + cols[None, :], mask=heads[:, None] < G,
                other=0.0)
    key_cols = (cols // COLUMN_BLOCK) * k_sblk + cols % COLUMN_BLOCK  # column c in either layout
    keys = k_ptr + b * k_sb + g * k_sg
    values = v_ptr + b * v_sb + g * v_sg
    row_max = tl.full([G_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV], tl.float32)
    for p0 in range(start, stop, BLOCK):
        place = p0 + tl.arange(0, BLOCK)
        in_range = place < stop
        j = tl.load(index_ptr + bg * L_max + place, mask=in_range, other=0)
        k = tl.load(keys + j[:, None] * k_srow + key_cols[None, :], mask=in_range[:, None], other=0.0)
        if IEEE:  # (5): exact scores at full width
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        v = tl.load(values + j[:, None] * v_srow + vcols[None, :], mask=in_range[:, None], other=0.0)
        s = tl.where(in_range[None, :], s * scaling, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        alpha = tl.exp(row_max - new_max)
        p = tl.exp(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:  # tf32 keeps p to 2^-11 where a bf16 p would round to 2^-8; bf16/fp16 values are exact in tf32
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32")
        row_max = new_max
    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    slot = (bg * n_splits + split) * G_PAD + heads
    tl.store(out_ptr + slot[:, None] * DV + vcols[None, :], out)
    tl.store(omax_ptr + slot, row_max)
    tl.store(osum_ptr + slot, row_sum)


@triton.jit
def _combine_kernel(part_ptr, omax_ptr, osum_ptr, out_ptr, o_sb, o_sh, H, n_splits,
                    G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, SPLITS_PAD: tl.constexpr):
    bh = tl.program_id(0)  # one query head of one row
    b, h = bh // H, bh % H
    bg, head = bh // G, bh % G  # its group (b H_kv + h // G) and place in the group
    vcols = tl.arange(0, DV)
    splits = tl.arange(0, SPLITS_PAD)
    slots = (bg * n_splits + splits) * G_PAD + head
    real = splits < n_splits
    pmax = tl.load(omax_ptr + slots, mask=real, other=float("-inf"))
    weight = tl.load(osum_ptr + slots, mask=real, other=0.0) * tl.exp(pmax - tl.max(pmax, 0))  # top is finite
    parts = tl.load(part_ptr + slots[:, None] * DV + vcols[None, :], mask=real[:, None], other=0.0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.sum(weight, 0)
    tl.store(out_ptr + b * o_sb + h * o_sh + vcols, out.to(out_ptr.dtype.element_ty))


def _setting(value: torch.Tensor | float, batch: int, kv_heads: int, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    """A (B, H_kv) view of a per-(row, KV head) setting: a broadcast view of a device tensor (no copy, no sync), or a
    filled tensor for a Python number."""
    if not isinstance(value, torch.Tensor):
        return torch.full((batch, kv_heads), value, dtype=dtype, device=device)
    if value.device != device:
        raise ValueError(f"settings must live on the keys' device {device}, got {value.device}. Fix: move rank, keep "
                         "and lengths to the device once (a host tensor would need a copy in every step).")
    try:
        return value.expand(batch, kv_heads)
    except RuntimeError:
        raise ValueError(f"setting {tuple(value.shape)} must broadcast to (B, H_kv) = {(batch, kv_heads)}. Fix: pass "
                         "a scalar or a (B, H_kv), (H_kv,) or (B, 1) tensor.") from None


def _split_count(groups: int, device: torch.device, most: int) -> int:
    """Splits per group so that the grid is about WAVES programs per SM, at most ``most``."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(most, triton.cdiv(WAVES * sms, groups)))


def selection_decode_triton(
    rotated_query: torch.Tensor,
    rotated_keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    rank: torch.Tensor | int,
    keep: torch.Tensor | float,
    *,
    scaling: float,
    sink_tokens: int,
    recent_tokens: int,
) -> torch.Tensor:
    """The kernel path of ``drrl_gym.selection_decode.selection_decode`` (same arguments, shapes checked here)."""
    if rotated_query.dim() != 3:
        raise ValueError(f"rotated_query must be (B, H, d), got {tuple(rotated_query.shape)}. Fix: pass the new token's "
                         "query as query[:, :, 0] of the (B, H, 1, d) attention input, rotated.")
    batch, heads, d = rotated_query.shape
    if rotated_keys.dim() == 4 and rotated_keys.shape[0] == batch and rotated_keys.shape[-1] == d:
        kv_heads, l_max = rotated_keys.shape[1], rotated_keys.shape[2]
        k_sblk, k_srow = DIM_BLOCK, rotated_keys.stride(2)  # rows: column block c starts 16 c elements into a row
        column_stride = rotated_keys.stride(3)
    elif rotated_keys.dim() == 5 and rotated_keys.shape[0] == batch and rotated_keys.shape[2:5:2] == (
            d // DIM_BLOCK, DIM_BLOCK):
        kv_heads, l_max = rotated_keys.shape[1], rotated_keys.shape[3]
        k_sblk, k_srow = rotated_keys.stride(2), rotated_keys.stride(3)
        column_stride = rotated_keys.stride(4)
    else:
        raise ValueError(f"rotated keys {tuple(rotated_keys.shape)} fit neither (B, H_kv, L, d) nor (B, H_kv, d // "
                         f"{DIM_BLOCK}, L, {DIM_BLOCK}) for the query's B = {batch}, d = {d}. Fix: pass the cache's rotated keys "
                         "(drrl_gym.selection_decode.dim_blocked_layout makes the second layout).")
    dv = values.shape[-1]
    if d % DIM_BLOCK or d & (d - 1) or dv & (dv - 1) or dv < 16:
        raise ValueError(f"the kernel needs head_dim a power of two >= {DIM_BLOCK} (got d = {d}, dv = {dv}). Fix: use "
                         "backend='reference'.")
    if values.dim() != 4 or tuple(values.shape[:3]) != (batch, kv_heads, l_max):
        raise ValueError(f"values must be (B, H_kv, L_max, dv) = {(batch, kv_heads, l_max, dv)}, got "
                         f"{tuple(values.shape)}. Fix: pass the value cache that belongs to the keys.")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads. Fix: pass the query before "
                         "any repeat_kv, heads in (B, H, d) order.")
    if not rotated_query.dtype == rotated_keys.dtype == values.dtype or rotated_query.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"query, keys and values need one dtype among float32, bfloat16, float16; got "
                         f"{rotated_query.dtype}, {rotated_keys.dtype}, {values.dtype}. Fix: cast the query to the "
                         "cache's dtype.")
    if rotated_query.stride(2) != 1 or column_stride != 1 or values.stride(3) != 1:
        raise ValueError("the last dimension of the query, keys and values must be contiguous. Fix: .contiguous().")
    if l_max > MAX_KEYS:
        raise ValueError(f"L_max = {l_max} exceeds MAX_KEYS = {MAX_KEYS} (the threshold kernel holds a group's "
                         "priorities in registers). Fix: use backend='reference' for longer caches.")
    if lengths.dim() != 1 or lengths.shape[0] != batch or lengths.is_floating_point():
        raise ValueError(f"lengths must be an integer (B,) = ({batch},) tensor, got {lengths.dtype} "
                         f"{tuple(lengths.shape)}. Fix: pass the visible key count of each row as int32 or int64.")
    device = rotated_query.device
    for name, tensor in (("keys", rotated_keys), ("values", values), ("lengths", lengths)):
        if tensor.device != device:
            raise ValueError(f"{name} on {tensor.device}, the query on {device}. Fix: keep them on one device.")
    rank = _setting(rank, batch, kv_heads, device, torch.int32)
    keep = _setting(keep, batch, kv_heads, device, torch.float64)
    if rank.is_floating_point() or not keep.is_floating_point():
        raise ValueError(f"rank must be integers and keep floats, got {rank.dtype} and {keep.dtype}. Fix: "
                         "rank.long(), keep.double().")

    group, groups = heads // kv_heads, batch * kv_heads
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    ieee = rotated_query.dtype == torch.float32
    score_splits = _split_count(groups, device, triton.cdiv(l_max, SCORE_BLOCK))
    attend_splits = _split_count(groups, device, triton.cdiv(l_max, ATTEND_BLOCK))
    f32 = dict(dtype=torch.float32, device=device)
    scores = torch.empty(groups, group, l_max, **f32)
    score_max = torch.empty(groups, group, score_splits, **f32)
    score_sum = torch.empty(groups, group, score_splits, **f32)
    kept_index = torch.empty(groups, l_max, dtype=torch.int32, device=device)
    kept_total = torch.empty(groups, dtype=torch.int32, device=device)
    partial = torch.empty(groups, attend_splits, g_pad, dv, **f32)
    partial_max = torch.empty(groups, attend_splits, g_pad, **f32)
    partial_sum = torch.empty(groups, attend_splits, g_pad, **f32)
    out = torch.empty(batch, heads, dv, dtype=values.dtype, device=device)

    q_strides = (rotated_query.stride(0), rotated_query.stride(1))
    k_strides = (rotated_keys.stride(0), rotated_keys.stride(1), k_sblk, k_srow)
    _score_kernel[(groups, score_splits)](
        rotated_query, *q_strides, rotated_keys, *k_strides, lengths, lengths.stride(0), rank, *rank.stride(),
        scores, score_max, score_sum, l_max, kv_heads, score_splits, scaling,
        G=group, G_PAD=g_pad, D=d, BLOCK=SCORE_BLOCK, IEEE=ieee, num_warps=4)
    block_n = triton.next_power_of_2(l_max)
    _threshold_kernel[(groups,)](
        scores, score_max, score_sum, lengths, lengths.stride(0), keep, *keep.stride(), kept_index, kept_total,
        l_max, kv_heads, score_splits, sink_tokens, recent_tokens,
        RTOL_INVERSE=RTOL_INVERSE, G=group, SPLITS_PAD=triton.next_power_of_2(score_splits), BLOCK_N=block_n,
        num_warps=THRESHOLD_WARPS if block_n >= 4096 else 4)
    _attend_kernel[(groups, attend_splits)](
        rotated_query, *q_strides, rotated_keys, *k_strides, values, values.stride(0), values.stride(1),
        values.stride(2), kept_index, kept_total, partial, partial_max, partial_sum, l_max, kv_heads, attend_splits,
        scaling, G=group, G_PAD=g_pad, D=d, DV=dv, BLOCK=ATTEND_BLOCK, IEEE=ieee, num_warps=4)
    _combine_kernel[(batch * heads,)](
        partial, partial_max, partial_sum, out, out.stride(0), out.stride(1), heads, attend_splits,
        G=group, G_PAD=g_pad, DV=dv, SPLITS_PAD=triton.next_power_of_2(attend_splits), num_warps=4)
    return out


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
