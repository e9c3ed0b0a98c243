"""Triton kernels of one-token selection attention over a rotated key cache (the math: ``drrl_gym.selection``).

Five kernels, all on the device, no host synchronisation (one decode step can be captured as a CUDA graph); every
grid is (B H_kv groups, splits of the keys), so each pass fills the GPU at any batch:

1. ``_score_kernel``: the rank-r scores (2) of the G query heads of a group against every visible key. It reads only
   the column blocks of K~ that start below r (contiguous BLOCK x 16 tiles in the dim-blocked layout, so a skipped
   column is never fetched) and multiplies them with the G heads in fp32 (a broadcast product: no MMA padding of G
   to 16 rows, and G exps per key, not 16). It writes the scores to a float32 scratch (G L_max per group) and, per
   split and head, the running (max, sum exp) of the scores for the logsumexp of (3). It also zeroes the group's
   select workspace (histograms, boundaries, ticket) for the passes that follow, so no memset is launched.
2. ``_priority_kernel``: merges the partials into logsumexp_h, forms the priorities (3) as int32 keys in the float
   order (stored, 4 bytes per key), and adds a block-local histogram of the keys' top 11 bits (non-forced visible
   keys only) into the group's global histogram: one atomic per non-empty bin per program.
3. ``_refine_kernel`` (twice): an exact radix select, parallel over the splits. From the previous level's histogram
   each program finds the boundary bin, the one that holds the need-th largest key (need = k by (4) minus the forced
   keys), by a reverse cumulative sum; the keys of that bin (their bits so far equal to the boundary's) add their
   next 11, then last 10, bits to the next histogram with per-key atomics (few keys: those of one bin). Split 0
   records the boundary and the rank left inside it for the next level.
4. ``_attend_kernel``: the third boundary gives the exact need-th largest key T; the kept keys are the forced ones
   and the candidates with key >= T. Each split compacts the kept keys of its range of positions into an index list
   (its own stretch of the scratch, no coordination), then runs exact attention (5) over that list only,
   flash-decoding style: it gathers the kept K~ rows (full width) and V rows, so an unkept key costs 4 bytes (its
   key) and no K~/V traffic. The last split of a group to finish (an atomic ticket) merges the groups' partials into
   the output, so no combine kernel is launched.

Why this split: choosing needs every head's global logsumexp before any key can be ranked, the threshold needs every
key's priority, and the exact pass needs the threshold: dependent reductions over L, and a grid-wide dependency is
a kernel boundary. An earlier design ranked a group's keys in one program (a serial chain of block reductions on one
SM per group): at B = 16 that step alone took 17 us on an H200, longer than the score pass. The radix select spreads
every level over all splits; its three levels (11 + 11 + 10 bits of the int32 key) make it exact for any
distribution of priorities (real ones share sign and exponent, so the first level often splits little and the
second does the work).

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

from drrl_gym.selection import KEEP_RTOL
from drrl_gym.selection_decode import DIM_BLOCK

COLUMN_BLOCK = tl.constexpr(DIM_BLOCK)  # the kernels' view of DIM_BLOCK
SCORE_BLOCK = 128  # keys per tile of the score kernel
PRIORITY_BLOCK = 128  # keys per tile of the priority pass (a BLOCK x BINS1 one-hot count)
SCAN_BLOCK = 1024  # keys per tile of the refine and compaction passes
ATTEND_BLOCK = 64  # kept keys per tile of the attend kernel
WAVES = 4  # programs per SM the split counts aim at
SPLIT_ALIGN = tl.constexpr(128)  # keys: the splits of the priority and refine passes start at multiples
RTOL_INVERSE = round(1 / KEEP_RTOL)
assert 1 / RTOL_INVERSE == KEEP_RTOL, "the kernel forms KEEP_RTOL as 1 / RTOL_INVERSE in float64"
# Radix select over the int32 keys' offsets from the lowest possible priority: level 1 has BINS1 bins over the
# group's whole range (at most 2^32 keys, so shift1 <= 27), each later level BITS bits: LEVELS levels reach single
# keys. Per group the int32 workspace holds the histograms, the bounds (low, shift1, then (prefix, rank left) of
# each level but the last) and the attend ticket.
BINS1, BITS, LEVELS = 64, 11, 4
assert (BINS1.bit_length() - 1) + (LEVELS - 1) * BITS >= 32
BOUNDS = BINS1 + (LEVELS - 1) * 2**BITS
TICKET = BOUNDS + 2 * LEVELS
WORKSPACE = TICKET + 1


@triton.jit
def _candidates_wanted(n, keep_ptr, sink_tokens, recent_tokens, RTOL_INVERSE: tl.constexpr):
    """Non-forced keys to keep: k by (4), as drrl_gym.selection.kept_counts, minus the min(n, sinks + recent)
    forced keys (the windows overlap only when together they cover all n keys)."""
    keep = tl.load(keep_ptr).to(tl.float64)
    one = tl.full([], 1.0, tl.float64)
    rtol = one / RTOL_INVERSE  # KEEP_RTOL in float64 (a float argument or literal would be rounded to float32)
    wanted = tl.ceil(keep * n.to(tl.float64) * (one - rtol)).to(tl.int32)
    forced = tl.minimum(n, sink_tokens + recent_tokens)
    return tl.minimum(tl.maximum(tl.maximum(wanted, forced), 1), n) - forced


@triton.jit
def _is_candidate(j, n, sink_tokens, recent_tokens):
    """Visible keys that are not forced (the sinks and the recent window, itself included)."""
    return (j < n) & (j >= sink_tokens) & (j <= n - 1 - recent_tokens)


@triton.jit
def _boundary(hist_ptr, need, BINS: tl.constexpr):
    """The bin that holds the need-th largest key (bins in increasing key order) and the rank left inside it."""
    bins = tl.arange(0, BINS)
    count = tl.load(hist_ptr + bins)
    at_or_above = tl.cumsum(count, 0, reverse=True)
    bin = tl.max(tl.where(at_or_above >= need, bins, 0), 0)
    return bin, need - tl.sum(tl.where(bins > bin, count, 0), 0)


@triton.jit
def _scan_range(n, n_splits, ALIGN: tl.constexpr):
    """This split's share [start, stop) of the n visible keys, starting at a multiple of ALIGN keys."""
    per = tl.cdiv(tl.cdiv(n, n_splits), ALIGN) * ALIGN
    start = tl.program_id(1) * per
    return start, tl.minimum(start + per, n)


@triton.jit
def _score_kernel(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sg, k_sblk, k_srow, len_ptr, len_s, rank_ptr, rank_sb, rank_sg,
                  scores_ptr, pmax_ptr, psum_ptr, pmin_ptr, work_ptr, L_max, H_kv, n_splits, scaling,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
                  WORKSPACE: tl.constexpr):
    bg, split = tl.program_id(0), tl.program_id(1)
    b, g = bg // H_kv, bg % H_kv
    for z0 in range(split * 1024, WORKSPACE, n_splits * 1024):  # this split's share of the select workspace
        z = z0 + tl.arange(0, 1024)
        tl.store(work_ptr + bg * WORKSPACE + z, tl.zeros([1024], tl.int32), mask=z < WORKSPACE)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b * len_s).to(tl.int32), 1), L_max)
    r = tl.minimum(tl.maximum(tl.load(rank_ptr + b * rank_sb + g * rank_sg).to(tl.int32), 1), D)
    start, stop = _scan_range(n, n_splits, BLOCK)
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
    row_min = tl.full([G_PAD], float("inf"), tl.float32)
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
        row_min = tl.minimum(row_min, tl.min(tl.where(in_range[None, :], s, float("inf")), 1))
    partial = (bg * G + heads) * n_splits + split
    tl.store(pmax_ptr + partial, row_max, mask=heads < G)
    tl.store(psum_ptr + partial, row_sum, mask=heads < G)
    tl.store(pmin_ptr + partial, row_min, mask=heads < G)


@triton.jit
def _merge_softmax(max_a, sum_a, max_b, sum_b):
    """(max, sum exp) of the union of two sets of scores: the flash-decoding merge."""
    top = tl.maximum(max_a, max_b)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return top, sum_a * tl.exp(max_a - safe) + sum_b * tl.exp(max_b - safe)


@triton.jit
def _sortable(priority):
    """float32 -> int32 in the float order (flip the magnitude bits of negative floats)."""
    bits = priority.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _priority_kernel(scores_ptr, pmax_ptr, psum_ptr, pmin_ptr, len_ptr, len_s, keep_ptr, keep_sb, keep_sg, key_ptr,
                     work_ptr, L_max, H_kv, n_splits, score_splits, sink_tokens, recent_tokens,
                     RTOL_INVERSE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                     BLOCK: tl.constexpr, BINS1: tl.constexpr, BOUNDS: tl.constexpr, WORKSPACE: tl.constexpr):
    bg = tl.program_id(0)
    b, g = bg // H_kv, bg % H_kv
    work = work_ptr + bg * WORKSPACE
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b * len_s).to(tl.int32), 1), L_max)
    need = _candidates_wanted(n, keep_ptr + b * keep_sb + g * keep_sg, sink_tokens, recent_tokens, RTOL_INVERSE)
    heads = tl.arange(0, G_PAD)
    splits = tl.arange(0, SPLITS_PAD)
    part = (bg * G + heads[:, None]) * score_splits + splits[None, :]
    real = (heads[:, None] < G) & (splits[None, :] < score_splits)
    top, total = tl.reduce((tl.load(pmax_ptr + part, mask=real, other=float("-inf")),
                            tl.load(psum_ptr + part, mask=real, other=0.0)), 1, _merge_softmax)
    lse = tl.where(heads < G, top + tl.log(tl.where(heads < G, total, 1.0)), 0.0)  # logsumexp_h (3)
    # Every visible key's priority (3) lies in [max_h (min_h - lse_h), max_h (max_h - lse_h)] (rounding is monotone).
    bottom = tl.min(tl.load(pmin_ptr + part, mask=real, other=float("inf")), 1)
    low = _sortable(tl.max(tl.where(heads < G, bottom - lse, float("-inf")), 0)).to(tl.int64)
    high = _sortable(tl.max(tl.where(heads < G, top - lse, float("-inf")), 0)).to(tl.int64)
    shift = 0  # the level-1 bins (key - low) >> shift cover [low, high] in BINS1 bins
    while (high - low) >> shift >= BINS1:
        shift += 1
    if tl.program_id(1) == 0:
        tl.store(work + BOUNDS, low.to(tl.int32))
        tl.store(work + BOUNDS + 1, shift)
    start, stop = _scan_range(n, n_splits, SPLIT_ALIGN)
    stop = tl.where(need > 0, stop, start)  # nothing to rank when the forced keys are all that is kept
    bins = tl.arange(0, BINS1)
    count = tl.zeros([BINS1], tl.int32)
    for j0 in range(start, stop, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        visible = j < stop
        s = tl.load(scores_ptr + (bg * G + heads[:, None]) * L_max + j[None, :],
                    mask=(heads[:, None] < G) & visible[None, :], other=float("-inf"))
        key = _sortable(tl.max(s - lse[:, None], 0))  # (3): the max over heads
        tl.store(key_ptr + bg * L_max + j, key, mask=visible)
        digit = ((key.to(tl.int64) - low) >> shift).to(tl.int32)
        candidate = visible & _is_candidate(j, n, sink_tokens, recent_tokens)
        count += tl.sum(((digit[:, None] == bins[None, :]) & candidate[:, None]).to(tl.int32), 0)
    tl.atomic_add(work + bins, count, mask=count > 0)


@triton.jit
def _level_boundary(work, need, LEVEL: tl.constexpr, BINS1: tl.constexpr, BINS: tl.constexpr, BITS: tl.constexpr,
                    BOUNDS: tl.constexpr):
    """(prefix, rank left, shift) after LEVEL levels: the candidate keys with (key - low) >> shift == prefix hold the
    need-th largest one, as the left-th largest among them. Level 1 has BINS1 bins of width 2^shift1 over
    [low, high]; each later level splits the boundary bin of the one before into BINS bins (BITS bits), down to
    single key values (shift 0). Level m's boundary is stored at BOUNDS + 2 m by the kernel that computes it first."""
    shift1 = tl.load(work + BOUNDS + 1)
    if LEVEL == 1:
        prefix, left = _boundary(work, need, BINS1)
        shift = shift1
    else:
        before = tl.maximum(shift1 - (LEVEL - 2) * BITS, 0)
        shift = tl.maximum(before - BITS, 0)
        prefix = tl.load(work + BOUNDS + 2 * LEVEL - 2).to(tl.int64)
        left = tl.load(work + BOUNDS + 2 * LEVEL - 1)
        if before > 0:  # split the boundary bin of the level before
            digit, left = _boundary(work + BINS1 + (LEVEL - 2) * BINS, left, BINS)
            prefix = (prefix << (before - shift)) | digit
    return prefix, left, shift


@triton.jit
def _refine_kernel(len_ptr, len_s, keep_ptr, keep_sb, keep_sg, key_ptr, work_ptr, L_max, H_kv, n_splits,
                   sink_tokens, recent_tokens, RTOL_INVERSE: tl.constexpr, LEVEL: tl.constexpr,
                   BINS1: tl.constexpr, BINS: tl.constexpr, BITS: tl.constexpr, BOUNDS: tl.constexpr,
                   BLOCK: tl.constexpr, WORKSPACE: tl.constexpr):
    bg = tl.program_id(0)
    b, g = bg // H_kv, bg % H_kv
    work = work_ptr + bg * WORKSPACE
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b * len_s).to(tl.int32), 1), L_max)
    need = _candidates_wanted(n, keep_ptr + b * keep_sb + g * keep_sg, sink_tokens, recent_tokens, RTOL_INVERSE)
    prefix, left, shift = _level_boundary(work, need, LEVEL - 1, BINS1, BINS, BITS, BOUNDS)
    if tl.program_id(1) == 0:
        tl.store(work + BOUNDS + 2 * LEVEL - 2, prefix.to(tl.int32))
        tl.store(work + BOUNDS + 2 * LEVEL - 1, left)
    next_shift = tl.maximum(shift - BITS, 0)
    low = tl.load(work + BOUNDS).to(tl.int64)
    start, stop = _scan_range(n, n_splits, SPLIT_ALIGN)
    stop = tl.where((need > 0) & (shift > 0), stop, start)  # at shift 0 the boundary is one key value: done
    hist = work + BINS1 + (LEVEL - 2) * BINS
    for j0 in range(start, stop, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        visible = j < stop
        offset = tl.load(key_ptr + bg * L_max + j, mask=visible, other=0).to(tl.int64) - low
        inside = visible & _is_candidate(j, n, sink_tokens, recent_tokens) & ((offset >> shift) == prefix)
        tl.atomic_add(hist + ((offset >> next_shift) & (BINS - 1)).to(tl.int32), tl.full([BLOCK], 1, tl.int32),
                      mask=inside)


@triton.jit
def _attend_kernel(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sg, k_sblk, k_srow, v_ptr, v_sb, v_sg, v_srow, len_ptr, len_s,
                   keep_ptr, keep_sb, keep_sg, key_ptr, index_ptr, work_ptr, part_ptr, omax_ptr, osum_ptr, out_ptr,
                   o_sb, o_sh, L_max, H_kv, n_splits, sink_tokens, recent_tokens, scaling,
                   RTOL_INVERSE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   DV: tl.constexpr, SCAN: tl.constexpr, BLOCK: tl.constexpr, SPLITS_PAD: tl.constexpr,
                   BINS1: tl.constexpr, BINS: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr,
                   BOUNDS: tl.constexpr, TICKET: tl.constexpr, WORKSPACE: tl.constexpr, IEEE: tl.constexpr):
    bg, split = tl.program_id(0), tl.program_id(1)
    b, g = bg // H_kv, bg % H_kv
    work = work_ptr + bg * WORKSPACE
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b * len_s).to(tl.int32), 1), L_max)
    need = _candidates_wanted(n, keep_ptr + b * keep_sb + g * keep_sg, sink_tokens, recent_tokens, RTOL_INVERSE)
    # The last level's boundary is a single key value (shift 0): the need-th largest candidate key T.
    offset, _, _ = _level_boundary(work, need, LEVELS, BINS1, BINS, BITS, BOUNDS)
    threshold = (tl.load(work + BOUNDS).to(tl.int64) + offset).to(tl.int32)
    # Compact the kept keys of this split's positions into its own stretch of the index list.
    start, stop = _scan_range(n, n_splits, BLOCK)
    total = 0
    for j0 in range(start, stop, SCAN):
        j = j0 + tl.arange(0, SCAN)
        visible = j < stop
        key = tl.load(key_ptr + bg * L_max + j, mask=visible, other=0)
        candidate = _is_candidate(j, n, sink_tokens, recent_tokens)
        kept = visible & ((candidate & (key >= threshold) & (need > 0)) | ~candidate)
        place = total + tl.cumsum(kept.to(tl.int32), 0) - 1
        tl.store(index_ptr + bg * L_max + start + place, j, mask=kept)
        total += tl.sum(kept.to(tl.int32), 0)
    tl.debug_barrier()  # the list is read back by other threads of this program
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
    for p0 in range(0, total, BLOCK):
        place = p0 + tl.arange(0, BLOCK)
        in_range = place < total
        j = tl.load(index_ptr + bg * L_max + start + place, mask=in_range, other=0)
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
    slot = (bg * n_splits + split) * G_PAD + heads
    tl.store(part_ptr + slot[:, None] * DV + vcols[None, :], acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None])
    tl.store(omax_ptr + slot, row_max)
    tl.store(osum_ptr + slot, row_sum)
    # The last split of the group to finish merges the partials: the flash-decoding combine, weights sum exp(max - top).
    tl.debug_barrier()
    if tl.atomic_add(work + TICKET, 1, sem="acq_rel") == n_splits - 1:
        splits = tl.arange(0, SPLITS_PAD)
        real = splits < n_splits
        for h in tl.static_range(G):
            slots = (bg * n_splits + splits) * G_PAD + h
            pmax = tl.load(omax_ptr + slots, mask=real, other=float("-inf"), cache_modifier=".cg")
            weight = tl.load(osum_ptr + slots, mask=real, other=0.0, cache_modifier=".cg") * tl.exp(
                pmax - tl.max(pmax, 0))  # the top is finite: the group keeps at least one key
            parts = tl.load(part_ptr + slots[:, None] * DV + vcols[None, :], mask=real[:, None], other=0.0,
                            cache_modifier=".cg")
            out = tl.sum(weight[:, None] * parts, 0) / tl.sum(weight, 0)
            tl.store(out_ptr + b * o_sb + (g * G + h) * o_sh + vcols, out.to(out_ptr.dtype.element_ty))


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
    g_pad = max(2, triton.next_power_of_2(group))  # heads of the score and priority tiles
    ieee = rotated_query.dtype == torch.float32
    score_splits = _split_count(groups, device, triton.cdiv(l_max, SCORE_BLOCK))
    attend_splits = _split_count(groups, device, triton.cdiv(l_max, ATTEND_BLOCK))
    f32, i32 = dict(dtype=torch.float32, device=device), dict(dtype=torch.int32, device=device)
    scores = torch.empty(groups, group, l_max, **f32)
    score_max, score_sum, score_min = (torch.empty(groups, group, score_splits, **f32) for _ in range(3))
    priority_key = torch.empty(groups, l_max, **i32)
    kept_index = torch.empty(groups, l_max, **i32)
    workspace = torch.empty(groups, WORKSPACE, **i32)  # zeroed by the score kernel
    mma_rows = max(16, g_pad)  # tl.dot needs 16 rows
    partial = torch.empty(groups, attend_splits, mma_rows, dv, **f32)
    partial_max = torch.empty(groups, attend_splits, mma_rows, **f32)
    partial_sum = torch.empty(groups, attend_splits, mma_rows, **f32)
    out = torch.empty(batch, heads, dv, dtype=values.dtype, device=device)

    q_strides = (rotated_query.stride(0), rotated_query.stride(1))
    k_strides = (rotated_keys.stride(0), rotated_keys.stride(1), k_sblk, k_srow)
    settings = (lengths, lengths.stride(0), keep, *keep.stride())
    window = (sink_tokens, recent_tokens)
    _score_kernel[(groups, score_splits)](
        rotated_query, *q_strides, rotated_keys, *k_strides, lengths, lengths.stride(0), rank, *rank.stride(),
        scores, score_max, score_sum, score_min, workspace, l_max, kv_heads, score_splits, scaling,
        G=group, G_PAD=mma_rows, D=d, BLOCK=SCORE_BLOCK, IEEE=ieee, WORKSPACE=WORKSPACE, num_warps=4)
    _priority_kernel[(groups, score_splits)](
        scores, score_max, score_sum, score_min, *settings, priority_key, workspace, l_max, kv_heads, score_splits,
        score_splits, *window, RTOL_INVERSE=RTOL_INVERSE, G=group, G_PAD=g_pad,
        SPLITS_PAD=triton.next_power_of_2(score_splits), BLOCK=PRIORITY_BLOCK, BINS1=BINS1, BOUNDS=BOUNDS,
        WORKSPACE=WORKSPACE, num_warps=4)
    for level in range(2, LEVELS + 1):
        _refine_kernel[(groups, score_splits)](
            *settings, priority_key, workspace, l_max, kv_heads, score_splits, *window,
            RTOL_INVERSE=RTOL_INVERSE, LEVEL=level, BINS1=BINS1, BINS=2**BITS, BITS=BITS, BOUNDS=BOUNDS,
            BLOCK=SCAN_BLOCK, WORKSPACE=WORKSPACE, num_warps=4)
    _attend_kernel[(groups, attend_splits)](
        rotated_query, *q_strides, rotated_keys, *k_strides, values, values.stride(0), values.stride(1),
        values.stride(2), *settings, priority_key, kept_index, workspace, partial, partial_max, partial_sum, out,
        out.stride(0), out.stride(1), l_max, kv_heads, attend_splits, *window, scaling,
        RTOL_INVERSE=RTOL_INVERSE, G=group, G_PAD=mma_rows, D=d, DV=dv, SCAN=SCAN_BLOCK, BLOCK=ATTEND_BLOCK,
        SPLITS_PAD=triton.next_power_of_2(attend_splits), BINS1=BINS1, BINS=2**BITS, BITS=BITS, LEVELS=LEVELS,
        BOUNDS=BOUNDS, TICKET=TICKET, WORKSPACE=WORKSPACE, IEEE=ieee, num_warps=4)
    return out


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
