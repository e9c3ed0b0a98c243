"""Selection attention (drrl_gym.selection, derivation: docs/selection.md) against plain attention and its bound.

* Full settings (r = d, keep = 1) reproduce causal attention in the T-of-L layout, fp32 and fp64, with and without GQA.
* The chosen keys are causal and contain the sinks and the recents; their number follows the documented rule.
* Settings mixed across batch rows and KV heads equal running each setting on its own.
* A seeded property test over 1200 random cases (random bases, ranks, keeps, windows, GQA, KV-cache offsets and
  adversarial scales): the dropped-mass bound is never below the true dropped mass, ||p - p^S||_1 = 2m holds, and
  the output moves by no more than 2 m max ||v||. The bound is exact at r = d and attained by a constructed case.
* The candidate table equals the bounds of the reference forward, compiled (as on CUDA) or not; costs equal hand
  counts; bad arguments raise.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import one_thread

from drrl_gym.selection import (
    dropped_mass_bound,
    dropped_mass_bound_table,
    forced_mask,
    kept_counts,
    output_change_bound,
    rotate,
    selection_attention,
    visible_mask,
)
from drrl_gym.selection_cost import SelectionFlops, decode_traffic, full_attention_flops, selection_flops

REL_SLACK = 1e-9  # float64 rounding only: the bound may never be exceeded by more than this, relatively


def orthonormal(kv_heads: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(kv_heads, d, d, generator=generator, dtype=torch.float64))[0]


def inputs(batch, kv_heads, group, n_queries, n_keys, d, generator, dtype=torch.float64):
    """Random q (B, H, T, d), k, v (B, H_kv, L, d) and an orthonormal basis (H_kv, d, d)."""
    q = torch.randn(batch, kv_heads * group, n_queries, d, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n_keys, d, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n_keys, d, generator=generator, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), orthonormal(kv_heads, d, generator).to(dtype)


def causal_attention(q, k, v, scaling=None):
    """torch SDPA with the bottom-right causal mask of the T-of-L layout, in transformers' (B, T, H, d) output."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = visible_mask(q.shape[2], k.shape[2])
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------ exact reproduction
SHAPES = [  # (B, H_kv, G, T, L, d)
    (2, 2, 1, 6, 6, 8),  # T = L, multi-head
    (1, 1, 3, 4, 11, 8),  # T < L, GQA
    (2, 2, 3, 7, 7, 4),  # T = L, GQA
    (1, 3, 1, 1, 9, 16),  # decode
    (2, 1, 3, 5, 13, 16),
]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("shape", SHAPES)
def test_full_settings_reproduce_causal_attention(shape, dtype, tol):
    batch, kv_heads, group, n_queries, n_keys, d = shape
    generator = torch.Generator().manual_seed(sum(shape))
    q, k, v, basis = inputs(batch, kv_heads, group, n_queries, n_keys, d, generator, dtype)
    expected = causal_attention(q, k, v)
    if n_queries == n_keys:  # the plain is_causal flag agrees with the bottom-right mask when T = L
        plain = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True).transpose(1, 2)
        torch.testing.assert_close(expected, plain, rtol=tol, atol=tol)
    for selection in ("group", "head"):
        out, _ = selection_attention(q, k, v, basis, d, 1.0, selection=selection)
        assert out.shape == (batch, n_queries, kv_heads * group, d) and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
        # keep = 1 keeps every visible key whatever the rank: the rank only chooses
        low, _ = selection_attention(q, k, v, basis, 1, 1.0, selection=selection, sink_tokens=0, recent_tokens=0)
        torch.testing.assert_close(low, expected, rtol=tol, atol=tol)


def test_rotated_keys_argument_changes_nothing():
    generator = torch.Generator().manual_seed(3)
    q, k, v, basis = inputs(2, 2, 2, 5, 12, 8, generator)
    rotated = rotate(k, basis)
    torch.testing.assert_close(rotated, k @ basis[None])
    for selection in ("group", "head"):
        a, da = selection_attention(q, k, v, basis, 3, 0.4, selection=selection, return_details=True)
        b, db = selection_attention(q, k, v, basis, 3, 0.4, selection=selection, rotated_keys=rotated,
                                    return_details=True)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(da.kept, db.kept)


# ----------------------------------------------------------------------------------------------- the chosen set
def test_kept_counts_rule():
    visible = torch.arange(1, 41)
    counts = kept_counts(torch.tensor(0.1), visible, 0, 0)
    assert counts[29] == 3  # 0.1 * 30 = 3.0000000000000004 in binary: still 3 keys
    assert torch.equal(counts, torch.ceil(visible / 10).long())
    with_window = torch.maximum(torch.ceil(visible / 10).long(), visible.clamp(max=5))
    assert torch.equal(kept_counts(0.1, visible, 2, 3), with_window)
    assert torch.equal(kept_counts(1.0, visible, 4, 8), visible)  # keep = 1 keeps everything
    assert kept_counts(1e-9, 7, 0, 0) == 1  # at least one key


@pytest.mark.parametrize("selection", ["group", "head"])
def test_chosen_keys_are_causal_and_contain_sinks_and_recents(selection):
    generator = torch.Generator().manual_seed(1)
    with one_thread():
        for case in range(40):
            batch, kv_heads, group = 2, 2, [1, 3][case % 2]
            n_keys = int(torch.randint(1, 30, (), generator=generator))
            n_queries = int(torch.randint(1, n_keys + 1, (), generator=generator))
            d = 8
            sinks, recent = (int(x) for x in torch.randint(0, 5, (2,), generator=generator))
            q, k, v, basis = inputs(batch, kv_heads, group, n_queries, n_keys, d, generator)
            rank = torch.randint(1, d + 1, (batch, kv_heads), generator=generator)
            keep = torch.rand(batch, kv_heads, generator=generator, dtype=torch.float64).clamp_min(0.01)
            _, details = selection_attention(q, k, v, basis, rank, keep, sink_tokens=sinks, recent_tokens=recent,
                                             selection=selection, return_details=True)
            kept = details.kept  # (B, H, T, L)
            visible = visible_mask(n_queries, n_keys)
            forced = forced_mask(n_queries, n_keys, sinks, recent)
            assert not (kept & ~visible).any(), "a future key was chosen"
            assert (kept | ~forced).all(), "a sink or recent key was dropped"
            expected = kept_counts(keep, visible.sum(-1), sinks, recent).repeat_interleave(group, 1)
            assert torch.equal(kept.sum(-1), expected)
            grouped = kept.reshape(batch, kv_heads, group, n_queries, n_keys)
            if selection == "group":
                assert (grouped == grouped[:, :, :1]).all(), "heads of one group read different keys"
                assert torch.equal(details.group_reads, details.kept_count)
            else:
                assert (details.group_reads >= details.kept_count).all()
                assert (details.group_reads <= (group * details.kept_count).clamp(max=visible.sum(-1))).all()


def test_head_selection_takes_each_heads_top_scores():
    """With no forced keys, selection="head" keeps exactly the k largest rank-r scores of each head."""
    generator = torch.Generator().manual_seed(2)
    q, k, v, basis = inputs(1, 1, 3, 1, 20, 8, generator)
    _, details = selection_attention(q, k, v, basis, 3, 0.25, sink_tokens=0, recent_tokens=0, selection="head",
                                     return_details=True)
    approx = 8**-0.5 * (q @ basis[0])[..., :3] @ (k @ basis[0])[0, :, :, :3].transpose(-1, -2)
    top = approx.topk(5, -1).indices  # 0.25 * 20 = 5
    assert torch.equal(details.kept, torch.zeros_like(details.kept).scatter(-1, top, True))


def test_mixed_settings_equal_separate_runs():
    generator = torch.Generator().manual_seed(4)
    batch, kv_heads, group, n_queries, n_keys, d = 3, 2, 3, 6, 15, 8
    q, k, v, basis = inputs(batch, kv_heads, group, n_queries, n_keys, d, generator)
    rank = torch.tensor([[1, 8], [3, 5], [8, 2]])
    keep = torch.tensor([[0.2, 1.0], [0.5, 0.3], [0.1, 0.7]])
    for selection in ("group", "head"):
        out, details = selection_attention(q, k, v, basis, rank, keep, sink_tokens=1, recent_tokens=2,
                                           selection=selection, return_details=True)
        for b in range(batch):
            for g in range(kv_heads):
                heads = slice(g * group, (g + 1) * group)
                alone, alone_details = selection_attention(
                    q[b:b + 1, heads], k[b:b + 1, g:g + 1], v[b:b + 1, g:g + 1], basis[g:g + 1], int(rank[b, g]),
                    float(keep[b, g]), sink_tokens=1, recent_tokens=2, selection=selection, return_details=True)
                torch.testing.assert_close(out[b:b + 1, :, heads], alone, rtol=1e-13, atol=1e-13)
                assert torch.equal(details.kept[b:b + 1, heads], alone_details.kept)
                torch.testing.assert_close(details.dropped_mass_bound[b:b + 1, heads], alone_details.dropped_mass_bound,
                                           rtol=1e-12, atol=1e-300)
    # (H_kv,) and (B, 1) settings broadcast to (B, H_kv)
    a, _ = selection_attention(q, k, v, basis, torch.tensor([2, 6]), torch.tensor([[0.3], [0.6], [0.9]]))
    b, _ = selection_attention(q, k, v, basis, torch.tensor([[2, 6]] * 3),
                               torch.tensor([[0.3] * 2, [0.6] * 2, [0.9] * 2]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- the bound
def true_quantities(q, k, v, kept, scaling):
    """Independent float64 reference: full softmax p over the visible keys, restricted p^S, m, ||p - p^S||_1 and
    the output change, per (B, H, T)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = scaling * q @ kk.transpose(-1, -2)
    visible = visible_mask(q.shape[2], k.shape[2])
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    p_kept = scores.masked_fill(~(kept & visible), float("-inf")).softmax(-1)
    dropped = visible & ~kept
    # m from log-sum-exps: accurate relative to m itself when it is tiny (1 - sum over kept would not be)
    mass = torch.sigmoid(scores.masked_fill(~dropped, float("-inf")).logsumexp(-1)
                         - scores.masked_fill(~kept, float("-inf")).logsumexp(-1))
    l1 = (p - p_kept).abs().sum(-1)
    output_change = ((p - p_kept) @ vv).norm(dim=-1)
    return mass, l1, output_change


def random_case(generator: torch.Generator):
    """One adversarial random case: shapes, GQA, offsets, settings and scales all drawn."""
    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=generator))

    d = [2, 4, 8, 16][draw(0, 3)]
    kv_heads, group, batch = draw(1, 2), [1, 2, 3][draw(0, 2)], draw(1, 2)
    n_keys = draw(1, 24)
    n_queries = draw(1, n_keys)
    q, k, v, basis = inputs(batch, kv_heads, group, n_queries, n_keys, d, generator)
    kind = draw(0, 5)
    if kind == 1:  # large-norm keys: saturated softmax, large tails
        k = k * 10 ** (3 * torch.rand(batch, kv_heads, n_keys, 1, generator=generator, dtype=torch.float64))
    elif kind == 2:  # large queries and a few huge keys
        q = q * 30
        k[..., : max(1, n_keys // 4), :] *= 20
    elif kind == 3:  # anisotropic: energy concentrated in the basis' first columns (the intended use)
        decay = 0.5 ** torch.arange(d, dtype=torch.float64)
        per_head = basis.repeat_interleave(group, 0)[None]
        q = (q @ per_head) * decay @ per_head.transpose(-1, -2)
        k = (k @ basis[None]) * decay @ basis[None].transpose(-1, -2)
    elif kind == 4:  # identity basis, keys with a large component beyond the rank
        basis = torch.eye(d, dtype=torch.float64).expand(kv_heads, d, d).clone()
        k[..., d // 2:] *= 50
    elif kind == 5:  # large value norms on a few keys
        v[..., :1, :] *= 1e3
    rank = torch.randint(1, d + 1, (batch, kv_heads), generator=generator)
    keep = torch.rand(batch, kv_heads, generator=generator, dtype=torch.float64).clamp_min(1e-3)
    sinks, recent = draw(0, 4), draw(0, 4)
    selection = ["group", "head"][draw(0, 1)]
    scaling = [None, 1.0, 0.05][draw(0, 2)]
    return q, k, v, basis, rank, keep, sinks, recent, selection, scaling


def test_dropped_mass_bound_holds_on_random_cases():
    generator = torch.Generator().manual_seed(12345)
    violations, checked, rows, ratios = 0, 0, 0, []
    with one_thread():
        for _ in range(1200):
            q, k, v, basis, rank, keep, sinks, recent, selection, scaling = random_case(generator)
            s = q.shape[-1] ** -0.5 if scaling is None else scaling
            out, details = selection_attention(q, k, v, basis, rank, keep, scaling=scaling, sink_tokens=sinks,
                                               recent_tokens=recent, selection=selection, return_details=True)
            mass, l1, output_change = true_quantities(q, k, v, details.kept, s)
            bound = details.dropped_mass_bound
            violations += int((mass > bound * (1 + REL_SLACK) + 1e-300).sum())
            # the reference's own true mass agrees with the independent one
            torch.testing.assert_close(details.dropped_mass, mass, rtol=1e-9, atol=1e-300)
            # ||p - p^S||_1 = 2 m exactly (m < 1 always: S is never empty)
            torch.testing.assert_close(l1, 2 * mass, rtol=1e-9, atol=1e-13)
            # output: the exact change obeys 2 m max||v||, and the reported bound dominates it
            largest = v.norm(dim=-1).cummax(-1).values[..., v.shape[2] - q.shape[2]:].repeat_interleave(
                q.shape[1] // k.shape[1], 1)
            assert (output_change <= 2 * mass * largest * (1 + REL_SLACK) + 1e-12).all()
            assert (output_change <= details.output_bound * (1 + REL_SLACK) + 1e-12).all()
            full = causal_attention(q, k, v, s)
            torch.testing.assert_close((full - out).norm(dim=-1).transpose(1, 2), output_change, rtol=1e-7, atol=1e-9)
            # the standalone bound, fed the same kept sets, agrees
            standalone = dropped_mass_bound(rotate(q, basis), rotate(k, basis), details.kept, rank, scaling=scaling)
            torch.testing.assert_close(standalone, bound, rtol=1e-12, atol=0)
            checked, rows = checked + 1, rows + mass.numel()
            truncated = (rank.repeat_interleave(q.shape[1] // k.shape[1], 1) < q.shape[-1])[..., None]  # r < d
            informative = truncated & (bound > 1e-12)  # at r = d the bound is the mass itself
            ratios.append(mass[informative] / bound[informative])
    ratio = torch.cat(ratios)
    print(f"\n{checked} cases, {rows} rows, {violations} violations; true/bound on {ratio.numel()} rows with r < d: "
          f"median {ratio.median():.3f}, max {ratio.max():.6f}")
    assert violations == 0
    assert checked >= 1000


def test_bound_is_exact_at_full_rank():
    """r = d: no tail, delta = 0, and U / (U + W) is the dropped mass itself."""
    generator = torch.Generator().manual_seed(5)
    q, k, v, basis = inputs(2, 2, 3, 6, 20, 8, generator)
    for selection in ("group", "head"):
        _, details = selection_attention(q, k, v, basis, 8, 0.3, sink_tokens=1, recent_tokens=1, selection=selection,
                                         return_details=True)
        torch.testing.assert_close(details.dropped_mass_bound, details.dropped_mass, rtol=1e-10, atol=1e-300)


def test_bound_is_attained():
    """Cauchy-Schwarz tight with opposite signs: q's tail parallel to every dropped key's tail and antiparallel to
    every kept one's, and no rank-r signal (all s^ = 0, so ties keep the first keys). Then (7) is an equality."""
    q = torch.tensor([0.0, 2.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    k = torch.tensor([[0.3, -1.0], [-0.7, -0.5], [0.1, 0.8], [0.2, 1.5]], dtype=torch.float64).reshape(1, 1, 4, 2)
    v = torch.randn(1, 1, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis = torch.eye(2, dtype=torch.float64)[None]
    _, details = selection_attention(q, k, v, basis, 1, 0.5, sink_tokens=0, recent_tokens=0, selection="head",
                                     return_details=True)
    assert details.kept[0, 0, 0].tolist() == [True, True, False, False]
    torch.testing.assert_close(details.dropped_mass_bound, details.dropped_mass, rtol=1e-14, atol=0)
    assert 0.1 < float(details.dropped_mass) < 0.99


def test_bound_table_matches_reference_forward():
    generator = torch.Generator().manual_seed(6)
    batch, kv_heads, group, n_queries, n_keys, d = 2, 2, 3, 5, 17, 8
    q, k, v, basis = inputs(batch, kv_heads, group, n_queries, n_keys, d, generator)
    ranks, keeps = (1, 3, 8), (0.1, 0.35, 1.0)
    for selection in ("group", "head"):
        mean, top = dropped_mass_bound_table(rotate(q, basis), rotate(k, basis), ranks, keeps, sink_tokens=1,
                                             recent_tokens=2, selection=selection)
        assert mean.shape == top.shape == (batch, kv_heads, len(ranks), len(keeps))
        assert (mean <= top).all() and (top[:, :, :, -1] == 0).all()  # keep = 1 drops nothing
        for a, r in enumerate(ranks):
            for b, keep in enumerate(keeps):
                _, details = selection_attention(q, k, v, basis, r, keep, sink_tokens=1, recent_tokens=2,
                                                 selection=selection, return_details=True)
                rows = details.dropped_mass_bound.reshape(batch, kv_heads, group * n_queries)
                torch.testing.assert_close(mean[:, :, a, b], rows.mean(-1), rtol=1e-10, atol=1e-300)
                torch.testing.assert_close(top[:, :, a, b], rows.amax(-1), rtol=1e-10, atol=1e-300)
        # float32 work (what the env uses) agrees with the float64 reference to float32 rounding
        mean32, top32 = dropped_mass_bound_table(rotate(q, basis), rotate(k, basis), ranks, keeps, sink_tokens=1,
                                                 recent_tokens=2, selection=selection, dtype=torch.float32)
        assert mean32.dtype == torch.float64
        torch.testing.assert_close(mean32, mean, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(top32, top, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, from inside the compiler
def test_bound_table_compiled_as_on_cuda_gives_the_eager_numbers(monkeypatch):
    # On CUDA the table's per-rank work runs through torch.compile with dynamic shapes; compiled here on the CPU, it
    # must give the eager float32 numbers at two key counts, as the env calls it with a growing KV cache.
    import drrl_gym.selection as selection

    generator = torch.Generator().manual_seed(7)
    ranks, keeps = (2, 5, 8), (0.2, 0.4, 1.0)
    compiled = selection._compiled_rank_bounds()
    for n_keys in (23, 41):
        q, k, _, basis = inputs(2, 2, 3, 9, n_keys, 8, generator, dtype=torch.float32)
        eager = dropped_mass_bound_table(rotate(q, basis), rotate(k, basis), ranks, keeps, dtype=torch.float32)
        with monkeypatch.context() as patch:
            patch.setattr(selection, "_rank_bounds", compiled)
            fused = dropped_mass_bound_table(rotate(q, basis), rotate(k, basis), ranks, keeps, dtype=torch.float32)
        assert (eager[0] > 0).any()
        for a, b in zip(fused, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_output_change_bound_uses_visible_values_only():
    value = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    value[0, 0, 3] = torch.tensor([3.0, 4.0])  # the last key only: visible to the last query alone
    value[0, 0, 0] = torch.tensor([1.0, 0.0])
    bound = output_change_bound(torch.full((1, 1, 2), 0.5, dtype=torch.float64), value)
    assert bound.tolist() == [[[1.0, 5.0]]]  # 2 * 0.5 * max ||v_j|| over keys 0..2, then 0..3


# -------------------------------------------------------------------------------------------------------- costs
def test_costs_against_hand_counts():
    # T = 2 new queries of L = 4 keys: n = (3, 4), P = 7; d = 4, G = 2, r = 2, keep = 0.5, 1 sink + 1 recent:
    # k = (max(ceil(1.5), 2), max(2, 2)) = (2, 2), K = 4.
    flops = selection_flops(2, 0.5, new_tokens=2, keys=4, head_dim=4, group_size=2, sink_tokens=1, recent_tokens=1)
    assert isinstance(flops, SelectionFlops)
    expected = dict(rotation=2 * 2 * 2 * 16 + 2 * 2 * 16, scoring=2 * 2 * 7 * 2, choosing=5 * 2 * 7 + 7,
                    scores=2 * 2 * 4 * 4, softmax=5 * 2 * 4, values=2 * 2 * 4 * 4)
    counted = {name: int(value) for name, value in flops.as_dict().items()}
    assert counted == {**expected, "total": sum(expected.values())}
    head = selection_flops(2, 0.5, new_tokens=2, keys=4, head_dim=4, group_size=2, sink_tokens=1, recent_tokens=1,
                           selection="head")
    assert int(head.choosing) == 2 * 7 and int(head.scores) == expected["scores"]
    full = full_attention_flops(new_tokens=2, keys=4, head_dim=4, group_size=2)
    assert {name: int(value) for name, value in full.as_dict().items()} == dict(
        rotation=0, scoring=0, choosing=0, scores=2 * 2 * 7 * 4, softmax=5 * 2 * 7, values=2 * 2 * 7 * 4,
        total=2 * 2 * 7 * 4 * 2 + 5 * 2 * 7)
    # decode: the token at position L - 1 = 3 sees 4 keys, k = 2: 2/(2*4) + 2/4
    assert float(decode_traffic(2, 0.5, keys=4, head_dim=4, sink_tokens=1, recent_tokens=1)) == 0.75
    assert float(decode_traffic(4, 1.0, keys=4, head_dim=4)) == 1.5  # full settings read more than full attention
    assert float(decode_traffic(2, 0.5, keys=4, head_dim=4, sink_tokens=1, recent_tokens=1, group_size=3,
                                selection="head")) == 0.25 + 1.0  # union of 3 heads' keys, at worst min(3k, L)


def test_costs_per_row_and_head_settings():
    rank = torch.tensor([[4, 64], [16, 32]])
    keep = torch.tensor([[1.0, 0.125], [0.5, 0.25]])
    flops = selection_flops(rank, keep, new_tokens=32, keys=256, head_dim=64, group_size=3)
    traffic = decode_traffic(rank, keep, keys=256, head_dim=64)
    assert flops.total.shape == traffic.shape == (2, 2)
    for b in range(2):
        for g in range(2):
            one = selection_flops(int(rank[b, g]), float(keep[b, g]), new_tokens=32, keys=256, head_dim=64,
                                  group_size=3)
            assert int(one.total) == int(flops.total[b, g])
            k = max(math.ceil(float(keep[b, g]) * 256), 12)
            assert float(traffic[b, g]) == pytest.approx(int(rank[b, g]) / 128 + k / 256, rel=1e-15)
    full = full_attention_flops(new_tokens=32, keys=256, head_dim=64, group_size=3)
    fraction = flops.total / full.total
    assert fraction.shape == (2, 2) and bool((fraction > 0).all())


def test_selection_fractions_count_every_entry_by_its_own_setting():
    """The env's per-row fractions (counted on the grid of distinct settings, looked up per entry) equal the mean
    over (layer, KV head) of each entry's own (9) against full attention, also for the dense reference."""
    import numpy as np

    from drrl_gym.backbone import AttentionGeometry
    from drrl_gym.flops import selection_fractions

    geometry = AttentionGeometry(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16, hidden_size=96)
    rng = np.random.default_rng(3)
    ranks = rng.choice([2, 8, 16], size=(4, 3, 2))
    keeps = rng.choice([0.1, 0.5, 1.0], size=(4, 3, 2))
    ranks[0], keeps[0] = 16, 1.0  # a row of full attention: exactly 1
    full = full_attention_flops(new_tokens=8, keys=40, head_dim=16, group_size=3)
    for dense_reference in (False, True):
        got = selection_fractions(geometry, ranks, keeps, 8, 40, dense_reference=dense_reference)
        expected = np.zeros((2, 4))
        for b, layer, head in np.ndindex(ranks.shape):
            rank, keep = int(ranks[b, layer, head]), float(keeps[b, layer, head])
            one = selection_flops(rank, keep, new_tokens=8, keys=40, head_dim=16, group_size=3)
            if rank == 16 and keep == 1.0:
                scores, total = full.scores, full.total
            elif dense_reference:
                scores = full.scores + one.scoring + one.choosing
                total = full.total + one.scoring + one.choosing + one.rotation
            else:
                scores, total = one.scoring + one.choosing + one.scores, one.total
            expected[:, b] += [float(scores) / float(full.scores) / 6, float(total) / float(full.total) / 6]
        assert got.scores == pytest.approx(expected[0], rel=1e-12)
        assert got.attention == pytest.approx(expected[1], rel=1e-12)
        assert got.scores[0] == pytest.approx(1.0) and got.attention[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------- arguments
def test_bad_arguments_raise_clear_errors():
    generator = torch.Generator().manual_seed(7)
    q, k, v, basis = inputs(1, 2, 2, 3, 5, 4, generator)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, head_dim=4\]"):
        selection_attention(q, k, v, basis, 0, 0.5)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, head_dim=4\]"):
        selection_attention(q, k, v, basis, torch.tensor([2, 5]), 0.5)
    with pytest.raises(ValueError, match="rank must be integers"):
        selection_attention(q, k, v, basis, 2.0, 0.5)
    for keep in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"keep must lie in \(0, 1\]"):
            selection_attention(q, k, v, basis, 2, keep)
    with pytest.raises(ValueError, match="sink_tokens must be a non-negative int"):
        selection_attention(q, k, v, basis, 2, 0.5, sink_tokens=-1)
    with pytest.raises(ValueError, match="recent_tokens must be a non-negative int"):
        selection_attention(q, k, v, basis, 2, 0.5, recent_tokens=1.5)
    with pytest.raises(ValueError, match="unknown selection"):
        selection_attention(q, k, v, basis, 2, 0.5, selection="union")
    with pytest.raises(ValueError, match="shape mismatch"):
        selection_attention(q, k[..., :3], v, basis, 2, 0.5)
    with pytest.raises(ValueError, match="not a multiple"):
        selection_attention(q[:, :3], k, v, basis, 2, 0.5)
    with pytest.raises(ValueError, match="need 1 <= T <= L"):
        selection_attention(q, k[:, :, :2], v[:, :, :2], basis, 2, 0.5)
    with pytest.raises(ValueError, match="basis must have shape"):
        selection_attention(q, k, v, basis[:1], 2, 0.5)
    with pytest.raises(ValueError, match=r"must broadcast to \(B, H_kv\)"):
        selection_attention(q, k, v, basis, torch.tensor([1, 2, 3]), 0.5)
    with pytest.raises(ValueError, match="scaling must be a positive"):
        selection_attention(q, k, v, basis, 2, 0.5, scaling=0.0)
    with pytest.raises(ValueError, match="keep must lie"):
        dropped_mass_bound_table(q, k, (2,), (0.0,))
    with pytest.raises(ValueError, match="rank must lie"):
        dropped_mass_bound_table(q, k, (5,), (0.5,))
    with pytest.raises(ValueError, match="no visible key"):
        dropped_mass_bound(q, k, torch.zeros(1, 4, 3, 5, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="rank must be integers in"):
        selection_flops(0, 0.5, new_tokens=2, keys=4, head_dim=4, group_size=1)


# ------------------------------------------------------------------------------------------------------ device
@pytest.mark.gpu
def test_cuda_matches_cpu_and_sdpa():
    generator = torch.Generator().manual_seed(8)
    q, k, v, basis = inputs(2, 2, 3, 16, 64, 32, generator, torch.float32)
    expected = causal_attention(q, k, v)
    cuda = [x.cuda() for x in (q, k, v, basis)]
    out, _ = selection_attention(*cuda, 32, 1.0)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
    rank, keep = torch.tensor([[4, 32], [8, 16]]), torch.tensor([[0.25, 0.5], [1.0, 0.1]])
    cpu_out, cpu_details = selection_attention(q.double(), k.double(), v.double(), basis.double(), rank, keep,
                                               return_details=True)
    gpu_out, gpu_details = selection_attention(*(x.double() for x in cuda), rank.cuda(), keep.cuda(),
                                               return_details=True)
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gpu_details.dropped_mass_bound.cpu(), cpu_details.dropped_mass_bound, rtol=1e-9,
                               atol=1e-300)
    half, _ = selection_attention(*(x.bfloat16() for x in cuda), rank.cuda(), keep.cuda())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    mean, top = dropped_mass_bound_table(rotate(cuda[0], cuda[3]), rotate(cuda[1], cuda[3]), (4, 32), (0.25, 1.0))
    assert mean.is_cuda and (top[..., -1] == 0).all()


# ------------------------------------------------------------------------------- inside DynamicRankAttention
def test_select_mode_in_the_model_reproduces_it_when_every_key_is_kept(tiny_llama):
    from drrl_gym.lowrank import DynamicRankAttention

    g, model = tiny_llama.geometry, tiny_llama.model
    basis = torch.linalg.qr(torch.randn(g.num_layers, g.num_kv_heads, g.head_dim, g.head_dim,
                                        generator=torch.Generator().manual_seed(0)))[0]
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens).logits
        # Every key forced by the recent window: selection keeps all, whatever rank and keep say.
        every = DynamicRankAttention(g, basis, approximation="select", recent_tokens=40)
        every.set_ranks(4)
        every.set_keep(0.1)
        with every.attached(model):
            kept_all = model(tokens).logits
        few = DynamicRankAttention(g, basis, approximation="select", sink_tokens=1, recent_tokens=1)
        few.set_ranks(4)
        few.set_keep(torch.tensor([[[0.1, 1.0], [0.2, 0.2]]]))  # per (layer, KV head), mixed
        with few.attached(model):
            fewer = model(tokens).logits
    assert (kept_all - reference).abs().max() <= 1e-4
    assert (fewer - reference).abs().max() > 1e-3  # dropping keys changes the output
    with pytest.raises(ValueError, match=r"keep must lie in \(0, 1\]"):
        few.set_keep(0.0)
    with pytest.raises(ValueError, match="needs the calibrated basis"):
        DynamicRankAttention(g, None, mode="exact", approximation="select")


# --------------------------------------------------------------------------------------------- in the env
def test_env_in_selection_mode_masks_by_the_dropped_mass_bound():
    import numpy as np
    from conftest import TINY_ENV

    from drrl_gym.env import DRRLAttentionEnv
    from drrl_gym.flops import selection_fractions

    env = DRRLAttentionEnv(**{**TINY_ENV, "attention": "select", "keep_choices": (0.25, 0.5, 1.0),
                              "epsilon_start": 0.27, "epsilon_end": 0.27})
    settings = env.decisions.settings
    assert settings[-1] == (16, 1.0) and all(keep < 1 for _, keep in settings[:-1])  # keep 1 once: exact attention
    assert env.action_space.nvec.tolist() == [len(settings)] * env.n_units
    assert env.observation_space.shape == (env.n_units * len(env.decisions.feature_names),)
    env.reset(seed=0)
    bounds = env.full_rank_bounds
    assert (0 <= bounds).all() and (bounds <= 1).all() and (bounds[:, -1] == 0).all()
    mask = env.action_masks().reshape(env.n_units, len(settings))
    expected = bounds <= 0.27
    expected[:, -1] = True
    assert np.array_equal(mask, expected) and not mask.all()  # the default-sized threshold binds
    cheapest = np.zeros(env.n_units, dtype=np.int64)
    *_, info = env.step(cheapest)
    assert info["mask_rejections"] == (~mask[:, 0]).sum()  # projected to an allowed setting
    ranks, keeps = info["ranks"], info["keeps"]
    layer_ranks = np.repeat(ranks[None, :, None], 2, axis=2)
    layer_keeps = np.repeat(keeps[None, :, None], 2, axis=2)
    counted = selection_fractions(env.geometry, layer_ranks, layer_keeps, 32, 64)
    assert info["flops_cost"] == pytest.approx(counted.scores[0])
    assert info["flops_saved_scores_executed"] < 0  # the dense reference runs more than full attention
    env.reset(seed=0)  # exact attention on a fresh trajectory: the reference itself
    *_, info = env.step(np.full(env.n_units, len(settings) - 1))
    assert info["fidelity"] == pytest.approx(1.0, abs=1e-5) and info["perturbation"] == 0.0
    assert info["flops_cost"] == pytest.approx(1.0)


def test_bound_over_the_last_queries_only():
    """bound_queries=m takes the mask's bound over a segment's last m queries: 32 by default, or all of a shorter
    segment; fewer change the bounds; anything else is refused with the fix."""
    import numpy as np
    from conftest import TINY_ENV

    from drrl_gym.config import EnvConfig
    from drrl_gym.env import DRRLAttentionEnv

    select = {**TINY_ENV, "attention": "select", "keep_choices": (0.25, 0.5, 1.0)}
    bounds = {}
    for m in (None, 32, 4):  # TINY_ENV's segments hold 32 tokens
        env = DRRLAttentionEnv(**select, bound_queries=m)
        env.reset(seed=0)
        env.step(np.zeros(env.n_units, dtype=np.int64))
        bounds[m] = env.full_rank_bounds
    assert np.array_equal(bounds[None], bounds[32]) and not np.allclose(bounds[None], bounds[4])
    assert EnvConfig(attention="select").bound_queries == 32 and EnvConfig().bound_queries is None
    assert EnvConfig(attention="select", segment_len=16, seq_len=64).bound_queries == 16
    for bad, kwargs in ((0, select), (33, select), (2.5, select), (8, TINY_ENV)):
        with pytest.raises(ValueError, match="bound_queries.*Fix"):
            DRRLAttentionEnv(**kwargs, bound_queries=bad)


def test_bound_from_the_reference():
    """bound_source="reference": the mask and observation read the full-rank reference's table of the segment just
    run, computed with the reference at reset (one forward of every remaining segment) and kept in the reference
    cache. It equals the table the agent's own forward records when the agent runs at full rank and keeps every
    key (the reference trajectory itself), whatever the agent does, on a cached episode too; outside selection mode,
    or an unknown source, is refused with the fix."""
    import math

    import numpy as np
    from conftest import TINY_ENV

    from drrl_gym.env import DRRLAttentionEnv

    select = {**TINY_ENV, "attention": "select", "keep_choices": (0.25, 0.5, 1.0), "bound_queries": 8,
              "epsilon_start": math.inf, "epsilon_end": math.inf}  # no mask: the actions run as chosen

    def episode(env, actions):
        env.reset(seed=0, options={"sequence_index": 1})
        bounds, observations, done = [env.full_rank_bounds], [], False
        for action in actions:
            observation, _, done, _, _ = env.step(action)
            bounds.append(env.full_rank_bounds)
            observations.append(observation)
        assert done
        return np.stack(bounds), np.stack(observations)

    own = DRRLAttentionEnv(**select)
    steps = own.batch.config.n_segments - 1
    exact = np.full((steps, own.n_units), own.action_space.nvec[0] - 1)
    cheap = np.zeros_like(exact)
    bounds_exact, _ = episode(own, exact)
    bounds_cheap, _ = episode(own, cheap)
    assert not np.allclose(bounds_exact[1:], bounds_cheap[1:])  # the agent's own table follows its choices
    reference = DRRLAttentionEnv(**select, bound_source="reference")
    for actions in (cheap, cheap, exact):  # computed, then twice from the reference cache
        bounds, observations = episode(reference, actions)
        np.testing.assert_allclose(bounds, bounds_exact, rtol=1e-4, atol=1e-7)
    assert reference.batch.references.hits == 2
    _, own_observations = episode(own, exact)
    np.testing.assert_allclose(observations, own_observations, atol=1e-5)  # exact actions: the same episode
    for bad, kwargs in (("future", select), ("reference", TINY_ENV)):
        with pytest.raises(ValueError, match="bound_source.*Fix"):
            DRRLAttentionEnv(**kwargs, bound_source=bad)


@pytest.mark.slow
def test_dropped_mass_bound_holds_on_smollm2_activations(smollm2):
    """The bound (7) against the true dropped mass on real post-RoPE activations: every layer of SmolLM2 on held-out
    text, ranks 8 to 32, keeps 1/16 to 1/4, both selection modes."""
    from conftest import CapturingAttention

    from drrl_gym.calibration import load_or_calibrate_basis
    from drrl_gym.corpus import CorpusConfig, load_corpus

    splits = load_corpus(smollm2.tokenizer, CorpusConfig(seq_len=256, calibration_sequences=4, eval_sequences=2))
    basis = load_or_calibrate_basis(smollm2, splits.calibration, splits.fingerprint)
    capture = CapturingAttention(smollm2.geometry, basis)
    with torch.no_grad(), capture.attached(smollm2.model):
        smollm2.model(splits.eval[:1], use_cache=False)
    rows = violations = 0
    worst = 0.0
    with one_thread():
        for layer, (query, key, value, scaling) in capture.captured.items():
            for rank, keep, mode in ((8, 1 / 16, "group"), (16, 1 / 8, "group"), (32, 1 / 4, "head"), (16, 1 / 4, "head")):
                _, details = selection_attention(query.double(), key.double(), value.double(), basis[layer].double(),
                                                 rank, keep, scaling=scaling, selection=mode, return_details=True)
                excess = details.dropped_mass - details.dropped_mass_bound
                violations += int((excess > 1e-9).sum())
                rows += excess.numel()
                worst = max(worst, float((details.dropped_mass / details.dropped_mass_bound.clamp_min(1e-300)).max()))
    assert rows >= 1000 and violations == 0, (rows, violations)
    assert worst <= 1 + 1e-9



def test_bound_queries_benchmark_compares_with_every_query(tmp_path):
    """benchmarks/bound_queries.py: the bound over all of a segment's queries agrees exactly with the reference (every
    query), fewer queries change the bounds; the reference's table (bound_source="reference") is compared too, and
    every run also against the next segment's bound, what its mask predicts."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bound_queries import main

    main(["--model", "tiny-random-llama", "--seq-len", "128", "--segment-len", "32", "--rank-choices", "4", "8", "16",
          "--bound-queries", "32", "4", "--sequences", "0", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    rows, predictions = results["rows"], results["predictions_of_the_next_segment"]
    every = rows["bound_queries=32"]
    assert every["mask_agreement"] == 1.0 and every["bound_relative_error_p90"] == 0
    assert rows["bound_queries=4"]["bound_relative_error_p90"] > 0
    assert predictions["bound_queries=32"] == predictions["every query"]
    assert set(predictions) == set(rows) - {"consecutive segments, every query"} | {"every query"}
    assert rows["bound_source=reference, bound_queries=32"]["mask_entries"] == every["mask_entries"]
    assert (tmp_path / "results.md").read_text().count("| bound_queries=") == 4


def test_selection_forward_benchmark_writes_its_time_and_profile(tmp_path):
    """benchmarks/selection_forward.py on the CPU: the time in results.json, and with --profile the profiler's tables,
    in which the selection operators appear by name."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from selection_forward import main

    main(["--device", "cpu", "--batch", "1", "--queries", "8", "--keys", "32", "--repeats", "2", "--profile",
          "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["ms"] > 0
    profile = (tmp_path / "profile.txt").read_text()
    assert "2 calls, by kernel and input shapes" in profile
    assert "drrl_gym::key_priorities" in profile and "drrl_gym::kept_masks" in profile
